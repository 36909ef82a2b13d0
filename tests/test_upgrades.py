"""Upgrades and repairs (reference §7, §8): batches, health gates, pause, MaxSurge, rollback, cancel and
restart, upgrade modes, automatic repairs; a 1,000-instance upgrade with injected failures; over gRPC."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from scaleset import (
    AutomaticRepairsPolicy,
    Controller,
    Region,
    RollingUpgradePolicy,
    ScaleSetSpec,
    Sku,
    UpgradePolicy,
)
from scaleset.client import Client
from scaleset.errors import CapacityError, ConflictError, InvalidInputError
from scaleset.policies.repairs import SUSPEND_AFTER
from scaleset.policies.upgrade import HEALTH_WAIT_S
from scaleset.testing.server import ServerThread

from tests.conftest import SIZE, take

NEW = "Standard_D4s_v5"
T0 = 1_800_000_000.0


def rolling(zones: tuple[str, ...] = ("1",), mode: str = "Rolling", **policy: object) -> ScaleSetSpec:
    return ScaleSetSpec(
        name="web",
        zones=list(zones),
        sku=Sku(name=SIZE),
        upgrade_policy=UpgradePolicy(mode=mode, rolling_upgrade_policy=RollingUpgradePolicy(**policy)),  # type: ignore[arg-type]
    )


def fleet(
    n: int = 10, zones: tuple[str, ...] = ("1",), fds: int = 5, mode: str = "Rolling", **policy: object
) -> Controller:
    engine = Controller(Region(zones=["1", "2", "3"], fault_domains_per_zone=fds), instance_limit=5000)
    engine.create_scale_set(rolling(zones, mode, **policy), n)
    engine.report_health("web", range(n), "Healthy")
    return engine


def new_model(engine: Controller) -> None:
    engine.update_scale_set(dataclasses.replace(engine.get_spec("web"), sku=Sku(name=NEW)))


def versions(engine: Controller) -> dict[int, int | None]:
    return {i.instance_id: i.model_version for i in engine.get_scale_set("web").instances}


def drive(
    engine: Controller, start: float = T0, step: float = 1.0, healthy: bool = True, limit: int = 10_000
) -> float:
    """Advances time, reporting every instance of a batch Healthy, until the upgrade stops."""
    now = start
    for _ in range(limit):
        engine.advance(now)
        u = engine.get_rolling_upgrade("web")
        assert u is not None
        if not u.active:
            return now
        if u.in_batch and healthy:
            engine.report_health("web", u.in_batch, "Healthy")
        now += step
    raise AssertionError("the upgrade did not finish")


def test_twenty_percent_of_ten_is_batches_of_two() -> None:
    engine = fleet()
    new_model(engine)
    engine.advance(T0)
    u = engine.get_rolling_upgrade("web")
    assert u is not None and [len(b) for b in u.batches] == [2, 2, 2, 2, 2]
    assert len(u.in_batch) == 2 and all(versions(engine)[i] == 2 for i in u.in_batch)
    drive(engine)
    u = engine.get_rolling_upgrade("web")
    assert u is not None and u.status == "Completed" and u.progress()["successful_instance_count"] == 10
    assert set(versions(engine).values()) == {2}
    assert {i.vm_size for i in engine.get_scale_set("web").instances} == {NEW}


def test_no_batch_spans_zones_unless_cross_zone_and_fault_domains_are_spread() -> None:
    engine = fleet(12, zones=("1", "2", "3"), fds=2)
    new_model(engine)
    engine.advance(T0)
    u = engine.get_rolling_upgrade("web")
    zone = {i.instance_id: i.zone for i in engine.get_scale_set("web").instances}
    fd = {i.instance_id: i.fault_domain for i in engine.get_scale_set("web").instances}
    assert u is not None and all(len({zone[i] for i in b}) == 1 for b in u.batches)
    assert all(
        len({fd[i] for i in b}) == 2 for b in u.batches
    )  # a batch of 2 never takes a whole fault domain
    cross = fleet(
        12, zones=("1", "2", "3"), fds=2, enable_cross_zone_upgrade=True, max_batch_instance_percent=50
    )
    new_model(cross)
    cross.advance(T0)
    cu = cross.get_rolling_upgrade("web")
    assert cu is not None and [len(b) for b in cu.batches] == [6, 6]


def test_pause_between_batches() -> None:
    engine = fleet(pause_time_between_batches="PT10S")
    new_model(engine)
    engine.advance(T0)
    engine.report_health("web", engine.get_rolling_upgrade("web").in_batch, "Healthy")  # type: ignore[union-attr]
    engine.advance(T0 + 1)  # batch 1 done; pause until T0 + 11
    assert engine.advance(T0 + 10.9) == []
    (started,) = engine.advance(T0 + 11)
    assert started.kind == "RollingUpgradeBatchStarted" and "batch 2 of 5" in started.reason


def test_initializing_waits_and_unknown_counts_as_unhealthy() -> None:
    engine = fleet(max_unhealthy_upgraded_instance_percent=0)
    new_model(engine)
    engine.advance(T0)
    assert engine.advance(T0 + HEALTH_WAIT_S - 1) == []  # still Initializing: wait
    (failed,) = engine.advance(T0 + HEALTH_WAIT_S)
    assert failed.kind == "RollingUpgradeFailed"
    assert (
        engine.get_rolling_upgrade("web").error_code
        == "MaxUnhealthyUpgradedInstancePercentExceededInRollingUpgrade"
    )  # type: ignore[union-attr]


def test_twenty_percent_unhealthy_thresholds_on_ten_instances() -> None:
    # Before each batch: 2 of 10 unhealthy is allowed, 3 stops the upgrade.
    ok = fleet()
    ok.report_health("web", [8, 9], "Unhealthy")
    new_model(ok)
    ok.advance(T0)
    assert ok.get_rolling_upgrade("web").active  # type: ignore[union-attr]
    stop = fleet()
    stop.report_health("web", [7, 8, 9], "Unhealthy")
    new_model(stop)
    stop.advance(T0)
    u = stop.get_rolling_upgrade("web")
    assert (
        u is not None
        and u.status == "Faulted"
        and u.error_code == "MaxUnhealthyInstancePercentExceededInRollingUpgrade"
    )
    assert set(versions(stop).values()) == {1}
    # After each batch: more than 2 of 10 unhealthy among upgraded instances stops it.
    after = fleet(max_unhealthy_instance_percent=100)
    new_model(after)
    now = T0
    for bad_batch in range(3):
        after.advance(now)
        u = after.get_rolling_upgrade("web")
        assert u is not None and u.active, bad_batch
        after.report_health("web", u.in_batch[:1], "Unhealthy")
        after.report_health("web", u.in_batch[1:], "Healthy")
        now += 1
        after.advance(now)
        now += 1
    u = after.get_rolling_upgrade("web")
    assert u is not None and u.status == "Faulted" and u.progress()["failed_instance_count"] == 3
    assert "more than the threshold of 20%" in u.error_message


def test_rollback_on_policy_breach() -> None:
    engine = fleet(max_unhealthy_upgraded_instance_percent=0, rollback_failed_instances_on_policy_breach=True)
    new_model(engine)
    engine.advance(T0)
    u = engine.get_rolling_upgrade("web")
    assert u is not None
    engine.report_health("web", u.in_batch, "Unhealthy")
    engine.advance(T0 + 1)
    u = engine.get_rolling_upgrade("web")
    assert u is not None and u.status == "RolledBack"
    assert set(versions(engine).values()) == {1}


def test_max_surge_never_drops_below_capacity() -> None:
    engine = fleet(max_surge=True)
    new_model(engine)
    now, running = T0, []
    while True:
        engine.advance(now)
        running.append(engine.capacity("web"))
        u = engine.get_rolling_upgrade("web")
        assert u is not None
        if not u.active:
            break
        if u.in_batch:
            engine.report_health("web", u.in_batch, "Healthy")
        now += 1
    assert min(running) >= 10 and max(running) <= 12
    assert engine.capacity("web") == 10 and set(versions(engine).values()) == {2}
    assert min(versions(engine)) >= 10  # every old instance was replaced by a new one


def test_max_surge_falls_back_to_in_place_without_capacity() -> None:
    engine = fleet(max_surge=True)
    engine.set_pool_capacity("1", NEW, "Regular", 0)
    new_model(engine)
    drive(engine)
    assert engine.capacity("web") == 10 and sorted(versions(engine)) == list(range(10))
    assert set(versions(engine).values()) == {2}


def test_prioritize_unhealthy_and_protected_instances() -> None:
    engine = fleet(prioritize_unhealthy_instances=True)
    engine.report_health("web", [7], "Unhealthy")
    engine.set_protection("web", [9], protect_from_scale_in=True, protect_from_scale_set_actions=True)
    new_model(engine)
    engine.advance(T0)
    u = engine.get_rolling_upgrade("web")
    assert u is not None and 7 in u.batches[0]
    assert all(9 not in b for b in u.batches)
    drive(engine, T0 + 1)
    assert versions(engine)[9] == 1 and versions(engine)[7] == 2


def test_cancel_and_restart() -> None:
    engine = fleet()
    new_model(engine)
    engine.advance(T0)
    engine.report_health("web", engine.get_rolling_upgrade("web").in_batch, "Healthy")  # type: ignore[union-attr]
    engine.advance(T0 + 1)
    cancelled = engine.cancel_rolling_upgrade("web", now=T0 + 2)
    assert cancelled.status == "Cancelled"
    assert engine.advance(T0 + 3) == []
    assert sum(v == 2 for v in versions(engine).values()) == 2
    with pytest.raises(ConflictError):
        engine.cancel_rolling_upgrade("web")
    restarted = engine.start_rolling_upgrade("web", now=T0 + 4)
    assert sum(len(b) for b in restarted.batches) == 8
    with pytest.raises(ConflictError) as err:
        engine.start_rolling_upgrade("web", now=T0 + 5)
    assert err.value.code == "RollingUpgradeInProgress"
    drive(engine, T0 + 5)
    assert set(versions(engine).values()) == {2}


def test_manual_and_automatic_modes() -> None:
    manual = fleet(mode="Manual")
    new_model(manual)
    assert manual.advance(T0) == [] and set(versions(manual).values()) == {1}
    manual.set_capacity("web", 11)
    assert versions(manual)[10] == 2  # new instances get the latest model
    manual.upgrade_instances("web", [0, 1])
    assert versions(manual)[0] == versions(manual)[1] == 2
    automatic = fleet(mode="Automatic")
    automatic.set_protection("web", [3], protect_from_scale_in=True, protect_from_scale_set_actions=True)
    new_model(automatic)
    assert [i for i, v in versions(automatic).items() if v == 1] == [3]


def test_policy_validation() -> None:
    engine = Controller(Region(zones=["1"]))
    for bad in (
        rolling(max_batch_instance_percent=4),
        rolling(max_unhealthy_instance_percent=101),
        rolling(pause_time_between_batches="10 seconds"),
        rolling(mode="Sometimes"),
        dataclasses.replace(
            rolling(), automatic_repairs_policy=AutomaticRepairsPolicy(enabled=True, grace_period="PT5M")
        ),
        dataclasses.replace(
            rolling(), automatic_repairs_policy=AutomaticRepairsPolicy(enabled=True, repair_action="Pray")
        ),
    ):
        with pytest.raises(InvalidInputError):
            engine.create_scale_set(bad)


def repairing(n: int, action: str = "Replace", grace: str = "PT10M") -> Controller:
    engine = Controller(Region(zones=["1"], fault_domains_per_zone=5))
    spec = dataclasses.replace(
        rolling(mode="Manual"), automatic_repairs_policy=AutomaticRepairsPolicy(True, grace, action)
    )
    engine.create_scale_set(spec, n, now=T0)
    engine.report_health("web", range(n), "Healthy")
    return engine


def test_repairs_wait_for_the_grace_period_and_replace_with_the_latest_model() -> None:
    engine = repairing(10)
    new_model(engine)
    engine.report_health("web", [4], "Unhealthy")
    assert engine.advance(T0 + 599) == []
    (repair,) = engine.advance(T0 + 600)
    assert repair.kind == "InstancesRepaired" and repair.instance_ids == (10,)
    assert 4 not in versions(engine) and versions(engine)[10] == 2
    # The replacement gets its own grace period.
    engine.report_health("web", [10], "Unknown")
    assert engine.advance(T0 + 1199) == []


def test_repairs_batch_limits_protection_and_actions() -> None:
    small = repairing(10)
    small.report_health("web", [1, 2, 3], "Unhealthy")
    small.set_protection("web", [1], protect_from_scale_in=True)
    (first,) = small.advance(T0 + 600)
    assert first.instance_ids == (10,)  # one at a time under 20 instances; 1 is protected
    assert small.advance(T0 + 601) == []  # the repair is still in progress
    small.report_health("web", [10], "Healthy")
    ended, second = small.advance(T0 + 602)
    assert (ended.kind, ended.instance_ids) == ("RepairSucceeded", (10,))
    assert second.kind == "InstancesRepaired" and len(second.instance_ids) == 1
    big = repairing(100, action="Restart")
    big.report_health("web", range(20), "Unhealthy")
    (batch,) = big.advance(T0 + 600)
    assert batch.instance_ids == (0, 1, 2, 3, 4)  # 5% of 100, restarted in place
    assert {i.health for i in big.get_scale_set("web").instances if i.instance_id < 5} == {"Initializing"}
    reimage = repairing(10, action="Reimage")
    new_model(reimage)
    reimage.report_health("web", [6], "Unhealthy")
    reimage.advance(T0 + 600)
    assert versions(reimage)[6] == 2


def test_repeated_failed_repairs_suspend_the_service() -> None:
    engine = repairing(5, action="Restart")
    engine.report_health("web", [0], "Unhealthy")
    now = T0 + 600
    kinds = []
    for _ in range(SUSPEND_AFTER + 1):
        kinds += [a.kind for a in engine.advance(now)]
        engine.report_health("web", [0], "Unhealthy")
        now += 600
    assert kinds == [
        "InstancesRepaired",
        *["RepairFailed", "InstancesRepaired"] * (SUSPEND_AFTER - 1),
        "RepairFailed",
        "AutomaticRepairsSuspended",
    ]
    assert engine.repairs_service_state("web") == "Suspended"
    assert engine.advance(now + 600) == []
    engine.set_repairs_service_state("web", "Running")
    assert engine.advance(now + 1200)[0].kind == "InstancesRepaired"


def test_a_repair_that_ends_is_an_action_even_when_nothing_new_is_repaired() -> None:
    """The control plane logs an advance only when it did something. A repair ending (the instance healthy
    again, or still unhealthy after its grace period) changes the policy's state (what is in repair, the
    failures in a row), so it is an action of its own: otherwise a restart would end it at the next logged
    advance instead, by the health of that time (a success replayed as a failure)."""
    engine = repairing(5, action="Restart")
    engine.report_health("web", [0], "Unhealthy")
    (repair,) = engine.advance(T0 + 600)
    assert repair.kind == "InstancesRepaired"
    engine.report_health("web", [0], "Healthy")
    (ended,) = engine.advance(T0 + 700)
    assert (ended.kind, ended.instance_ids) == ("RepairSucceeded", (0,))
    engine.report_health("web", [1], "Unhealthy")
    engine.advance(T0 + 1300)  # 1 restarted: Initializing
    assert engine.advance(T0 + 1899) == []  # its grace period not over: still in repair
    (failed,) = engine.advance(T0 + 1900)  # not Healthy by then
    assert failed.kind == "RepairFailed" and failed.instance_ids == (1,)


def test_repairs_forget_instances_deleted_since_their_repair() -> None:
    """When each instance was last repaired is kept for its grace period; an instance deleted since is
    forgotten at the next repair, so the record stays within the scale set's size."""
    engine = repairing(5)
    repaired_at = lambda: engine.export_state()["policies"]["repairs"]["web"]["repaired_at"]  # noqa: E731
    engine.report_health("web", [0], "Unhealthy")
    (repair,) = engine.advance(T0 + 600)
    assert repair.instance_ids == (5,) and set(repaired_at()) == {"5"}
    engine.delete_instances("web", [5], now=T0 + 700)
    engine.report_health("web", [1], "Unhealthy")
    ended, repair = engine.advance(T0 + 1300)
    assert ended.kind == "RepairEnded" and ended.instance_ids == (5,)
    assert set(repaired_at()) == set(map(str, repair.instance_ids))


def test_a_repair_by_replacement_waits_while_the_instances_zone_is_down() -> None:
    """The replacement goes in the instance's zone; while that zone is down the repair waits, as for a
    full pool. (It failed with InvalidParameter, which stopped the policy loop's round for every scale set
    after this one, each round, until the zone came back.)"""
    engine = repairing(5)
    engine.report_health("web", [0], "Unhealthy")
    engine.set_zone_available("1", False, now=T0)
    assert engine.advance(T0 + 600) == []
    # What the repair met: a move into a zone that is down is a shortage, with what to do about it
    with pytest.raises(CapacityError) as down:
        engine.engine.apply_rebalance_moves("web", [("1", 0, SIZE, "Regular")], [0])
    assert down.value.code == "ZonalAllocationFailed" and "SetZoneAvailability" in str(down.value)
    engine.set_zone_available("1", True, now=T0 + 700)
    (repair,) = engine.advance(T0 + 700)
    assert repair.kind == "InstancesRepaired" and repair.instance_ids == (5,)


def test_thousand_instances_with_injected_failures_stop_roll_back_and_resume() -> None:
    engine = fleet(
        1000,
        zones=("1", "2", "3"),
        max_unhealthy_instance_percent=100,
        max_unhealthy_upgraded_instance_percent=5,
        rollback_failed_instances_on_policy_breach=True,
    )
    new_model(engine)
    now = T0
    bad = set(range(300, 360))  # instances whose new model fails their health probe
    while True:
        engine.advance(now)
        u = engine.get_rolling_upgrade("web")
        assert u is not None
        if not u.active:
            break
        engine.report_health("web", [i for i in u.in_batch if i not in bad], "Healthy")
        engine.report_health("web", [i for i in u.in_batch if i in bad], "Unhealthy")
        now += 1
    assert u.status == "RolledBack" and u.progress()["failed_instance_count"] > 50
    rolled_back = [i for i in u.failed]
    assert all(versions(engine)[i] == 1 for i in rolled_back)
    # Operators fix the image: the same instances now come up healthy; a restart resumes the rest.
    engine.report_health("web", rolled_back, "Healthy")
    bad.clear()
    engine.start_rolling_upgrade("web", now=now + 1)
    drive(engine, now + 1)
    u = engine.get_rolling_upgrade("web")
    assert u is not None and u.status == "Completed" and set(versions(engine).values()) == {2}


def test_upgrades_over_grpc(tmp_path: Path) -> None:
    clock = [T0]
    db = str(tmp_path / "state.db")
    with (
        ServerThread(db, Region(zones=["1"], fault_domains_per_zone=5), clock=lambda: clock[0]) as server,
        Client(server.target) as c,
    ):
        c.create_scale_set(rolling(), 4)
        c.report_health("web", range(4), "Healthy")
        assert c.get_rolling_upgrade("web") is None  # as Controller.get_rolling_upgrade
        c.update_scale_set(dataclasses.replace(rolling(), sku=Sku(name=NEW)))
        server.call(server.control.advance())
        status = c.get_rolling_upgrade("web")
        assert status is not None
        assert status.status == "RollingForward" and len(status.batches) == 4 and status.in_batch == [0]
        c.report_health("web", [0], "Healthy")
        clock[0] += 1
        server.call(server.control.advance())
        cancelled = c.cancel_rolling_upgrade("web")
        assert cancelled.status == "Cancelled" and cancelled.progress()["successful_instance_count"] == 1
        restarted = c.start_rolling_upgrade("web")
        assert restarted.status == "RollingForward" and len(restarted.batches) == 3
        c.upgrade_instances("web", [3])
        kinds = [e.type for e in take(c.watch("web"), 9)]
        assert (
            "RollingUpgradeStarted" in kinds
            and "RollingUpgradeBatchCompleted" in kinds
            and "RollingUpgradeCancelled" in kinds
        )
        c.set_repairs_service_state("web", "Running")
        with pytest.raises(InvalidInputError):
            c.set_repairs_service_state("web", "Asleep")
    with ServerThread(db, Region(zones=["1"]), clock=lambda: clock[0]) as again, Client(again.target) as c:
        assert c.get_rolling_upgrade("web").status == "RollingForward"  # type: ignore[union-attr]
        assert [i.model_version for i in c.list_instances("web")] == [2, 1, 1, 2]
