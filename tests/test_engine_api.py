"""The Python API end to end: dry runs, determinism, import, listing, region, plans."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import scaleset
from scaleset import Engine, Instance, Region, ScaleSetSpec
from scaleset.engine import EAGER_ITEMS
from scaleset.errors import NotFoundError

from tests.conftest import SIZE, zonal_spec


def test_public_names() -> None:
    for name in [
        "Region",
        "ScaleSetSpec",
        "Sku",
        "SkuProfile",
        "VmSize",
        "PriorityMixPolicy",
        "ScaleInPolicy",
        "Instance",
        "Plan",
        "Engine",
    ]:
        assert name in scaleset.__all__ and hasattr(scaleset, name)
    assert issubclass(scaleset.errors.CapacityError, scaleset.errors.ScaleSetError)


def test_dry_run_changes_nothing_and_matches_the_real_run(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(), capacity=4)
    dry = engine.set_capacity("web", 9, dry_run=True)
    assert dry.dry_run and engine.capacity("web") == 4
    real = engine.set_capacity("web", 9)
    assert list(dry.creates) == list(real.creates)
    assert [i.instance_id for i in engine.get_scale_set("web").instances] == list(range(9))


def test_same_state_same_plan(region: Region) -> None:
    def run() -> list[object]:
        e = Engine(region)
        e.create_scale_set(zonal_spec(), capacity=17)
        e.set_capacity("web", 40)
        return [*e.set_capacity("web", 11).deletes, *e.get_scale_set("web").instances]

    assert run() == run()


def test_plan_items_and_columns(engine: Engine) -> None:
    plan = engine.create_scale_set(zonal_spec(), capacity=6)
    assert len(plan.creates) == 6 and plan.capacity_before == 0 and plan.capacity_after == 6
    cols = plan.create_columns()
    assert cols["instance_id"] == [c.instance_id for c in plan.creates]
    assert cols["zone"] == [c.zone for c in plan.creates] == ["1", "2", "3", "1", "2", "3"]
    assert plan.creates[-1] == plan.creates[5]
    assert [c.instance_id for c in plan.creates[1:3]] == [1, 2]
    with pytest.raises(IndexError):
        plan.creates[6]
    deletes = engine.set_capacity("web", 4)
    assert deletes.delete_columns()["instance_id"] == [d.instance_id for d in deletes.deletes]


@pytest.mark.parametrize("n", [EAGER_ITEMS, EAGER_ITEMS + 1, 300], ids=["eager", "lazy", "lazy300"])
def test_plan_items_read_at_once_or_one_by_one_agree(n: int) -> None:
    """Small plans read their items in one call, large ones item by item: the same items either way,
    in the columns' order, with reasons, negative indexes and slices."""
    engine = Engine(Region(zones=["1", "2", "3"], fault_domains_per_zone=5), instance_limit=1_000)
    out = engine.create_scale_set(zonal_spec(), capacity=n)
    back = engine.set_capacity("web", 0)
    for items, cols in ((out.creates, out.create_columns()), (back.deletes, back.delete_columns())):
        assert len(items) == n and (type(items) is tuple) == (n <= EAGER_ITEMS)
        assert [i.instance_id for i in items] == cols["instance_id"]
        assert [i.zone for i in items] == cols["zone"] and [i.fault_domain for i in items] == cols[
            "fault_domain"
        ]
        assert all(i.reason for i in items)
        assert items[-1] == items[n - 1] and list(items[2:5]) == [items[2], items[3], items[4]]
        with pytest.raises(IndexError):
            items[n]
    assert sorted(d.instance_id for d in back.deletes) == list(range(n))
    assert (out.create_count, back.delete_count, back.capacity_before, back.capacity_after) == (n, n, n, 0)
    assert (back.scale_set, back.unallocated, back.unallocated_reason, back.dry_run) == ("web", 0, "", False)
    with pytest.raises(AttributeError, match="no attribute 'capacity'"):
        back.capacity  # type: ignore[attr-defined]  # noqa: B018


def test_import_then_scale_continues_ids(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec())
    engine.import_instances(
        "web",
        [
            Instance(
                instance_id=41, zone="2", fault_domain=3, vm_size=SIZE, health="Healthy", name="legacy-41"
            ),
            Instance(
                instance_id=7,
                zone="1",
                fault_domain=1,
                vm_size=SIZE,
                power_state="deallocated",
                model_version=0,
            ),
        ],
    )
    got = engine.get_scale_set("web").instances
    assert [(i.instance_id, i.name, i.zone, i.fault_domain) for i in got] == [
        (7, "web_7", "1", 1),
        (41, "legacy-41", "2", 3),
    ]
    assert got[0].power_state == "deallocated" and got[0].model_version == 0 and got[1].model_version == 1
    plan = engine.set_capacity("web", 3)
    assert [(c.instance_id, c.zone) for c in plan.creates] == [(42, "3")]


def test_spec_round_trips_through_dicts(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec(priority="Spot", max_price=-1))
    stored = engine.get_spec("web")
    assert ScaleSetSpec.from_dict(stored.to_dict()) == stored
    assert stored.max_price == -1.0 and stored.eviction_policy == "Deallocate"


def test_delete_and_list(engine: Engine) -> None:
    engine.create_scale_set(zonal_spec("b"), capacity=1)
    engine.create_scale_set(zonal_spec("a"), capacity=1)
    assert [s.name for s in engine.list_scale_sets()] == ["a", "b"]
    engine.delete_scale_set("a")
    assert [s.name for s in engine.list_scale_sets()] == ["b"]
    with pytest.raises(NotFoundError):
        engine.get_scale_set("a")


def test_region_description(engine: Engine) -> None:
    engine.set_zone_available("2", False)
    engine.set_pool_capacity("1", SIZE, "Spot", 10, price=0.01)
    engine.set_pool_capacity(None, SIZE, "Regular", None, price=0.1)
    region = engine.describe_region()
    assert region.zones == ("1", "2", "3") and region.unavailable_zones == ("2",)
    assert {(p.zone, p.priority, p.available, p.price) for p in region.pools} == {
        ("1", "Spot", 10, 0.01),
        (None, "Regular", None, 0.1),
    }


def test_concurrent_callers_share_one_engine(engine: Engine) -> None:
    for n in range(4):
        engine.create_scale_set(zonal_spec(f"s{n}"))

    def grow(name: str) -> None:
        for capacity in range(1, 200):
            engine.set_capacity(name, capacity)

    threads = [threading.Thread(target=grow, args=(f"s{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [engine.capacity(f"s{n}") for n in range(4)] == [199] * 4


def test_single_decisions_beside_a_large_change_on_another_thread() -> None:
    """One decision in a small set runs holding the GIL when the engine is free, and waits for it
    with the GIL released when a large change on another thread holds it: both finish, and the
    decisions are the ones a single thread makes."""
    region = Region(zones=["1", "2", "3"], fault_domains_per_zone=5)
    alone = Engine(region)
    alone.create_scale_set(zonal_spec("small"), capacity=1_000)
    expected = [alone.set_capacity("small", n).deletes[0].instance_id for n in range(999, -1, -1)]

    engine = Engine(region, instance_limit=100_000)
    engine.create_scale_set(zonal_spec("small"), capacity=1_000)
    engine.create_scale_set(zonal_spec("big"))

    started = threading.Event()

    def churn() -> None:
        started.set()  # the next call releases the GIL and holds the engine for milliseconds
        for _ in range(3):
            engine.set_capacity("big", 100_000)
            engine.set_capacity("big", 0)

    big = threading.Thread(target=churn)
    big.start()
    started.wait()
    order = [engine.set_capacity("small", n).deletes[0].instance_id for n in range(999, -1, -1)]
    big.join(timeout=120)
    assert not big.is_alive()
    assert order == expected
    assert (engine.capacity("small"), engine.capacity("big")) == (0, 0)


def test_frozen_model() -> None:
    spec = zonal_spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]
    assert hash(spec) == hash(zonal_spec())
