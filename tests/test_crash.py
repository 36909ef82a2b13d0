"""Crash safety: SIGKILL a server in the middle of concurrent mutations, restart it, and check that every
acknowledged change is there, nothing unacknowledged is half-applied, and the engine's invariants hold."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from scaleset.testing.server import free_port
from scaleset.testing.server import start_server_process as start
from scaleset.v1 import scaleset_pb2 as pb
from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

CLIENTS = 4


@dataclass
class History:
    name: str
    acked: dict[int, int] = field(default_factory=dict)  # revision -> capacity after it
    in_flight: pb.SetCapacityRequest | pb.SetInstanceProtectionRequest | None = None
    last_capacity: int = 0


def drive(target: str, history: History, stop: threading.Event, cycle: int = 0) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ScaleSetsStub(channel)
        n = 0
        while not stop.is_set():
            n += 1
            if n % 5 == 0:
                request = pb.SetInstanceProtectionRequest(
                    name=history.name,
                    instance_ids=[0],
                    protect_from_scale_in=n % 10 == 0,
                    request_id=f"{history.name}-{cycle}-{n}",
                )
                call, capacity = stub.SetInstanceProtection, history.last_capacity
            else:
                capacity = 1 + (n * 37) % 60
                request = pb.SetCapacityRequest(
                    name=history.name, capacity=capacity, request_id=f"{history.name}-{cycle}-{n}"
                )
                call = stub.SetCapacity
            history.in_flight = request
            try:
                reply = call(request, timeout=10)
            except grpc.RpcError:
                return  # the server died: this request stays in flight (unacknowledged)
            history.acked[reply.revision] = capacity
            history.last_capacity = capacity
            history.in_flight = None


KILLS = 3


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_sigkill_loses_nothing_acknowledged(
    tmp_path: Path, request: pytest.FixtureRequest, store: str
) -> None:
    """Chaos: three SIGKILLs of the server in a row under concurrent load, each followed by a restart and a
    full check; on SQLite, before the second restart the WAL ends in a torn write, as a machine that lost
    power mid-write leaves it. On PostgreSQL the same runs with the state in a real PostgreSQL."""
    db, log, port = tmp_path / "state.db", tmp_path / "server.log", free_port()
    target = f"127.0.0.1:{port}"
    extra = (
        ("--store", request.getfixturevalue("postgres").create_database()) if store == "postgresql" else ()
    )

    def start_server(db: Path, port: int, log: Path) -> Any:
        return start(db, port, log, *extra)

    proc = start_server(db, port, log)
    histories = [History(f"set{i}") for i in range(CLIENTS)]
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ScaleSetsStub(channel)
            for h in histories:
                reply = stub.CreateScaleSet(
                    pb.CreateScaleSetRequest(
                        scale_set=pb.ScaleSetSpec(
                            name=h.name, zones=["1", "2", "3"], sku=pb.Sku(name="Standard_D2s_v5")
                        ),
                        capacity=3,
                    )
                )
                h.acked[reply.scale_set.revision] = 3
                h.last_capacity = 3
        for cycle in range(KILLS):
            stop = threading.Event()
            threads = [threading.Thread(target=drive, args=(target, h, stop, cycle)) for h in histories]
            goal = sum(len(h.acked) for h in histories) + 200
            for t in threads:
                t.start()
            while sum(len(h.acked) for h in histories) < goal:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            stop.set()
            for t in threads:
                t.join(timeout=30)
            if cycle == 1 and store == "sqlite":
                tear_the_wal(db)
            proc = start_server(db, port, log)
            check_and_settle(target, histories)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0


def tear_the_wal(db: Path) -> None:
    """Appends half a frame of garbage to the write-ahead log: the write that was under way when the power
    went. Only an unacknowledged commit can be torn (acknowledged ones were fsynced), so nothing
    acknowledged may be lost; SQLite must recognise the torn frame by its checksum and ignore it."""
    wal = db.with_name(db.name + "-wal")
    assert wal.exists() and wal.stat().st_size > 32
    page_size = int.from_bytes(wal.read_bytes()[8:12], "big")
    with wal.open("ab") as f:
        f.write(os.urandom(24 + page_size // 2))


def check_and_settle(target: str, histories: list[History]) -> None:
    """Every acknowledged change is there, nothing unacknowledged is half-applied, the invariants hold;
    then the in-flight request is retried with its request_id, and the histories go on from there."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ScaleSetsStub(channel)
        for h in histories:
            got = stub.GetScaleSet(pb.GetScaleSetRequest(name=h.name))
            last_acked = max(h.acked)
            # Every acknowledged change is there; at most the one unacknowledged change beyond it.
            assert got.revision in (last_acked, last_acked + 1), (h.name, got.revision, last_acked)
            if got.revision == last_acked:
                assert got.capacity == h.acked[last_acked]
            else:
                assert h.in_flight is not None
                expected = (
                    h.in_flight.capacity
                    if isinstance(h.in_flight, pb.SetCapacityRequest)
                    else h.acked[last_acked]
                )
                assert got.capacity == expected
            instances = stub.ListInstances(pb.ListInstancesRequest(name=h.name)).instances
            ids = list(instances.instance_id)
            assert len(ids) == got.capacity == len(set(ids)) and ids == sorted(ids)
            zones = Counter(instances.zone_names[z] for z in instances.zone)
            assert max(zones.values()) - min(zones.values()) <= 1 if zones else True
            # Retrying the unacknowledged request with its request_id is safe either way.
            if h.in_flight is not None:
                method = (
                    stub.SetCapacity
                    if isinstance(h.in_flight, pb.SetCapacityRequest)
                    else stub.SetInstanceProtection
                )
                reply = method(h.in_flight)
                assert reply.revision == last_acked + 1
                after = stub.GetScaleSet(pb.GetScaleSetRequest(name=h.name))
                assert after.revision == last_acked + 1
                h.acked[after.revision] = after.capacity
                h.last_capacity = after.capacity
                h.in_flight = None
