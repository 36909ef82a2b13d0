"""Autoscale's rules in plain Python: the differential oracle of the Rust evaluator and its benchmark
baseline. Samples are a list of (time in seconds, value); the rules read as reference §9 states them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from scaleset.engine import duration_seconds
from scaleset.model import AutoscaleCapacity, ScaleRule

__all__ = ["aggregate", "decide"]

_OPS: dict[str, Callable[[float, float], bool]] = {
    "Equals": lambda v, t: v == t,
    "NotEquals": lambda v, t: v != t,
    "GreaterThan": lambda v, t: v > t,
    "GreaterThanOrEqual": lambda v, t: v >= t,
    "LessThan": lambda v, t: v < t,
    "LessThanOrEqual": lambda v, t: v <= t,
}


def aggregate(samples: Sequence[tuple[float, float]], now: float, rule: ScaleRule) -> float | None:
    t = rule.metric_trigger
    grain, window = duration_seconds(t.time_grain), duration_seconds(t.time_window)
    start = now - window
    grains: dict[int, list[float]] = {}
    for time, value in samples:
        if start <= time < now:
            grains.setdefault(int((time - start) // grain), []).append(value)
    if not grains:
        return None
    per_grain = [_statistic(t.statistic, grains[k]) for k in sorted(grains)]
    if t.time_aggregation == "Count":
        return float(sum(len(v) for v in grains.values()))
    if t.time_aggregation == "Last":
        return per_grain[-1]
    return _statistic(
        {"Minimum": "Min", "Maximum": "Max", "Total": "Sum"}.get(t.time_aggregation, "Average"), per_grain
    )


def _statistic(name: str, xs: list[float]) -> float:
    if name == "Min":
        return min(xs)
    if name == "Max":
        return max(xs)
    if name == "Sum":
        return sum(xs)
    if name == "Count":
        return float(len(xs))
    return sum(xs) / len(xs)


def _target(rule: ScaleRule, capacity: int) -> int:
    a = rule.scale_action
    sign = 1 if a.direction == "Increase" else -1 if a.direction == "Decrease" else 0
    if a.type == "ExactCount":
        return max(a.value, capacity) if sign > 0 else min(a.value, capacity) if sign < 0 else capacity
    step = {"ChangeCount": a.value, "ServiceAllowedNextValue": 1}.get(a.type)
    if step is None:  # PercentChangeCount
        step = max(1, math.ceil(capacity * a.value / 100))
    return max(0, capacity + sign * step)


def _projected(value: float, capacity: int, n: int) -> float:
    """A per-instance value spread over ``n`` instances; over none, an unbounded load (or none)."""
    if n == 0:
        return 0.0 if value == 0 else math.copysign(math.inf, value)
    return value * capacity / n


def _per_instance(rule: ScaleRule) -> bool:
    return rule.metric_trigger.divide_per_instance or rule.metric_trigger.statistic in (
        "Average",
        "Min",
        "Max",
    )


def decide(
    rules: Sequence[ScaleRule],
    samples: dict[str, list[tuple[float, float]]],
    capacity: int,
    bounds: AutoscaleCapacity,
    now: float,
    cooldown_until: float | None,
) -> tuple[str, int]:
    """(Scale | NoAction | Skipped, capacity): the same decision as the core's."""
    if not bounds.minimum <= capacity <= bounds.maximum:
        return "Scale", min(max(capacity, bounds.minimum), bounds.maximum)
    values: list[float] = []
    for r in rules:
        v = aggregate(samples.get(r.metric_trigger.metric_name, []), now, r)
        if v is None:
            return ("Scale", bounds.default) if capacity < bounds.default else ("NoAction", capacity)
        values.append(v / max(capacity, 1) if r.metric_trigger.divide_per_instance else v)

    def fires(r: ScaleRule, v: float) -> bool:
        return _OPS[r.metric_trigger.operator](v, r.metric_trigger.threshold)

    outs = [
        (min(_target(r, capacity), bounds.maximum), k)
        for k, r in enumerate(rules)
        if r.scale_action.direction == "Increase" and fires(r, values[k])
    ]
    chosen: int | None = None
    if outs:
        best = max(t for t, _ in outs)
        chosen = best if best > capacity else None
    else:
        ins = [k for k, r in enumerate(rules) if r.scale_action.direction == "Decrease"]
        if ins and all(fires(rules[k], values[k]) for k in ins):
            target = max(max(_target(rules[k], capacity), bounds.minimum) for k in ins)
            for n in range(target, capacity):
                flap = any(
                    r.scale_action.direction == "Increase"
                    and fires(r, _projected(values[k], capacity, n) if _per_instance(r) else values[k])
                    for k, r in enumerate(rules)
                )
                if not flap:
                    chosen = n
                    break
            else:
                if target < capacity:
                    return "Skipped", capacity
    if chosen is None:
        return "NoAction", capacity
    if cooldown_until is not None and now < cooldown_until:
        return "Skipped", capacity
    return "Scale", chosen
