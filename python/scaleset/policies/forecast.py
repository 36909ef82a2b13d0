"""The forecast behind predictive autoscale: a seasonal-naive model over 5-minute buckets.

The forecast of a metric at time ``t`` is seasonal-naive over weeks: the mean of the same 5-minute bucket
of local time one and two weeks earlier (the same weekday, so weekday and weekend peaks each keep their
own shape, and the daily pattern comes with it), scaled by how the last hour compares with the same hour
a week earlier (clamped to 0.5-2x), so that growth carries over. Local time (the setting's time zone)
keeps the pattern in place across a DST change. That captures the daily
and weekly seasonality predictive autoscale is for (reference §9.5) in a few lines, with nothing to fit:
statistical packages (statsmodels, Prophet) would add hundreds of megabytes to every server for a model
that, on a series whose shape repeats daily and weekly, forecasts no better. Like Azure, it forecasts
only with at least 7 days of history and keeps at most 15 days.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

__all__ = ["BUCKET_S", "HISTORY_S", "MIN_HISTORY_S", "SeasonalHistory"]

BUCKET_S = 300
HISTORY_S = 15 * 86_400
MIN_HISTORY_S = 7 * 86_400


class SeasonalHistory:
    """Means of one metric per 5-minute bucket over the last 15 days (at most 4,320 numbers)."""

    def __init__(self) -> None:
        self._sums: dict[int, list[float]] = {}
        self._first: int | None = None

    def add(self, times: list[float], values: list[float]) -> None:
        for t, v in zip(times, values, strict=True):
            b = int(t // BUCKET_S)
            cell = self._sums.setdefault(b, [0.0, 0.0])
            cell[0] += v
            cell[1] += 1.0
            self._first = b if self._first is None else min(self._first, b)
        if self._sums:
            newest = max(self._sums)
            for b in [b for b in self._sums if b < newest - HISTORY_S // BUCKET_S]:
                del self._sums[b]
            self._first = max(self._first or newest, newest - HISTORY_S // BUCKET_S)

    def span_s(self) -> float:
        """How much history there is, in seconds."""
        if not self._sums or self._first is None:
            return 0.0
        return float((max(self._sums) - self._first + 1) * BUCKET_S)

    def _mean(self, b: int) -> float | None:
        cell = self._sums.get(b)
        return None if cell is None else cell[0] / cell[1]

    def forecast(self, t: float, tz: dt.tzinfo = dt.UTC) -> float | None:
        """The metric expected at ``t``; None with less than 7 days of history."""
        if self.span_s() < MIN_HISTORY_S:
            return None
        local = dt.datetime.fromtimestamp(t, tz)

        def at(when: dt.datetime) -> float | None:
            return self._mean(int(when.timestamp() // BUCKET_S))

        # The same wall-clock time k weeks earlier (aware datetimes add days in local time).
        seasonal = [v for k in (7, 14) if (v := at(local - dt.timedelta(days=k))) is not None]
        if not seasonal:
            return None
        return sum(seasonal) / len(seasonal) * self._level(tz)

    def _level(self, tz: dt.tzinfo) -> float:
        """The last hour of history against the same local hour a week before (1.0 when either is missing)."""
        newest = max(self._sums)
        week_ago = dt.datetime.fromtimestamp(newest * BUCKET_S, tz) - dt.timedelta(days=7)
        before = int(week_ago.timestamp() // BUCKET_S)
        recent = [m for b in range(newest - 11, newest + 1) if (m := self._mean(b)) is not None]
        earlier = [m for b in range(before - 11, before + 1) if (m := self._mean(b)) is not None]
        if not recent or not earlier or sum(earlier) <= 0:
            return 1.0
        return min(2.0, max(0.5, (sum(recent) / len(recent)) / (sum(earlier) / len(earlier))))

    def to_dict(self) -> dict[str, Any]:
        return {"first": self._first, "buckets": {str(b): c for b, c in self._sums.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeasonalHistory:
        h = cls()
        h._first = data.get("first")
        h._sums = {int(b): list(c) for b, c in data.get("buckets", {}).items()}
        return h
