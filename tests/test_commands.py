"""Typed commands: every logged command round-trips through its log encoding, and entries written before the
commands existed (which carried their time inside) still decode, so existing databases replay."""

from __future__ import annotations

import pytest
from scaleset import (
    AutoscaleCapacity,
    AutoscaleProfile,
    AutoscaleSetting,
    Controller,
    Instance,
    MetricTrigger,
    Region,
    ScaleAction,
    ScaleRule,
)
from scaleset import commands as cmd
from scaleset.errors import InvalidInputError

from tests.conftest import SIZE, zonal_spec

T0 = 1_800_000_000.0

EXAMPLES: list[cmd.Command] = [
    cmd.CreateScaleSet(zonal_spec(), 3),
    cmd.UpdateScaleSet(zonal_spec()),
    cmd.DeleteScaleSet("web"),
    cmd.SetCapacity("web", 5),
    cmd.ImportInstances("web", (Instance(instance_id=9, zone="1", vm_size=SIZE),)),
    cmd.DeleteInstances("web", (1, 2)),
    cmd.EvictInstances("web", (1,)),
    cmd.SetProtection("web", (1,), True, False),
    cmd.UpgradeInstances("web", (1,)),
    cmd.ReportHealth("web", (((1, 2), "Healthy"), ((3,), "Unhealthy"))),
    cmd.RebalanceMoves("web", (("1", 0, SIZE, "Regular"),), (4,)),
    cmd.Advance("web"),
    cmd.StartRollingUpgrade("web"),
    cmd.CancelRollingUpgrade("web"),
    cmd.SetRepairsServiceState("web", "Suspended"),
    cmd.SetZoneAvailability("2", False),
    cmd.SetPoolCapacity("1", SIZE, "Spot", 10, 0.02),
    cmd.SetAutoscaleSetting(
        "web",
        AutoscaleSetting(
            [
                AutoscaleProfile(
                    "default",
                    AutoscaleCapacity(1, 5, 2),
                    (ScaleRule(MetricTrigger("cpu", "GreaterThan", 70.0), ScaleAction("Increase")),),
                )
            ]
        ),
    ),
    cmd.DeleteAutoscaleSetting("web"),
    cmd.ReportMetrics("web", (("cpu", (T0, T0 + 60), (50.0, 60.5)),)),
    cmd.SetExecutionMode("Executors"),
    cmd.SetCoreQuota("standardDSv5Family", 40),
    cmd.AcknowledgeScheduledEvent("web", 3),
    cmd.CompleteLifecycleAction("web", 4, "drain", "Abandon"),
    cmd.RecordLifecycleActionHeartbeat("web", 4, "drain"),
    cmd.ReportOperation("web", 7, False, "ZonalAllocationFailed", "zone 1 is out of D2s_v5", "", ""),
]


@pytest.mark.parametrize("command", EXAMPLES, ids=[type(c).__name__ for c in EXAMPLES])
def test_every_logged_command_round_trips(command: cmd.Command) -> None:
    assert cmd.decode(command.encode()) == command


def test_every_registered_command_has_an_example() -> None:
    assert {c.op for c in EXAMPLES} == set(cmd.COMMANDS)


def test_entries_of_the_old_log_format_replay() -> None:
    controller = Controller(Region(zones=["1", "2", "3"]))
    old_log = [
        {"op": "create", "spec": zonal_spec().to_dict(), "capacity": 3},
        {"op": "health", "name": "web", "reports": [[[0, 1, 2], "Healthy"]]},
        {"op": "start_upgrade", "name": "web", "now": T0},
        {"op": "advance", "name": "web", "now": T0 + 1},
    ]
    for entry in old_log:
        controller.execute(cmd.decode(entry), T0)
    upgrade = controller.get_rolling_upgrade("web")
    assert controller.capacity("web") == 3 and upgrade is not None and upgrade.status == "Completed"


def test_dry_runs_are_not_logged_and_bad_arguments_name_their_field() -> None:
    assert not cmd.SetCapacity("web", 1, dry_run=True).mutates and cmd.SetCapacity("web", 1).mutates
    assert not cmd.Rebalance("web").mutates
    with pytest.raises(InvalidInputError) as caught:
        Controller(Region(zones=["1"])).execute(cmd.Rebalance("web", max_surge=0))
    assert caught.value.field == "max_surge"
    with pytest.raises(InvalidInputError, match="unknown command"):
        cmd.decode({"op": "teleport"})
