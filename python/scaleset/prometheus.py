"""Metrics pulled from Prometheus for autoscale triggers that name a PromQL ``query``.

Before each evaluation the server asks Prometheus' HTTP API (``/api/v1/query``) for every such query at
its own clock and records the answers as samples of the trigger's ``metric_name``, through the same
durable ReportMetrics command a client would send. So a restart, or a replay of the log, sees exactly the
values the live decisions saw. A query should return one number (a scalar, or a vector of one series:
wrap it in ``sum()`` or ``avg()``); a vector of several series counts as their average. A query that
fails or returns nothing records nothing: the rule then sees missing data, and autoscale falls back to
the profile's default capacity, as Azure does when it cannot read a metric.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING

from scaleset.commands import ReportMetrics

if TYPE_CHECKING:
    from scaleset.control import ControlPlane

log = logging.getLogger(__name__)

__all__ = ["PrometheusSource", "pull_metrics"]


class PrometheusSource:
    """Instant queries against one Prometheus server (``http://host:9090``)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def query(self, promql: str, at: float) -> float | None:
        """The query's value at ``at`` (seconds since the epoch), or None (no data, or an error, logged)."""
        params = urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=self.timeout) as reply:
                body = json.load(reply)
        except (OSError, ValueError) as e:
            log.warning("prometheus query %r failed: %s", promql, e)
            return None
        data = body.get("data", {}) if body.get("status") == "success" else {}
        result = data.get("result")
        if data.get("resultType") == "scalar" and result:
            return float(result[1])
        values = [float(series["value"][1]) for series in result or [] if "value" in series]
        return sum(values) / len(values) if values else None


async def pull_metrics(control: ControlPlane, source: PrometheusSource) -> int:
    """Reads every autoscale query of every scale set at the server's clock and records the answers;
    returns how many samples were recorded."""
    now = control.time()
    recorded = 0
    for name, queries in control.controller.autoscale_queries().items():
        series = []
        for metric, promql in queries:
            value = await asyncio.to_thread(source.query, promql, now)
            if value is not None:
                series.append((metric, (now,), (value,)))
        if series:
            await control.record(ReportMetrics(name, tuple(series)))
            recorded += len(series)
    return recorded
