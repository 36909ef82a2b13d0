"""Executors: a 1,000-instance scale-out carried out by the fake cloud with 5% injected failures.

- Convergence: the fleet reaches 1,000 Succeeded instances with at most twice the ideal number of executor
  operations (ideal: one create each). Deterministic for the seed, so the gate is an operation count.
- The controller's own overhead: the whole scale-out through the ledger (1,000 operations leased, their
  outcomes applied, failures placed again) against the baseline of 1,000 single-instance health reports
  through the same Controller (the cheapest one-instance command), same run.
- Through the server: the same scale-out with an executor over gRPC and no injected failures (a failed
  create waits out its 5 s retry backoff, which would be most of the time), wall time to convergence.

Run: ``pytest bench/test_bench_executors.py --benchmark-only -s``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from scaleset.client import Client
from scaleset.controller import Controller
from scaleset.executor import Executor, FakeCloud, ProviderError
from scaleset.model import Region, ScaleSetSpec, Sku
from scaleset.testing.server import ServerThread

from bench.conftest import EXECUTORS, MEDIANS

N = 1000
FAILURE_RATE = 0.05
REGION = Region(zones=("1", "2", "3"), fault_domains_per_zone=1)
SPEC = ScaleSetSpec(name="web", zones=("1", "2", "3"), sku=Sku("Standard_D2s_v5"))


def converge_in_process(seed: int = 11) -> tuple[Controller, FakeCloud]:
    """The scale-out carried out by the fake cloud, operation by operation, through the Controller."""
    controller = Controller(REGION)
    controller.set_execution_mode("Executors", now=0)
    cloud = FakeCloud(seed=seed, failure_rate=FAILURE_RATE)
    controller.create_scale_set(SPEC, N, now=1)
    now = 1.0
    while pending := controller.pending_operations():
        ready = [o for o in pending if o.not_before <= now]
        for op in ready:
            try:
                address, provider_id = cloud.create(op)
                controller.report_operation(
                    "web", op.operation_id, True, address=address, provider_id=provider_id, now=now
                )
            except ProviderError as e:
                controller.report_operation("web", op.operation_id, False, e.code, e.message, now=now)
        now += 5.0  # the next round comes after the retries' backoff
        controller.advance(now, "web")
    return controller, cloud


def test_scale_out_through_the_fake_cloud_converges_with_few_operations(benchmark: Any, record: Any) -> None:
    benchmark.group = "executor_scale_out_1000"
    controller, cloud = benchmark.pedantic(converge_in_process, rounds=3, iterations=1)
    record("core")
    report = controller.fleet_report("web")
    assert report.provisioning_states == {"Succeeded": N} and report.pending_operation_count == 0
    operations = len(cloud.log)
    failures = sum(1 for *_, code in cloud.log if code != "OK")
    assert failures > 0  # the injection happened
    assert operations <= 2 * N, f"{operations} operations for {N} instances"
    EXECUTORS["operations"] = (
        f"{operations} for {N} instances ({failures} failed and were redone; gate {2 * N})"
    )


def test_baseline_single_instance_commands(benchmark: Any, record: Any) -> None:
    benchmark.group = "executor_scale_out_1000"
    controller = Controller(REGION)
    controller.create_scale_set(SPEC, N, now=1)

    def reports() -> None:
        for i in range(N):
            controller.report_health("web", [i], "Healthy", now=2)

    benchmark.pedantic(reports, rounds=3, iterations=1)
    record("baseline")
    medians = MEDIANS["executor_scale_out_1000"]
    if "core" in medians:
        EXECUTORS["controller per instance"] = (
            f"{medians['core'] / N * 1e6:.1f} us (a health report: {medians['baseline'] / N * 1e6:.1f} us)"
        )


def test_scale_out_through_a_server_and_an_executor(benchmark: Any, tmp_path: Path) -> None:
    benchmark.group = "executor_scale_out_server"
    with (
        ServerThread(str(tmp_path / "db"), REGION, executors=True) as server,
        Client(server.target) as client,
    ):
        cloud = FakeCloud(seed=11)
        executor = Executor(client, cloud, executor_id="bench", max_in_flight=64)
        thread = threading.Thread(target=executor.run, daemon=True)
        thread.start()

        def scale_out() -> float:
            started = time.perf_counter()
            client.create_scale_set(SPEC, N)
            while True:
                report = client.fleet_report("web")
                if report.pending_operation_count == 0 and report.provisioning_states == {"Succeeded": N}:
                    return time.perf_counter() - started
                time.sleep(0.02)

        try:
            elapsed = benchmark.pedantic(scale_out, rounds=1, iterations=1)
        finally:
            executor.stop()
            thread.join(10)
        assert len(cloud.instances) == N
        EXECUTORS["through the server"] = (
            f"{elapsed:.2f} s to converge without failures ({elapsed / N * 1e6:.0f} us per instance, durable)"
        )
