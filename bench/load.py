"""A load generator: several client processes, each with some calls in flight on one aio channel."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import random
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from scaleset.testing.server import free_port, start_proxy_process, start_server_process
from scaleset.v1 import scaleset_pb2 as pb


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    #: Every call's latency in seconds, ascending (to pool several runs' percentiles).
    latencies: list[float] = field(default_factory=list, repr=False)

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


def cpu_seconds(pid: int) -> float:
    """The process's CPU time so far (user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile_ms(latencies: list[float], q: float) -> float:
    """The ``q`` quantile of ascending latencies (seconds), in milliseconds."""
    return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0


async def _client(
    target: str, workload: str, process: int, inflight: int, calls: int, rate: float | None = None
) -> tuple[list[float], int]:
    """Closed loop (``rate`` None): ``inflight`` loops of ``calls`` calls each, every call sent when the
    last one of its loop returns. Open loop: ``inflight * calls`` calls at ``rate`` a second, on a fixed
    schedule whatever the replies do (at most ``inflight`` waiting at once), each timed from when it was
    due, so a stall counts against every call it delayed."""
    latencies: list[float] = []
    errors = 0
    # Requests are encoded once and replies kept as bytes (checked, not decoded, on the hot path), so the
    # generator spends as little CPU as possible on the 2 cores it shares with the server.
    async with grpc.aio.insecure_channel(target) as channel:
        method, requests = _workload(channel, workload, process)
        expected = await _reply_size(method, requests) if workload == "list_instances" else None

        async def call(request: bytes, started: float) -> None:
            nonlocal errors
            try:
                reply = await method(request)
                if expected is not None and len(reply) != expected:
                    errors += 1
            except grpc.aio.AioRpcError:
                errors += 1
            latencies.append(time.perf_counter() - started)

        async def loop(k: int) -> None:
            for j in range(calls):
                await call(requests[k][j % 2], time.perf_counter())

        if rate is None:
            await asyncio.gather(*(loop(k) for k in range(inflight)))
            return latencies, errors
        waiting = asyncio.Semaphore(inflight)

        async def due(j: int, at: float) -> None:
            async with waiting:
                await call(requests[j % len(requests)][j // len(requests) % 2], at)

        start, tasks = time.perf_counter(), []
        for j in range(inflight * calls):
            at = start + j / rate
            if (ahead := at - time.perf_counter()) > 0:
                await asyncio.sleep(ahead)
            tasks.append(asyncio.create_task(due(j, at)))
        await asyncio.gather(*tasks)
    return latencies, errors


def create_load_sets(target: str, processes: int, per_process: int = 64) -> None:
    """The small scale sets the ``set_capacity`` workload scales: ``load-<process>-<slot>``, 10 instances
    each, in 3 zones."""
    from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ScaleSetsStub(channel)
        spec = pb.ScaleSetSpec(zones=["1", "2", "3"], sku=pb.Sku(name="Standard_D2s_v5"))
        for p in range(processes):
            for k in range(per_process):
                spec.name = f"load-{p}-{k}"
                stub.CreateScaleSet(pb.CreateScaleSetRequest(scale_set=spec, capacity=10), timeout=30)


@contextlib.contextmanager
def load_server(tmp: Path, processes: int, per_process: int = 64, *flags: str) -> Iterator[tuple[str, int]]:
    """``scaleset serve`` on SQLite in ``tmp`` (``flags`` added) with the load's scale sets
    (create_load_sets); yields its target and pid, then stops it and checks that it exited cleanly."""
    port = free_port()
    proc = start_server_process(tmp / "state.db", port, tmp / "server.log", *flags)
    target = f"127.0.0.1:{port}"
    try:
        create_load_sets(target, processes, per_process)
        yield target, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    assert code == 0, f"the server exited with {code}: {(tmp / 'server.log').read_text()[-2000:]}"


def _workload(channel: grpc.aio.Channel, workload: str, process: int) -> tuple[Any, list[list[bytes]]]:
    """The raw method and, per in-flight slot, two alternating encoded requests."""
    slots = range(64)
    if workload == "echo":
        path = "/scaleset.v1.Diagnostics/Echo"
        requests = [[pb.EchoRequest().SerializeToString()] * 2 for _ in slots]
    elif workload == "set_capacity":
        path = "/scaleset.v1.ScaleSets/SetCapacity"
        requests = [
            [
                pb.SetCapacityRequest(name=f"load-{process}-{k}", capacity=c).SerializeToString()
                for c in (10, 11)
            ]
            for k in slots
        ]
    elif workload == "set_capacity_big":  # one scale set named "big", 100,000 <-> 100,001 instances
        path = "/scaleset.v1.ScaleSets/SetCapacity"
        requests = [
            [
                pb.SetCapacityRequest(name="big", capacity=c, view=pb.PLAN_VIEW_SUMMARY).SerializeToString()
                for c in (100_000, 100_001)
            ]
            for _ in slots
        ]
    else:
        path = "/scaleset.v1.ScaleSets/ListInstances"
        requests = [
            [pb.ListInstancesRequest(name="listing", page_size=1000).SerializeToString()] * 2 for _ in slots
        ]
    return channel.unary_unary(path), requests


async def _reply_size(method: Any, requests: list[list[bytes]]) -> int:
    """Checks one full listing decoded, and returns its encoded size for the cheap per-call check."""
    reply = await method(requests[0][0])
    assert len(pb.ListInstancesResponse.FromString(reply).instances.instance_id) == 1000
    return len(reply)


def _process(args: tuple[str, str, int, int, int, float | None]) -> tuple[list[float], int]:
    return asyncio.run(_client(*args))


def run_load(
    target: str | list[str],
    workload: str,
    processes: int,
    inflight_per_process: int,
    calls_per_slot: int,
    rate: float | None = None,
) -> LoadResult:
    """Runs ``workload`` (echo | set_capacity | set_capacity_big | list_instances) and measures it from start to finish.
    Given several targets (the servers of a cluster), client process ``p`` talks to ``target[p % n]``.
    With ``rate`` (calls a second, across the processes) the load is an open loop (see ``_client``)."""
    ctx = multiprocessing.get_context("spawn")
    targets = [target] if isinstance(target, str) else target
    each = rate / processes if rate else None
    jobs = [
        (targets[p % len(targets)], workload, p, inflight_per_process, calls_per_slot, each)
        for p in range(processes)
    ]
    with ctx.Pool(processes) as pool:
        # Warm the workers (interpreter start and imports) before the clock starts.
        pool.map(_noop, range(processes))
        started = time.perf_counter()
        results: list[Any] = pool.map(_process, jobs)
        seconds = time.perf_counter() - started
    latencies = sorted(t for lat, _ in results for t in lat)
    errors = sum(e for _, e in results)
    return LoadResult(
        len(latencies),
        errors,
        seconds,
        percentile_ms(latencies, 0.50),
        percentile_ms(latencies, 0.99),
        latencies,
    )


RUST = Path(__file__).resolve().parent.parent / "rust"


def build_rust_client(binary: str) -> Path:
    """Builds one of the soak's Rust clients (rust/scaleset-client/src/bin: ``scaleset-load``, the load
    generator, or ``scaleset-watch``, the watchers), optimised since it shares the machine with the server
    it measures, and returns its path."""
    subprocess.run(
        ["cargo", "build", "--quiet", "--release", "-p", "scaleset-client", "--bin", binary],
        cwd=RUST,
        check=True,
        timeout=1800,
    )
    return RUST / "target" / "release" / binary


def run_rust_load(
    binary: Path, target: str, rate: float, seconds: float, processes: int, inflight_per_process: int
) -> LoadResult:
    """The ``set_capacity`` open loop of run_load, made by the Rust load generator: ``rate * seconds``
    calls over ``processes`` connections, each call timed from when it was due."""
    run = subprocess.run(
        [
            str(binary),
            "--target",
            f"http://{target}",
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            "--processes",
            str(processes),
            "--inflight",
            str(inflight_per_process),
        ],
        capture_output=True,
        text=True,
        timeout=seconds * 10 + 60,
    )
    if run.returncode != 0:
        raise RuntimeError(f"scaleset-load failed (exit status {run.returncode}): {run.stderr.strip()}")
    first, *lines = run.stdout.splitlines()
    calls, errors, took = first.split()
    latencies = sorted(int(us) / 1e6 for us in lines)
    assert len(latencies) == int(calls), f"{calls} calls reported, {len(latencies)} latencies"
    return LoadResult(
        int(calls),
        int(errors),
        float(took),
        percentile_ms(latencies, 0.50),
        percentile_ms(latencies, 0.99),
        latencies,
    )


class PythonWatchers:
    """run_watchers in a process of its own, asked as RustWatchers are."""

    def __init__(self, target: str, count: int, *, reads: bool, resume: bool) -> None:
        self._asks: multiprocessing.Queue[Any] = multiprocessing.Queue()
        self._answers: multiprocessing.Queue[Any] = multiprocessing.Queue()
        self._proc = multiprocessing.Process(
            target=run_watchers,
            args=(target, count, self._asks, self._answers),
            kwargs={"reads": reads, "resume": resume},
            daemon=True,
        )
        self._proc.start()
        assert self._proc.pid is not None
        self.pid = self._proc.pid

    def least(self, which: str) -> tuple[int, int]:
        """As RustWatchers.least."""
        self._asks.put(which)
        positions, reopened = self._answers.get(timeout=60)
        return min(positions), reopened

    def stop(self) -> None:
        self._proc.kill()
        self._proc.join()


class RustWatchers:
    """The Rust watchers (``scaleset-watch``): ``count`` streams of every scale set at ``target`` from the
    start, in a process of their own, reading each message or (``reads`` False) holding the stream after
    the first; a reading stream that fails resumes after its last event with ``resume``. Asked as
    run_watchers' processes are, for the least position over the streams only."""

    def __init__(self, binary: Path, target: str, count: int, *, reads: bool, resume: bool) -> None:
        flags = {"--target": f"http://{target}", "--streams": str(count)}
        flags |= {"--reads": "yes" if reads else "no", "--resume": "yes" if resume else "no"}
        self._proc = subprocess.Popen(
            [str(binary), *(part for flag in flags.items() for part in flag)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self._proc.pid

    def least(self, which: str) -> tuple[int, int]:
        """Over the streams, the least ``which`` ("first": the first event of each stream's last message;
        "last": its last event; 0 before any message, -1 once ended), and how many times a stream opened
        again."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(which + "\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline().split()
        if len(answer) != 2:
            raise RuntimeError(f"scaleset-watch gave no answer (exit status {self._proc.poll()})")
        return int(answer[0]), int(answer[1])

    def stop(self) -> None:
        self._proc.kill()
        self._proc.communicate()


def _noop(_: int) -> None:
    import scaleset.v1.scaleset_pb2  # noqa: F401 - import cost paid before timing


#: Watch streams per client connection: the server takes at most 256 streams at once on one connection
#: (SERVER_OPTIONS), and gRPC queues any more in the client until one ends.
STREAMS_PER_CHANNEL = 200


def run_watchers(
    target: str,
    count: int,
    asks: Any,
    answers: Any,
    *,
    reads: bool = True,
    resume: bool = False,
    sets: Sequence[tuple[str, int]] = (),
) -> None:
    """A watcher process: ``count`` streams of every scale set from the start or, with ``sets`` ((name,
    revision) pairs), stream k of scale set ``sets[k % len(sets)]`` after that revision (an agent watching
    its own scale set from where it stands). It reads every message as bytes (decoding is the watcher's
    work, not the server's, and on this machine it would take CPU from both); with ``reads`` False each
    stream reads one message and then holds the stream open without reading another. A stream that fails
    before its first message (a connection refused) opens again; with ``resume`` a reading stream that
    fails later resumes after its last event too, as a real watcher would. For each item put on ``asks`` it
    puts on ``answers`` where each stream is (its last event's sequence, or with ``sets`` its revision; for
    "first": the sequence of the first event of its last message, which decodes one event, not thousands;
    -1 for a stream that ended) and how many times its streams opened again; None on ``asks`` ends it."""
    asyncio.run(_watchers(target, count, asks, answers, reads, resume, sets))


def watch_channels(target: str, streams: int) -> list[grpc.aio.Channel]:
    """Enough asyncio channels for ``streams`` streams, STREAMS_PER_CHANNEL each, on a connection each
    (channels to one target otherwise share one connection, and its stream limit)."""
    return [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(-(-streams // STREAMS_PER_CHANNEL))
    ]


def _last_event(message: bytes) -> pb.Event | None:
    """The last event in a WatchEventsResponse (None before any)."""
    return pb.WatchEventsResponse.FromString(message).events[-1] if message else None


def _first_sequence(message: bytes) -> int:
    """The sequence of the first event in a WatchEventsResponse (0 before any), decoding that event alone
    (a message of a replay holds thousands)."""
    if not message:
        return 0
    length, shift, at = 0, 0, 1  # message[0]: the tag of field 1, events
    while True:
        length |= (message[at] & 0x7F) << shift
        shift, at = shift + 7, at + 1
        if message[at - 1] < 0x80:
            sequence: int = pb.Event.FromString(message[at : at + length]).sequence
            return sequence


async def _watchers(
    target: str,
    count: int,
    asks: Any,
    answers: Any,
    reads: bool,
    resume: bool,
    sets: Sequence[tuple[str, int]],
) -> None:
    channels = watch_channels(target, count)
    last, ended, reopened = [b""] * count, [False] * count, 0
    watched = [sets[k % len(sets)] if sets else ("", 0) for k in range(count)]

    def position(k: int) -> int:
        """Where stream ``k`` is: after its last event's sequence or, watching one scale set, revision."""
        event = _last_event(last[k])
        if event is None:
            return watched[k][1]
        return event.revision if sets else event.sequence

    async def one(k: int) -> None:
        nonlocal reopened
        watch = channels[k // STREAMS_PER_CHANNEL].unary_stream("/scaleset.v1.ScaleSets/WatchEvents")
        while True:
            request = pb.WatchEventsRequest(scale_set=watched[k][0], after=position(k)).SerializeToString()
            try:
                async for message in watch(request):
                    last[k] = message
                    if not reads:
                        await asyncio.Event().wait()  # never set: stops reading
            except grpc.RpcError:
                if not last[k] or (resume and reads):
                    reopened += 1
                    await asyncio.sleep(1 + random.random())
                    continue
            ended[k] = True
            return

    streams = [asyncio.create_task(one(k)) for k in range(count)]
    while True:
        try:
            ask = asks.get_nowait()
        except queue.Empty:
            await asyncio.sleep(0.1)
            continue
        if ask is None:
            break
        answers.put(
            (
                [
                    -1 if ended[k] else position(k) if ask == "last" else _first_sequence(last[k])
                    for k in range(count)
                ],
                reopened,
            )
        )
    for stream in streams:
        stream.cancel()
    for channel in channels:
        await channel.close()


def metric(metrics_port: int, sample: str) -> int:
    """One sample of a server's (or a proxy's) metrics, e.g. ``scaleset_watchers`` (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else 0


class WatchProxyProcess:
    """`scaleset watch-proxy` of a server, in a process of its own."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, metrics_port: int) -> None:
        self.proc, self.pid, self.metrics_port = proc, proc.pid, metrics_port
        self.target = f"127.0.0.1:{port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


def start_proxy(
    target: str, watchers: int, tmp: Path, *extra: str, metrics: bool = False
) -> WatchProxyProcess:
    """A watch proxy of the server at ``target`` for ``watchers`` streams (its log in ``tmp``; ``extra``
    flags of `watch-proxy`), SERVING."""
    port, metrics_port = free_port(), free_port() if metrics else 0
    proc = start_proxy_process(
        target,
        port,
        tmp / "proxy.log",
        "--metrics-port",
        str(metrics_port),
        "--max-watchers",
        str(watchers + 10),
        *extra,
    )
    return WatchProxyProcess(proc, port, metrics_port)
