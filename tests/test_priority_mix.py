"""Spot priority mix (reference §5) and Spot eviction."""

from __future__ import annotations

import pytest
from scaleset import Engine, PriorityMixPolicy, Region, ScaleSetSpec, Sku
from scaleset.errors import InvalidInputError

from tests.conftest import priority_counts, zonal_spec


def mix_spec(base: int, pct: int, eviction_policy: str = "Delete") -> ScaleSetSpec:
    return zonal_spec(
        "spot",
        priority="Spot",
        eviction_policy=eviction_policy,
        priority_mix_policy=PriorityMixPolicy(
            base_regular_priority_count=base, regular_priority_percentage_above_base=pct
        ),
    )


def test_scenario_1_fifty_fifty_with_ten_base(engine: Engine) -> None:
    """Reference §5.2 scenario 1, every row, including the eviction of all Spot VMs."""
    engine.create_scale_set(mix_spec(10, 50), capacity=10)
    assert priority_counts(engine, "spot") == (10, 0)
    for capacity, regular, spot in [(20, 15, 5), (30, 20, 10), (40, 25, 15), (41, 25, 16), (42, 26, 16)]:
        engine.set_capacity("spot", capacity)
        assert priority_counts(engine, "spot") == (regular, spot), capacity
    spot_ids = [i.instance_id for i in engine.get_scale_set("spot").instances if i.priority == "Spot"]
    eviction = engine.evict("spot", spot_ids)
    assert sorted(eviction.deleted) == sorted(spot_ids) and eviction.deallocated == ()
    assert engine.capacity("spot") == 26
    assert priority_counts(engine, "spot") == (26, 0)
    for capacity, regular, spot in [(30, 26, 4), (42, 26, 16), (44, 27, 17)]:
        engine.set_capacity("spot", capacity)
        assert priority_counts(engine, "spot") == (regular, spot), capacity


def test_cli_example_follows_the_formula_not_its_caption(engine: Engine) -> None:
    """S14's CLI example (capacity 4, base 2, 50%) is captioned "two standard and two Spot", which
    contradicts the formula that every row of the scenario tables follows: 2 + floor(2 * 50%) = 3 Regular.
    We follow the formula (README: "Where Azure's documentation is silent or contradicts itself")."""
    engine.create_scale_set(mix_spec(2, 50), capacity=4)
    assert priority_counts(engine, "spot") == (3, 1)


def test_deallocate_eviction_keeps_the_instances_counted(engine: Engine) -> None:
    engine.create_scale_set(mix_spec(0, 0, eviction_policy="Deallocate"), capacity=6)
    eviction = engine.evict("spot", [0, 1])
    assert eviction.deallocated == (0, 1) and eviction.deleted == ()
    assert engine.capacity("spot") == 6
    states = {i.instance_id: i.power_state for i in engine.get_scale_set("spot").instances}
    assert states[0] == states[1] == "deallocated"
    # Deallocated Spot VMs still count: scaling to 6 adds nothing.
    assert len(engine.set_capacity("spot", 6).creates) == 0


def test_scale_in_keeps_the_mix(engine: Engine) -> None:
    engine.create_scale_set(mix_spec(10, 50), capacity=42)
    for capacity in (41, 40, 30, 20, 11, 10, 5):
        engine.set_capacity("spot", capacity)
        total = capacity
        regular_target = min(total, 10) + max(0, total - 10) * 50 // 100
        assert priority_counts(engine, "spot") == (regular_target, total - regular_target), capacity


def test_only_spot_instances_can_be_evicted(engine: Engine) -> None:
    engine.create_scale_set(mix_spec(2, 0), capacity=3)
    regular = [i.instance_id for i in engine.get_scale_set("spot").instances if i.priority == "Regular"]
    with pytest.raises(InvalidInputError) as err:
        engine.evict("spot", regular[:1])
    assert err.value.code == "NotAzureSpotVirtualMachine"


def test_all_spot_uniform_scale_set() -> None:
    engine = Engine(Region(zones=["1", "2"]))
    engine.create_scale_set(
        ScaleSetSpec(
            name="u",
            orchestration_mode="Uniform",
            zones=["1", "2"],
            sku=Sku(name="Standard_D2s_v5"),
            priority="Spot",
        ),
        capacity=4,
    )
    assert priority_counts(engine, "u") == (0, 4)
    assert engine.get_spec("u").eviction_policy == "Deallocate"
