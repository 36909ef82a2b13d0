"""A simulated fleet under autoscale: three weeks of a demand curve with daily peaks (lower at weekends),
across the EU change to summer time, driving per-instance CPU samples into a Controller. The tests assert
on it; ``scripts/autoscale_week.py`` draws it for the README.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from scaleset.controller import Controller
from scaleset.model import (
    AutoscaleCapacity,
    AutoscaleProfile,
    AutoscaleSetting,
    MetricTrigger,
    PredictiveAutoscalePolicy,
    Recurrence,
    RecurrentSchedule,
    Region,
    ScaleAction,
    ScaleRule,
    ScaleSetSpec,
    Sku,
)
from scaleset.policies.common import Action

__all__ = ["BERLIN", "PEAK", "START", "THRESHOLD", "Trace", "demand", "setting", "simulate"]

BERLIN = ZoneInfo("Europe/Berlin")
#: Monday 2027-03-15 00:00 in Berlin; summer time starts on Sunday 2027-03-28, in the second week.
START = dt.datetime(2027, 3, 15, tzinfo=BERLIN).timestamp()
#: Total CPU (percent of one instance, summed over instances) at the weekday and weekend peaks.
PEAK, WEEKEND_PEAK, BASE = 1500.0, 500.0, 150.0
THRESHOLD = 70.0
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def demand(t: float) -> float:
    """Total CPU load at ``t``: a steep ramp from 08:00 to 09:00 local time (the morning rush), a plateau to
    17:00, down by 19:00."""
    local = dt.datetime.fromtimestamp(t, BERLIN)
    h = local.hour + local.minute / 60
    peak = PEAK if local.weekday() < 5 else WEEKEND_PEAK

    def smooth(x: float) -> float:
        x = min(max(x, 0.0), 1.0)
        return x * x * (3 - 2 * x)

    level = smooth(h - 8) - smooth((h - 17) / 2)
    return BASE + (peak - BASE) * level * (1 + 0.03 * math.sin(t / 1800))


def setting(predictive: str = "Disabled") -> AutoscaleSetting:
    rules = (
        ScaleRule(
            MetricTrigger("cpu", "GreaterThan", THRESHOLD), ScaleAction("Increase", value=1, cooldown="PT5M")
        ),
        ScaleRule(MetricTrigger("cpu", "LessThan", 35), ScaleAction("Decrease", value=1, cooldown="PT5M")),
    )
    tz = "W. Europe Standard Time"
    return AutoscaleSetting(
        [
            AutoscaleProfile(
                "business hours",
                AutoscaleCapacity(4, 40, 4),
                rules,
                recurrence=Recurrence(RecurrentSchedule(tz, WEEKDAYS, [7], [0])),
            ),
            AutoscaleProfile(
                "off hours",
                AutoscaleCapacity(2, 40, 2),
                rules,
                recurrence=Recurrence(RecurrentSchedule(tz, [*WEEKDAYS, "Saturday", "Sunday"], [20], [0])),
            ),
        ],
        predictive_autoscale_policy=(
            None if predictive == "Disabled" else PredictiveAutoscalePolicy(predictive, "PT30M")
        ),
    )


@dataclass
class Trace:
    times: list[float] = field(default_factory=list)
    demand: list[float] = field(default_factory=list)
    capacity: list[int] = field(default_factory=list)
    forecast: list[float | None] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)
    actions: list[tuple[float, Action]] = field(default_factory=list)


def simulate(days: int = 21, predictive: str = "Disabled", step_s: float = 120.0) -> Trace:
    """Runs the fleet for ``days``: every ``step_s`` each instance reports its share of the load, then
    autoscale evaluates. ``predictive`` is the predictive autoscale mode (Disabled, ForecastOnly, Enabled). The load is not capped at 100% (think of requests per instance against a target,
    not CPU): a capped metric hides how far demand outran capacity, and the forecast learns from it."""
    c = Controller(Region(zones=["1", "2", "3"]))
    spec = ScaleSetSpec(name="web", zones=["1", "2", "3"], sku=Sku(name="Standard_D2s_v5"))
    c.create_scale_set(spec, 2, now=START)
    c.set_autoscale_setting("web", setting(predictive), now=START)
    trace = Trace()
    for k in range(int(days * 86_400 / step_s)):
        t = START + (k + 1) * step_s
        n = c.capacity("web")
        load = demand(t)
        per_instance = load / n
        c.report_metrics("web", "cpu", [(t - 1, per_instance)] * n, now=t)
        for action in c.advance(t):
            if action.kind.startswith("Autoscale"):
                trace.actions.append((t, action))
        trace.times.append(t)
        trace.demand.append(load)
        trace.capacity.append(c.capacity("web"))
        trace.forecast.append(c.autoscale_forecast("web", "cpu", t))
        trace.profile.append(c.evaluate_autoscale("web", t).profile if k % 30 == 0 else trace.profile[-1])
    return trace
