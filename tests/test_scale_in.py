"""Scale-in policies (reference §3), protection (§4) and manual deletes."""

from __future__ import annotations

import pytest
from scaleset import Engine, Instance, Region, ScaleInPolicy, ScaleSetSpec, Sku, SkuProfile, VmSize
from scaleset.errors import ConflictError, InvalidInputError

from tests.conftest import SIZE, instances_in, zonal_spec, zone_counts

OLDEST_VM_TABLE = {"1": [3, 4, 5, 10], "2": [2, 6, 9, 11], "3": [1, 7, 8]}


def test_oldest_vm_worked_table(engine: Engine) -> None:
    """The verbatim OldestVM table of reference §3.3, one scale-in at a time."""
    engine.create_scale_set(zonal_spec(scale_in_policy=ScaleInPolicy(rules=["OldestVM"])))
    engine.import_instances("web", instances_in(OLDEST_VM_TABLE))
    chosen = []
    for capacity in range(10, 4, -1):
        plan = engine.set_capacity("web", capacity)
        (delete,) = plan.deletes
        chosen.append((delete.instance_id, delete.zone))
    assert chosen == [(2, "2"), (3, "1"), (1, "3"), (4, "1"), (6, "2"), (5, "1")]


def test_oldest_vm_in_one_call_matches_one_at_a_time(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(scale_in_policy=ScaleInPolicy(rules=["OldestVM"])))
    engine.import_instances("web", instances_in(OLDEST_VM_TABLE))
    plan = engine.set_capacity("web", 5, dry_run=True)
    assert [d.instance_id for d in plan.deletes] == [2, 3, 1, 4, 6, 5]
    assert engine.capacity("web") == 11  # dry run


def test_newest_vm_picks_the_newest_among_the_fullest_zones(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(scale_in_policy=ScaleInPolicy(rules=["NewestVM"])))
    engine.import_instances("web", instances_in(OLDEST_VM_TABLE))
    plan = engine.set_capacity("web", 8)
    assert [d.instance_id for d in plan.deletes] == [11, 10, 9]
    assert "newest" in plan.deletes[0].reason


def test_default_balances_fault_domains_then_takes_the_highest_id(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(zones=["1"]))
    engine.import_instances(
        "web",
        [
            Instance(instance_id=1, zone="1", fault_domain=0, vm_size=SIZE),
            Instance(instance_id=2, zone="1", fault_domain=0, vm_size=SIZE),
            Instance(instance_id=3, zone="1", fault_domain=0, vm_size=SIZE),
            Instance(instance_id=9, zone="1", fault_domain=1, vm_size=SIZE),
        ],
    )
    plan = engine.set_capacity("web", 2)
    # Fault domain 0 holds three: its newest (3), then it still holds the most (2 vs 1): 2.
    assert [d.instance_id for d in plan.deletes] == [3, 2]
    assert "fault domain 0 held the most in its zone (3)" in plan.deletes[0].reason


def test_protected_instances_are_never_scaled_in(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(scale_in_policy=ScaleInPolicy(rules=["OldestVM"])))
    engine.import_instances("web", instances_in(OLDEST_VM_TABLE))
    # Reference §3.1: the oldest VM, protected, is not considered by OldestVM.
    engine.set_protection("web", [2], protect_from_scale_in=True)
    engine.set_protection("web", [3], protect_from_scale_in=True, protect_from_scale_set_actions=True)
    plan = engine.set_capacity("web", 3)
    assert {2, 3}.isdisjoint(d.instance_id for d in plan.deletes)
    survivors = {i.instance_id for i in engine.get_scale_set("web").instances}
    assert {2, 3} <= survivors and len(survivors) == 3


def test_scale_in_past_the_protected_instances_fails_whole(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(), capacity=4)
    engine.set_protection("web", [0, 1, 2], protect_from_scale_in=True)
    with pytest.raises(ConflictError) as err:
        engine.set_capacity("web", 2)
    assert err.value.code == "ScaleInBlockedByProtection"
    assert engine.capacity("web") == 4
    engine.set_capacity("web", 3)
    assert [i.instance_id for i in engine.get_scale_set("web").instances] == [0, 1, 2]


def test_protection_validation(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(), capacity=2)
    with pytest.raises(InvalidInputError) as err:
        engine.set_protection("web", [0], protect_from_scale_in=False, protect_from_scale_set_actions=True)
    assert err.value.code == "InvalidProtectionPolicy"
    instance = engine.get_scale_set("web").instances[0]
    assert not instance.protect_from_scale_in and not instance.protect_from_scale_set_actions


def test_manual_delete_is_allowed_for_protected_instances(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(), capacity=3)
    engine.set_protection("web", [1], protect_from_scale_in=True, protect_from_scale_set_actions=True)
    plan = engine.delete_instances("web", [1])
    assert [d.instance_id for d in plan.deletes] == [1]
    assert plan.deletes[0].reason == "manual delete requested by the user"
    assert engine.capacity("web") == 2


def test_regional_instances_go_first(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec())
    engine.import_instances(
        "web",
        [*instances_in({"1": [1, 2], "2": [3], "3": [4]}), Instance(instance_id=0, zone=None, vm_size=SIZE)],
    )
    plan = engine.set_capacity("web", 4)
    assert [d.instance_id for d in plan.deletes] == [0]
    assert "regional instances go before zonal ones" in plan.deletes[0].reason


def test_prioritize_unhealthy_vms(engine: Engine) -> None:
    engine.create_scale_set(
        zonal_spec(scale_in_policy=ScaleInPolicy(prioritize_unhealthy_vms=True)), capacity=6
    )
    engine.report_health("web", [0], "Unhealthy")
    engine.report_health("web", [1, 2, 3, 4, 5], "Healthy")
    plan = engine.set_capacity("web", 5)
    assert [d.instance_id for d in plan.deletes] == [0]
    assert "unhealthy" in plan.deletes[0].reason
    # Without the flag the newest goes.
    other = Engine(Region(zones=["1", "2", "3"]))
    other.create_scale_set(zonal_spec(), capacity=6)
    other.report_health("web", [0], "Unhealthy")
    assert [d.instance_id for d in other.set_capacity("web", 5).deletes] == [5]


def test_lowest_price_removes_the_most_expensive_size_first() -> None:
    engine = Engine(Region(zones=["1"]))
    engine.set_pool_capacity("1", "Standard_D2s_v5", "Regular", None, price=0.10)
    engine.set_pool_capacity("1", "Standard_D4s_v5", "Regular", None, price=0.20)
    spec = ScaleSetSpec(
        name="mix",
        zones=["1"],
        sku_profile=SkuProfile(vm_sizes=[VmSize("Standard_D2s_v5"), VmSize("Standard_D4s_v5")]),
    )
    engine.create_scale_set(spec)
    engine.import_instances(
        "mix",
        [
            Instance(instance_id=1, zone="1", vm_size="Standard_D4s_v5"),
            Instance(instance_id=2, zone="1", vm_size="Standard_D2s_v5"),
            Instance(instance_id=3, zone="1", vm_size="Standard_D2s_v5"),
        ],
    )
    plan = engine.set_capacity("mix", 2)
    assert [d.instance_id for d in plan.deletes] == [1]
    assert "most expensive" in plan.deletes[0].reason


def test_strict_scale_in_refuses_to_unbalance(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(zone_balance=True))
    engine.import_instances("web", instances_in({"1": [1, 2], "2": [3, 4], "3": [5, 6]}))
    engine.set_protection("web", [1, 2, 3, 4], protect_from_scale_in=True)
    engine.set_capacity("web", 5)  # zone 3 -> 1; still balanced (2/2/1)
    with pytest.raises(Exception) as err:
        engine.set_capacity("web", 4)
    assert getattr(err.value, "code", None) == "ZoneBalanceBlocked"
    assert zone_counts(engine, "web") == {"1": 2, "2": 2, "3": 1}


def test_single_size_scale_set_uses_its_sku(engine: Engine) -> None:
    engine.create_scale_set(
        ScaleSetSpec(name="one", zones=["1"], sku=Sku(name="Standard_E2s_v5")), capacity=2
    )
    assert {i.vm_size for i in engine.get_scale_set("one").instances} == {"Standard_E2s_v5"}
