"""A load generator: several client processes, each with some calls in flight on one aio channel."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import dataclass
from typing import Any

import grpc

from scaleset.v1 import scaleset_pb2 as pb
from scaleset.v1 import scaleset_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


async def _client(target: str, workload: str, process: int, inflight: int, calls: int) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        scale_sets = pb_grpc.ScaleSetsStub(channel)
        diagnostics = pb_grpc.DiagnosticsStub(channel)

        async def loop(k: int) -> None:
            nonlocal errors
            name = f"load-{process}-{k}"
            for j in range(calls):
                started = time.perf_counter()
                try:
                    if workload == "echo":
                        await diagnostics.Echo(pb.EchoRequest())
                    elif workload == "set_capacity":
                        await scale_sets.SetCapacity(pb.SetCapacityRequest(name=name, capacity=10 + j % 2))
                    else:
                        reply = await scale_sets.ListInstances(pb.ListInstancesRequest(name="listing", page_size=1000))
                        if len(reply.instances.instance_id) != 1000:
                            errors += 1
                except grpc.aio.AioRpcError:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(loop(k) for k in range(inflight)))
    return latencies, errors


def _process(args: tuple[str, str, int, int, int]) -> tuple[list[float], int]:
    return asyncio.run(_client(*args))


def run_load(target: str, workload: str, processes: int, inflight_per_process: int, calls_per_slot: int) -> LoadResult:
    """Runs ``workload`` (echo | set_capacity | list_instances) and measures it from start to finish."""
    ctx = multiprocessing.get_context("spawn")
    jobs = [(target, workload, p, inflight_per_process, calls_per_slot) for p in range(processes)]
    with ctx.Pool(processes) as pool:
        # Warm the workers (interpreter start and imports) before the clock starts.
        pool.map(_noop, range(processes))
        started = time.perf_counter()
        results: list[Any] = pool.map(_process, jobs)
        seconds = time.perf_counter() - started
    latencies = sorted(t for lat, _ in results for t in lat)
    errors = sum(e for _, e in results)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return LoadResult(len(latencies), errors, seconds, pct(0.50), pct(0.99))


def _noop(_: int) -> None:
    import scaleset.v1.scaleset_pb2  # noqa: F401 - import cost paid before timing
