"""Placement benchmarks: the Rust core through the Python API against the pure-Python reference rules.

Run: ``pytest bench --benchmark-only`` (a release build: ``pip install .``). Every benchmark checks its
result. The reference (scaleset.testing.reference) implements the same zone / fault-domain /
priority-mix / scale-in rules in plain Python and is the differential oracle of the tests.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from scaleset import Engine, Instance, PriorityMixPolicy, Region, ScaleSetSpec, Sku
from scaleset.testing import reference

from bench.conftest import CURVE

SIZE = "Standard_D2s_v5"
REGION = Region(zones=["1", "2", "3"], fault_domains_per_zone=5)


def spec(mix: bool = True) -> ScaleSetSpec:
    return ScaleSetSpec(
        name="bench",
        zones=["1", "2", "3"],
        sku=Sku(name=SIZE),
        priority="Spot" if mix else "Regular",
        priority_mix_policy=PriorityMixPolicy(10, 50) if mix else None,
    )


def fresh(capacity: int = 0, limit: int | None = None) -> Engine:
    engine = Engine(REGION, instance_limit=limit)
    engine.create_scale_set(spec(), capacity=capacity)
    return engine


def assert_balanced_counts(zones: list[str | None], n: int) -> None:
    counts = Counter(zones)
    assert sum(counts.values()) == n
    assert max(counts.values()) - min(counts.values()) <= 1


def regular_target(n: int) -> int:
    return reference.regular_target(spec(), n)


# ----- scale out 0 -> N ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1_000, 100_000], ids=["1k", "100k"])
def test_scale_out_core(benchmark: Any, record: Any, n: int) -> None:
    benchmark.group = f"scale_out_0_to_{n}"
    plan = benchmark.pedantic(
        lambda e: e.set_capacity("bench", n),
        setup=lambda: ((fresh(limit=n),), {}),
        rounds=20 if n <= 1_000 else 5,
    )
    record("core")
    cols = plan.create_columns()
    assert_balanced_counts(cols["zone"], n)
    assert cols["priority"].count("Regular") == regular_target(n)


@pytest.mark.parametrize("n", [1_000, 100_000], ids=["1k", "100k"])
def test_scale_out_baseline(benchmark: Any, record: Any, n: int) -> None:
    benchmark.group = f"scale_out_0_to_{n}"
    stored = fresh().get_spec("bench")
    placed = benchmark.pedantic(
        lambda: reference.plan_scale_out(stored, REGION, [], n, 0), rounds=3 if n <= 1_000 else 1
    )
    record("baseline")
    assert_balanced_counts([p.zone for p in placed], n)
    assert sum(p.priority == "Regular" for p in placed) == regular_target(n)


# ----- one scale-in decision on a 1,000-instance set --------------------------------------------------


def test_scale_in_one_decision_core(benchmark: Any, record: Any) -> None:
    benchmark.group = "scale_in_one_decision_1k"
    engine = fresh(1_000)
    plan = benchmark(lambda: engine.set_capacity("bench", 999, dry_run=True))
    record("core")
    (delete,) = plan.deletes
    assert delete.priority == "Regular"  # 506 Regular > 504.5 wanted at 999: a Regular goes
    assert engine.capacity("bench") == 1_000


def test_scale_in_one_decision_baseline(benchmark: Any, record: Any) -> None:
    benchmark.group = "scale_in_one_decision_1k"
    engine = fresh(1_000)
    stored = engine.get_spec("bench")
    instances = list(engine.get_scale_set("bench").instances)
    expected = engine.set_capacity("bench", 999, dry_run=True).deletes[0].instance_id
    ids = benchmark(lambda: reference.plan_scale_in(stored, REGION, instances, 1))
    record("baseline")
    assert ids == [expected]


# ----- 1,000 -> 0, one decision (one call) at a time ---------------------------------------------------


def test_scale_in_1k_to_0_one_at_a_time(benchmark: Any, record: Any) -> None:
    """1,000 -> 0 one call at a time, the core against the reference. The core's rounds are short (about
    2 ms), the baseline's long (about 0.4 s), and this machine has slow moments lasting tens of
    milliseconds that slow both alike: measured apart, one side may land in one and the other not. So
    the two are interleaved: the baseline runs in chunks of 100 decisions, one before each core round (in
    the round's untimed setup), 5 baseline rounds across the core's 50, and each side's median is filed."""
    benchmark.group = "scale_in_1k_to_0_one_at_a_time"
    engine = fresh(1_000)
    stored = engine.get_spec("bench")
    start: list[Instance] = list(engine.get_scale_set("bench").instances)
    expected = [engine.set_capacity("bench", n).deletes[0].instance_id for n in range(999, -1, -1)]

    def run(engine: Engine) -> list[int]:
        return [engine.set_capacity("bench", n).deletes[0].instance_id for n in range(999, -1, -1)]

    chunk, chunks_per_round = 100, 10

    def baseline() -> Iterator[None]:
        """One baseline round, paused after every ``chunk`` decisions."""
        live, order = list(start), []
        for k in range(1, 1_001):
            (victim,) = reference.plan_scale_in(stored, REGION, live, 1)
            order.append(victim)
            live = [i for i in live if i.instance_id != victim]
            if k % chunk == 0:
                yield
        assert order == expected

    baseline_rounds: list[float] = []
    current, spent, done = baseline(), 0.0, 0

    def setup() -> tuple[tuple[Engine], dict[str, Any]]:
        nonlocal current, spent, done
        began = time.perf_counter()
        next(current, None)
        spent += time.perf_counter() - began
        done += 1
        if done == chunks_per_round:
            next(current, None)  # the round's check of its order
            baseline_rounds.append(spent)
            current, spent, done = baseline(), 0.0, 0
        return (fresh(1_000),), {}

    order = benchmark.pedantic(run, setup=setup, rounds=5 * chunks_per_round)
    assert order == expected
    record("core")
    if not benchmark.disabled:
        assert len(baseline_rounds) == 5
        record("baseline", median=statistics.median(baseline_rounds))


# ----- one decision at 100,000 against one at 1,000 (the decisions read kept groups, not every instance) --


@pytest.mark.parametrize("n", [1_000, 10_000, 100_000, 1_000_000], ids=["1k", "10k", "100k", "1M"])
@pytest.mark.parametrize("kind", ["scale_in", "scale_out"])
def test_one_decision_scaling_curve(benchmark: Any, record: Any, kind: str, n: int) -> None:
    """One decision (a dry run of one instance fewer, or one more) at each size: the engine's kept
    groups make it O(groups + log N). 100,000 against 1,000 is gated at 3x (FLOORS)."""
    benchmark.group = f"{kind}_one_decision_100k_vs_1k" if n in (1_000, 100_000) else f"{kind}_one_decision"
    engine = fresh(n, limit=max(n + 1, 1_000))
    target = n - 1 if kind == "scale_in" else n + 1
    plan = benchmark(lambda: engine.set_capacity("bench", target, dry_run=True))
    if n == 100_000:
        record("core")
    elif n == 1_000:
        record("baseline")
    if not benchmark.disabled:
        CURVE[kind, n] = benchmark.stats.stats.median
    assert engine.capacity("bench") == n
    # The Spot mix decides the priority: the one the target count has too many (or too few) of.
    regular_changes = regular_target(n) != regular_target(target)
    if kind == "scale_in":
        (delete,) = plan.deletes
        assert delete.priority == ("Regular" if regular_changes else "Spot")
    else:
        (create,) = plan.creates
        assert create.priority == ("Regular" if regular_changes else "Spot")
        assert create.instance_id == n


# ----- 100,000 -> 0 one call at a time, against 1,000 -> 0 a hundred times -------------------------------


def test_scale_in_100k_to_0_one_at_a_time(benchmark: Any, record: Any) -> None:
    benchmark.group = "scale_in_to_0_per_call_100k_vs_1k"

    def run(engine: Engine) -> int:
        for n in range(99_999, -1, -1):
            engine.set_capacity("bench", n)
        return engine.capacity("bench")

    left = benchmark.pedantic(run, setup=lambda: ((fresh(100_000, limit=100_000),), {}), rounds=1)
    record("core")
    assert left == 0


def test_scale_in_1k_to_0_a_hundred_times(benchmark: Any, record: Any) -> None:
    benchmark.group = "scale_in_to_0_per_call_100k_vs_1k"
    engines = [fresh(1_000) for _ in range(100)]

    def run() -> int:
        for engine in engines:
            for n in range(999, -1, -1):
                engine.set_capacity("bench", n)
        return sum(e.capacity("bench") for e in engines)

    left = benchmark.pedantic(run, rounds=1)
    record("baseline")
    assert left == 0
