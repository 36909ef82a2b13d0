"""Zone balance and fault-domain spreading on scale-out (reference §2)."""

from __future__ import annotations

from collections import Counter

import pytest
from scaleset import Engine, Region
from scaleset.errors import CapacityError

from tests.conftest import instances_in, zonal_spec, zone_counts


def test_scale_out_fills_the_zones_with_the_fewest(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec())
    engine.import_instances("web", instances_in({"1": [0, 1], "2": [2], "3": [3, 4, 5]}))
    plan = engine.set_capacity("web", 9)
    assert [c.zone for c in plan.creates] == ["2", "1", "2"]
    assert zone_counts(engine, "web") == {"1": 3, "2": 3, "3": 3}


@pytest.mark.parametrize("capacity", [1, 2, 3, 7, 10, 31])
def test_a_balanced_set_stays_balanced(engine: Engine, capacity: int) -> None:
    engine.create_scale_set(zonal_spec(), capacity=capacity)
    counts = zone_counts(engine, "web").values()
    assert max(counts) - min(counts) <= 1
    assert sum(counts) == capacity


def test_fault_domains_spread_inside_each_zone(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(), capacity=30)
    per_zone_fd = Counter((i.zone, i.fault_domain) for i in engine.get_scale_set("web").instances)
    # 10 per zone over the region's 5 fault domains: exactly 2 in each.
    assert set(per_zone_fd.values()) == {2}
    assert len(per_zone_fd) == 15


def test_fixed_fault_domain_count_uses_only_that_many(region: Region) -> None:
    engine = Engine(region)
    engine.create_scale_set(
        zonal_spec(orchestration_mode="Uniform", platform_fault_domain_count=5), capacity=15
    )
    assert {i.fault_domain for i in engine.get_scale_set("web").instances} == {0, 1, 2, 3, 4}
    regional = Engine(Region(zones=["1"], fault_domains_per_zone=3))
    regional.create_scale_set(
        zonal_spec("r", zones=[], orchestration_mode="Flexible", platform_fault_domain_count=2), capacity=5
    )
    assert sorted(Counter(i.fault_domain for i in regional.get_scale_set("r").instances).values()) == [2, 3]


def test_fixed_fault_domains_the_region_cannot_meet_fail(region: Region) -> None:
    engine = Engine(Region(zones=["1", "2", "3"], fault_domains_per_zone=3))
    engine.create_scale_set(zonal_spec(orchestration_mode="Uniform", platform_fault_domain_count=5))
    with pytest.raises(CapacityError) as err:
        engine.set_capacity("web", 1)
    assert err.value.code == "AllocationFailed"


def test_best_effort_tolerates_one_zone_down(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(), capacity=6)
    engine.set_zone_available("1", False)
    plan = engine.set_capacity("web", 10)
    assert {c.zone for c in plan.creates} == {"2", "3"}
    assert [c.zone for c in plan.creates] == ["2", "3", "2", "3"]
    assert "fewest instances (2)" in plan.creates[0].reason
    assert "down or full" in plan.creates[2].reason
    assert zone_counts(engine, "web") == {"1": 2, "2": 4, "3": 4}


def test_best_effort_blocks_with_two_zones_down(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(), capacity=6)
    engine.set_zone_available("1", False)
    engine.set_zone_available("2", False)
    for capacity in (9, 3):
        with pytest.raises(CapacityError) as err:
            engine.set_capacity("web", capacity)
        assert err.value.code == "TooManyZonesUnavailable"
    assert engine.capacity("web") == 6


def test_recovered_zone_catches_up_on_the_next_scale_out(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(), capacity=6)
    engine.set_zone_available("1", False)
    engine.set_capacity("web", 10)
    engine.set_zone_available("1", True)
    plan = engine.set_capacity("web", 12)
    assert [c.zone for c in plan.creates] == ["1", "1"]


def test_zone_recovery_scale_in_removes_from_the_over_provisioned_zone(engine: Engine) -> None:
    # Reference §13.5: 2, 2, 4 -> 2, 2, 2 takes both instances from zone 3.
    engine.create_scale_set(zonal_spec())
    engine.import_instances("web", instances_in({"1": [0, 1], "2": [2, 3], "3": [4, 5, 6, 7]}))
    plan = engine.set_capacity("web", 6)
    assert [d.zone for d in plan.deletes] == ["3", "3"]
    assert zone_counts(engine, "web") == {"1": 2, "2": 2, "3": 2}


def test_strict_balance_blocks_a_scale_out_that_would_unbalance(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(zone_balance=True))
    engine.import_instances("web", instances_in({"1": [0, 1, 2], "2": [3, 4, 5], "3": [6, 7]}))
    engine.set_zone_available("1", False)
    # 3/3/2 -> zone 3, then zone 2, then zone 3: all still balanced; the next needs zone 1.
    engine.set_capacity("web", 11)
    assert zone_counts(engine, "web") == {"1": 3, "2": 4, "3": 4}
    with pytest.raises(CapacityError) as err:
        engine.set_capacity("web", 12)
    assert err.value.code == "ZoneBalanceBlocked"
    assert "zone 1" in str(err.value)
    assert engine.capacity("web") == 11


def test_failed_scale_out_changes_nothing(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(), capacity=3)
    engine.set_pool_capacity("2", "Standard_D2s_v5", "Regular", 0)
    engine.set_pool_capacity("3", "Standard_D2s_v5", "Regular", 0)
    with pytest.raises(CapacityError) as err:
        engine.set_capacity("web", 9)
    assert err.value.code == "ZonalAllocationFailed"
    assert engine.capacity("web") == 3


def test_one_full_zone_is_tolerated_like_one_down_zone(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(), capacity=3)
    engine.set_pool_capacity("2", "Standard_D2s_v5", "Regular", 0)
    engine.set_capacity("web", 7)
    assert zone_counts(engine, "web") == {"1": 3, "2": 1, "3": 3}


def test_regional_scale_set_has_no_zone() -> None:
    engine = Engine(Region(zones=["1", "2", "3"]))
    plan = engine.create_scale_set(zonal_spec("r", zones=[]), capacity=4)
    assert {c.zone for c in plan.creates} == {None}
    assert plan.creates[0].reason.startswith("scale-out: regional scale set")
