"""A simulated three weeks of autoscale (scaleset.testing.simulation): demand with weekday and weekend
peaks drives per-instance metrics; schedules switch at local times across the EU change to summer time;
capacity stays within bounds, nothing flaps, cooldowns hold; predictive autoscale has the peak capacity in
place before each weekday peak, where reactive autoscale lags it."""

from __future__ import annotations

import datetime as dt
import itertools
import math

import pytest
from scaleset.policies.autoscale import active_profile
from scaleset.testing.simulation import BERLIN, PEAK, START, THRESHOLD, Trace, setting, simulate

NEED = math.ceil(PEAK / THRESHOLD)  # instances the weekday peak needs


@pytest.fixture(scope="module")
def reactive() -> Trace:
    return simulate(days=21)


@pytest.fixture(scope="module")
def predictive() -> Trace:
    return simulate(days=21, predictive="Enabled")


def scales(trace: Trace) -> list[tuple[float, str]]:
    return [(t, a.kind) for t, a in trace.actions if a.kind in ("AutoscaleScaleOut", "AutoscaleScaleIn")]


@pytest.mark.parametrize("mode", ["reactive", "predictive"])
def test_bounds_cooldowns_and_no_flapping(mode: str, request: pytest.FixtureRequest) -> None:
    trace: Trace = request.getfixturevalue(mode)
    s = setting("Enabled" if mode == "predictive" else "Disabled")
    for t, capacity in zip(trace.times, trace.capacity, strict=True):
        profile, _ = active_profile(s, t)
        assert profile is not None
        assert profile.capacity.minimum <= capacity <= profile.capacity.maximum, dt.datetime.fromtimestamp(
            t, BERLIN
        )
    events = scales(trace)
    assert len(events) > 100  # it did scale, every day
    for (t1, k1), (t2, k2) in itertools.pairwise(events):
        assert t2 - t1 >= 5 * 60, "a scale action inside the previous one's 5-minute cooldown"
        if k1 != k2:
            assert t2 - t1 >= 15 * 60, f"flapping at {dt.datetime.fromtimestamp(t2, BERLIN)}"


def test_schedules_switch_at_local_times_across_the_dst_change() -> None:
    s = setting()
    for day in (dt.date(2027, 3, 22), dt.date(2027, 3, 29)):  # the Mondays before and after the change
        seven = dt.datetime(day.year, day.month, day.day, 7, 0, tzinfo=BERLIN).timestamp()
        assert active_profile(s, seven - 60)[0].name == "off hours"  # type: ignore[union-attr]
        assert active_profile(s, seven)[0].name == "business hours"  # type: ignore[union-attr]
    # 07:00 in Berlin is 06:00 UTC before the change and 05:00 UTC after it.
    assert dt.datetime(2027, 3, 22, 7, tzinfo=BERLIN).astimezone(dt.UTC).hour == 6
    assert dt.datetime(2027, 3, 29, 7, tzinfo=BERLIN).astimezone(dt.UTC).hour == 5
    # Saturday keeps the Friday-evening profile all day (a recurring profile lasts until the next starts).
    saturday_noon = dt.datetime(2027, 3, 27, 12, tzinfo=BERLIN).timestamp()
    assert active_profile(s, saturday_noon)[0].name == "off hours"  # type: ignore[union-attr]


def reached(trace: Trace, day: int) -> float:
    """When capacity first reached the weekday peak's need on ``day`` (seconds after local midnight)."""
    midnight = dt.datetime.fromtimestamp(START, BERLIN) + dt.timedelta(days=day)
    start = midnight.timestamp()
    first = next(t for t, c in zip(trace.times, trace.capacity, strict=True) if t >= start and c >= NEED)
    return first - start


def test_predictive_autoscale_has_the_peak_capacity_in_place_first(
    reactive: Trace, predictive: Trace
) -> None:
    plateau = 9 * 3600  # the load reaches its peak at 09:00 local time
    third_week_weekdays = range(14, 19)
    for day in third_week_weekdays:
        assert reached(predictive, day) < plateau, f"day {day}: predictive capacity not in place by 09:00"
        assert reached(reactive, day) > plateau, (
            f"day {day}: reactive scaling keeps up (the test proves nothing)"
        )
        assert reached(predictive, day) + 20 * 60 < reached(reactive, day)
    # Without a week of history there is no forecast: the first week looks the same in both runs.
    first_week = [
        c for t, c in zip(predictive.times, predictive.capacity, strict=True) if t < START + 7 * 86_400
    ]
    assert first_week == reactive.capacity[: len(first_week)]
    assert all(f is None for f in predictive.forecast[: len(first_week) - 1])


def test_forecast_only_records_what_it_would_do_and_changes_nothing(reactive: Trace) -> None:
    watching = simulate(days=9, predictive="ForecastOnly")
    assert watching.capacity == reactive.capacity[: len(watching.capacity)]  # it never acted
    forecasts = [a for t, a in watching.actions if a.kind == "AutoscaleForecast"]
    assert forecasts and all("forecast only" in a.reason for a in forecasts)
    assert all(t >= START + 7 * 86_400 for t, a in watching.actions if a.kind == "AutoscaleForecast")
