"""Rebalancing benchmarks: the pool-based CP-SAT rebalancer against a per-VM boolean CP-SAT model of the
same problem and a greedy heuristic, from a skewed start: the scale set grew while zone 1 was down, then
half of its Spot instances were evicted (eviction_policy Delete), so zones and the priority mix are off.

Run: ``pytest bench/test_bench_rebalance.py --benchmark-only``. Each benchmark checks its plan; moves and
violation are in the summary.
"""

from __future__ import annotations

from typing import Any

import pytest
from scaleset import Controller, PriorityMixPolicy, Region, ScaleSetSpec, Sku
from scaleset.testing.rebalance_baselines import greedy_rebalance, per_vm_rebalance

from bench.conftest import REBALANCE

SIZES = [1_000, 10_000, 100_000]


def skewed(n: int) -> Controller:
    engine = Controller(Region(zones=["1", "2", "3"], fault_domains_per_zone=5), instance_limit=200_000)
    engine.create_scale_set(
        ScaleSetSpec(
            name="rb",
            zones=["1", "2", "3"],
            sku=Sku(name="Standard_D2s_v5"),
            priority="Spot",
            eviction_policy="Delete",
            priority_mix_policy=PriorityMixPolicy(10, 50),
        )
    )
    engine.set_zone_available("1", False)
    engine.set_capacity("rb", n)
    engine.set_zone_available("1", True)
    spot = engine.instance_columns("rb")
    evicted = [i for i, p in zip(spot["instance_id"], spot["priority"], strict=False) if p == "Spot"][::2]
    engine.evict("rb", evicted)
    return engine


@pytest.mark.parametrize("n", SIZES, ids=["1k", "10k", "100k"])
def test_rebalance_pools(benchmark: Any, record: Any, n: int) -> None:
    benchmark.group = f"rebalance_{n}"
    engine = skewed(n)
    engine.rebalance("rb")  # OR-Tools import and first-solve warm-up
    plan = benchmark.pedantic(
        lambda: engine.rebalance("rb", time_limit_s=10.0), rounds=7 if n < 100_000 else 5
    )
    record("core")
    assert plan.optimal and plan.score_after == 0 == plan.violation_bound
    assert plan.violation_before["zones"] > 0 and plan.violation_before["priority_mix"] > 0
    capacity = engine.capacity("rb")
    assert plan.zone_counts_after["1"] >= capacity // 3
    if not benchmark.disabled:
        REBALANCE[f"{n:>7} pool model"] = (
            plan.replacements,
            plan.score_after,
            benchmark.stats.stats.median,
            plan.status,
        )


@pytest.mark.parametrize("n", SIZES, ids=["1k", "10k", "100k"])
def test_rebalance_greedy(benchmark: Any, record: Any, n: int) -> None:
    benchmark.group = f"rebalance_{n}"
    engine = skewed(n)
    result = benchmark.pedantic(lambda: greedy_rebalance(engine.engine, "rb"), rounds=3)
    exact = engine.rebalance("rb")
    # The greedy script balances zones but knows nothing of the mix: it leaves violation the model removes.
    assert result.violation > exact.score_after
    if not benchmark.disabled:
        REBALANCE[f"{n:>7} greedy"] = (
            result.replacements,
            result.violation,
            benchmark.stats.stats.median,
            result.status,
        )


def test_rebalance_per_vm_model_1k(benchmark: Any, record: Any) -> None:
    benchmark.group = "rebalance_1000"
    engine = skewed(1_000)
    limit = 1.0 if benchmark.disabled else 10.0
    result = benchmark.pedantic(lambda: per_vm_rebalance(engine.engine, "rb", time_limit_s=limit), rounds=1)
    record("baseline")
    exact = engine.rebalance("rb")
    # The same problem: proven, it agrees with the pool model; stopped by its time limit, it is no better.
    if result.status == "OPTIMAL":
        assert (result.violation, result.replacements) == (exact.score_after, exact.replacements)
    else:
        assert result.violation == -1 or (result.violation, result.replacements) >= (
            exact.score_after,
            exact.replacements,
        )
    if not benchmark.disabled:
        REBALANCE["   1000 per-VM model"] = (
            result.replacements,
            result.violation,
            benchmark.stats.stats.median,
            result.status,
        )
