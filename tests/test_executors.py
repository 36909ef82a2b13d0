"""Plans meet reality: the lifecycle ledger in process, and executors over gRPC (the fake cloud and
real local processes)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from scaleset.client import Client
from scaleset.controller import Controller
from scaleset.errors import CapacityError, ConflictError, InvalidInputError
from scaleset.executor import ApplicationHealth, Executor, FakeCloud, LocalProcesses
from scaleset.model import (
    AutomaticRepairsPolicy,
    AutoscaleCapacity,
    AutoscaleProfile,
    AutoscaleSetting,
    LifecycleHook,
    PriorityMixPolicy,
    Region,
    ScaleSetSpec,
    Sku,
    SkuProfile,
    SpotRestorePolicy,
    UpgradePolicy,
    VmSize,
)
from scaleset.policies.lifecycle import BACKOFF_BASE_S, MAX_ATTEMPTS, UNAVAILABLE_TTL_S
from scaleset.testing.server import ServerThread

from tests.conftest import wait_until

SIZE = "Standard_D2s_v5"
REGION = Region(zones=("1", "2", "3"), fault_domains_per_zone=1)


def spec(name: str = "web", **changes: object) -> ScaleSetSpec:
    fields: dict[str, object] = {"zones": ("1", "2", "3"), "sku": Sku(SIZE), **changes}
    return ScaleSetSpec(name=name, **fields)  # type: ignore[arg-type]


def executors_controller() -> Controller:
    c = Controller(REGION)
    c.set_execution_mode("Executors", now=0)
    return c


def ops(c: Controller) -> list[tuple[str, int, str | None]]:
    return [(o.kind, o.instance_id, o.zone) for o in c.pending_operations()]


def states(c: Controller, name: str = "web") -> dict[int, str]:
    cols = c.instance_columns(name)
    return dict(zip(cols["instance_id"], cols["provisioning_state"], strict=True))


def op_of(c: Controller, instance_id: int, kind: str = "Create") -> int:
    return next(
        o.operation_id for o in c.pending_operations() if o.instance_id == instance_id and o.kind == kind
    )


# ----- in process ------------------------------------------------------------------------------------


def test_immediate_mode_is_unchanged_every_instance_succeeded_and_no_operations() -> None:
    c = Controller(REGION)
    c.create_scale_set(spec(), 3, now=1)
    assert set(states(c).values()) == {"Succeeded"}
    assert c.pending_operations() == []
    assert c.engine.journal is None


def test_executors_mode_turns_every_change_into_an_operation_and_marks_instances() -> None:
    c = executors_controller()
    c.create_scale_set(spec(), 3, now=1)
    assert ops(c) == [("Create", 0, "1"), ("Create", 1, "2"), ("Create", 2, "3")]
    assert set(states(c).values()) == {"Creating"}
    assert c.report_operation("web", op_of(c, 1), True, address="10.0.0.5", provider_id="vm-1", now=2)
    assert states(c)[1] == "Succeeded"
    assert c.policies.lifecycle.addresses["web"][1] == ("10.0.0.5", "vm-1")
    # a scale-in of an instance still being created cancels its create and deletes it
    c.set_capacity("web", 2, now=3)
    assert ("Create", 2, "3") not in ops(c) and ("Delete", 2, "3") in ops(c)
    report = c.fleet_report("web")
    assert report.desired_capacity == 2 and report.provisioning_states == {"Creating": 1, "Succeeded": 1}


def test_an_outcome_reported_twice_is_applied_once() -> None:
    c = executors_controller()
    c.create_scale_set(spec(), 1, now=1)
    op = op_of(c, 0)
    assert c.report_operation("web", op, True, now=2) is not None
    assert c.report_operation("web", op, False, "AllocationFailed", now=3) is None
    assert states(c) == {0: "Succeeded"} and c.pending_operations() == []


def test_a_zone_out_of_capacity_is_skipped_for_its_ttl_and_the_instance_placed_in_another_zone() -> None:
    c = executors_controller()
    c.create_scale_set(spec(), 3, now=1)
    actions = c.report_operation("web", op_of(c, 0), False, "ZonalAllocationFailed", "zone 1 is full", now=2)
    assert actions is not None and actions[0].kind == "InstancesReplaced"
    assert "ZonalAllocationFailed" in actions[0].reason and "skipped for 180 s" in actions[0].reason
    (new,) = actions[0].instance_ids
    assert 0 not in states(c) and states(c)[new] == "Creating"
    assert c.pending_operations()[-1].zone != "1"  # best-effort zone balance takes another zone
    assert c.fleet_report("web").unavailable_pools == (("1", SIZE, "Regular", 2 + UNAVAILABLE_TTL_S),)
    # while the pool is skipped, a scale-out avoids zone 1; after the TTL it is used again
    c.set_capacity("web", 6, now=3)
    assert all(o.zone != "1" for o in c.pending_operations())
    assert [a.kind for a in c.advance(2 + UNAVAILABLE_TTL_S, "web")] == ["PoolAvailableAgain"]
    c.set_capacity("web", 7, now=2 + UNAVAILABLE_TTL_S)
    assert c.pending_operations()[-1].zone == "1"


def test_strict_zone_balance_does_not_move_to_another_zone_and_reports_the_shortfall() -> None:
    c = executors_controller()
    c.create_scale_set(spec(zone_balance=True), 3, now=1)
    actions = c.report_operation("web", op_of(c, 0), False, "ZonalAllocationFailed", now=2)
    assert actions is not None and actions[0].kind == "ReplacementDeferred"
    report = c.fleet_report("web")
    assert report.shortfall == 1 and report.desired_capacity == 3 and report.retry_at == 2 + BACKOFF_BASE_S
    assert report.last_error_code  # the placement's refusal, in Azure's words
    # retried with backoff (still refused while zone 1 is skipped), then placed once the pool is back
    assert [a.kind for a in c.advance(2 + BACKOFF_BASE_S, "web")] == ["ReplacementDeferred"]
    assert c.fleet_report("web").retry_at == 2 + 3 * BACKOFF_BASE_S  # 5 s, then 10 s
    kinds = [a.kind for a in c.advance(2 + UNAVAILABLE_TTL_S, "web")]
    assert kinds == ["PoolAvailableAgain", "InstancesReplaced"]
    assert c.pending_operations()[-1].zone == "1" and c.fleet_report("web").shortfall == 0


def test_a_quota_failure_places_nothing_until_the_backoff_passes() -> None:
    c = executors_controller()
    c.create_scale_set(spec(), 2, now=1)
    actions = c.report_operation("web", op_of(c, 0), False, "OperationNotAllowed", "core quota", now=2)
    assert actions is not None and actions[0].kind == "ReplacementDeferred"
    assert c.fleet_report("web").unavailable_pools == ()  # quota is not a pool's capacity
    assert c.advance(3, "web") == []
    assert [a.kind for a in c.advance(2 + BACKOFF_BASE_S, "web")] == ["InstancesReplaced"]


def test_other_failures_retry_the_same_operation_then_place_the_instance_again() -> None:
    c = executors_controller()
    c.create_scale_set(spec(), 1, now=1)
    op = op_of(c, 0)
    for attempt in range(1, MAX_ATTEMPTS):
        actions = c.report_operation("web", op, False, "InternalExecutionError", now=1 + attempt)
        assert actions is not None and actions[0].kind == "OperationRetried"
        (pending,) = c.pending_operations()
        assert pending.operation_id == op and pending.attempt == attempt + 1
        assert pending.not_before > 1 + attempt
    actions = c.report_operation("web", op, False, "InternalExecutionError", now=10)
    assert actions is not None and actions[0].kind == "InstancesReplaced"


def test_a_user_capacity_change_replaces_the_shortfall() -> None:
    c = executors_controller()
    c.create_scale_set(spec(zone_balance=True), 3, now=1)
    c.report_operation("web", op_of(c, 0), False, "ZonalAllocationFailed", now=2)
    assert c.fleet_report("web").shortfall == 1
    c.set_capacity("web", 2, now=3)
    assert c.fleet_report("web").shortfall == 0 and c.fleet_report("web").desired_capacity == 2


def test_deleting_a_scale_set_cancels_its_creates_and_deletes_every_instance() -> None:
    c = executors_controller()
    c.create_scale_set(spec(), 3, now=1)
    c.report_operation("web", op_of(c, 0), True, now=2)
    c.delete_scale_set("web", now=3)
    assert sorted(ops(c)) == [("Delete", 0, "1"), ("Delete", 1, "2"), ("Delete", 2, "3")]


def test_a_recreated_scale_set_waits_for_the_old_deletes_of_its_instance_names() -> None:
    c = executors_controller()
    c.create_scale_set(spec(), 2, now=1)
    for o in c.pending_operations():
        c.report_operation("web", o.operation_id, True, now=2)
    c.delete_scale_set("web", now=3)
    c.create_scale_set(spec(), 2, now=4)  # web_0 and web_1 again
    ledger = c.policies.lifecycle
    ready = {(o.kind, o.instance_id): ledger.ready(o) for o in c.pending_operations()}
    assert ready == {("Delete", 0): True, ("Delete", 1): True, ("Create", 0): False, ("Create", 1): False}
    old = next(o for o in c.pending_operations() if o.kind == "Delete" and o.instance_id == 0)
    c.report_operation("web", old.operation_id, True, now=5)
    assert ledger.ready(next(o for o in c.pending_operations() if o.kind == "Create" and o.instance_id == 0))


def behind_the_model(c: Controller) -> None:
    """Two instances of "web", created (each executor's create reported done), then a new model (a size)."""
    c.create_scale_set(spec(), 2, now=1)
    for o in c.pending_operations():
        c.report_operation("web", o.operation_id, True, now=2)
    c.update_scale_set(spec(sku=Sku("Standard_D4s_v5")), now=3)


def test_upgrades_and_restarts_are_operations_and_instances_are_updating_meanwhile() -> None:
    c = executors_controller()
    behind_the_model(c)
    c.upgrade_instances("web", [1], now=4)
    (op,) = c.pending_operations()
    assert (op.kind, op.instance_id, op.model_version) == ("Reimage", 1, 2)
    assert states(c) == {0: "Succeeded", 1: "Updating"}
    c.report_operation("web", op.operation_id, False, "VMExtensionProvisioningError", now=5)
    assert states(c)[1] == "Failed"


def test_an_instance_listed_twice_for_an_upgrade_is_upgraded_once_in_either_mode() -> None:
    # Executors mode used to upgrade the instance, then refuse the call while making its operation: the
    # refused call changed the state (found by the fuzz). Immediate mode always accepted it.
    c = executors_controller()
    behind_the_model(c)
    c.upgrade_instances("web", [1, 1], now=4)
    assert [(o.kind, o.instance_id) for o in c.pending_operations()] == [("Reimage", 1)]
    immediate = Controller(REGION)
    behind_the_model(immediate)
    immediate.upgrade_instances("web", [1, 1], now=4)
    assert [i.model_version for i in immediate.engine.get_scale_set("web").instances] == [1, 2]


def test_the_ledger_survives_a_snapshot_and_leaving_executors_mode_completes_it() -> None:
    c = executors_controller()
    c.create_scale_set(spec(zone_balance=True), 3, now=1)
    c.report_operation("web", op_of(c, 0), False, "ZonalAllocationFailed", now=2)
    restored = Controller.from_state(json.loads(json.dumps(c.export_state())))
    assert restored.pending_operations() == c.pending_operations()
    assert restored.fleet_report("web") == c.fleet_report("web")
    # the skipped pool is skipped after the restore too: the retry is refused the same way
    assert [a.kind for a in restored.advance(2 + BACKOFF_BASE_S, "web")] == ["ReplacementDeferred"]
    restored.set_execution_mode("Immediate", now=10)
    assert restored.pending_operations() == [] and set(states(restored).values()) == {"Succeeded"}


def test_bad_reports_and_modes_are_refused_with_the_field() -> None:
    c = executors_controller()
    c.create_scale_set(spec(), 1, now=1)
    with pytest.raises(InvalidInputError) as e:
        c.report_operation("web", op_of(c, 0), False, now=2)
    assert e.value.field == "error_code"
    with pytest.raises(InvalidInputError) as e:
        c.report_operation("web", op_of(c, 0), True, address="x" * 600, now=2)
    assert e.value.field == "address"
    with pytest.raises(InvalidInputError) as e:
        c.set_execution_mode("Eventually")
    assert e.value.field == "mode"


# ----- Spot: price evictions with notice, Try & restore -------------------------------------------------


def spot_spec(**changes: object) -> ScaleSetSpec:
    return spec(**{"priority": "Spot", "eviction_policy": "Delete", "max_price": 0.05, **changes})


def test_a_spot_price_above_max_price_schedules_a_preempt_30_s_ahead_then_evicts() -> None:
    c = Controller(REGION)
    c.create_scale_set(spot_spec(), 3, now=1)
    c.create_scale_set(spec("steady", priority="Spot", max_price=-1.0), 3, now=1)
    actions = c.set_pool_capacity("1", SIZE, "Spot", None, price=0.08, now=10)
    (notice,) = actions  # "steady" (max price -1) is never evicted for price
    assert notice.kind == "EvictionScheduled" and notice.instance_ids == (0,) and "0.08" in notice.reason
    (event,) = c.fleet_report("web").scheduled_events
    assert event.event_type == "Preempt" and event.not_before == 40 and event.instance_ids == (0,)
    assert c.advance(39, "web") == [] and c.capacity("web") == 3  # not before its time
    assert [a.kind for a in c.advance(40, "web")] == ["InstancesEvicted"]
    assert c.capacity("web") == 2 and c.fleet_report("web").scheduled_events == ()
    # the price falling back does not bring the VM back (Azure: not restarted automatically)
    c.set_pool_capacity("1", SIZE, "Spot", None, price=0.01, now=50)
    assert c.advance(200, "web") == [] and c.capacity("web") == 2


def test_a_spot_price_above_max_price_at_create_is_azures_error() -> None:
    c = Controller(REGION)
    for zone in ("1", "2", "3"):
        c.set_pool_capacity(zone, SIZE, "Spot", None, price=0.08, now=0)
    with pytest.raises(CapacityError) as e:
        c.create_scale_set(spot_spec(), 1, now=1)
    assert e.value.code == "SpotPriceGreaterThanProvidedMaxPrice"
    assert "'0.05 USD' is lower than the current spot price '0.08 USD'" in str(e.value)
    c.set_pool_capacity("2", SIZE, "Spot", None, price=0.04, now=2)
    c.create_scale_set(spot_spec(), 1, now=3)
    assert c.instance_columns("web")["zone"] == ["2"]


def test_an_acknowledged_notice_evicts_at_once_and_executors_carry_it_out() -> None:
    c = executors_controller()
    c.create_scale_set(spot_spec(eviction_policy="Deallocate"), 3, now=1)
    for o in c.pending_operations():
        c.report_operation("web", o.operation_id, True, now=2)
    c.set_pool_capacity("2", SIZE, "Spot", None, price=0.5, now=3)
    (event,) = c.fleet_report("web").scheduled_events
    actions = c.acknowledge_scheduled_event("web", event.event_id, now=4)
    assert actions is not None and actions[0].kind == "InstancesEvicted"
    assert c.acknowledge_scheduled_event("web", event.event_id, now=5) is None  # once
    (op,) = c.pending_operations()
    assert (op.kind, op.instance_id) == ("Deallocate", 1)
    cols = c.instance_columns("web")
    assert cols["power_state"][1] == "deallocated" and cols["provisioning_state"][1] == "Updating"
    c.report_operation("web", op.operation_id, True, now=6)
    assert c.instance_columns("web")["provisioning_state"][1] == "Succeeded"


def test_try_and_restore_brings_back_capacity_evictions_until_its_timeout() -> None:
    c = Controller(REGION)
    restore = SpotRestorePolicy(enabled=True, restore_timeout="PT10M")
    c.create_scale_set(spot_spec(spot_restore_policy=restore), 6, now=0)
    c.set_pool_capacity("1", SIZE, "Spot", 0, now=1)
    c.set_pool_capacity("2", SIZE, "Spot", 0, now=1)
    c.set_pool_capacity("3", SIZE, "Spot", 0, now=1)
    c.evict("web", [0, 1], now=10)  # the cloud took them back (capacity)
    assert c.fleet_report("web").restoring == (2, 610)
    assert c.advance(69, "web") == []  # tried once a minute
    assert [a.kind for a in c.advance(70, "web")] == ["SpotRestoreDeferred"]  # no Spot capacity yet
    c.set_pool_capacity("1", SIZE, "Spot", None, now=100)
    (restored,) = c.advance(130, "web")
    assert restored.kind == "SpotRestored" and len(restored.instance_ids) == 2 and c.capacity("web") == 6
    # a later eviction whose capacity never returns is given up at the timeout
    c.set_pool_capacity("1", SIZE, "Spot", 0, now=200)
    c.evict("web", [restored.instance_ids[0]], now=200)
    kinds = [a.kind for t in range(260, 900, 60) for a in c.advance(t, "web")]
    assert kinds[-1] == "SpotRestoreTimedOut" and set(kinds[:-1]) == {"SpotRestoreDeferred"}
    assert c.fleet_report("web").restoring is None and c.capacity("web") == 5


def test_try_and_restore_is_for_spot_sets_and_leaves_autoscaled_sets_to_autoscale() -> None:
    c = Controller(REGION)
    with pytest.raises(InvalidInputError) as e:
        c.create_scale_set(spec(spot_restore_policy=SpotRestorePolicy(enabled=True)), 1, now=0)
    assert (e.value.code, e.value.field) == (
        "SpotRestorationIsSupportedOnlyForAzureSpotScaleSets",
        "spot_restore_policy.enabled",
    )
    with pytest.raises(InvalidInputError) as e:
        c.create_scale_set(spot_spec(spot_restore_policy=SpotRestorePolicy(True, "P90D")), 1, now=0)
    assert e.value.field == "spot_restore_policy.restore_timeout"
    c.create_scale_set(spot_spec(spot_restore_policy=SpotRestorePolicy(enabled=True)), 3, now=0)
    c.set_autoscale_setting(
        "web",
        AutoscaleSetting([AutoscaleProfile("default", AutoscaleCapacity(1, 5, 3), ())]),
        now=1,
    )
    c.evict("web", [0], now=2)
    assert c.fleet_report("web").restoring is None


# ----- sizes not offered in a zone ------------------------------------------------------------------------


def test_a_size_restricted_in_a_zone_is_refused_at_placement_with_sku_not_available() -> None:
    c = Controller(REGION)
    c.set_pool_capacity("1", SIZE, "Regular", None, restricted=True, now=0)
    c.create_scale_set(spec(), 3, now=1)  # best effort: the other zones take them, nothing was tried in 1
    assert "1" not in c.instance_columns("web")["zone"]
    c.create_scale_set(spec("strict", zone_balance=True), 2, now=1)
    with pytest.raises(CapacityError) as e:
        c.set_capacity("strict", 3, now=2)  # the third must go to zone 1
    assert e.value.code == "SkuNotAvailable" and "'1'" in str(e.value)
    # an instance mix falls back to a size that is offered
    mix = spec(
        "mix",
        sku=Sku("Mix"),
        sku_profile=SkuProfile(
            vm_sizes=(VmSize(SIZE), VmSize("Standard_D4s_v5")), allocation_strategy="Prioritized"
        ),
        zones=("1",),
    )
    c.create_scale_set(mix, 2, now=3)
    assert set(c.instance_columns("mix")["vm_size"]) == {"Standard_D4s_v5"}
    c.set_pool_capacity("1", SIZE, "Regular", None, restricted=False, now=4)
    c.set_capacity("strict", 3, now=5)
    assert c.instance_columns("strict")["zone"][-1] == "1"


def test_restricted_sizes_over_grpc_and_across_a_restart(tmp_path: Path) -> None:
    with ServerThread(str(tmp_path / "db"), REGION) as server, Client(server.target) as client:
        region = client.set_pool_capacity("2", SIZE, "Spot", 5, restricted=True)
        (pool,) = region.pools
        assert pool.restricted and pool.available == 5
        region = client.set_pool_capacity("2", SIZE, "Spot", 6)  # unset: stays restricted
        assert region.pools[0].restricted and region.pools[0].available == 6
    with ServerThread(str(tmp_path / "db"), REGION) as server, Client(server.target) as client:
        assert client.describe_region().pools[0].restricted


# ----- core quotas ---------------------------------------------------------------------------------------


def test_a_core_quota_is_checked_before_placing_and_the_refusal_is_azures() -> None:
    c = Controller(REGION)
    c.set_core_quota("standardDSv5Family", 8, now=0)  # Standard_D2s_v5: 2 vCPUs each
    c.create_scale_set(spec(), 4, now=1)
    with pytest.raises(CapacityError) as e:
        c.set_capacity("web", 5, now=2)
    assert e.value.code == "OperationNotAllowed" and "standardDSv5Family Cores quota" in str(e.value)
    with pytest.raises(CapacityError):
        c.set_capacity("web", 5, dry_run=True, now=2)  # a dry run tells the same
    assert c.capacity("web") == 4
    # A create beyond the quota leaves no scale set behind; one within it (no instances) is made
    with pytest.raises(CapacityError) as e:
        c.create_scale_set(spec(name="more"), 1, now=2)
    assert e.value.code == "OperationNotAllowed" and "more" not in c.engine.scale_set_names()
    c.create_scale_set(spec(name="more"), 0, now=2)
    # Spot draws on lowPriorityCores, so a Spot set is not held by the Regular family's quota
    c.create_scale_set(spot_spec(name="spot"), 2, now=3)
    c.set_core_quota("lowPriorityCores", 4, now=4)
    with pytest.raises(CapacityError):
        c.set_capacity("spot", 3, now=5)
    c.set_core_quota("standardDSv5Family", None, now=6)
    c.set_capacity("web", 8, now=7)


def test_with_executors_a_quota_refusal_becomes_shortfall_retried_with_backoff() -> None:
    c = executors_controller()
    c.set_core_quota("standardDSv5Family", 4, now=0)
    c.create_scale_set(spec(), 2, now=1)
    # the cloud refused one create for its own quota: the instance goes and is placed again later, but
    # our quota check lets it back only within the 4 vCPUs
    actions = c.report_operation("web", op_of(c, 0), False, "OperationNotAllowed", "core quota", now=2)
    assert actions is not None and actions[0].kind == "ReplacementDeferred"
    c.set_core_quota("standardDSv5Family", 2, now=3)
    assert [a.kind for a in c.advance(2 + BACKOFF_BASE_S, "web")] == ["ReplacementDeferred"]
    assert c.fleet_report("web").last_error_code == "OperationNotAllowed"
    c.set_core_quota("standardDSv5Family", 4, now=10)
    assert [a.kind for a in c.advance(100, "web")] == ["InstancesReplaced"]


def test_core_quotas_over_grpc_are_admin_changes_that_survive_a_restart(tmp_path: Path) -> None:
    with ServerThread(str(tmp_path / "db"), REGION) as server, Client(server.target) as client:
        region = client.set_core_quota("standardDSv5Family", 6)
        assert [(q.family, q.cores) for q in region.core_quotas] == [("standardDSv5Family", 6)]
        client.create_scale_set(spec(), 3)
        with pytest.raises(CapacityError) as e:
            client.set_capacity("web", 4)
        assert e.value.code == "OperationNotAllowed"
    with ServerThread(str(tmp_path / "db"), REGION) as server, Client(server.target) as client:
        assert client.describe_region().core_quotas[0].cores == 6


# ----- lifecycle hooks -----------------------------------------------------------------------------------

HOOKS = (
    LifecycleHook("warm-up", "Launching", "PT60S", "Abandon"),
    LifecycleHook("drain", "Terminating", "PT5M", "Continue"),
)


def created(c: Controller, now: float) -> None:
    for o in c.pending_operations():
        if o.kind == "Create":
            c.report_operation("web", o.operation_id, True, now=now)


def test_a_launch_hook_keeps_a_created_instance_out_of_service_until_completed() -> None:
    c = executors_controller()
    c.create_scale_set(spec(lifecycle_hooks=HOOKS), 2, now=1)
    created(c, 2)
    assert set(states(c).values()) == {"Creating"}  # created, but waiting on warm-up
    w0, _ = c.fleet_report("web").lifecycle_actions
    assert (w0.hook, w0.transition, w0.deadline) == ("warm-up", "Launching", 62)
    actions = c.complete_lifecycle_action("web", 0, "warm-up", now=10)
    assert actions is not None and "in service" in actions[0].reason and states(c)[0] == "Succeeded"
    assert c.complete_lifecycle_action("web", 0, "warm-up", now=11) is None  # once
    # a heartbeat moves the deadline; then the default result (Abandon) deletes and replaces it
    assert c.record_lifecycle_action_heartbeat("web", 1, "warm-up", now=50)
    assert c.advance(62, "web") == []
    kinds = [a.kind for a in c.advance(110, "web")]
    assert kinds == ["LifecycleActionTimedOut", "InstancesReplaced"]
    assert 1 not in states(c) and ("Delete", 1, "2") in ops(c)
    delete = next(o for o in c.pending_operations() if o.instance_id == 1)
    assert not delete.held  # an abandoned launch never served: no drain


def test_a_terminate_hook_holds_the_delete_until_drained_or_timed_out() -> None:
    c = executors_controller()
    c.create_scale_set(spec(lifecycle_hooks=HOOKS[1:]), 3, now=1)
    created(c, 2)
    c.set_capacity("web", 1, now=3)
    held = [o for o in c.pending_operations() if o.kind == "Delete"]
    assert len(held) == 2 and all(o.held for o in held) and c.capacity("web") == 1
    c.complete_lifecycle_action("web", held[0].instance_id, "drain", now=4)
    assert [o.held for o in c.pending_operations() if o.kind == "Delete"] == [False, True]
    assert [a.kind for a in c.advance(3 + 300, "web")] == ["LifecycleActionTimedOut"]
    assert all(not o.held for o in c.pending_operations())
    assert c.fleet_report("web").lifecycle_actions == ()


def test_lifecycle_hooks_are_validated_with_the_field() -> None:
    c = Controller(REGION)
    bad = [
        ((LifecycleHook("x", heartbeat_timeout="PT10S"),), "lifecycle_hooks.heartbeat_timeout"),
        ((LifecycleHook("a b"),), "lifecycle_hooks.name"),
        ((LifecycleHook("x"), LifecycleHook("x")), "lifecycle_hooks.name"),
        ((LifecycleHook("x", transition="Rebooting"),), "lifecycle_hooks.transition"),
    ]
    for hooks, field in bad:
        with pytest.raises(InvalidInputError) as e:
            c.create_scale_set(spec(lifecycle_hooks=hooks), 1, now=0)
        assert e.value.field == field


# ----- over gRPC with the fake cloud -------------------------------------------------------------------


class Clock:
    """A server clock tests can move forward (lease expiry, grace periods)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


#: Executors a test started: stopped before its server goes, even when the test fails.
_RUNNING: list[tuple[Executor, threading.Thread]] = []


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[ServerThread, Client, Clock]]:
    clock = Clock()
    with ServerThread(str(tmp_path / "db"), REGION, executors=True, clock=clock) as server:
        client = Client(server.target)
        try:
            yield server, client, clock
        finally:
            while _RUNNING:
                executor, thread = _RUNNING.pop()
                executor.stop()
                thread.join(10)
            client.close()


def start(executor: Executor) -> threading.Thread:
    thread = threading.Thread(target=executor.run, daemon=True)
    thread.start()
    _RUNNING.append((executor, thread))
    return thread


def converged(client: Client, capacity: int) -> bool:
    report = client.fleet_report("web")
    return report.pending_operation_count == 0 and report.provisioning_states == {"Succeeded": capacity}


def test_a_zone_that_runs_out_mid_scale_out_converges_elsewhere_with_every_decision_explained(
    fleet: tuple[ServerThread, Client, Clock],
) -> None:
    _server, client, _ = fleet
    cloud = FakeCloud(seed=7, capacity={("1", SIZE, "Regular"): 4})
    executor = Executor(client, cloud, executor_id="zone-all", max_in_flight=8)
    start(executor)
    client.create_scale_set(spec(), 30)
    wait_until(lambda: converged(client, 30))
    zones = Counter(client.instance_columns("web")["zone"])
    assert zones["1"] == 4 and sum(zones.values()) == 30
    assert Counter(i.zone for i in cloud.instances.values()) == zones  # the cloud agrees with the engine
    failures = [entry for entry in cloud.log if entry[2] != "OK"]
    assert {code for *_, code in failures} == {"ZonalAllocationFailed"}
    # each failure was answered by one replacement, explained in the scale set's events
    last = client.get_scale_set("web").revision
    replaced = []
    for event in client.watch("web"):
        if event.type == "InstancesReplaced":
            replaced.append(event.summary)
        if event.revision >= last:
            break
    assert len(replaced) == len(failures) and all("ZonalAllocationFailed" in text for text in replaced)
    assert len(cloud.log) == 30 + len(failures)  # the fewest operations: one create each, one per failure


def test_an_executor_killed_holding_leases_loses_nothing_and_a_second_report_changes_nothing(
    fleet: tuple[ServerThread, Client, Clock],
) -> None:
    _server, client, clock = fleet
    client.create_scale_set(spec(), 6)
    stream = client.lease_operations("doomed", max_in_flight=4, lease_seconds=5)
    leased, _, _ = next(iter(stream))
    assert len(leased) == 4
    stream.cancel()  # dies holding four leases
    cloud = FakeCloud(seed=1)
    executor = Executor(client, cloud, executor_id="survivor")
    start(executor)
    wait_until(lambda: client.fleet_report("web").pending_operation_count == 4)  # only the two unleased ran
    clock.offset += 6  # the dead executor's leases lapse
    wait_until(lambda: converged(client, 6))
    assert sorted(name for kind, name, _ in cloud.log if kind == "Create") == [f"web_{i}" for i in range(6)]
    revision = client.get_scale_set("web").revision
    assert client.report_operation(leased[0].operation_id, True, executor_id="doomed") is False
    assert client.get_scale_set("web").revision == revision


def test_executors_are_refused_by_a_server_that_applies_plans_immediately(tmp_path: Path) -> None:
    with ServerThread(str(tmp_path / "db"), REGION) as server, Client(server.target) as client:
        with pytest.raises(ConflictError) as e:
            next(iter(client.lease_operations("x")))
        assert e.value.code == "ExecutorsDisabled"
        with pytest.raises(InvalidInputError) as bad:
            client.report_operation(1, False)
        assert bad.value.field == "error_code"


def test_executors_can_split_the_work_by_zone(fleet: tuple[ServerThread, Client, Clock]) -> None:
    _, client, _ = fleet
    clouds = {zone: FakeCloud(seed=3) for zone in ("1", "2", "3")}
    executors = [Executor(client, clouds[z], executor_id=f"zone-{z}", zones=[z]) for z in clouds]
    for e in executors:
        start(e)
    client.create_scale_set(spec(), 9)
    wait_until(lambda: converged(client, 9))
    assert {z: sorted(i.zone for i in cloud.instances.values()) for z, cloud in clouds.items()} == {
        z: [z] * 3 for z in clouds
    }


def test_a_spot_preempt_notice_reaches_executors_which_drain_and_acknowledge(
    fleet: tuple[ServerThread, Client, Clock],
) -> None:
    _, client, _ = fleet
    cloud = FakeCloud(seed=5)
    executor = Executor(client, cloud, executor_id="spot")
    start(executor)
    client.create_scale_set(spot_spec(), 3)
    wait_until(lambda: converged(client, 3))
    client.set_pool_capacity("3", SIZE, "Spot", None, price=1.0)  # far above the max price of 0.05
    # the executor hears of the Preempt on its lease stream and acknowledges it (nothing to drain), so the
    # eviction happens now rather than 30 s later, and the executor deletes the VM
    wait_until(lambda: converged(client, 2))
    assert sorted(cloud.instances) == ["web_0", "web_1"]
    assert client.fleet_report("web").scheduled_events == ()


def test_a_capacity_eviction_in_the_fake_cloud_is_reported_and_try_and_restore_brings_it_back(
    fleet: tuple[ServerThread, Client, Clock],
) -> None:
    server, client, clock = fleet
    cloud = FakeCloud(seed=9)
    executor = Executor(client, cloud, executor_id="spot", probe_interval=0.1)
    start(executor)
    client.create_scale_set(spot_spec(spot_restore_policy=SpotRestorePolicy(enabled=True)), 4)
    wait_until(lambda: converged(client, 4))
    cloud.evict(["web_1", "web_2"])  # the cloud needs its capacity back
    wait_until(lambda: client.fleet_report("web").restoring is not None)
    assert client.get_scale_set("web").capacity == 2
    clock.offset += 61  # Try & restore's next try
    server.call(server.control.advance())
    wait_until(lambda: converged(client, 4))
    assert len(cloud.instances) == 4 and client.fleet_report("web").restoring is None


def test_lifecycle_actions_over_grpc_and_the_executor_never_gets_a_held_delete(
    fleet: tuple[ServerThread, Client, Clock],
) -> None:
    _, client, _ = fleet
    cloud = FakeCloud(seed=2)
    executor = Executor(client, cloud, executor_id="hooks")
    start(executor)
    client.create_scale_set(spec(lifecycle_hooks=HOOKS), 2)
    wait_until(lambda: len(client.fleet_report("web").lifecycle_actions) == 2)
    assert client.fleet_report("web").provisioning_states == {"Creating": 2}
    for i in (0, 1):
        assert client.complete_lifecycle_action("web", i, "warm-up")
    wait_until(lambda: converged(client, 2))
    client.set_capacity("web", 1)
    wait_until(
        lambda: any(w.transition == "Terminating" for w in client.fleet_report("web").lifecycle_actions)
    )
    time.sleep(0.3)
    assert len(cloud.instances) == 2  # the delete waits for the drain
    (held,) = client.fleet_report("web").pending_operations
    assert held.held and held.kind == "Delete"
    assert client.record_lifecycle_action_heartbeat("web", held.instance_id, "drain")
    assert client.complete_lifecycle_action("web", held.instance_id, "drain")
    wait_until(lambda: converged(client, 1) and len(cloud.instances) == 1)
    assert client.complete_lifecycle_action("web", held.instance_id, "drain") is False


def test_a_spot_pool_that_disappears_keeps_the_mix_and_waits_for_spot_capacity(
    fleet: tuple[ServerThread, Client, Clock],
) -> None:
    server, client, clock = fleet
    cloud = FakeCloud(seed=4)
    executor = Executor(client, cloud, executor_id="spot-mix")
    start(executor)
    mix = spot_spec(priority_mix_policy=PriorityMixPolicy(2, 50))
    client.create_scale_set(mix, 4)
    wait_until(lambda: converged(client, 4))
    for zone in ("1", "2", "3"):
        cloud.take_pool(zone, SIZE, "Spot", 0)  # Spot capacity is gone everywhere
    client.set_capacity("web", 8)  # base 2 + half of 6 above it: 5 Regular, 3 Spot (2 more of each)
    wait_until(lambda: client.fleet_report("web").shortfall == 2)
    report = client.fleet_report("web")
    assert report.desired_capacity == 8 and report.provisioning_states == {"Succeeded": 6}
    assert {z for z, *_ in report.unavailable_pools} == {"1", "2", "3"}
    priorities = Counter(client.instance_columns("web")["priority"])
    assert priorities == {"Regular": 5, "Spot": 1}  # the mix holds: no Regular in place of Spot
    for zone in ("1", "2", "3"):
        cloud.take_pool(zone, SIZE, "Spot", 100)
    clock.offset += UNAVAILABLE_TTL_S + 1  # the skipped pools are tried again
    server.call(server.control.advance())
    wait_until(lambda: converged(client, 8))
    assert Counter(client.instance_columns("web")["priority"]) == {"Regular": 5, "Spot": 3}


def test_the_clouds_quota_running_out_backs_off_and_converges_once_raised(
    fleet: tuple[ServerThread, Client, Clock],
) -> None:
    server, client, clock = fleet
    cloud = FakeCloud(seed=6, quota=5)
    executor = Executor(client, cloud, executor_id="quota")
    start(executor)
    client.create_scale_set(spec(), 7)
    wait_until(
        lambda: (
            client.fleet_report("web").shortfall == 2
            and client.fleet_report("web").pending_operation_count == 0
        )
    )
    report = client.fleet_report("web")
    assert report.last_error_code == "OperationNotAllowed" and report.retry_at is not None
    assert report.unavailable_pools == ()  # a quota is no pool's fault
    info = client.get_scale_set("web")  # every read shows desired and actual
    assert (info.capacity, info.desired_capacity) == (5, 7)
    assert server.metrics.registry.get_sample_value("scaleset_shortfall_instances") == 2
    cloud.quota = 10
    clock.offset += 400  # past any backoff
    server.call(server.control.advance())
    wait_until(lambda: converged(client, 7))
    failed = sum(1 for *_, code in cloud.log if code != "OK")
    assert len(cloud.log) == 7 + failed  # one create per instance, one per refusal: nothing else


# ----- real local processes ----------------------------------------------------------------------------


def test_local_processes_carry_a_fleet_health_repairs_and_a_rolling_upgrade(
    fleet: tuple[ServerThread, Client, Clock],
) -> None:
    server, client, clock = fleet
    local = LocalProcesses(ApplicationHealth(interval_s=0.1))
    executor = Executor(client, local, executor_id="local", probe_interval=0.1)
    start(executor)
    try:
        repairs = AutomaticRepairsPolicy(enabled=True, grace_period="PT10M")
        client.create_scale_set(spec(automatic_repairs_policy=repairs), 3)
        wait_until(lambda: converged(client, 3))

        def health() -> list[str]:
            return list(client.instance_columns("web")["health"])

        wait_until(lambda: health() == ["Healthy"] * 3)  # from the processes' own health endpoints
        pids = {i: local.pid("web", i) for i in range(3)}
        assert all(pid is not None for pid in pids.values())
        os.kill(pids[1], signal.SIGKILL)  # an instance dies
        wait_until(lambda: health()[1] == "Unhealthy")
        clock.offset += 11 * 60  # past the repair grace period
        server.call(server.control.advance())
        wait_until(lambda: converged(client, 3) and health() == ["Healthy"] * 3)
        ids = list(client.instance_columns("web")["instance_id"])
        assert 1 not in ids and len(ids) == 3  # replaced by a new instance with a new process
        # a rolling upgrade reimages the processes batch by batch, each batch healthy before the next
        before = {i: local.pid("web", i) for i in ids}
        rolling = UpgradePolicy(mode="Rolling")
        client.update_scale_set(
            spec(sku=Sku("Standard_D4s_v5"), upgrade_policy=rolling, automatic_repairs_policy=repairs)
        )
        batches_seen = set()

        def upgraded() -> bool:
            server.call(server.control.advance())
            status = client.get_rolling_upgrade("web")
            if status is not None:
                batches_seen.add(tuple(status.in_batch))
            return status is not None and status.status == "Completed"

        wait_until(upgraded, timeout=60)
        wait_until(lambda: converged(client, 3) and health() == ["Healthy"] * 3)
        assert set(client.instance_columns("web")["model_version"]) == {2}
        assert all(local.pid("web", i) != before[i] for i in ids)  # every process replaced
        assert max(len(b) for b in batches_seen) == 1  # one instance at a time (20% of 3)
    finally:
        executor.stop()  # before the processes go, so none is reported unhealthy on the way out
        local.close()


# ----- the commands an operator types ------------------------------------------------------------------


def test_serve_with_executors_and_the_local_executor_make_a_working_fleet_from_the_cli(
    tmp_path: Path,
) -> None:
    """``scaleset serve --executors`` and ``scaleset executor local`` as processes, driven by ``scaleset
    create`` / ``scale`` / ``fleet``: real processes start and stop, each answering its health endpoint."""
    import subprocess
    import sys
    import urllib.request

    from scaleset.testing.server import free_port, start_server_process

    port = free_port()
    server = start_server_process(tmp_path / "state.db", port, tmp_path / "server.log", "--executors")
    target = f"127.0.0.1:{port}"
    cli = [sys.executable, "-m", "scaleset", "--server", target]
    with (tmp_path / "executor.log").open("wb") as log:
        executor = subprocess.Popen(
            [*cli, "executor", "local", "--id", "cli", "--probe-interval", "0.2"],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        (tmp_path / "web.json").write_text(
            json.dumps({"name": "web", "zones": ["1", "2", "3"], "sku": {"name": SIZE}})
        )
        subprocess.run(
            [*cli, "create", "-f", str(tmp_path / "web.json"), "--capacity", "2"],
            check=True,
            capture_output=True,
        )
        subprocess.run([*cli, "scale", "web", "3"], check=True, capture_output=True)
        with Client(target) as client:
            wait_until(lambda: converged(client, 3))
            wait_until(lambda: list(client.instance_columns("web")["health"]) == ["Healthy"] * 3)
            report = subprocess.run(
                [*cli, "fleet", "web", "-o", "json"], check=True, capture_output=True, text=True
            )
            assert json.loads(report.stdout)["provisioning_states"] == {"Succeeded": 3}
            # each instance is a live process answering on the address the executor reported
            addresses = [address for address, _ in client.fleet_report("web").addresses.values()]
            assert len(addresses) == 3
            for address in addresses:
                with urllib.request.urlopen(f"http://{address}/", timeout=5) as reply:
                    assert json.loads(reply.read())["name"].startswith("web_")
            subprocess.run([*cli, "scale", "web", "1"], check=True, capture_output=True)
            wait_until(lambda: converged(client, 1))

            def stopped() -> int:
                down = 0
                for address in addresses:
                    try:
                        urllib.request.urlopen(f"http://{address}/health", timeout=1).close()
                    except OSError:
                        down += 1
                return down

            wait_until(lambda: stopped() == 2)  # the two scaled-in instances' processes are gone
    finally:
        executor.send_signal(signal.SIGTERM)
        assert executor.wait(timeout=20) == 0
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)


def test_an_executor_renews_the_leases_of_long_operations() -> None:
    """A cloud's create takes minutes: the executor reports progress every third of the lease, so the
    server does not offer the operation to another executor meanwhile."""

    class Recorder:
        def __init__(self) -> None:
            self.reports: list[tuple[int, bool]] = []

        def report_operation(self, operation_id: int, succeeded: bool, *a: object, **k: object) -> bool:
            self.reports.append((operation_id, bool(k.get("in_progress"))))
            return True

    recorder = Recorder()
    executor = Executor(recorder, FakeCloud(), lease_seconds=30)  # type: ignore[arg-type]
    now = time.monotonic()
    executor._in_flight = {7: now - 11, 8: now - 2}  # 7 began 11 s ago, 8 just now
    executor._renew_leases()
    assert recorder.reports == [(7, True)]
    executor._renew_leases()
    assert recorder.reports == [(7, True)]  # renewed: not again until another third of the lease


def test_lifecycle_actions_from_the_cli(
    fleet: tuple[ServerThread, Client, Clock], capsys: pytest.CaptureFixture[str]
) -> None:
    from scaleset.cli import main

    server, client, _ = fleet
    start(Executor(client, FakeCloud(seed=8), executor_id="cli-hooks"))
    client.create_scale_set(spec(lifecycle_hooks=HOOKS), 1)
    wait_until(lambda: len(client.fleet_report("web").lifecycle_actions) == 1)
    assert main(["--server", server.target, "fleet", "web"]) == 0
    assert "waits on launching hook 'warm-up'" in capsys.readouterr().out
    assert main(["--server", server.target, "hook", "heartbeat", "web", "0", "warm-up"]) == 0
    assert "extended by a heartbeat" in capsys.readouterr().out
    assert main(["--server", server.target, "hook", "complete", "web", "0", "warm-up"]) == 0
    assert "completed" in capsys.readouterr().out
    assert main(["--server", server.target, "hook", "complete", "web", "0", "warm-up"]) == 1
    assert "no lifecycle action" in capsys.readouterr().err
    wait_until(lambda: converged(client, 1))


@pytest.mark.parametrize("protocol", ["http", "tcp"])
def test_application_health_probes_a_live_process_and_notices_a_dead_one(protocol: str) -> None:
    from scaleset.policies.lifecycle import Operation

    local = LocalProcesses(ApplicationHealth(protocol=protocol, interval_s=0.1, probes=2))
    op = Operation(1, "Create", "web", 0, "1", 0, SIZE, "Regular", 1, 0.0)
    try:
        address, provider_id = local.create(op)
        assert address.startswith("127.0.0.1:") and provider_id.startswith("pid://")
        assert local.create(op) == (address, provider_id)  # idempotent by instance name
        assert local.health() == {}  # one success: two in a row are needed to change the state
        assert local.health() == {"web": {0: "Healthy"}}
        pid = local.pid("web", 0)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: local.health() == {"web": {0: "Unhealthy"}}, timeout=10)
    finally:
        local.close()
