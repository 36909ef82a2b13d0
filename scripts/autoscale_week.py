"""Draws docs/autoscale-week.png: the simulated fleet of tests/test_autoscale_week.py, its demand, and
the capacity reactive and predictive autoscale gave it, over the third week (after the DST change).

Run: ``pip install '.[dev]' && python scripts/autoscale_week.py`` (matplotlib is a dev extra).
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from scaleset.testing.simulation import BERLIN, START, THRESHOLD, simulate

OUT = Path(__file__).resolve().parent.parent / "docs" / "autoscale-week.png"


def main() -> None:
    reactive, predictive = simulate(21), simulate(21, predictive="Enabled")
    week = START + 14 * 86_400
    tuesday = week + 86_400
    fig, (ax, zoom) = plt.subplots(2, 1, figsize=(12, 7.5), dpi=110, gridspec_kw={"height_ratios": [3, 2]})
    for axis, lo, hi, fmt in (
        (ax, week, week + 7 * 86_400, "%a %d %b"),
        (zoom, tuesday + 6.5 * 3600, tuesday + 11 * 3600, "%H:%M"),
    ):
        keep = [i for i, t in enumerate(reactive.times) if lo <= t < hi]
        times = [dt.datetime.fromtimestamp(reactive.times[i], BERLIN) for i in keep]
        axis.plot(
            times,
            [reactive.demand[i] / THRESHOLD for i in keep],
            color="0.5",
            lw=1,
            label=f"instances the demand needs (load / {THRESHOLD:.0f})",
        )
        forecast = [predictive.forecast[i] for i in keep]
        axis.plot(
            times,
            [math.nan if f is None else f / THRESHOLD for f in forecast],
            color="tab:green",
            lw=1,
            ls="--",
            label="forecast of it (from the two weeks before)",
        )
        axis.step(
            times,
            [reactive.capacity[i] for i in keep],
            where="post",
            color="tab:orange",
            lw=1.5,
            label="capacity, reactive rules",
        )
        axis.step(
            times,
            [predictive.capacity[i] for i in keep],
            where="post",
            color="tab:blue",
            lw=1.5,
            label="capacity, predictive Enabled (look-ahead 30 min)",
        )
        axis.set_ylabel("instances")
        axis.xaxis.set_major_formatter(mdates.DateFormatter(fmt, tz=BERLIN))
        axis.grid(alpha=0.3)
    ax.set_title("scaleset autoscale: simulated week 3 (Berlin time, after the change to summer time)")
    zoom.set_title(
        "Tuesday morning: predictive capacity is in place before the 09:00 peak; reactive rules catch up an hour later",
        fontsize=9,
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
