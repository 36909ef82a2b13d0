"""Rolling-upgrade planning: every batch of a 1,000 and a 100,000-instance upgrade (3 zones, 5 fault
domains, 20% batches, unhealthy first), the Rust core against the pure-Python planner of the same rules
(scaleset.testing.reference.plan_upgrade_batches) in the same run.

Run: ``pytest bench/test_bench_upgrade.py --benchmark-only``.
"""

from __future__ import annotations

from typing import Any

import pytest
from scaleset import Engine, Region, ScaleSetSpec, Sku
from scaleset.testing import reference


def out_of_date(n: int) -> tuple[Engine, int]:
    engine = Engine(Region(zones=["1", "2", "3"], fault_domains_per_zone=5), instance_limit=200_000)
    spec = ScaleSetSpec(name="up", zones=["1", "2", "3"], sku=Sku(name="Standard_D2s_v5"))
    engine.create_scale_set(spec, n)
    engine.report_health("up", range(0, n, 2), "Healthy")
    engine.report_health("up", range(1, n, 2), "Unhealthy")
    engine.update_scale_set(ScaleSetSpec(name="up", zones=["1", "2", "3"], sku=Sku(name="Standard_D4s_v5")))
    return engine, max(1, n * 20 // 100)


def check(batches: list[list[int]], n: int, size: int, zone: dict[int, str | None]) -> None:
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert all(0 < len(b) <= size and len({zone[i] for i in b}) == 1 for b in batches)
    first = batches[0]
    odd = [i % 2 == 1 for i in first]
    assert odd[0] and odd == sorted(odd, reverse=True)  # unhealthy (odd ids) first, then healthy top-up


@pytest.mark.parametrize("n", [1_000, 100_000], ids=["1k", "100k"])
def test_plan_upgrade_core(benchmark: Any, record: Any, n: int) -> None:
    benchmark.group = f"upgrade_batches_{n}"
    engine, size = out_of_date(n)
    batches = benchmark(lambda: engine.plan_upgrade_batches("up", size, True, False))
    record("core")
    cols = engine.instance_columns("up")
    check(batches, n, size, dict(zip(cols["instance_id"], cols["zone"], strict=False)))


@pytest.mark.parametrize("n", [1_000, 100_000], ids=["1k", "100k"])
def test_plan_upgrade_baseline(benchmark: Any, record: Any, n: int) -> None:
    benchmark.group = f"upgrade_batches_{n}"
    engine, size = out_of_date(n)
    spec, instances = engine.get_spec("up"), list(engine.get_scale_set("up").instances)
    batches = benchmark.pedantic(
        lambda: reference.plan_upgrade_batches(spec, instances, size, True, False),
        rounds=3 if n <= 1_000 else 1,
    )
    record("baseline")
    assert batches == engine.plan_upgrade_batches("up", size, True, False)
