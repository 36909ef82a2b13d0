"""Several active servers on one PostgreSQL (`scaleset serve --cluster`): scale sets shared out among them
by partition, any server answering for any scale set, and the partitions of a server that dies (or is cut
off from the database) taken over by the others, with nothing acknowledged lost and nothing applied twice."""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from scaleset.client import Client
from scaleset.cluster import partition_of
from scaleset.errors import AccessDeniedError, ConflictError, InvalidInputError, ScaleSetError
from scaleset.testing.server import free_port

from tests.conftest import wait_until, zonal_spec
from tests.test_gateway import post
from tests.test_replicas import finish_rolling_upgrade, serving, start_rolling_upgrade, stop_all

pytestmark = pytest.mark.slow


class Cluster:
    """``size`` servers started with --cluster on one database, each logging to its own file."""

    def __init__(
        self,
        url: str,
        tmp: Path,
        size: int = 3,
        partitions: int = 12,
        flags: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.url, self.tmp, self.partitions, self.flags = url, tmp, partitions, flags
        self.env = {**os.environ, **(env or {})}
        self.ports = [free_port() for _ in range(size)]
        self.metrics = {port: free_port() for port in self.ports}
        self.http = {port: free_port() for port in self.ports}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        for port in self.ports:
            self.start(port)

    def start(self, port: int) -> None:
        if port in self.procs:
            self.procs[port].wait(timeout=30)  # reaped before it is replaced
        with (self.tmp / f"server-{port}.log").open("ab") as log:
            self.procs[port] = subprocess.Popen(
                [
                    sys.executable, "-m", "scaleset", "serve", "--store", self.url, "--cluster",
                    "--partitions", str(self.partitions), "--port", str(port), "--metrics-port", str(self.metrics[port]), "--http-port", str(self.http[port]),
                    "--advance-interval", "0.2", *self.flags,
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=self.env,
            )  # fmt: skip

    def target(self, first: int) -> str:
        """All servers, this one first: a client sticks to it while it is up, then moves on."""
        ports = self.ports[first:] + self.ports[:first]
        return "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)

    def owners(self) -> dict[int, list[int]]:
        """port -> the partitions it owns, as `scaleset cluster status` prints them."""
        out = subprocess.run(
            [sys.executable, "-m", "scaleset", "cluster", "status", "--store", self.url],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        owned: dict[int, list[int]] = {}
        for line in out.splitlines()[1:]:
            if line.startswith("127.") and "(gone)" not in line:
                address, partitions = line.split()[:2]
                owned[int(address.rsplit(":", 1)[1])] = (
                    [] if partitions == "-" else [int(p) for p in partitions.split(",")]
                )
        return owned

    def wait_shared(self, ports: list[int], timeout: float = 60) -> dict[int, list[int]]:
        """Waits until ``ports`` own every partition between them, evenly."""
        deadline = time.monotonic() + timeout
        while True:
            owned = self.owners()
            counts = sorted(len(owned.get(p, [])) for p in ports)
            if sum(counts) == self.partitions and counts[-1] - counts[0] <= 1:
                return owned
            if time.monotonic() > deadline:
                logs = " | ".join(p.read_text()[-600:] for p in self.tmp.glob("*.log"))
                raise AssertionError(f"partitions not shared out: {owned} | {logs}")
            time.sleep(0.3)

    def stop(self) -> None:
        stop_all(self.procs.values())


def drive(
    target: str, name: str, acked: list[tuple[str, int]], stop: threading.Event, errors: list[str]
) -> None:
    """SetCapacity with request_ids until stopped; each acknowledged request_id with its capacity."""
    with Client(target, retries=15, timeout=15) as c:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                plan = c.set_capacity(name, 1 + n % 5, request_id=f"{name}-{n}")
            except Exception as e:
                errors.append(f"{name}: {type(e).__name__}: {e}")
                return
            acked.append((f"{name}-{n}", plan.capacity_after))


def logged_capacity_changes(url: str, partitions: int, name: str) -> list[tuple[str, int]]:
    """Every SetCapacity in the scale set's log (its partition's schema), in order: (its request_id, the
    capacity it set)."""
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f"SELECT command, summary FROM p{partition_of(name, partitions)}.events "
            "WHERE scale_set = %s AND type = 'CapacitySet' ORDER BY revision",
            (name,),
        ).fetchall()
    return [(json.loads(summary)["request_id"], json.loads(command)["capacity"]) for command, summary in rows]


def test_three_servers_share_the_scale_sets_and_survive_a_kill_and_a_cut_off(
    postgres: Any, tmp_path: Path
) -> None:
    import psycopg

    url = postgres.create_database()
    cluster = Cluster(url, tmp_path)
    stop = threading.Event()
    try:
        owned = cluster.wait_shared(cluster.ports)
        assert sorted(len(v) for v in owned.values()) == [4, 4, 4]

        # Any server answers for any scale set: created through one, read through the others.
        names = [f"set-{i}" for i in range(6)]
        with Client(cluster.target(0), retries=15) as c:
            for name in names:
                c.create_scale_set(zonal_spec(name), 2)
            start_rolling_upgrade(c, "roll")
        for i in (1, 2):
            with Client(cluster.target(i)) as c:
                assert [s.spec.name for s in c.list_scale_sets()] == sorted([*names, "roll"])
                assert c.get_scale_set("set-3").capacity == 2
                with pytest.raises(ConflictError) as refused:
                    c.set_core_quota("standardDSv5Family", 100)
                assert refused.value.code == "NotInCluster"

        acked: dict[str, list[tuple[str, int]]] = {name: [] for name in names}
        errors: list[str] = []
        writers = [
            threading.Thread(
                target=drive, args=(cluster.target(i % 3), name, acked[name], stop, errors), daemon=True
            )
            for i, name in enumerate(names)
        ]
        for w in writers:
            w.start()

        def progress(calls: int) -> None:
            goal = {n: len(a) + calls for n, a in acked.items()}
            deadline = time.monotonic() + 60
            while any(len(acked[n]) < goal[n] for n in names) and not errors:
                assert time.monotonic() < deadline, {n: len(a) for n, a in acked.items()}
                time.sleep(0.05)

        progress(20)
        # 1. The server that owns the rolling upgrade's partition dies.
        roll = partition_of("roll", cluster.partitions)
        victim = next(port for port, ps in cluster.owners().items() if roll in ps)
        cluster.procs[victim].send_signal(signal.SIGKILL)
        survivors = [p for p in cluster.ports if p != victim]
        owned = cluster.wait_shared(survivors)
        assert sorted(len(owned[p]) for p in survivors) == [6, 6]
        progress(20)

        # 2. Another is cut off from the database: every session it has is ended.
        cut = survivors[0]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                (f"scaleset 127.0.0.1:{cut}",),
            )
        progress(20)
        # 3. The killed one comes back and gets its share again.
        cluster.start(victim)
        owned = cluster.wait_shared(cluster.ports)
        assert sorted(len(v) for v in owned.values()) == [4, 4, 4]
        progress(20)
        stop.set()
        for w in writers:
            w.join(timeout=120)
        assert errors == [], "\n".join(errors)

        with Client(cluster.target(2), retries=15) as c:
            for name in names:
                # Nothing acknowledged lost, nothing applied twice: the log holds each acknowledged
                # request once, in the order it was acknowledged, and the state is the last one's.
                assert logged_capacity_changes(url, cluster.partitions, name) == acked[name]
                assert c.get_scale_set(name).capacity == acked[name][-1][1]
            # The rolling upgrade, whose owner was killed, went on on a survivor.
            finish_rolling_upgrade(c, "roll", timeout=60)
    finally:
        stop.set()
        cluster.stop()


def test_a_server_leaving_hands_its_partitions_back_and_requests_wait_for_the_new_owner(
    postgres: Any, tmp_path: Path
) -> None:
    url = postgres.create_database()
    cluster = Cluster(url, tmp_path, size=2, partitions=4)
    try:
        cluster.wait_shared(cluster.ports)
        assert serving(cluster.ports[0]) and serving(cluster.ports[1])
        with Client(cluster.target(0), retries=15) as c:
            for i in range(8):
                c.create_scale_set(zonal_spec(f"s{i}"), 1)
            # Region changes reach every partition: a zone down is seen by scale sets on both servers.
            c.set_zone_available("2", False)
        for port in cluster.ports:  # any server streams any scale set's events, from its owner
            with Client(f"127.0.0.1:{port}") as c:
                for i in range(8):
                    first = next(iter(c.watch(f"s{i}", 0)))
                    assert (first.scale_set, first.revision, first.type) == (f"s{i}", 1, "ScaleSetCreated")
        # The HTTP/JSON gateway of each server reaches every partition as well.
        for port in cluster.ports:
            for i in range(8):
                status, got = post(
                    f"http://127.0.0.1:{cluster.http[port]}",
                    "/scaleset.v1.ScaleSets/GetScaleSet",
                    {"name": f"s{i}"},
                    token=None,
                )
                assert status == 200 and got["capacity"] == "1"
        # Each server's metrics port shows the partitions it owns, each partition's metrics labelled.
        for port in cluster.ports:
            text = (
                urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics[port]}/metrics", timeout=10)
                .read()
                .decode()
            )
            assert "scaleset_partitions_owned 2.0" in text
            sets = sum(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("scaleset_scale_sets{")
            )
            assert 'scaleset_scale_sets{partition="' in text and 0 < sets < 8
        # A watch of every scale set through any server: each partition's events, merged, each with a
        # resume_token; a region change is an event in every partition.
        with Client(f"127.0.0.1:{cluster.ports[1]}") as c:
            everything = list(itertools.islice(c.watch(""), 12))
        assert Counter(e.type for e in everything) == {"ScaleSetCreated": 8, "ZoneAvailabilityChanged": 4}
        assert len({e.sequence for e in everything}) == 12 and all(e.resume_token for e in everything)
        leaving = cluster.ports[1]
        # A watch through the staying server of a scale set the leaving one owns: it ends with the hand-
        # back, and resumes from its last revision on the new owner.
        moving = next(f"s{i}" for i in range(8) if partition_of(f"s{i}", 4) in cluster.owners()[leaving])
        seen: list[tuple[int, str]] = []
        watcher = Client(f"127.0.0.1:{cluster.ports[0]}")

        def follow() -> None:
            try:
                for event in watcher.watch(moving, 0):
                    seen.append((event.revision, event.type))
            except ScaleSetError:
                pass  # the owner went away mid-stream: resume below

        following = threading.Thread(target=follow, daemon=True)
        following.start()
        wait_until(lambda: len(seen) == 1)
        cluster.procs[leaving].send_signal(signal.SIGTERM)
        assert cluster.procs[leaving].wait(timeout=60) == 0
        following.join(timeout=30)
        assert not following.is_alive() and seen == [(1, "ScaleSetCreated")]
        watcher.close()
        with Client(f"127.0.0.1:{cluster.ports[0]}", retries=15) as c:
            # Clean hand-back: the survivor owns everything, and every scale set answers from it.
            assert cluster.wait_shared([cluster.ports[0]], timeout=30)[cluster.ports[0]] == [0, 1, 2, 3]
            for i in range(8):
                plan = c.set_capacity(f"s{i}", 6)
                assert plan.capacity_after == 6
                zones = {inst.zone for inst in c.list_instances(f"s{i}")}
                assert "2" not in zones, (i, zones)
            resumed = c.watch(moving, seen[-1][0])
            assert [(e.revision, e.type) for e in itertools.islice(resumed, 1)] == [(2, "CapacitySet")]
            # The watch of everything, resumed on the other server after the hand-back, from its 6th event:
            # exactly what it had not delivered yet, then what came since.
            rest = list(itertools.islice(c.watch("", resume_token=everything[5].resume_token), 6 + 8))
            key = lambda e: (e.scale_set, e.revision, e.type)  # noqa: E731
            expected = [key(e) for e in everything[6:]] + [(f"s{i}", 2, "CapacitySet") for i in range(8)]
            assert sorted(map(key, rest)) == sorted(expected)
            with pytest.raises(InvalidInputError) as bad:
                next(iter(c.watch("", 5)))
            assert bad.value.field == "after"
    finally:
        cluster.stop()


def test_tokens_and_roles_hold_on_every_server_for_every_partition(postgres: Any, tmp_path: Path) -> None:
    """The front forwards the caller's token; the partition's owner checks it, wherever it runs."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        "tokens:\n  - {token: r-token, name: rita, role: reader}\n  - {token: o-token, name: omar, role: operator}\n"
    )
    cluster = Cluster(
        postgres.create_database(), tmp_path, size=2, partitions=2, flags=("--tokens", str(tokens))
    )
    try:
        cluster.wait_shared(cluster.ports)
        names = ["a", "b", "c", "d", "e", "f"]
        assert {partition_of(n, 2) for n in names} == {0, 1}  # owned by both servers
        with Client(cluster.target(0), token="o-token") as operator:
            for name in names:
                operator.create_scale_set(zonal_spec(name), 1)
        for first in (0, 1):  # through each server: one partition in process, the other forwarded
            with Client(cluster.target(first), token="r-token") as reader:
                for name in names:
                    assert reader.get_scale_set(name).capacity == 1
                    with pytest.raises(AccessDeniedError) as denied:
                        reader.set_capacity(name, 2)
                    assert denied.value.code == "PermissionDenied"
            with Client(cluster.target(first)) as anonymous, pytest.raises(AccessDeniedError) as denied:
                anonymous.get_scale_set(names[first])
            assert denied.value.code == "Unauthenticated"
        assert serving(cluster.ports[0])  # probes need no token
    finally:
        cluster.stop()


def test_a_cluster_serves_tls_and_forwards_over_tls(postgres: Any, tmp_path: Path) -> None:
    """With --tls-cert the front and every partition serve TLS only; fronts verify one another against
    --tls-ca ($SCALESET_TLS_CA) when they forward."""
    from tests.test_security import authority, write

    ca, server, _ = authority("cluster-ca")
    cert, key, ca_file = write(tmp_path, server, ca)
    assert ca_file is not None
    cluster = Cluster(
        postgres.create_database(),
        tmp_path,
        size=2,
        partitions=2,
        flags=("--tls-cert", cert, "--tls-key", key),
        env={"SCALESET_TLS_CA": ca_file},
    )
    try:
        cluster.wait_shared(cluster.ports)
        names = ["a", "b", "c", "d"]
        assert {partition_of(n, 2) for n in names} == {0, 1}
        with Client(f"127.0.0.1:{cluster.ports[0]}", root_certificates=ca.cert) as c:
            for name in names:
                c.create_scale_set(zonal_spec(name), 1)
        for first in (0, 1):  # each server: one partition in process, the other forwarded over TLS
            with Client(f"127.0.0.1:{cluster.ports[first]}", root_certificates=ca.cert) as c:
                assert [c.get_scale_set(n).capacity for n in names] == [1, 1, 1, 1]
            with Client(f"127.0.0.1:{cluster.ports[first]}", retries=0, timeout=5) as plain:
                with pytest.raises(ScaleSetError):
                    plain.get_scale_set("a")
    finally:
        cluster.stop()


def test_executors_serve_the_whole_cluster_through_any_server(postgres: Any, tmp_path: Path) -> None:
    """An executor on one server carries out every partition's operations (forwarded lease streams,
    cluster-wide operation ids), through a takeover as well."""
    from scaleset.executor import Executor, FakeCloud

    cluster = Cluster(postgres.create_database(), tmp_path, size=2, partitions=2, flags=("--executors",))
    names = ["a", "b", "c", "d"]
    assert {partition_of(n, 2) for n in names} == {0, 1}
    cloud = FakeCloud(seed=11)
    first = f"127.0.0.1:{cluster.ports[0]}"
    with Client(first, retries=15) as lessee, Client(first, retries=15) as c:
        executor = Executor(lessee, cloud, executor_id="everywhere", max_in_flight=8)
        worker = threading.Thread(target=executor.run, daemon=True)

        def converged(capacity: int) -> bool:
            for name in names:
                report = c.fleet_report(name)
                if report.pending_operation_count or report.provisioning_states != {"Succeeded": capacity}:
                    return False
            return True

        try:
            cluster.wait_shared(cluster.ports)
            worker.start()
            for name in names:
                c.create_scale_set(zonal_spec(name), 3)
            wait_until(lambda: converged(3))
            assert sorted(cloud.instances) == sorted(f"{n}_{i}" for n in names for i in range(3))
            # The other server stops: its partition moves to the first, and the executor's stream follows.
            cluster.procs[cluster.ports[1]].send_signal(signal.SIGTERM)
            assert cluster.procs[cluster.ports[1]].wait(timeout=60) == 0
            cluster.wait_shared([cluster.ports[0]])
            for name in names:
                c.set_capacity(name, 5)
            wait_until(lambda: converged(5))
            assert len(cloud.instances) == 20
        finally:
            executor.stop()
            worker.join(timeout=30)
            cluster.stop()


def test_each_client_is_rate_limited_at_the_front_it_calls(postgres: Any, tmp_path: Path) -> None:
    from scaleset.errors import CapacityError

    cluster = Cluster(postgres.create_database(), tmp_path, size=1, partitions=2, flags=("--rate-limit", "5"))
    try:
        cluster.wait_shared(cluster.ports)
        with Client(cluster.target(0)) as c:
            c.create_scale_set(zonal_spec("web"), 1)
        with Client(cluster.target(0), retries=0) as hasty, pytest.raises(CapacityError) as limited:
            for _ in range(30):
                hasty.get_scale_set("web")
        assert limited.value.code == "RateLimited"
    finally:
        cluster.stop()


def test_a_cluster_front_lets_go_of_a_watcher_that_stops_reading(postgres: Any, tmp_path: Path) -> None:
    """On a cluster, a watch of every scale set whose client stops reading ends, through the front, with
    RESOURCE_EXHAUSTED SlowConsumer after the messages written before it (each event once, with the
    resume_token to go on from)."""
    from scaleset.v1 import scaleset_pb2 as pb
    from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

    flags = ("--stream-send-timeout", "0.5", "--instance-limit", "10000")
    cluster = Cluster(postgres.create_database(), tmp_path, size=1, partitions=2, flags=flags)
    try:
        cluster.wait_shared(cluster.ports)
        with Client(cluster.target(0)) as c, grpc.insecure_channel(f"127.0.0.1:{cluster.ports[0]}") as ch:
            c.create_scale_set(zonal_spec("web"), 0)
            stalled = pb_grpc.ScaleSetsStub(ch).WatchEvents(pb.WatchEventsRequest(), timeout=120)
            events = list(next(stalled).events)
            # Plans of 999 instances (~28 KB an event): more than the client, the front and the
            # partition's stream to the front hold unread between them.
            for _ in range(400):
                c.set_capacity("web", 999)
                c.set_capacity("web", 0)
            time.sleep(2)
            with pytest.raises(grpc.RpcError) as ended:
                for message in stalled:
                    events.extend(message.events)
    finally:
        cluster.stop()
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "took no message from this stream" in ended.value.details()
    assert len({e.sequence for e in events}) == len(events) > 1 and all(e.resume_token for e in events)


def test_a_cluster_front_accepts_a_watch_only_once_the_partitions_do(postgres: Any, tmp_path: Path) -> None:
    """Through the front, a watch's headers say it was accepted (``scaleset-stream: open``) as a single
    server's do: a routed watch of one scale set gets them from its partition's owner before any event,
    and a watch of every scale set that a partition refuses (its events compacted) ends with trailers
    only, so a client (a watch proxy) never takes the refusal for an accepted watch."""
    from scaleset.v1 import scaleset_pb2 as pb
    from scaleset.watchproxy import WATCH_PATH

    flags = ("--event-retention", "3", "--instance-limit", "10000")
    cluster = Cluster(postgres.create_database(), tmp_path, size=1, partitions=2, flags=flags)

    def watch(channel: grpc.Channel, **request: Any) -> Any:
        return channel.unary_stream(WATCH_PATH)(
            pb.WatchEventsRequest(**request).SerializeToString(), timeout=30
        )

    try:
        cluster.wait_shared(cluster.ports)
        with Client(cluster.target(0)) as c, grpc.insecure_channel(f"127.0.0.1:{cluster.ports[0]}") as ch:
            c.create_scale_set(zonal_spec("web"), 0)
            quiet = watch(ch, scale_set="web", after=1)  # nothing to send yet: the headers alone
            assert ("scaleset-stream", "open") in (quiet.initial_metadata() or ())
            quiet.cancel()
            every = watch(ch)
            assert ("scaleset-stream", "open") in (every.initial_metadata() or ())
            assert pb.WatchEventsResponse.FromString(next(every)).events[0].type == "ScaleSetCreated"
            every.cancel()
            for token in ("YWxsOjE=", base64.urlsafe_b64encode(f"all:0,{2**63}".encode()).decode()):
                with pytest.raises(InvalidInputError) as foreign:  # one partition, or beyond a sequence
                    next(c.watch("", resume_token=token))
                assert foreign.value.field == "resume_token"
            # Over 1 MB of log in web's partition: a snapshot, then its events compacted to the last 3.
            for _ in range(30):
                c.set_capacity("web", 999)
                c.set_capacity("web", 0)

            def compacted() -> bool:
                try:
                    next(c.watch("web", after=0))
                except ConflictError as e:
                    return e.code == "EventsCompacted"
                return False

            wait_until(compacted, what="web's events compacted")
            refused = watch(ch)
            assert ("scaleset-stream", "open") not in (refused.initial_metadata() or ())
            assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "compacted" in refused.details()
    finally:
        cluster.stop()
