"""Autoscale evaluation: 1,000 scale sets' settings over one hour of per-instance samples, the Rust
evaluator (through the engine facade) against the pure-Python rules (scaleset.testing.autoscale_reference)
in the same run. Each scale set has 10 instances reporting CPU once a minute (600 samples per set, 600,000
in all) and a profile with a scale-out and a scale-in rule over a 60-minute window.
"""

from __future__ import annotations

from typing import Any

import pytest
from scaleset import AutoscaleCapacity, MetricTrigger, ScaleAction, ScaleRule
from scaleset.engine import MetricBuffer, compile_rules
from scaleset.testing import autoscale_reference

SETS, INSTANCES, MINUTES = 1_000, 10, 60
NOW = 1_800_000_000.0
BOUNDS = AutoscaleCapacity(2, 50, 2)
RULES = (
    ScaleRule(MetricTrigger("cpu", "GreaterThan", 70, time_window="PT60M"), ScaleAction("Increase")),
    ScaleRule(MetricTrigger("cpu", "LessThan", 30, time_window="PT60M"), ScaleAction("Decrease")),
)


def load(s: int) -> float:
    """Set ``s``'s CPU: a third of the sets are busy, a third idle, a third in between."""
    return (90.0, 10.0, 50.0)[s % 3]


def samples(s: int) -> list[tuple[float, float]]:
    return [(NOW - 3600 + m * 60 + i, load(s) + i % 3) for m in range(MINUTES) for i in range(INSTANCES)]


@pytest.fixture(scope="module")
def data() -> dict[int, list[tuple[float, float]]]:
    return {s: samples(s) for s in range(SETS)}


def expected(s: int) -> tuple[str, int]:
    return [("Scale", 11), ("Scale", 9), ("NoAction", 10)][s % 3]


def test_autoscale_core(benchmark: Any, record: Any, data: dict[int, list[tuple[float, float]]]) -> None:
    benchmark.group = "autoscale_1000_sets_1h"
    buffer = MetricBuffer()
    for s, series in data.items():
        buffer.add(f"set-{s}", "cpu", [t for t, _ in series], [v for _, v in series])
    rules = compile_rules(RULES)

    def run() -> list[tuple[str, int]]:
        out = []
        for s in range(SETS):
            d = buffer.evaluate(f"set-{s}", rules, INSTANCES, BOUNDS, NOW, None)
            out.append((d["kind"], d["capacity"]))
        return out

    decisions = benchmark(run)
    record("core")
    assert decisions == [expected(s) for s in range(SETS)]
    # Memory: 16 bytes a sample in the core, and the buffer holds only the retention's worth.
    assert buffer.sample_count() == SETS * INSTANCES * MINUTES
    benchmark.extra_info["bytes_per_sample"] = MetricBuffer.SAMPLE_BYTES
    assert MetricBuffer.SAMPLE_BYTES == 16
    buffer.set_retention("set-0", 600)
    buffer.add("set-0", "cpu", [NOW], [50.0])
    assert buffer.sample_count() == SETS * INSTANCES * MINUTES - INSTANCES * MINUTES + INSTANCES * 10 + 1


def test_autoscale_baseline(benchmark: Any, record: Any, data: dict[int, list[tuple[float, float]]]) -> None:
    benchmark.group = "autoscale_1000_sets_1h"

    def run() -> list[tuple[str, int]]:
        return [
            autoscale_reference.decide(RULES, {"cpu": data[s]}, INSTANCES, BOUNDS, NOW, None)
            for s in range(SETS)
        ]

    decisions = benchmark.pedantic(run, rounds=1 if benchmark.disabled else 3)
    record("baseline")
    assert decisions == [expected(s) for s in range(SETS)]
