"""Autoscale end to end: over gRPC (settings, pushed metrics, decisions on the server's clock, history,
watch events, restart), from the CLI with an ARM autoscaleSettings resource, and driven by a real
Prometheus (Debian's package, started here on a free port) scraping an exporter whose load the test sets."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from scaleset import (
    AutoscaleCapacity,
    AutoscaleProfile,
    AutoscaleSetting,
    MetricTrigger,
    Region,
    ScaleAction,
    ScaleRule,
)
from scaleset.cli import main
from scaleset.client import Client
from scaleset.documents import autoscale_from_document
from scaleset.errors import InvalidInputError, NotFoundError
from scaleset.prometheus import PrometheusSource, pull_metrics
from scaleset.testing.server import ServerThread, free_port
from scaleset.v1 import scaleset_pb2 as pb
from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

from tests.conftest import take, zonal_spec

REGION = Region(zones=["1", "2", "3"], fault_domains_per_zone=3)
T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cpu_setting(cooldown: str = "PT5M") -> AutoscaleSetting:
    return AutoscaleSetting(
        [
            AutoscaleProfile(
                "default",
                AutoscaleCapacity(2, 10, 2),
                [
                    ScaleRule(
                        MetricTrigger("cpu", "GreaterThan", 70),
                        ScaleAction("Increase", value=2, cooldown=cooldown),
                    ),
                    ScaleRule(
                        MetricTrigger("cpu", "LessThan", 20), ScaleAction("Decrease", cooldown=cooldown)
                    ),
                ],
            )
        ]
    )


def test_autoscale_over_grpc_is_durable_and_watched(tmp_path: Path) -> None:
    db, clock = str(tmp_path / "state.db"), Clock(T0)
    with ServerThread(db, REGION, clock=clock) as server, Client(server.target) as c:
        c.create_scale_set(zonal_spec(), 2)
        assert c.set_autoscale_setting("web", cpu_setting()) == cpu_setting()
        assert c.get_autoscale_setting("web") == cpu_setting()
        assert c.report_metrics("web", "cpu", [(T0 - k * 60, 95.0) for k in range(5)]) == 5
        decision = c.evaluate_autoscale("web")
        assert (
            decision.kind == "Scale"
            and decision.capacity == 4
            and decision.metric_values == {"1:cpu": 95.0, "2:cpu": 95.0}
        )
        (action,) = server.call(server.control.advance())
        assert action.kind == "AutoscaleScaleOut" and c.get_scale_set("web").capacity == 4
        clock.now += 60
        c.report_metrics("web", "cpu", [(clock.now - 1, 95.0)])
        (skip,) = server.call(server.control.advance())
        assert skip.kind == "AutoscaleSkipped" and "cooldown" in skip.reason
        kinds = [d.kind for d in c.autoscale_history("web")]
        assert kinds == ["Skipped", "Scale"]  # newest first
        types = [e.type for e in take(c.watch("web"), 5)]
        assert types == [
            "ScaleSetCreated",
            "AutoscaleSettingSet",
            "MetricsReported",
            "AutoscaleScaleOut",
            "MetricsReported",
        ]
    # A restart keeps the setting, the cooldown, the history and the metrics.
    with ServerThread(db, REGION, clock=clock) as again, Client(again.target) as c:
        assert c.get_autoscale_setting("web") == cpu_setting()
        assert [d.kind for d in c.autoscale_history("web")] == ["Skipped", "Scale"]
        after = c.evaluate_autoscale("web")
        assert after.kind == "Skipped" and after.metric_values["1:cpu"] == 95.0


def test_autoscale_errors_over_grpc(tmp_path: Path) -> None:
    with ServerThread(str(tmp_path / "state.db"), REGION) as server, Client(server.target) as c:
        with pytest.raises(NotFoundError):
            c.set_autoscale_setting("nope", cpu_setting())
        c.create_scale_set(zonal_spec(), 2)
        with pytest.raises(NotFoundError) as missing:
            c.get_autoscale_setting("web")
        assert missing.value.code == "AutoscaleSettingNotFound"
        bad = AutoscaleSetting(
            [
                AutoscaleProfile(
                    "p",
                    AutoscaleCapacity(1, 2, 1),
                    [
                        ScaleRule(
                            MetricTrigger("cpu", "GreaterThan", 1, time_window="PT1M"),
                            ScaleAction("Increase"),
                        ),
                    ],
                )
            ]
        )
        with pytest.raises(InvalidInputError) as invalid:
            c.set_autoscale_setting("web", bad)
        assert invalid.value.field == "profiles[0].rules[0].metric_trigger.time_window"
        with pytest.raises(InvalidInputError) as nan:
            c.report_metrics("web", "cpu", [(time.time(), float("inf"))])
        assert nan.value.field == "samples.value"
        # Ahead of the server's clock by more than 5 minutes (here: microseconds sent as milliseconds).
        with pytest.raises(InvalidInputError) as ahead:
            c.report_metrics("web", "cpu", [(time.time(), 1.0), (time.time() * 1000, 2.0)])
        assert ahead.value.field == "series.samples.time_unix_ms" and "ahead" in str(ahead.value)
        assert c.report_metrics("web", "cpu", [(time.time() + 240, 1.0)]) == 1  # within 5 minutes
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.AutoscaleStub(channel)
            with pytest.raises(grpc.RpcError) as raw:
                stub.SetAutoscaleSetting(pb.SetAutoscaleSettingRequest(name="web"))
            assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert c.get_scale_set("web").revision == 2  # nothing rejected was logged (one report was kept)


AZURE_SETTING = {
    "type": "Microsoft.Insights/autoscaleSettings",
    "name": "web-autoscale",
    "location": "westeurope",
    "tags": {},
    "properties": {
        "name": "web-autoscale",
        "enabled": True,
        "targetResourceUri": "/subscriptions/x/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/web",
        "profiles": [
            {
                "name": "Auto created default scale condition",
                "capacity": {"minimum": "2", "maximum": "10", "default": "2"},
                "rules": [
                    {
                        "metricTrigger": {
                            "metricName": "Percentage CPU",
                            "metricNamespace": "microsoft.compute/virtualmachinescalesets",
                            "metricResourceUri": "/subscriptions/x/.../web",
                            "timeGrain": "PT1M",
                            "statistic": "Average",
                            "timeWindow": "PT5M",
                            "timeAggregation": "Average",
                            "operator": "GreaterThan",
                            "threshold": 70,
                            "dimensions": [],
                            "dividePerInstance": False,
                        },
                        "scaleAction": {
                            "direction": "Increase",
                            "type": "ChangeCount",
                            "value": "1",
                            "cooldown": "PT5M",
                        },
                    },
                ],
            },
            {
                "name": "launch day",
                "capacity": {"minimum": "4", "maximum": "10", "default": "4"},
                "rules": [],
                "fixedDate": {
                    "timeZone": "W. Europe Standard Time",
                    "start": "2099-12-24T00:00:00",
                    "end": "2099-12-26T00:00:00",
                },
            },
        ],
        "notifications": [],
        "predictiveAutoscalePolicy": {"scaleMode": "Disabled"},
    },
}


def test_arm_autoscale_documents_map_to_settings() -> None:
    setting, ignored = autoscale_from_document(AZURE_SETTING)
    (default, launch) = setting.profiles
    assert default.capacity == AutoscaleCapacity(2, 10, 2)
    trigger = default.rules[0].metric_trigger
    assert (trigger.metric_name, trigger.operator, trigger.threshold) == (
        "Percentage CPU",
        "GreaterThan",
        70.0,
    )
    assert default.rules[0].scale_action == ScaleAction("Increase", "ChangeCount", 1, "PT5M")
    assert launch.fixed_date is not None and launch.fixed_date.time_zone == "W. Europe Standard Time"
    assert set(ignored) == {
        "type",
        "name",
        "location",
        "tags",
        "target_resource_uri",
        "notifications",
        "profiles[0].rules[0].metric_trigger.metric_namespace",
        "profiles[0].rules[0].metric_trigger.metric_resource_uri",
        "profiles[0].rules[0].metric_trigger.dimensions",
    }


def test_autoscale_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "autoscale.json"
    doc.write_text(json.dumps(AZURE_SETTING))
    with ServerThread(str(tmp_path / "state.db"), REGION) as server, Client(server.target) as c:
        c.create_scale_set(zonal_spec(), 2)

        def run(*argv: str) -> str:
            assert main(["--server", server.target, *argv]) == 0
            return capsys.readouterr().out

        assert "autoscale setting with 2 profiles stored" in run("autoscale", "set", "web", "-f", str(doc))
        assert json.loads(run("autoscale", "show", "web"))["profiles"][0]["capacity"]["maximum"] == 10
        assert "3 samples of Percentage CPU accepted" in run(
            "autoscale", "report", "web", "Percentage CPU", "90", "95", "99"
        )
        evaluation = run("autoscale", "evaluate", "web")
        assert "Scale" in evaluation and "2 -> 3" in evaluation and "rule 1" in evaluation
        server.call(server.control.advance())
        assert "2 -> 3" in run("autoscale", "history", "web")
        assert "deleted" in run("autoscale", "delete", "web")


# ----- a real Prometheus ------------------------------------------------------------------------------------


class Exporter:
    """A tiny exporter: ``app_load`` is whatever the test sets."""

    def __init__(self) -> None:
        self.load = 0.0
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = f"# TYPE app_load gauge\napp_load {exporter.load}\n".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Exporter]]:
    binary = shutil.which("prometheus")
    assert binary, "Prometheus is not installed: scripts/test.sh installs Debian's prometheus package"
    exporter = Exporter()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: app, static_configs: [{{targets: ['127.0.0.1:{exporter.port}']}}]}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, exporter
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        exporter.server.shutdown()
        exporter.server.server_close()
        log.close()


def wait_for(source: PrometheusSource, value: float, clock: Callable[[], float]) -> None:
    deadline = time.monotonic() + 30
    while source.query("app_load", clock()) != value:
        assert time.monotonic() < deadline, f"Prometheus never reported app_load {value}"
        time.sleep(0.25)


def test_prometheus_drives_a_scale_out_and_a_scale_in(
    tmp_path: Path, prometheus: tuple[str, Exporter]
) -> None:
    url, exporter = prometheus
    source = PrometheusSource(url)
    # The server's clock runs ahead of real time when the test needs a cooldown or a grain to pass; an
    # instant query at a later time still sees the latest scrape (Prometheus looks back 5 minutes).
    offset = [0.0]
    setting = AutoscaleSetting(
        [
            AutoscaleProfile(
                "default",
                AutoscaleCapacity(2, 10, 2),
                [
                    ScaleRule(
                        MetricTrigger(
                            "load", "GreaterThan", 70, time_aggregation="Last", query="avg(app_load)"
                        ),
                        ScaleAction("Increase", cooldown="PT1M"),
                    ),
                    ScaleRule(
                        MetricTrigger("load", "LessThan", 20, time_aggregation="Last", query="avg(app_load)"),
                        ScaleAction("Decrease", cooldown="PT1M"),
                    ),
                ],
            )
        ]
    )
    with (
        ServerThread(str(tmp_path / "state.db"), REGION, clock=lambda: time.time() + offset[0]) as server,
        Client(server.target) as c,
    ):
        c.create_scale_set(zonal_spec(), 3)
        c.set_autoscale_setting("web", setting)
        exporter.load = 90.0
        wait_for(source, 90.0, server.control.time)
        assert server.call(pull_metrics(server.control, source)) == 1
        (out,) = server.call(server.control.advance())
        assert out.kind == "AutoscaleScaleOut" and c.get_scale_set("web").capacity == 4
        assert "load" in out.reason and "90" in out.reason
        exporter.load = 10.0
        offset[0] += 61  # past the cooldown, into the next grain
        wait_for(source, 10.0, server.control.time)
        server.call(pull_metrics(server.control, source))
        (down,) = server.call(server.control.advance())
        assert down.kind == "AutoscaleScaleIn" and c.get_scale_set("web").capacity == 3
    # Prometheus unreachable: nothing is recorded and nothing raises.
    assert PrometheusSource("http://127.0.0.1:9", timeout=1).query("up", time.time()) is None


def test_autoscale_state_survives_sigkill(tmp_path: Path) -> None:
    """The server drives autoscale on its own clock; after a SIGKILL (no snapshot at stop) the replayed
    log gives back the setting, the decisions and their cooldown, and the metrics."""
    import signal

    from scaleset.testing.server import start_server_process

    db, port, log = tmp_path / "state.db", free_port(), tmp_path / "server.log"
    proc = start_server_process(db, port, log, "--advance-interval", "0.2")
    target = f"127.0.0.1:{port}"
    try:
        with Client(target) as c:
            c.create_scale_set(zonal_spec(), 2)
            c.set_autoscale_setting("web", cpu_setting(cooldown="PT1H"))
            c.report_metrics("web", "cpu", [(time.time() - 1, 95.0)])
            deadline = time.monotonic() + 30
            while c.get_scale_set("web").capacity != 4:
                assert time.monotonic() < deadline, "the server never scaled out"
                time.sleep(0.1)
            before = c.autoscale_history("web")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    proc = start_server_process(db, port, log)
    try:
        with Client(target) as c:
            assert c.get_scale_set("web").capacity == 4
            assert c.get_autoscale_setting("web") == cpu_setting(cooldown="PT1H")
            # Newest first; the restarted server may have evaluated (and recorded a skip) since.
            assert c.autoscale_history("web")[-len(before) :] == before and before[-1].kind == "Scale"
            after = c.evaluate_autoscale("web")
            assert after.kind == "Skipped" and any("cooldown" in e for e in after.explanation)
            assert after.metric_values["1:cpu"] == 95.0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
