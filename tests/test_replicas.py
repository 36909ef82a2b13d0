"""Survive the loss of a server: three `scaleset serve --standby` processes on one PostgreSQL. One holds the
database and serves; the others wait. Clients name all three (gRPC's pick-first over the list) and retry
UNAVAILABLE with the same request_id. The active one is SIGKILLed mid-stream, then the next one loses its
database session (as a network partition from PostgreSQL would end it); each time a standby takes over,
nothing acknowledged is lost, nothing is applied twice, and a rolling upgrade in progress goes on."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scaleset.client import Client
from scaleset.errors import ConflictError
from scaleset.model import RollingUpgradePolicy, Sku, UpgradePolicy
from scaleset.testing.server import free_port

from tests.conftest import zonal_spec


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class Cluster:
    def __init__(self, url: str, tmp: Path, size: int = 3) -> None:
        self.url, self.tmp = url, tmp
        self.ports = [free_port() for _ in range(size)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        for port in self.ports:
            self.start(port)
            if port == self.ports[0]:
                self.active(timeout=30)  # the first one takes the database; the others wait behind it

    def start(self, port: int) -> None:
        with (self.tmp / f"server-{port}.log").open("ab") as log:
            self.procs[port] = self._popen(port, log)

    def _popen(self, port: int, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable, "-m", "scaleset", "serve", "--store", self.url, "--standby",
                "--port", str(port), "--metrics-port", "0", "--advance-interval", "0.2",
                "--db", str(self.tmp / f"unused-{port}.db"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )  # fmt: skip

    @property
    def target(self) -> str:
        return "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def active(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for port in self.ports:
                if port in self.procs and self.procs[port].poll() is None and serving(port):
                    return port
            time.sleep(0.1)
        raise AssertionError(
            "no server took over: " + " | ".join(p.read_text()[-400:] for p in self.tmp.glob("*.log"))
        )

    def stop(self) -> None:
        stop_all(self.procs.values())


def cluster_status(url: str) -> dict[str, str]:
    """`scaleset cluster status`: address -> role, as an operator reads it."""
    out = subprocess.run(
        [sys.executable, "-m", "scaleset", "cluster", "status", "--store", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if line.startswith("127.")}


def stop_all(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every server still running, then waits for each (killing one that does not stop)."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_rolling_upgrade(c: Client, name: str) -> None:
    """A 10-instance set, healthy, rolling to a new size in batches (pausing a second between them)."""
    rolling = zonal_spec(
        name, upgrade_policy=UpgradePolicy("Rolling", RollingUpgradePolicy(pause_time_between_batches="PT1S"))
    )
    c.create_scale_set(rolling, 10)
    c.report_health(name, range(10), "Healthy")
    c.update_scale_set(
        zonal_spec(name, sku=Sku(name="Standard_D4s_v5"), upgrade_policy=rolling.upgrade_policy)
    )
    try:
        started = c.start_rolling_upgrade(name)
    except ConflictError as e:  # Rolling mode starts one itself at the policies' next pass: it may be first
        assert e.code == "RollingUpgradeInProgress"
        started = c.get_rolling_upgrade(name)
    assert started is not None and started.status == "RollingForward" and len(started.batches) >= 3


def finish_rolling_upgrade(c: Client, name: str, timeout: float) -> None:
    """Waits (reporting every instance healthy) until the rolling upgrade completes on all 10."""
    deadline = time.monotonic() + timeout
    while (u := c.get_rolling_upgrade(name)) is not None and u.status == "RollingForward":
        c.report_health(name, range(10), "Healthy")
        assert time.monotonic() < deadline, u
        time.sleep(0.2)
    assert u is not None and u.status == "Completed" and u.progress()["successful_instance_count"] == 10


def drive(target: str, name: str, acked: dict[int, int], stop: threading.Event, errors: list[str]) -> None:
    """SetCapacity with request_ids until stopped; every acknowledged revision with its capacity."""
    with Client(target, retries=12, timeout=10) as c:
        n = 0
        while not stop.is_set():
            n += 1
            capacity = 1 + n % 7
            try:
                plan = c.set_capacity(name, capacity, request_id=f"{name}-{n}")
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                return
            revision = c.get_scale_set(name).revision
            acked[revision] = plan.capacity_after


@pytest.mark.slow
def test_a_standby_takes_over_and_nothing_acknowledged_is_lost(postgres: Any, tmp_path: Path) -> None:
    import psycopg

    url = postgres.create_database()
    cluster = Cluster(url, tmp_path)
    try:
        with Client(cluster.target, retries=12) as c:
            c.create_scale_set(zonal_spec("load"), 1)
            start_rolling_upgrade(c, "roll")

        first = cluster.active(timeout=5)
        deadline = time.monotonic() + 10
        while len(status := cluster_status(url)) < 3:  # the standbys announce themselves as they wait
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert sorted(status.values()) == ["active", "standby", "standby"]
        assert status[f"127.0.0.1:{first}"] == "active"

        acked: dict[int, int] = {}
        errors: list[str] = []
        stop = threading.Event()
        writer = threading.Thread(target=drive, args=(cluster.target, "load", acked, stop, errors))
        writer.start()
        while len(acked) < 50:
            time.sleep(0.01)

        # 1. The active server dies.
        cluster.procs[first].send_signal(signal.SIGKILL)
        second = cluster.active(timeout=30)
        assert second != first
        count = len(acked)
        while len(acked) < count + 50:
            time.sleep(0.01)

        # 2. The next one loses its database session (a partition from PostgreSQL ends it the same way).
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            )
        assert cluster.procs[second].wait(timeout=30) == 1  # it notices within a second and stops serving
        third = cluster.active(timeout=30)
        assert third not in (first, second)
        count = len(acked)
        while len(acked) < count + 50 and writer.is_alive():
            time.sleep(0.01)
        stop.set()
        writer.join(timeout=60)
        assert errors == []
        assert cluster_status(url)[f"127.0.0.1:{third}"] == "active"

        with Client(cluster.target, retries=12) as c:
            got = c.get_scale_set("load")
            last = max(acked)
            assert got.revision == last and got.capacity == acked[last]  # nothing lost, nothing twice
            assert sorted(acked) == list(range(2, last + 1))  # one revision per acknowledged call
            # The rolling upgrade, started on the first server, went on on the survivors.
            finish_rolling_upgrade(c, "roll", timeout=30)
    finally:
        cluster.stop()
