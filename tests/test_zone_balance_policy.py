"""Azure's automatic zone balance as an engine policy driven by explicit time (reference §10)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from scaleset import AutomaticZoneRebalancingPolicy, Controller, Instance, Region
from scaleset.client import Client
from scaleset.errors import InvalidInputError
from scaleset.policies.zone_balance import HEALTH_WAIT_S, QUIET_PERIOD_S, RATE_LIMIT_S
from scaleset.testing.server import ServerThread

from tests.conftest import SIZE, take, zonal_spec

T0 = 1_800_000_000.0
ON = AutomaticZoneRebalancingPolicy(enabled=True)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def recovered(n: int = 10) -> Controller:
    engine = Controller(Region(zones=["1", "2", "3"], fault_domains_per_zone=3))
    engine.create_scale_set(zonal_spec(automatic_zone_rebalancing_policy=ON), now=T0)
    engine.set_zone_available("1", False)
    engine.set_capacity("web", n)
    engine.set_zone_available("1", True)
    return engine


def zones(engine: Controller) -> dict[str | None, int]:
    return dict(sorted(Counter(i.zone for i in engine.get_scale_set("web").instances).items()))


def test_one_vm_at_a_time_after_the_quiet_period_and_once_it_is_healthy() -> None:
    engine = recovered()
    assert engine.advance(T0 + QUIET_PERIOD_S - 1) == []  # changed less than an hour ago
    (started,) = engine.advance(T0 + QUIET_PERIOD_S)
    assert started.kind == "ZoneBalanceStarted" and started.instance_ids == (10,)
    assert zones(engine) == {"1": 1, "2": 5, "3": 5} and engine.capacity("web") == 11
    op = engine.zone_balance_operation("web")
    assert op is not None and (op.from_zone, op.to_zone) == ("2", "1")
    assert engine.advance(T0 + QUIET_PERIOD_S + 60) == []  # waiting for health
    engine.report_health("web", [10], "Healthy")
    (done,) = engine.advance(T0 + QUIET_PERIOD_S + 120)
    assert done.kind == "ZoneBalanceCompleted" and done.instance_ids == (op.source_id,)
    assert zones(engine) == {"1": 1, "2": 4, "3": 5} and engine.capacity("web") == 10
    # At most one operation every 12 hours.
    assert engine.advance(T0 + QUIET_PERIOD_S + RATE_LIMIT_S - 1) == []
    (again,) = engine.advance(T0 + QUIET_PERIOD_S + RATE_LIMIT_S)
    assert again.kind == "ZoneBalanceStarted" and engine.zone_balance_operation("web").from_zone == "3"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("source_health", "kind", "kept_zone"),
    [("Healthy", "ZoneBalanceRolledBack", "2"), ("Unhealthy", "ZoneBalanceReplacedUnhealthySource", "1")],
)
def test_health_wait_outcomes(source_health: str, kind: str, kept_zone: str) -> None:
    engine = recovered()
    engine.advance(T0 + QUIET_PERIOD_S)
    op = engine.zone_balance_operation("web")
    assert op is not None
    engine.report_health("web", [op.source_id], source_health)
    engine.report_health("web", [op.new_id], "Unhealthy")
    assert engine.advance(op.started_at + HEALTH_WAIT_S - 1) == []
    (action,) = engine.advance(op.started_at + HEALTH_WAIT_S)
    assert action.kind == kind
    remaining = {i.instance_id: i.zone for i in engine.get_scale_set("web").instances}
    survivor = op.source_id if kept_zone == "2" else op.new_id
    assert remaining[survivor] == kept_zone and len(remaining) == 10


def test_a_capacity_change_cancels_the_operation_and_keeps_the_new_vm() -> None:
    engine = recovered()
    engine.advance(T0 + QUIET_PERIOD_S)
    engine.set_capacity("web", 12, now=T0 + QUIET_PERIOD_S + 10)
    assert engine.zone_balance_operation("web") is None
    assert engine.capacity("web") == 12 and zones(engine)["1"] == 2
    # And the change restarts the quiet period.
    assert engine.advance(T0 + 2 * QUIET_PERIOD_S) == []


def test_protected_deallocated_and_regional_vms_block_or_are_skipped() -> None:
    engine = Controller(Region(zones=["1", "2", "3"], fault_domains_per_zone=3))
    engine.create_scale_set(zonal_spec(priority="Spot", automatic_zone_rebalancing_policy=ON), now=T0)
    engine.import_instances(
        "web", [Instance(instance_id=i, zone="2", vm_size=SIZE, priority="Spot") for i in range(4)]
    )
    engine.set_protection("web", [0, 1, 2, 3], protect_from_scale_in=True)
    assert engine.advance(T0 + QUIET_PERIOD_S) == []  # nothing in zone 2 may move
    engine.set_protection("web", [3], protect_from_scale_in=False)
    engine.evict("web", [3])  # Deallocate: still not movable
    assert engine.advance(T0 + 2 * QUIET_PERIOD_S) == []
    other = Controller(Region(zones=["1", "2"], fault_domains_per_zone=1))
    other.create_scale_set(zonal_spec(zones=["1", "2"], automatic_zone_rebalancing_policy=ON), now=T0)
    other.import_instances(
        "web",
        [
            *(Instance(instance_id=i, zone="2", vm_size=SIZE) for i in range(4)),
            Instance(instance_id=9, vm_size=SIZE),
        ],
    )
    assert other.advance(T0 + QUIET_PERIOD_S) == []  # a regional VM: automatic zone balance does not run


def test_running_distribution_must_improve() -> None:
    engine = Controller(Region(zones=["1", "2"], fault_domains_per_zone=1))
    engine.create_scale_set(
        zonal_spec(zones=["1", "2"], priority="Spot", automatic_zone_rebalancing_policy=ON), now=T0
    )
    engine.import_instances(
        "web",
        [
            *(Instance(instance_id=i, zone="1", vm_size=SIZE, priority="Spot") for i in range(2)),
            *(
                Instance(instance_id=i, zone="2", vm_size=SIZE, priority="Spot", power_state="deallocated")
                for i in range(2, 6)
            ),
        ],
    )
    # Totals 2 vs 4 are imbalanced, but zone 1 already runs more VMs than zone 2.
    assert engine.advance(T0 + QUIET_PERIOD_S) == []


def test_policy_validation() -> None:
    engine = Controller(Region(zones=["1", "2", "3"]))
    for spec in (
        zonal_spec(zones=["1"], automatic_zone_rebalancing_policy=ON),
        zonal_spec(zone_balance=True, automatic_zone_rebalancing_policy=ON),
        zonal_spec(
            automatic_zone_rebalancing_policy=AutomaticZoneRebalancingPolicy(
                enabled=True, rebalance_strategy="Migrate"
            )
        ),
    ):
        with pytest.raises(InvalidInputError):
            engine.create_scale_set(spec)


def test_operation_in_progress_survives_export_and_restore() -> None:
    engine = recovered()
    engine.advance(T0 + QUIET_PERIOD_S)
    copy = Controller.from_state(engine.export_state())
    assert copy.zone_balance_operation("web") == engine.zone_balance_operation("web")
    copy.report_health("web", [10], "Healthy")
    assert copy.advance(T0 + QUIET_PERIOD_S + 5)[0].kind == "ZoneBalanceCompleted"


def test_the_server_drives_and_logs_policy_actions(tmp_path: Path) -> None:
    clock = Clock()
    db = str(tmp_path / "state.db")
    with (
        ServerThread(db, Region(zones=["1", "2", "3"], fault_domains_per_zone=3), clock=clock) as server,
        Client(server.target) as c,
    ):
        c.set_zone_available("1", False)
        c.create_scale_set(zonal_spec(automatic_zone_rebalancing_policy=ON), 6)
        c.set_zone_available("1", True)
        clock.now = T0 + QUIET_PERIOD_S
        (started,) = server.call(server.control.advance())
        c.report_health("web", [started.instance_ids[0]], "Healthy")
        clock.now += 30
        (done,) = server.call(server.control.advance())
        assert done.kind == "ZoneBalanceCompleted"
        events = [(e.type, e.revision) for e in take(c.watch("web"), 4)]
        assert events == [
            ("ScaleSetCreated", 1),
            ("ZoneBalanceStarted", 2),
            ("InstanceHealthReported", 3),
            ("ZoneBalanceCompleted", 4),
        ]
        before = c.list_instances("web")
    with ServerThread(db, Region(zones=["1", "2", "3"]), clock=clock) as again, Client(again.target) as c:
        assert c.list_instances("web") == before
