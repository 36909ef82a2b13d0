"""Properties across the Python/Rust boundary, with the pure-Python reference rules as the oracle."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scaleset import Engine, Instance, PriorityMixPolicy, Region, ScaleInPolicy, ScaleSetSpec, Sku
from scaleset.errors import ScaleSetError
from scaleset.testing import reference

from tests.conftest import SIZE

FDS = 3


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Region, ScaleSetSpec, list[Instance], int]:
    zones = draw(st.sampled_from([[], ["1"], ["1", "2"], ["1", "2", "3"]]))
    mix = draw(st.none() | st.builds(PriorityMixPolicy, st.integers(0, 6), st.integers(0, 100)))
    spec = ScaleSetSpec(
        name="p",
        zones=zones,
        zone_balance=len(zones) > 1 and draw(st.booleans()),
        sku=Sku(name=SIZE),
        priority="Spot" if mix is not None or draw(st.booleans()) else "Regular",
        priority_mix_policy=mix,
        scale_in_policy=ScaleInPolicy(
            rules=[draw(st.sampled_from(["Default", "NewestVM", "OldestVM"]))],
            prioritize_unhealthy_vms=draw(st.booleans()),
        ),
    )
    down = draw(st.lists(st.sampled_from(["1", "2", "3"]), unique=True, max_size=2))
    region = Region(zones=["1", "2", "3"], fault_domains_per_zone=FDS, unavailable_zones=down)
    ids = draw(st.lists(st.integers(0, 60), unique=True, max_size=24))
    instances = []
    for i in ids:
        in_zone = draw(st.sampled_from([*zones, None])) if zones else None
        protected = draw(st.integers(0, 5))
        instances.append(
            Instance(
                instance_id=i,
                zone=in_zone,
                fault_domain=draw(st.integers(0, FDS - 1)),
                vm_size=SIZE,
                priority=draw(st.sampled_from(["Regular", "Spot"])) if mix is not None else spec.priority,
                health=draw(st.sampled_from(["Healthy", "Unhealthy", "Unknown"])),
                power_state=draw(st.sampled_from(["running", "running", "deallocated"])),
                protect_from_scale_in=protected >= 4,
                protect_from_scale_set_actions=protected == 5,
            )
        )
    capacity = draw(st.integers(0, 40))
    return region, spec, instances, capacity


def build(region: Region, spec: ScaleSetSpec, instances: list[Instance]) -> Engine:
    engine = Engine(region)
    engine.create_scale_set(spec)
    engine.import_instances(spec.name, instances)
    return engine


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_core_matches_the_reference_rules(scenario: tuple[Region, ScaleSetSpec, list[Instance], int]) -> None:
    region, spec, instances, capacity = scenario
    engine = build(region, spec, instances)
    stored = engine.get_spec(spec.name)
    current = sorted(instances, key=lambda i: i.instance_id)
    try:
        if capacity >= len(current):
            next_id = max((i.instance_id + 1 for i in current), default=0)
            expected: object = reference.plan_scale_out(
                stored, region, current, capacity - len(current), next_id
            )
        else:
            expected = reference.plan_scale_in(stored, region, current, len(current) - capacity)
    except reference.ReferenceError as err:
        expected = err.code
    try:
        plan = engine.set_capacity(spec.name, capacity, dry_run=True)
        got: object = (
            [reference.Placed(c.instance_id, c.zone, c.fault_domain, c.priority) for c in plan.creates]
            if capacity >= len(current)
            else [d.instance_id for d in plan.deletes]
        )
    except ScaleSetError as err:
        got = err.code
    assert got == expected


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_invariants_after_any_capacity_change(
    scenario: tuple[Region, ScaleSetSpec, list[Instance], int],
) -> None:
    region, spec, instances, capacity = scenario
    engine = build(region, spec, instances)
    before = {i.instance_id: i for i in instances}
    try:
        engine.set_capacity(spec.name, capacity)
    except ScaleSetError:
        assert {i.instance_id for i in engine.get_scale_set(spec.name).instances} == set(before)
        return
    after = engine.get_scale_set(spec.name).instances
    assert len(after) == capacity
    ids = {i.instance_id for i in after}
    # Protected instances survive every scale-in.
    assert {
        i for i, inst in before.items() if inst.protect_from_scale_in or inst.protect_from_scale_set_actions
    } <= ids
    # Scale-out only adds, scale-in only removes.
    assert ids >= set(before) or ids <= set(before)
    if spec.priority_mix_policy is not None and capacity > len(instances):
        regular = sum(1 for i in after if i.priority == "Regular")
        regular_before = sum(1 for i in instances if i.priority == "Regular")
        added = capacity - len(instances)
        # Exact target, unless existing Spot instances already exceed the Spot share (they are not replaced).
        wanted = max(reference.regular_target(spec, capacity), regular_before)
        assert regular == min(wanted, regular_before + added)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 3), st.integers(0, 60), st.integers(0, 60))
def test_balanced_sets_stay_balanced_when_zones_are_healthy(zone_count: int, first: int, second: int) -> None:
    zones = ["1", "2", "3"][:zone_count]
    engine = Engine(Region(zones=zones, fault_domains_per_zone=FDS))
    engine.create_scale_set(ScaleSetSpec(name="b", zones=zones, sku=Sku(name=SIZE)), capacity=first)
    engine.set_capacity("b", second)
    counts = Counter(i.zone for i in engine.get_scale_set("b").instances)
    per_zone = [counts.get(z, 0) for z in zones]
    assert max(per_zone) - min(per_zone) <= 1
    fd_counts = Counter((i.zone, i.fault_domain) for i in engine.get_scale_set("b").instances)
    for z in zones:
        per_fd = [fd_counts.get((z, f), 0) for f in range(FDS)]
        assert max(per_fd) - min(per_fd) <= 1


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([["1"], ["1", "2"], ["1", "2", "3"]]),
    st.lists(
        st.tuples(
            st.integers(0, 3),
            st.integers(0, FDS - 1),
            st.sampled_from(["Healthy", "Unhealthy", "Unknown"]),
            st.integers(0, 1),
            st.integers(0, 9),
        ),
        max_size=30,
    ),
    st.integers(1, 6),
    st.booleans(),
    st.booleans(),
)
def test_upgrade_batches_match_the_reference_planner(
    zones: list[str],
    rows: list[tuple[int, int, str, int, int]],
    batch_size: int,
    prioritize: bool,
    cross_zone: bool,
) -> None:
    engine = Engine(Region(zones=["1", "2", "3"], fault_domains_per_zone=FDS))
    engine.create_scale_set(ScaleSetSpec(name="u", zones=zones, sku=Sku(name=SIZE)))
    engine.import_instances(
        "u",
        [
            Instance(
                instance_id=k,
                zone=zones[z] if z < len(zones) else None,
                fault_domain=fd,
                vm_size=SIZE,
                health=health,
                model_version=version,
                protect_from_scale_in=protect == 0,
                protect_from_scale_set_actions=protect == 0,
            )
            for k, (z, fd, health, version, protect) in enumerate(rows)
        ],
    )
    engine.update_scale_set(ScaleSetSpec(name="u", zones=zones, sku=Sku(name="Standard_D4s_v5")))
    spec, instances = engine.get_spec("u"), list(engine.get_scale_set("u").instances)
    got = engine.plan_upgrade_batches("u", batch_size, prioritize, cross_zone)
    assert got == reference.plan_upgrade_batches(spec, instances, batch_size, prioritize, cross_zone)
    upgradable = {
        i.instance_id
        for i in instances
        if (i.model_version or 0) < spec.model_version and not i.protect_from_scale_set_actions
    }
    assert sorted(i for b in got for i in b) == sorted(upgradable)
    assert all(0 < len(b) <= batch_size for b in got)
