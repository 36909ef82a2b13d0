"""Executors: carry a server's operations out on infrastructure and report back.

An :class:`Executor` leases operations from a server in Executors mode (``scaleset serve --executors``),
runs each on a :class:`Provider` in a thread pool (at most ``max_in_flight`` at once), and reports every
outcome; with a ``probe_interval`` it also probes the instances' health, Application Health extension
style, and reports changes. Two providers ship with scaleset:

- :class:`FakeCloud`: a simulated cloud for tests and what-ifs: per-pool capacity, quota, latency, injected
  failures, deterministic for a seed (each operation's fate depends on the seed and the operation, not on
  thread timing).
- :class:`LocalProcesses`: each instance is a real local process (``python -m scaleset.instance``, a small
  HTTP server with a health endpoint), so ``scaleset serve --executors`` plus ``scaleset executor local``
  is a working fleet on one machine.

A provider must be idempotent by instance name: creating an instance that exists returns it, deleting
one that does not exist succeeds (an operation whose lease lapsed may be carried out twice).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from scaleset.client import Client, LeaseStream
from scaleset.errors import ScaleSetError
from scaleset.policies.lifecycle import Operation, ScheduledEvent

log = logging.getLogger(__name__)

__all__ = [
    "ApplicationHealth",
    "Executor",
    "FakeCloud",
    "LocalProcesses",
    "Provider",
    "ProviderError",
]


class ProviderError(Exception):
    """An operation failed: ``code`` is Azure's (``ZonalAllocationFailed``, ``OperationNotAllowed`` ...) or
    the provider's own."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class Provider(Protocol):
    """What an executor drives. Each method blocks until its operation is done or raises ProviderError."""

    def create(self, op: Operation) -> tuple[str, str]:
        """Creates the instance; returns (address, provider id). A create that raises leaves nothing
        behind (the server places the instance again, and deletes nothing for it)."""
        ...

    def delete(self, op: Operation) -> None: ...

    def deallocate(self, op: Operation) -> None: ...

    def reimage(self, op: Operation) -> None: ...

    def restart(self, op: Operation) -> None: ...

    def preempt(self, event: ScheduledEvent) -> bool:
        """A Spot eviction is scheduled for ``event.instance_ids``: drain them; True to let it happen now
        (acknowledge), False to let it come at its not-before time."""
        ...

    def health(self) -> dict[str, dict[int, str]]:
        """Each known instance's Application Health by scale set (Healthy, Unhealthy, Initializing,
        Unknown); empty if the provider does not probe."""
        ...

    def evictions(self) -> dict[str, list[int]]:
        """Spot instances the infrastructure evicted (for capacity) since the last call, by scale set."""
        ...


def instance_name(op: Operation) -> str:
    return f"{op.scale_set}_{op.instance_id}"


# ----- the fake cloud ---------------------------------------------------------------------------------


@dataclass
class FakeCloud:
    """A simulated cloud. ``capacity`` maps (zone or None, vm_size, priority) to how many instances that
    pool holds (absent pools are unlimited); a create beyond it fails with ZonalAllocationFailed (or
    AllocationFailed for regional capacity). ``quota`` caps instances in all. A ``failure_rate`` share of
    operations fails with ``failure_code`` on their first try. Everything a seed decides is a function of
    the seed and the operation, so runs repeat."""

    seed: int = 0
    latency_s: tuple[float, float] = (0.0, 0.0)
    capacity: dict[tuple[str | None, str, str], int] = field(default_factory=dict)
    quota: int | None = None
    failure_rate: float = 0.0
    failure_code: str = "InternalExecutionError"
    instances: dict[str, Operation] = field(default_factory=dict)
    #: Every operation carried out, as (kind, instance name, outcome code or "OK").
    log: list[tuple[str, str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _evicted: dict[str, list[int]] = field(default_factory=dict, repr=False)
    #: Instances per pool, kept with ``instances``.
    _used: Counter[tuple[str | None, str, str]] = field(default_factory=Counter, repr=False)

    def _fate(self, op: Operation) -> random.Random:
        digest = hashlib.sha256(f"{self.seed}/{op.operation_id}/{op.attempt}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def _work(self, op: Operation) -> None:
        rng = self._fate(op)
        low, high = self.latency_s
        if high > 0:
            time.sleep(rng.uniform(low, high))
        if op.attempt == 1 and rng.random() < self.failure_rate:
            raise ProviderError(
                self.failure_code, f"injected failure of {op.kind.lower()} {instance_name(op)}"
            )

    def _add(self, name: str, op: Operation) -> None:
        self.instances[name] = op
        self._used[op.zone, op.vm_size, op.priority] += 1

    def _drop(self, name: str) -> Operation | None:
        op = self.instances.pop(name, None)
        if op is not None:
            self._used[op.zone, op.vm_size, op.priority] -= 1
        return op

    def create(self, op: Operation) -> tuple[str, str]:
        name = instance_name(op)
        try:
            self._work(op)
            with self._lock:
                if name not in self.instances:
                    pool = (op.zone, op.vm_size, op.priority)
                    if pool in self.capacity and self._used[pool] >= self.capacity[pool]:
                        code = "ZonalAllocationFailed" if op.zone else "AllocationFailed"
                        raise ProviderError(
                            code, f"no {op.vm_size} {op.priority} capacity in {op.zone or 'the region'}"
                        )
                    if self.quota is not None and len(self.instances) >= self.quota:
                        raise ProviderError("OperationNotAllowed", f"quota of {self.quota} instances reached")
                    self._add(name, op)
                self.log.append(("Create", name, "OK"))
        except ProviderError as e:
            with self._lock:
                self.log.append(("Create", name, e.code))
            raise
        return f"10.0.{op.instance_id // 250}.{op.instance_id % 250 + 4}", f"fake://{name}"

    def _simple(self, op: Operation) -> None:
        name = instance_name(op)
        try:
            self._work(op)
        except ProviderError as e:
            with self._lock:
                self.log.append((op.kind, name, e.code))
            raise
        with self._lock:
            if op.kind == "Delete":
                self._drop(name)
            self.log.append((op.kind, name, "OK"))

    delete = deallocate = reimage = restart = _simple

    def preempt(self, event: ScheduledEvent) -> bool:
        return True  # nothing to drain

    def health(self) -> dict[str, dict[int, str]]:
        return {}

    def evict(self, names: list[str]) -> None:
        """Injects a capacity eviction: the instances are gone, and the executor tells the server."""
        with self._lock:
            for name in names:
                op = self._drop(name)
                if op is not None:
                    self._evicted.setdefault(op.scale_set, []).append(op.instance_id)
                    self.log.append(("Evicted", name, "OK"))

    def evictions(self) -> dict[str, list[int]]:
        with self._lock:
            evicted, self._evicted = self._evicted, {}
        return evicted

    def take_pool(self, zone: str | None, vm_size: str, priority: str, capacity: int) -> None:
        """Changes a pool's capacity (a zone runs out of a size, a Spot pool disappears)."""
        with self._lock:
            self.capacity[(zone, vm_size, priority)] = capacity


# ----- local processes --------------------------------------------------------------------------------


@dataclass
class ApplicationHealth:
    """Azure's Application Health extension: a probe every ``interval_s`` (``http``: GET ``path`` answers
    200; ``tcp``: the port accepts a connection); ``probes`` failures (or successes) in a row change the
    state; Initializing until the first success or ``grace_s``."""

    protocol: str = "http"
    path: str = "/health"
    interval_s: float = 5.0
    probes: int = 1
    grace_s: float = 600.0


class LocalProcesses:
    """Each instance a local process: ``python -m scaleset.instance`` on a free port of 127.0.0.1."""

    def __init__(self, health: ApplicationHealth | None = None) -> None:
        self.settings = health or ApplicationHealth()
        self._procs: dict[str, tuple[subprocess.Popen[bytes], int, Operation, float]] = {}
        self._streaks: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    def _start(self, op: Operation) -> tuple[subprocess.Popen[bytes], int]:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scaleset.instance",
                "--name",
                instance_name(op),
                "--model",
                str(op.model_version),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()  # "PORT <n>" once it listens
        if not line.startswith("PORT "):
            proc.kill()
            raise ProviderError("VMStartTimedOut", f"instance {instance_name(op)} did not start")
        return proc, int(line.split()[1])

    def create(self, op: Operation) -> tuple[str, str]:
        name = instance_name(op)
        with self._lock:
            known = self._procs.get(name)
        if known is not None and known[0].poll() is None:
            return f"127.0.0.1:{known[1]}", f"pid://{known[0].pid}"
        proc, port = self._start(op)
        with self._lock:
            self._procs[name] = (proc, port, op, time.monotonic())
        return f"127.0.0.1:{port}", f"pid://{proc.pid}"

    def delete(self, op: Operation) -> None:
        with self._lock:
            known = self._procs.pop(instance_name(op), None)
            self._streaks.pop(instance_name(op), None)
        if known is not None:
            _stop(known[0])

    deallocate = delete  # a deallocated VM runs no process

    def reimage(self, op: Operation) -> None:
        self.delete(op)
        self.create(op)

    restart = reimage

    def preempt(self, event: ScheduledEvent) -> bool:
        return True  # the processes hold nothing to drain

    def pid(self, scale_set: str, instance_id: int) -> int | None:
        with self._lock:
            known = self._procs.get(f"{scale_set}_{instance_id}")
        return None if known is None else known[0].pid

    def _probe(self, port: int) -> bool:
        if self.settings.protocol == "tcp":
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except OSError:
                return False
            return True
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{self.settings.path}", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def health(self) -> dict[str, dict[int, str]]:
        with self._lock:
            procs = dict(self._procs)
        out: dict[str, dict[int, str]] = {}
        for name, (proc, port, op, started) in procs.items():
            ok = proc.poll() is None and self._probe(port)
            last, streak = self._streaks.get(name, ("", 0))
            seen = "Healthy" if ok else "Unhealthy"
            streak = streak + 1 if seen == last else 1
            self._streaks[name] = (seen, streak)
            if streak >= self.settings.probes:
                state = seen
            elif not ok and time.monotonic() - started < self.settings.grace_s and last != "Healthy":
                state = "Initializing"
            else:
                continue  # not enough probes in a row to change the state
            out.setdefault(op.scale_set, {})[op.instance_id] = state
        return out

    def evictions(self) -> dict[str, list[int]]:
        return {}  # local processes are never evicted

    def close(self) -> None:
        with self._lock:
            procs, self._procs = list(self._procs.values()), {}
        for proc, *_ in procs:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# ----- the executor -----------------------------------------------------------------------------------


class Executor:
    """Leases operations from ``client``'s server and carries them out on ``provider``.

    Args:
        executor_id: this executor's name (default: host and pid).
        zones: only operations in these zones ("" for regional); empty means all.
        max_in_flight: operations carried out at once.
        lease_seconds: how long the server waits for a report before offering an operation again.
        probe_interval: seconds between health probes (None: no probing).
    """

    def __init__(
        self,
        client: Client,
        provider: Provider,
        *,
        executor_id: str | None = None,
        zones: Iterable[str] = (),
        max_in_flight: int = 16,
        lease_seconds: int = 60,
        probe_interval: float | None = None,
    ) -> None:
        self.client = client
        self.provider = provider
        self.executor_id = executor_id or f"{os.uname().nodename}-{os.getpid()}"
        self.zones = list(zones)
        self.max_in_flight = max_in_flight
        self.lease_seconds = lease_seconds
        self.probe_interval = probe_interval
        self.stopped = threading.Event()
        #: Operations carried out (whatever their outcome), and reports the server applied.
        self.carried_out = 0
        self.applied = 0
        self._cancelled: set[int] = set()
        #: The health last reported per (scale set, instance): only changes are sent.
        self._reported: dict[tuple[str, int], str] = {}
        #: Instances with an operation under way: not probed (a reimage is not a failure).
        self._busy: set[tuple[str, int]] = set()
        #: Operations under way -> when their lease was last renewed (monotonic seconds).
        self._in_flight: dict[int, float] = {}
        self._stream: LeaseStream | None = None
        self._lock = threading.Lock()

    def run(self) -> None:
        """Leases and carries out operations until :meth:`stop`; reconnects after a lost stream."""
        prober = threading.Thread(target=self._probe_loop, name="scaleset-probes", daemon=True)
        prober.start()
        with ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="scaleset-op") as pool:
            delay = 0.5
            while not self.stopped.is_set():
                try:
                    self._stream = self.client.lease_operations(
                        self.executor_id, self.zones, self.max_in_flight, self.lease_seconds
                    )
                    for leased, cancelled, events in self._stream:
                        delay = 0.5
                        with self._lock:
                            self._cancelled.update(cancelled)
                        for op in leased:
                            pool.submit(self._carry_out, op)
                        for event in events:
                            pool.submit(self._preempt, event)
                except ScaleSetError as e:
                    log.warning("executor %s: lease stream ended (%s); reconnecting", self.executor_id, e)
                self.stopped.wait(delay)
                delay = min(delay * 2, 10.0)
        prober.join(timeout=10)

    def stop(self) -> None:
        self.stopped.set()
        if self._stream is not None:
            self._stream.cancel()

    def _preempt(self, event: ScheduledEvent) -> None:
        try:
            if self.provider.preempt(event):
                self.client.acknowledge_scheduled_event(event.scale_set, event.event_id)
        except ScaleSetError as e:  # it happens at its not-before time anyway
            log.info(
                "executor %s: scheduled event %d not acknowledged: %s", self.executor_id, event.event_id, e
            )

    def _carry_out(self, op: Operation) -> None:
        key = (op.scale_set, op.instance_id)
        with self._lock:
            if op.operation_id in self._cancelled:
                self._cancelled.discard(op.operation_id)
                return
            self._busy.add(key)
            self._in_flight[op.operation_id] = time.monotonic()
        try:
            address, provider_id, code, message = self._run(op)
            with self._lock:
                self.carried_out += 1
                self._in_flight.pop(op.operation_id, None)
            applied = self.client.report_operation(
                op.operation_id,
                not code,
                code,
                message[:2048],
                executor_id=self.executor_id,
                address=address,
                provider_id=provider_id,
            )
        except ScaleSetError as e:  # the lease lapses and the operation is offered again
            log.warning(
                "executor %s: could not report operation %d: %s", self.executor_id, op.operation_id, e
            )
            return
        finally:
            with self._lock:
                self._busy.discard(key)
                self._in_flight.pop(op.operation_id, None)
        with self._lock:
            self.applied += applied
            if not code:  # a new, reimaged or restarted instance starts over (the server set Initializing)
                self._reported.pop(key, None)

    def _run(self, op: Operation) -> tuple[str, str, str, str]:
        """Carries ``op`` out on the provider: (address, provider id, error code, error message)."""
        try:
            if op.kind == "Create":
                address, provider_id = self.provider.create(op)
                return address, provider_id, "", ""
            {
                "Delete": self.provider.delete,
                "Deallocate": self.provider.deallocate,
                "Reimage": self.provider.reimage,
                "Restart": self.provider.restart,
            }[op.kind](op)
        except ProviderError as e:
            return "", "", e.code, e.message
        except Exception as e:  # a provider bug must not kill the executor: report it
            log.exception("executor %s: %s of %s failed", self.executor_id, op.kind, instance_name(op))
            return "", "", "ExecutorError", f"{type(e).__name__}: {e}"
        return "", "", "", ""

    def _renew_leases(self) -> None:
        """Operations that take long (a cloud's create takes minutes) keep their leases: a progress
        report every third of the lease."""
        now = time.monotonic()
        with self._lock:
            due = [i for i, at in self._in_flight.items() if now - at >= self.lease_seconds / 3]
            for i in due:
                self._in_flight[i] = now
        for operation_id in due:
            try:
                self.client.report_operation(
                    operation_id, False, executor_id=self.executor_id, in_progress=True
                )
            except ScaleSetError as e:
                log.info(
                    "executor %s: lease of operation %d not renewed: %s", self.executor_id, operation_id, e
                )

    def _probe_loop(self) -> None:
        """Reports what the infrastructure did on its own (evictions) and, with a probe interval, the
        instances' health changes."""
        reported = self._reported
        while not self.stopped.wait(self.probe_interval or 1.0):
            self._renew_leases()
            for scale_set, ids in self.provider.evictions().items():
                try:
                    self.client.evict(scale_set, ids)
                except ScaleSetError as e:
                    log.info("executor %s: eviction in %s not reported: %s", self.executor_id, scale_set, e)
            if not self.probe_interval:
                continue
            for scale_set, states in self.provider.health().items():
                changed: dict[str, list[int]] = {}
                with self._lock:
                    for instance_id, state in states.items():
                        key = (scale_set, instance_id)
                        if key not in self._busy and reported.get(key) != state:
                            changed.setdefault(state, []).append(instance_id)
                for state, ids in changed.items():
                    try:
                        self.client.report_health(scale_set, ids, state)
                    except ScaleSetError as e:
                        log.info("executor %s: health of %s not reported: %s", self.executor_id, scale_set, e)
                        continue
                    with self._lock:
                        reported.update({(scale_set, i): state for i in ids})
