"""Instance mix (reference §6): allocation strategies over pool capacity and price."""

from __future__ import annotations

from collections import Counter

import pytest
from scaleset import Engine, Pool, Region, ScaleSetSpec, SkuProfile, VmSize
from scaleset.errors import CapacityError

D2, D4, E2 = "Standard_D2s_v5", "Standard_D4s_v5", "Standard_E2s_v5"


def mix(strategy: str, sizes: list[VmSize], **kwargs: object) -> ScaleSetSpec:
    return ScaleSetSpec(
        name="mix",
        zones=["1"],
        sku_profile=SkuProfile(vm_sizes=sizes, allocation_strategy=strategy),
        **kwargs,  # type: ignore[arg-type]
    )


def sizes_of(engine: Engine) -> Counter[str]:
    return Counter(i.vm_size for i in engine.get_scale_set("mix").instances)


def test_lowest_price_takes_the_cheapest_until_it_runs_out() -> None:
    engine = Engine(
        Region(
            zones=["1"],
            pools=[
                Pool(zone="1", vm_size=D2, available=3, price=0.30),
                Pool(zone="1", vm_size=D4, available=None, price=0.20),
                Pool(zone="1", vm_size=E2, available=2, price=0.10),
            ],
        )
    )
    plan = engine.create_scale_set(mix("LowestPrice", [VmSize(D2), VmSize(D4), VmSize(E2)]), capacity=6)
    assert [c.vm_size for c in plan.creates] == [E2, E2, D4, D4, D4, D4]
    assert "LowestPrice first choice" in plan.creates[0].reason
    assert "preferred sizes had no capacity" in plan.creates[2].reason
    pools = {(p.vm_size): p.available for p in engine.describe_region().pools}
    assert pools == {D2: 3, D4: None, E2: 0}


def test_capacity_optimized_prefers_the_most_available() -> None:
    engine = Engine(Region(zones=["1"], pools=[Pool("1", D2, available=2), Pool("1", D4, available=5)]))
    engine.create_scale_set(mix("CapacityOptimized", [VmSize(D2), VmSize(D4)]), capacity=5)
    # D4 has more until both hold 2: then ties go to the listed order.
    assert sizes_of(engine) == Counter({D4: 4, D2: 1})


def test_prioritized_follows_rank() -> None:
    engine = Engine(Region(zones=["1"], pools=[Pool("1", E2, available=2)]))
    sizes = [VmSize(D2, rank=2), VmSize(E2, rank=0), VmSize(D4, rank=1)]
    plan = engine.create_scale_set(mix("Prioritized", sizes), capacity=4)
    assert [c.vm_size for c in plan.creates] == [E2, E2, D4, D4]


def test_allocation_fails_when_no_size_fits_and_nothing_changes() -> None:
    engine = Engine(Region(zones=["1"], pools=[Pool("1", D2, available=1), Pool("1", D4, available=1)]))
    with pytest.raises(CapacityError) as err:
        engine.create_scale_set(mix("LowestPrice", [VmSize(D2), VmSize(D4)]), capacity=3)
    assert err.value.code == "ZonalAllocationFailed"
    assert engine.list_scale_sets() == []
    assert {p.available for p in engine.describe_region().pools} == {1}


def test_spot_max_price_skips_pools_above_it() -> None:
    engine = Engine(
        Region(zones=["1"], pools=[Pool("1", D2, "Spot", price=0.05), Pool("1", D4, "Spot", price=0.02)])
    )
    spec = mix("CapacityOptimized", [VmSize(D4), VmSize(D2)], priority="Spot", max_price=0.04)
    engine.create_scale_set(spec, capacity=2)
    assert sizes_of(engine) == Counter({D4: 2})
    engine.set_pool_capacity("1", D4, "Spot", 0)
    with pytest.raises(CapacityError):
        engine.set_capacity("mix", 3)


def test_scale_in_returns_capacity_to_the_pool_but_eviction_does_not() -> None:
    engine = Engine(Region(zones=["1"], pools=[Pool("1", D2, "Spot", available=4)]))
    engine.create_scale_set(
        ScaleSetSpec(
            name="mix",
            zones=["1"],
            sku_profile=SkuProfile([VmSize(D2)]),
            priority="Spot",
            eviction_policy="Delete",
        ),
        capacity=4,
    )
    assert engine.describe_region().pools[0].available == 0
    engine.set_capacity("mix", 3)
    assert engine.describe_region().pools[0].available == 1
    engine.evict("mix", [0])
    assert engine.describe_region().pools[0].available == 1
    engine.delete_scale_set("mix")
    assert engine.describe_region().pools[0].available == 3
