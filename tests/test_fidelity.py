"""Azure fidelity, round two (issue 14): documented rules that came out wrong, from the reference's own words."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from scaleset import AutomaticRepairsPolicy, Controller, Region, RollingUpgradePolicy, Sku, UpgradePolicy
from scaleset.client import Client
from scaleset.errors import CapacityError, ConflictError
from scaleset.testing.server import ServerThread

from tests.conftest import SIZE, zonal_spec

T0 = 1_800_000_000.0


def spot(**kwargs: object) -> Controller:
    c = Controller(Region(zones=["1", "2", "3"]))
    c.create_scale_set(zonal_spec(priority="Spot", eviction_policy="Deallocate", max_price=0.5, **kwargs), 3)
    return c


def test_max_price_of_allocated_spot_vms_cannot_change_until_they_are_deallocated() -> None:
    """Reference §12: MaxPriceChangeNotAllowedForAllocatedVMs, "Deallocate and try again"."""
    c = spot()
    raised = dataclasses.replace(c.get_spec("web"), max_price=0.8)
    with pytest.raises(ConflictError) as caught:
        c.update_scale_set(raised)
    assert caught.value.code == "MaxPriceChangeNotAllowedForAllocatedVMs"
    assert (
        caught.value.field == "max_price"
        and "web_0" in str(caught.value)
        and "Deallocate" in str(caught.value)
    )
    assert c.get_spec("web").max_price == 0.5  # nothing changed
    c.evict("web", [0, 1, 2])  # eviction policy Deallocate: every VM deallocated
    assert c.update_scale_set(raised).max_price == 0.8


def test_max_price_rule_over_grpc(tmp_path: Path) -> None:
    with (
        ServerThread(str(tmp_path / "state.db"), Region(zones=["1", "2", "3"])) as server,
        Client(server.target) as c,
    ):
        c.create_scale_set(zonal_spec(priority="Spot", eviction_policy="Delete", max_price=0.5), 2)
        with pytest.raises(ConflictError) as caught:
            c.update_scale_set(dataclasses.replace(c.get_scale_set("web").spec, max_price=-1.0))
        assert (
            caught.value.code == "MaxPriceChangeNotAllowedForAllocatedVMs"
            and caught.value.field == "max_price"
        )


def test_repair_action_changes_only_through_disable_then_enable() -> None:
    """Reference §8.1: "To change repairAction on an existing policy you must disable then re-enable"."""
    c = Controller(Region(zones=["1"]))
    c.create_scale_set(
        zonal_spec(zones=["1"], automatic_repairs_policy=AutomaticRepairsPolicy(True, "PT10M", "Replace"))
    )
    spec = c.get_spec("web")
    with pytest.raises(ConflictError) as caught:
        c.update_scale_set(
            dataclasses.replace(
                spec, automatic_repairs_policy=AutomaticRepairsPolicy(True, "PT10M", "Reimage")
            )
        )
    assert caught.value.code == "PropertyChangeNotAllowed"
    assert caught.value.field == "automatic_repairs_policy.repair_action"
    c.update_scale_set(
        dataclasses.replace(spec, automatic_repairs_policy=AutomaticRepairsPolicy(False, "PT10M", "Replace"))
    )
    c.update_scale_set(
        dataclasses.replace(spec, automatic_repairs_policy=AutomaticRepairsPolicy(True, "PT10M", "Reimage"))
    )
    assert c.get_spec("web").automatic_repairs_policy == AutomaticRepairsPolicy(True, "PT10M", "Reimage")


def test_a_full_single_placement_group_fails_with_azures_message() -> None:
    c = Controller(Region(zones=["1", "2", "3"], fault_domains_per_zone=5))
    c.create_scale_set(
        zonal_spec(zones=[], orchestration_mode="Uniform")
    )  # regional Uniform: one placement group
    assert c.get_spec("web").single_placement_group is True
    c.set_pool_capacity(None, SIZE, "Regular", 2)
    with pytest.raises(CapacityError) as caught:
        c.set_capacity("web", 3)
    assert caught.value.code == "AllocationFailed"
    assert str(caught.value).startswith(
        "Allocation failed. If you are trying to add a new VM to a Virtual Machine Scale Set with a single placement group"
    )
    multi = Controller(Region(zones=["1", "2", "3"], fault_domains_per_zone=5))
    multi.create_scale_set(zonal_spec(zones=[], orchestration_mode="Uniform", single_placement_group=False))
    multi.set_pool_capacity(None, SIZE, "Regular", 2)
    with pytest.raises(CapacityError) as other:
        multi.set_capacity("web", 3)
    assert str(other.value).startswith(
        "Allocation failed. We do not have sufficient capacity for the requested VM size"
    )


def rolling_fleet(n: int = 5, **policy: object) -> Controller:
    c = Controller(Region(zones=["1"], fault_domains_per_zone=5))
    spec = zonal_spec(zones=["1"], upgrade_policy=UpgradePolicy("Rolling", RollingUpgradePolicy(**policy)))  # type: ignore[arg-type]
    c.create_scale_set(spec, n, now=T0)
    c.report_health("web", range(n), "Healthy", now=T0)
    c.update_scale_set(dataclasses.replace(c.get_spec("web"), sku=Sku(name="Standard_D4s_v5")), now=T0)
    return c


def test_unknown_after_an_upgrade_pauses_the_batch_until_healthy() -> None:
    """Reference §7.4 (Rich Health States): Unknown -> "rolling upgrades will be paused until the instance
    falls back into a Healthy state"."""
    c = rolling_fleet()
    c.advance(T0 + 1)  # batch 1 starts
    (first,) = c.get_rolling_upgrade("web").in_batch  # type: ignore[union-attr]
    c.report_health("web", [first], "Unknown", now=T0 + 2)
    assert c.advance(T0 + 60) == []  # paused, not failed
    assert c.get_rolling_upgrade("web").progress()["failed_instance_count"] == 0  # type: ignore[union-attr]
    c.report_health("web", [first], "Healthy", now=T0 + 90)
    (done,) = c.advance(T0 + 120)
    assert done.kind == "RollingUpgradeBatchCompleted" and "1 healthy, 0 not" in done.reason


def test_unknown_past_the_health_timeout_counts_as_unhealthy() -> None:
    from scaleset.policies.upgrade import HEALTH_WAIT_S

    c = rolling_fleet(max_unhealthy_upgraded_instance_percent=0)
    c.advance(T0 + 1)
    (first,) = c.get_rolling_upgrade("web").in_batch  # type: ignore[union-attr]
    c.report_health("web", [first], "Unknown", now=T0 + 2)
    assert c.advance(T0 + HEALTH_WAIT_S) == []
    (failed,) = c.advance(T0 + 1 + HEALTH_WAIT_S)
    assert failed.kind == "RollingUpgradeFailed"


def test_an_update_after_a_policy_breach_starts_the_rolling_upgrade_again() -> None:
    """Reference §7.4: "if … the upgrade has stopped due to any policy breach, any more changes … trigger a new
    rolling upgrade"; "a generic az vmss update re-triggers the check"."""
    c = rolling_fleet(max_unhealthy_upgraded_instance_percent=0)
    c.advance(T0 + 1)
    (first,) = c.get_rolling_upgrade("web").in_batch  # type: ignore[union-attr]
    c.report_health("web", [first], "Unhealthy", now=T0 + 2)
    c.advance(T0 + 3)
    assert c.get_rolling_upgrade("web").status == "Faulted"  # type: ignore[union-attr]
    c.report_health("web", [first], "Healthy", now=T0 + 4)  # the cause is fixed
    c.update_scale_set(c.get_spec("web"), now=T0 + 5)  # a generic update: no model property changes
    (started, *_) = c.advance(T0 + 6)
    assert started.kind == "RollingUpgradeStarted" and c.get_rolling_upgrade("web").active  # type: ignore[union-attr]
    # Once every instance is on the latest model, an update starts nothing.
    while c.get_rolling_upgrade("web").active:  # type: ignore[union-attr]
        c.report_health("web", c.get_rolling_upgrade("web").in_batch, "Healthy", now=c.now + 1)  # type: ignore[union-attr]
        c.advance(c.now + 1)
    c.update_scale_set(c.get_spec("web"), now=c.now + 1)
    assert c.advance(c.now + 1) == []


# ----- rebalancing around instances that cannot move ------------------------------------------------------


def pinned_fleet(zones: list[str], fds: int, layout: list[tuple[str, int, int, bool]]) -> Controller:
    """``layout``: (zone, fault domain, count, protected from scale-set actions)."""
    from scaleset import Instance

    c = Controller(Region(zones=zones, fault_domains_per_zone=fds))
    c.create_scale_set(zonal_spec(zones=zones, platform_fault_domain_count=1 if len(zones) > 1 else None))
    instances, protected = [], []
    for zone, fd, count, pin in layout:
        for _ in range(count):
            i = len(instances)
            instances.append(
                Instance(instance_id=i, zone=zone, fault_domain=fd, vm_size=SIZE, health="Healthy")
            )
            if pin:
                protected.append(i)
    c.import_instances("web", instances)
    c.set_protection("web", protected, protect_from_scale_in=True, protect_from_scale_set_actions=True)
    return c


def zone_counts(c: Controller) -> dict[str | None, int]:
    from collections import Counter

    return dict(sorted(Counter(i.zone for i in c.get_scale_set("web").instances).items(), key=str))


def test_zones_balance_as_well_as_pinned_instances_allow() -> None:
    """Issue 14: zones 1 / 2 / 3 hold 0 / 40 (protected) / 20; the best reachable shape is 10 / 40 / 10."""
    c = pinned_fleet(["1", "2", "3"], 1, [("2", 0, 40, True), ("3", 0, 20, False)])
    plan = c.rebalance("web")
    assert plan.status == "OPTIMAL" and plan.replacements == 10
    assert plan.zone_counts_after == {"1": 10, "2": 40, "3": 10}
    assert plan.violation_after["zones"] == 0 and plan.violation_before["zones"] > 0
    c.rebalance("web", dry_run=False)
    assert zone_counts(c) == {"1": 10, "2": 40, "3": 10}
    assert c.rebalance("web").replacements == 0  # already the best reachable shape


def test_fault_domains_balance_as_well_as_pinned_instances_allow() -> None:
    c = pinned_fleet(["1"], 3, [("1", 1, 40, True), ("1", 2, 20, False)])
    plan = c.rebalance("web")
    assert plan.replacements == 10
    assert {fd: n for (_, fd), n in plan.fault_domain_counts_after.items()} == {0: 10, 1: 40, 2: 10}
    assert plan.violation_after["fault_domains"] == 0


def test_without_pinned_instances_the_target_is_the_even_split() -> None:
    from scaleset.rebalance import water_fill

    assert water_fill([0, 0, 0], 10) == [(3, 4), (3, 4), (3, 4)]
    assert water_fill([0, 40, 0], 60) == [(10, 10), (40, 40), (10, 10)]
    assert water_fill([0, 40, 5], 60) == [(10, 10), (40, 40), (10, 10)]
    assert water_fill([0, 40, 15], 60) == [(5, 5), (40, 40), (15, 15)]


# ----- overprovisioning (reference §11) -------------------------------------------------------------------


def uniform(**kwargs: object) -> Controller:
    c = Controller(Region(zones=["1", "2", "3"], fault_domains_per_zone=5))
    c.create_scale_set(zonal_spec(orchestration_mode="Uniform", platform_fault_domain_count=5, **kwargs))
    return c


def test_uniform_scale_outs_overprovision_and_delete_the_extras() -> None:
    """Reference §11: "the scale set actually spins up more VMs than you asked for, then deletes the extra VMs
    once the requested number of VMs are successfully provisioned"; the number is ours (20%)."""
    c = uniform()
    assert c.get_spec("web").overprovision is True  # Azure's default for Uniform
    plan = c.set_capacity("web", 10)
    extras = [p for p in plan.creates if p.reason.startswith("overprovisioning")]
    assert len(plan.creates) == 12 and len(extras) == 2 and [p.instance_id for p in extras] == [10, 11]
    assert sorted(d.instance_id for d in plan.deletes) == [10, 11]
    assert all("deleted once the 10 requested instances succeed" in p.reason for p in extras)
    assert c.capacity("web") == 10 and {i.instance_id for i in c.get_scale_set("web").instances} == set(
        range(10)
    )
    assert c.set_capacity("web", 11).creates[0].instance_id == 12  # the extras took ids, as in Azure
    assert len(c.set_capacity("web", 5).creates) == 0  # scale-in: nothing extra


def test_overprovisioning_is_configurable_and_never_fails_a_request() -> None:
    assert len(uniform(overprovision_percent=50).set_capacity("web", 10).creates) == 15
    assert len(uniform(overprovision_percent=0).set_capacity("web", 10).creates) == 10
    assert len(uniform(overprovision=False).set_capacity("web", 10).creates) == 10
    quiet = uniform(do_not_run_extensions_on_overprovisioned_vms=True).set_capacity("web", 5)
    assert "extensions do not run" in quiet.creates[-1].reason
    # Extras count toward neither the instance limit nor the pools: a set at its limit still scales to it,
    # and a pool with room for exactly the request gets no extras rather than a failure.
    spg = Controller(Region(zones=["1", "2", "3"], fault_domains_per_zone=5))
    spg.create_scale_set(zonal_spec(orchestration_mode="Uniform", zones=[]))
    assert spg.get_spec("web").single_placement_group is True
    assert spg.set_capacity("web", 100).capacity_after == 100  # the limit is 100; 20 extras came and went
    tight = uniform()
    for zone in ("1", "2", "3"):
        tight.set_pool_capacity(zone, SIZE, "Regular", 4)
    plan = tight.set_capacity("web", 12)
    assert len(plan.creates) == 12 and tight.capacity("web") == 12


def test_overprovisioning_is_refused_on_flexible() -> None:
    from scaleset.errors import InvalidInputError

    c = Controller(Region(zones=["1", "2", "3"]))
    with pytest.raises(InvalidInputError) as caught:
        c.create_scale_set(zonal_spec(overprovision=True))
    assert caught.value.field == "overprovision"
    c.create_scale_set(zonal_spec())
    assert c.get_spec("web").overprovision is False and len(c.set_capacity("web", 10).creates) == 10


# ----- automatic zone placement (reference §2.6) ------------------------------------------------------------


def auto_region(zones: int = 4) -> Region:
    return Region(zones=[str(z) for z in range(1, zones + 1)], fault_domains_per_zone=3)


def auto_spec(**kwargs: object):  # type: ignore[no-untyped-def]
    from scaleset import Placement

    placement = kwargs.pop("placement", Placement())
    return zonal_spec(zones=[], placement=placement, **kwargs)


def test_automatic_placement_targets_three_zones_evenly() -> None:
    """ "Targets an even distribution across three availability zones."""
    c = Controller(auto_region(4))
    c.create_scale_set(auto_spec(), 9)
    assert list(c.get_spec("web").zones) == ["1", "2", "3"]  # chosen by the engine, recorded
    assert zone_counts(c) == {"1": 3, "2": 3, "3": 3}


def test_include_and_exclude_zones_and_their_rules() -> None:
    from scaleset import Placement
    from scaleset.errors import InvalidInputError

    c = Controller(auto_region(4))
    c.create_scale_set(auto_spec(name="inc", placement=Placement(include_zones=["2", "4"])), 4)
    assert list(c.get_spec("inc").zones) == ["2", "4"]
    c.create_scale_set(auto_spec(name="exc", placement=Placement(exclude_zones=["1"])), 3)
    assert list(c.get_spec("exc").zones) == ["2", "3", "4"]
    for bad, field in [
        (auto_spec(placement=Placement(include_zones=["1"], exclude_zones=["2"])), "placement"),
        (auto_spec(placement=Placement(include_zones=["1"])), "placement"),  # fewer than two zones
        (dataclasses.replace(auto_spec(), zones=["1", "2"]), "zones"),  # mutually exclusive
        (
            auto_spec(orchestration_mode="Uniform", overprovision=True, platform_fault_domain_count=1),
            "overprovision",
        ),
    ]:
        with pytest.raises(InvalidInputError) as caught:
            c.create_scale_set(bad)
        assert caught.value.field == field, bad


def test_zone_allocation_policy_rules() -> None:
    from scaleset import MaxInstancePercentPerZonePolicy as Pct
    from scaleset import ZoneAllocationPolicy as Policy
    from scaleset.errors import InvalidInputError

    c = Controller(auto_region(3))
    cases = [
        (
            auto_spec(zone_balance=True),
            "zone_allocation_policy.max_zone_count",
        ),  # zone balance needs max_zone_count
        (auto_spec(zone_allocation_policy=Policy(max_zone_count=1)), "zone_allocation_policy.max_zone_count"),
        (
            auto_spec(zone_balance=True, zone_allocation_policy=Policy(2, Pct(True, 60))),
            "zone_allocation_policy.max_instance_percent_per_zone_policy",
        ),
        # ceil(100 / 3 eligible zones) = 34 is the least valid percentage; with max_zone_count 2 it is 50.
        (
            auto_spec(zone_allocation_policy=Policy(None, Pct(True, 33))),
            "zone_allocation_policy.max_instance_percent_per_zone_policy.value",
        ),
        (
            auto_spec(zone_allocation_policy=Policy(2, Pct(True, 49))),
            "zone_allocation_policy.max_instance_percent_per_zone_policy.value",
        ),
    ]
    for bad, field in cases:
        with pytest.raises(InvalidInputError) as caught:
            c.create_scale_set(bad)
        assert caught.value.field == field, bad
    c.create_scale_set(auto_spec(zone_allocation_policy=Policy(None, Pct(True, 34))))
    c.create_scale_set(
        auto_spec(name="two", zone_balance=True, zone_allocation_policy=Policy(max_zone_count=2)), 4
    )
    assert list(c.get_spec("two").zones) == ["1", "2"]


def test_expansion_only_when_capacity_runs_short_and_never_past_max_zone_count() -> None:
    """ "Can expand to additional availability zones if the current zones don't have enough capacity";
    with maxZoneCount it "never exceeds the configured limit"."""
    c = Controller(auto_region(4))
    c.create_scale_set(auto_spec(), 6)
    c.set_pool_capacity("3", SIZE, "Regular", 0)  # zone 3 is out of this size
    c.set_capacity("web", 9)  # zones 1 and 2 still have room under the 50% cap: no expansion
    assert list(c.get_spec("web").zones) == ["1", "2", "3"]
    c.set_pool_capacity("1", SIZE, "Regular", 0)  # now zone 1 is out too
    assert zone_counts(c) == {"1": 4, "2": 3, "3": 2}
    c.set_capacity("web", 14)  # zone 2 may hold 7 of 14 (50%); the last one needs a fourth zone
    assert list(c.get_spec("web").zones) == ["1", "2", "3", "4"]
    assert zone_counts(c) == {"1": 4, "2": 7, "3": 2, "4": 1}  # existing instances never moved
    from scaleset import ZoneAllocationPolicy as Policy

    capped = Controller(auto_region(4))
    capped.create_scale_set(auto_spec(zone_allocation_policy=Policy(max_zone_count=3)), 9)
    capped.set_pool_capacity("1", SIZE, "Regular", 0)
    capped.set_pool_capacity("3", SIZE, "Regular", 0)
    plan = capped.set_capacity("web", 14)
    assert list(capped.get_spec("web").zones) == ["1", "2", "3"]  # never a fourth zone
    assert (plan.capacity_after, plan.unallocated) == (13, 1)  # zone 2 holds at most 7 of 14


def test_partial_allocation_places_what_the_policy_allows() -> None:
    """ "Azure allocates as many instances as the policy allows and the remaining instances may fail to
    provision. This behavior is a partial allocation failure, not a failure of the entire request." """
    from scaleset import Placement

    c = Controller(auto_region(3))
    c.create_scale_set(auto_spec(placement=Placement(include_zones=["1", "2"])))
    c.set_zone_available("2", False)
    plan = c.set_capacity("web", 10)
    assert (plan.capacity_after, plan.unallocated) == (5, 5)  # zone 1 holds at most 50% of 10
    assert (
        "5 of 10 instances placed" in plan.unallocated_reason
        and "partial allocation" in plan.unallocated_reason
    )
    assert c.capacity("web") == 5 and zone_counts(c) == {"1": 5}


def test_the_switch_from_regional_is_one_way() -> None:
    from scaleset import Placement
    from scaleset.errors import ConflictError

    c = Controller(auto_region(3))
    c.create_scale_set(zonal_spec(zones=[]), 2)  # regional
    c.update_scale_set(dataclasses.replace(c.get_spec("web"), placement=Placement()))
    assert list(c.get_spec("web").zones) == ["1", "2", "3"]
    c.set_capacity("web", 5)
    assert zone_counts(c) == {None: 2, "1": 1, "2": 1, "3": 1}  # regional instances stay where they are
    with pytest.raises(ConflictError) as back:
        c.update_scale_set(dataclasses.replace(c.get_spec("web"), placement=None))
    assert back.value.field == "placement"
    zonal = Controller(auto_region(3))
    zonal.create_scale_set(zonal_spec(zones=["1", "2"]))
    with pytest.raises(ConflictError):
        zonal.update_scale_set(dataclasses.replace(zonal.get_spec("web"), placement=Placement()))


def test_automatic_placement_over_grpc(tmp_path: Path) -> None:
    from scaleset import Placement

    with ServerThread(str(tmp_path / "state.db"), auto_region(3)) as server, Client(server.target) as c:
        c.create_scale_set(auto_spec(placement=Placement(include_zones=["1", "2"])))
        c.set_zone_available("2", False)
        plan = c.set_capacity("web", 4)
        assert (plan.capacity_after, plan.unallocated) == (
            2,
            2,
        ) and "partial allocation" in plan.unallocated_reason
        info = c.get_scale_set("web")
        assert info.capacity == 2 and info.spec.placement == Placement(include_zones=["1", "2"])


def test_arm_documents_carry_placement_and_zone_allocation_policy() -> None:
    from scaleset import Placement
    from scaleset import ZoneAllocationPolicy as Policy
    from scaleset.documents import spec_from_document

    spec, _, ignored = spec_from_document(
        {
            "name": "web",
            "sku": {"name": SIZE, "capacity": 4},
            "properties": {
                "orchestrationMode": "Flexible",
                "placement": {"zonePlacementPolicy": "Auto", "excludeZones": ["3"]},
                "resiliencyPolicy": {"zoneAllocationPolicy": {"maxZoneCount": 2}},
            },
        }
    )
    assert spec.placement == Placement(exclude_zones=["3"]) and spec.zone_allocation_policy == Policy(2)
    assert ignored == []
