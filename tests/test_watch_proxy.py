"""The watch proxy (`scaleset watch-proxy`, issue 13): many watchers served from one watch of the server.
Its watchers see what the server's own watchers see (same events, same statuses); what its log cannot
serve goes to the server stream for stream; it follows the server through a restart without a gap or a
repeat; it keeps the server's bounds and roles; it answers nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scaleset.auth import Authenticator
from scaleset.client import Client, WatchedEvent
from scaleset.errors import ConflictError, InvalidInputError, NotFoundError, ScaleSetError
from scaleset.model import Region
from scaleset.service import WATCH_MESSAGE_BYTES
from scaleset.testing.server import (
    ServerThread,
    WatchProxyThread,
    free_port,
    start_proxy_process,
    start_server_process,
    wait_serving,
)
from scaleset.v1 import scaleset_pb2 as pb
from scaleset.v1 import scaleset_pb2_grpc as pb_grpc
from scaleset.watchproxy import WATCH_PATH, EventLog, Served, WatchProxy, split_events

from tests.conftest import flood_until_a_watch_is_taken, wait_until, zonal_spec

REGION = Region(zones=["1", "2", "3"], fault_domains_per_zone=3)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(str(tmp_path / "state.db"), REGION) as s:
        yield s


def _history(client: Client) -> None:
    """Eleven events: two scale sets, capacity changes, a region change."""
    client.create_scale_set(zonal_spec("web"), 3)
    client.create_scale_set(zonal_spec("api"), 2)
    for capacity in (4, 6, 5):
        client.set_capacity("web", capacity)
        client.set_capacity("api", capacity)
    client.set_zone_available("2", False)
    client.set_zone_available("2", True)
    client.set_capacity("web", 7)


def _take(events: Iterator[WatchedEvent], n: int) -> list[WatchedEvent]:
    return [next(events) for _ in range(n)]


def test_watchers_of_the_proxy_see_what_watchers_of_the_server_see(server: ServerThread) -> None:
    with Client(server.target) as direct, WatchProxyThread(server.target) as proxy, Client(proxy.target) as c:
        _history(direct)
        from_server = _take(direct.watch(), 11)
        through = c.watch()
        assert _take(through, 11) == from_server
        # Resuming from within the history, and a live change after it.
        resumed = c.watch(after=7)
        assert _take(resumed, 4) == from_server[7:]
        direct.set_capacity("api", 9)
        live = next(through)
        assert next(resumed) == live
        assert (live.sequence, live.scale_set, live.summary) == (12, "api", "5 -> 9 instances")
        assert live == _take(direct.watch(after=11), 1)[0]


def test_messages_through_the_proxy_are_the_servers_bytes(server: ServerThread) -> None:
    """The log keeps each event as the server encoded it: a message through the proxy is the server's
    events joined, byte for byte."""
    with Client(server.target) as direct, WatchProxyThread(server.target) as proxy:
        _history(direct)
        watches = []
        for target in (server.target, proxy.target):
            channel = grpc.insecure_channel(target)
            watch = channel.unary_stream("/scaleset.v1.ScaleSets/WatchEvents")(b"")
            entries: list[tuple[int, bytes]] = []
            while len(entries) < 11:
                entries += split_events(next(watch))
            watch.cancel()
            channel.close()
            watches.append(entries)
        assert watches[0] == watches[1]
        assert [sequence for sequence, _ in watches[1]] == list(range(1, 12))


def test_a_watch_from_before_the_log_reads_the_servers_history_then_the_log(server: ServerThread) -> None:
    """With a log of at most 4 events, a watch from the start reads the older ones from the server and
    moves onto the log: every event once, in order, then live ones."""
    with (
        Client(server.target) as direct,
        WatchProxyThread(server.target, buffer_events=4) as proxy,
        Client(proxy.target) as c,
    ):
        _history(direct)
        everything = _take(direct.watch(), 11)
        through = c.watch()
        assert _take(through, 11) == everything
        direct.set_capacity("web", 2)
        assert next(through).sequence == 12
        metrics = proxy_metrics(proxy)
        assert metrics["scaleset_proxy_passed_through_total"] >= 1
        assert metrics["scaleset_proxy_log_events"] <= 4


def proxy_metrics(proxy: WatchProxyThread) -> dict[str, float]:
    from prometheus_client import generate_latest

    samples = {}
    for line in generate_latest(proxy.proxy.registry).decode().splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_event_log_holds_its_bounds_and_answers_only_what_it_holds() -> None:
    def message(*sequences: int) -> bytes:
        return pb.WatchEventsResponse(
            events=[pb.Event(sequence=s, type="CapacitySet", summary="x" * 40) for s in sequences]
        ).SerializeToString()

    log = EventLog(max_events=6, max_bytes=1 << 20)
    assert log.message(0) is None  # following nothing yet
    log.reset(0)
    log.append(message(1, 2, 3))
    log.append(message(3, 4))  # 3 again (a reconnect's overlap): kept once
    served = log.message(1)
    assert served is not None
    assert [s for s, _ in split_events(served.message)] == [2, 3, 4] and served[1:] == (4, False, False)
    assert log.message(4) == Served(b"", 4)
    log.append(message(5, 6, 7))  # 7 events: the oldest half (3) goes
    assert (len(log), log.start) == (4, 3)
    assert log.message(2) is None and log.message(3) is not None
    log.append(message(*range(8, 18)))  # 10 events in one message: more than the oldest half goes
    assert (len(log), log.start) == (6, 11)
    # Messages of at most about WATCH_MESSAGE_BYTES, cut between events; one larger event goes alone.
    large = EventLog()
    large.reset(0)
    large.append(
        pb.WatchEventsResponse(
            events=[
                pb.Event(
                    sequence=s, scale_set="big", revision=s, summary="x" * (WATCH_MESSAGE_BYTES * 2 // 5)
                )
                for s in (1, 2, 3)
            ]
        ).SerializeToString()
    )
    large.append(
        pb.WatchEventsResponse(
            events=[pb.Event(sequence=4, summary="y" * (WATCH_MESSAGE_BYTES * 3 // 2))]
        ).SerializeToString()
    )
    # One message at a time, each saying whether more follows it at once.
    cut = [large.message(after) for after in (0, 2, 3)]
    assert [(s.last, s.more) for s in cut if s is not None] == [(2, True), (3, True), (4, False)]
    assert [[s for s, _ in split_events(m.message)] for m in cut if m is not None] == [[1, 2], [3], [4]]
    assert all(m is not None and len(m.message) <= WATCH_MESSAGE_BYTES for m in cut[:2])
    # A watch of one scale set is cut the same way.
    of_set = [large.set_message("big", after) for after in (0, 2)]
    assert [(s.last, s.more) for s in of_set if s is not None] == [(2, True), (3, False)]
    with pytest.raises(DecodeError):  # a message cut short, in the middle of a length
        split_events(message(1, 2)[:-60] + bytes([0x0A, 0xFF]))
    small = EventLog(max_events=100, max_bytes=200)
    small.reset(0)
    small.append(message(*range(1, 6)))  # past the byte bound: the oldest half goes
    assert small.size <= 200 and small.start == 2


def test_a_watcher_of_the_proxy_waiting_for_its_turn_holds_nothing_of_the_message_it_sent() -> None:
    """As on the server (tests/test_failure_paths.py): between its messages a watcher of the proxy's log
    holds nothing of the last one (1,000 waiting watchers would hold up to a message of about 256 KB each);
    and a replay longer than a message goes out message after message, without waiting for a turn between
    them."""

    class Context:
        def __init__(self) -> None:
            self.written: list[bytes] = []

        async def send_initial_metadata(self, metadata: object) -> None:
            pass

        async def write(self, message: bytes) -> None:
            self.written.append(message)

    async def scenario() -> tuple[list[list[int]], int, bool]:
        channel = grpc.aio.insecure_channel("127.0.0.1:1")  # never called: the log serves the watch
        # One turn a second: a replay that waited for turns between its messages would take seconds.
        proxy = WatchProxy(channel, upstream="127.0.0.1:1", messages_per_second=1)
        proxy.log.reset(0)
        big = "x" * (WATCH_MESSAGE_BYTES // 3)
        proxy.log.append(
            pb.WatchEventsResponse(
                events=[pb.Event(sequence=s, type="CapacitySet", summary=big) for s in range(1, 8)]
            ).SerializeToString()
        )
        context = Context()
        await proxy._turns.take()  # the next turn is a second away
        watch = asyncio.create_task(proxy._follow_log(0, context))  # type: ignore[arg-type]
        await asyncio.sleep(0.5)  # the replay sent, and the watcher waiting for its next turn
        # References to the last message beyond context.written's and getrefcount's own (a tuple of bytes
        # and numbers, as a Served is, is not tracked by the garbage collector: get_referrers misses it).
        held = sys.getrefcount(context.written[-1]) - 2
        waiting = not watch.done()
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        await channel.close()
        return [[s for s, _ in split_events(m)] for m in context.written], held, waiting

    sent, held, waiting = asyncio.run(scenario())
    assert sent == [[1, 2], [3, 4], [5, 6], [7]] and held == 0 and waiting


def test_event_log_serves_one_scale_set_only_from_where_it_holds_all_its_events() -> None:
    def message(*events: tuple[int, str, int, str]) -> bytes:
        return pb.WatchEventsResponse(
            events=[pb.Event(sequence=q, scale_set=n, revision=r, type=t) for q, n, r, t in events]
        ).SerializeToString()

    def revisions(served: Served | None) -> list[int]:
        assert served is not None
        return [e.revision for e in pb.WatchEventsResponse.FromString(served.message).events]

    log = EventLog(max_events=6, max_bytes=1 << 20)
    log.reset(10)  # web's revisions 1 and 2 came before the log started
    log.append(message((11, "web", 3, "CapacitySet"), (12, "api", 1, "ScaleSetCreated")))
    log.append(message((13, "web", 4, "CapacitySet"), (14, "", 7, "ZoneAvailabilityChanged")))
    assert [log.serves_set("web", after) for after in (1, 2, 3, 4, 5)] == [False, True, True, True, False]
    assert not log.serves_set("db", 0)  # nothing of it held: the server knows whether it exists
    two = log.set_message("web", 2)
    assert revisions(two) == [3, 4] and two is not None and two[1:] == (4, False, False)
    assert log.set_message("web", 4) == Served(b"", 4)  # nothing after it yet
    assert log.set_message("web", 1) is None
    # Deleted and created again: a watch ends with the deletion; after it, the server answers.
    log.append(message((15, "web", 5, "ScaleSetDeleted"), (16, "api", 2, "CapacitySet")))
    ends = log.set_message("web", 3)
    assert ends is not None and ends[1:] == (5, False, True) and not log.serves_set("web", 5)
    log.append(message((17, "web", 6, "ScaleSetCreated")))  # 7 events: the oldest half goes
    assert log.start == 13 and log.serves_set("web", 5)
    assert revisions(log.set_message("web", 4)) == [5]  # up to the deletion, not past it
    assert log.set_message("web", 3) is None  # revision 4 went with the oldest half
    assert log.set_message("api", 2) == Served(b"", 2)  # all of api's held events went: none after 2
    log.reset(20)
    assert not log.serves_set("web", 6) and log.generation == 2
    log.known("web", 6)  # listed by the server: its events from there on are the log's
    assert log.serves_set("web", 6) and not log.serves_set("web", 5)
    assert log.set_message("web", 6) == Served(b"", 6)
    # A cluster's watch of one scale set numbers its events otherwise: the server serves those.
    cluster = EventLog()
    cluster.reset(20)
    cluster.append(
        pb.WatchEventsResponse(
            events=[pb.Event(sequence=21, scale_set="web", revision=7, resume_token="eA==")]
        ).SerializeToString()
    )
    assert not cluster.serves_set("web", 6) and not cluster.serves_set("web", 7)


def test_a_proxy_of_a_compacted_history_starts_at_its_oldest_kept_event(tmp_path: Path) -> None:
    """The server keeps only recent events: the proxy's log starts at the oldest it keeps, and a watcher
    from before it gets the server's own answer, EventsCompacted. A scale set none of whose events is kept
    is known to the log from the server's list: a watch of it from its revision is the log's."""
    options = {"snapshot_every": 5, "event_retention": 3, "request_retention": 2}
    with (
        ServerThread(str(tmp_path / "state.db"), REGION, **options) as server,
        Client(server.target) as direct,
    ):
        direct.create_scale_set(zonal_spec("quiet"), 1)
        direct.create_scale_set(zonal_spec("web"), 1)
        for n in range(40):
            direct.set_capacity("web", n % 3)
        server.call(server.control._snapshot())
        oldest = int(server.control._store.first_retained(None))
        assert oldest > 1
        # The log claims no start before the server accepts its watch: the first watch, from 0, is
        # refused as compacted, so when it follows, the log starts at the oldest kept event.
        assert asyncio.run(_start_when_following(server.target)) == oldest - 1
        with WatchProxyThread(server.target) as proxy, Client(proxy.target) as c:
            assert proxy.proxy.log.start == oldest - 1
            with pytest.raises(ConflictError) as compacted:
                next(c.watch(after=0))
            assert compacted.value.code == "EventsCompacted"
            with grpc.insecure_channel(proxy.target) as channel:  # refused: no headers, as the server's
                refused = channel.unary_stream(WATCH_PATH)(pb.WatchEventsRequest(after=0).SerializeToString())
                assert ("scaleset-stream", "open") not in (refused.initial_metadata() or ())
                assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
            kept = c.watch(after=oldest - 1)
            assert [e.sequence for e in _take(kept, 42 - oldest + 1)] == list(range(oldest, 43))
            quiet = c.watch("quiet", after=1)
            direct.set_capacity("quiet", 2)
            assert next(quiet).revision == 2
            assert proxy_metrics(proxy)["scaleset_proxy_passed_through_total"] == 2  # the compacted watches


async def _start_when_following(upstream: str) -> int | None:
    """Where a new proxy's log starts when it first reports following ``upstream``."""
    async with grpc.aio.insecure_channel(upstream) as channel:
        proxy = WatchProxy(channel, upstream=upstream)
        starts: list[int | None] = []

        async def heard(following: bool) -> None:
            if following:
                starts.append(proxy.log.start)

        proxy.listeners.append(heard)
        following = asyncio.create_task(proxy.follow())
        try:
            async with asyncio.timeout(30):
                while not starts:
                    await asyncio.sleep(0.01)
        finally:
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following
        return starts[0]


def test_watches_of_one_scale_set_are_served_from_the_log(server: ServerThread) -> None:
    """A watch of one scale set whose events the log holds is served from it: the server's events, in
    the server's messages, live ones after them, ending with the set's deletion; nothing goes upstream."""
    with Client(server.target) as direct, WatchProxyThread(server.target) as proxy, Client(proxy.target) as c:
        _history(direct)
        wait_until(lambda: (proxy.proxy.log.last or 0) >= 11, what="the proxy's log to hold the history")
        from_server = _take(direct.watch("web"), 5)
        web, resumed = c.watch("web"), c.watch("web", after=3)
        assert _take(web, 5) == from_server
        assert [e.revision for e in from_server] == [1, 2, 3, 4, 5]
        assert _take(resumed, 2) == from_server[3:]
        direct.set_capacity("api", 1)  # another set's change: not theirs
        direct.set_capacity("web", 2)
        live = next(web)
        assert (live.revision, live.summary) == (6, "7 -> 2 instances")
        assert next(resumed) == live == _take(direct.watch("web", after=5), 1)[0]
        direct.delete_scale_set("web")
        for watch in (web, resumed):
            assert next(watch).type == "ScaleSetDeleted"
            with pytest.raises(StopIteration):
                next(watch)
        channels = [grpc.insecure_channel(t) for t in (server.target, proxy.target)]
        request = pb.WatchEventsRequest(scale_set="api", after=2).SerializeToString()
        messages = [ch.unary_stream("/scaleset.v1.ScaleSets/WatchEvents")(request) for ch in channels]
        assert next(messages[0]) == next(messages[1])  # api's revisions 3 to 5, byte for byte
        for watch, channel in zip(messages, channels, strict=True):
            watch.cancel()
            channel.close()
        assert proxy_metrics(proxy)["scaleset_proxy_passed_through_total"] == 0


def test_what_the_log_cannot_serve_goes_to_the_server_as_it_is(server: ServerThread) -> None:
    with Client(server.target) as direct, WatchProxyThread(server.target) as proxy, Client(proxy.target) as c:
        _history(direct)
        direct.delete_scale_set("web")
        with pytest.raises(NotFoundError):  # deleted: after its last revision, the server says so
            next(c.watch("web", after=6))
        with pytest.raises(NotFoundError):
            next(c.watch("missing"))
        # From beyond a set's revision (the log cannot tell whether it is there yet): the server's.
        stub = pb_grpc.ScaleSetsStub(grpc.insecure_channel(proxy.target))
        api = stub.WatchEvents(pb.WatchEventsRequest(scale_set="api", after=5))
        wait_until(lambda: proxy_metrics(proxy)["scaleset_proxy_passed_through_total"] == 3)
        direct.set_capacity("api", 9)
        direct.set_capacity("api", 8)
        assert next(api).events[0].revision == 6
        api.cancel()
        with pytest.raises(InvalidInputError) as token:
            next(c.watch("", resume_token="YWxsOjE="))
        assert token.value.field == "resume_token"
        with pytest.raises(grpc.RpcError) as far:
            next(stub.WatchEvents(pb.WatchEventsRequest(after=2**63)))
        assert far.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        raw = grpc.insecure_channel(proxy.target).unary_stream("/scaleset.v1.ScaleSets/WatchEvents")
        with pytest.raises(grpc.RpcError) as garbage:
            next(raw(b"\xff\xff\xff"))
        assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_proxy_answers_nothing_but_watches_and_health(server: ServerThread) -> None:
    with WatchProxyThread(server.target) as proxy, grpc.insecure_channel(proxy.target) as channel:
        with pytest.raises(grpc.RpcError) as other:
            pb_grpc.ScaleSetsStub(channel).SetCapacity(pb.SetCapacityRequest(name="web", capacity=3))
        assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert f"call SetCapacity on the server at {server.target}" in str(other.value.details())
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_the_proxy_bounds_its_watchers(server: ServerThread) -> None:
    with (
        Client(server.target) as direct,
        WatchProxyThread(server.target, max_watchers=1) as proxy,
        grpc.insecure_channel(proxy.target) as channel,
    ):
        direct.create_scale_set(zonal_spec("web"), 1)
        stub = pb_grpc.ScaleSetsStub(channel)
        first = stub.WatchEvents(pb.WatchEventsRequest())
        assert next(first).events[0].sequence == 1
        with pytest.raises(grpc.RpcError) as second:
            next(stub.WatchEvents(pb.WatchEventsRequest()))
        assert second.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 watch streams" in str(second.value.details())
        first.cancel()


def test_watches_passed_to_the_server_are_bounded(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Watches of one scale set share the proxy's one connection to the server: at most
    PASS_THROUGH_STREAMS at once (1 here), and they count as watchers too."""
    import scaleset.watchproxy

    monkeypatch.setattr(scaleset.watchproxy, "PASS_THROUGH_STREAMS", 1)
    with (
        Client(server.target) as direct,
        WatchProxyThread(server.target, max_watchers=2) as proxy,
        grpc.insecure_channel(proxy.target) as channel,
    ):
        direct.create_scale_set(zonal_spec("web"), 1)
        stub = pb_grpc.ScaleSetsStub(channel)
        # From beyond web's revision: the log cannot serve it (it does not know web's next revision yet).
        web = stub.WatchEvents(pb.WatchEventsRequest(scale_set="web", after=2))
        wait_until(lambda: proxy_metrics(proxy)["scaleset_proxy_passed_through_total"] == 1)
        direct.set_capacity("web", 2)
        direct.set_capacity("web", 3)
        assert next(web).events[0].revision == 3
        with pytest.raises(grpc.RpcError) as second:
            next(stub.WatchEvents(pb.WatchEventsRequest(scale_set="web", after=5)))
        assert second.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already passes 1 watches to the server" in str(second.value.details())
        every = stub.WatchEvents(pb.WatchEventsRequest())  # served from the log: still there
        assert next(every).events[0].sequence == 1
        with pytest.raises(grpc.RpcError) as third:  # the watch of "web" and this one: 2 watchers
            next(stub.WatchEvents(pb.WatchEventsRequest()))
        assert third.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        web.cancel()
        every.cancel()


def test_watchers_of_one_scale_set_from_the_log_are_not_bounded_by_the_upstream_streams(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one stream to spare upstream and a log of 4 events, five watchers of a quiet scale set are
    served from the log, and stay on it while other sets' changes push its events out of the log."""
    import scaleset.watchproxy

    monkeypatch.setattr(scaleset.watchproxy, "PASS_THROUGH_STREAMS", 1)
    with (
        Client(server.target) as direct,
        WatchProxyThread(server.target, buffer_events=4) as proxy,
        grpc.insecure_channel(proxy.target) as channel,
    ):
        direct.create_scale_set(zonal_spec("web"), 1)
        direct.create_scale_set(zonal_spec("api"), 1)
        wait_until(lambda: (proxy.proxy.log.last or 0) >= 2, what="the proxy's log to hold both creations")
        stub = pb_grpc.ScaleSetsStub(channel)
        watches = [stub.WatchEvents(pb.WatchEventsRequest(scale_set="web", after=1)) for _ in range(5)]
        wait_until(lambda: proxy.proxy.watchers == 5, what="five watchers")
        for capacity in range(2, 12):  # ten events of api: web's creation leaves the log
            direct.set_capacity("api", capacity)
        direct.set_capacity("web", 3)
        assert [next(w).events[0].revision for w in watches] == [2] * 5
        assert proxy_metrics(proxy)["scaleset_proxy_passed_through_total"] == 0
        assert proxy.proxy.log.start is not None and proxy.proxy.log.start > 2
        for w in watches:
            w.cancel()


def test_the_proxy_lets_a_watcher_that_stops_reading_go(tmp_path: Path) -> None:
    """A watcher that takes no message for the send timeout gets every message written before, then
    RESOURCE_EXHAUSTED SlowConsumer, as on the server; its slot is free for another watcher."""
    with (
        ServerThread(str(tmp_path / "state.db"), REGION, instance_limit=10_000) as server,
        Client(server.target) as direct,
        WatchProxyThread(server.target, max_watchers=1, stream_send_timeout=0.5) as proxy,
        Client(proxy.target) as c,
        grpc.insecure_channel(proxy.target) as channel,
    ):
        direct.create_scale_set(zonal_spec("web"), 0)
        stalled = pb_grpc.ScaleSetsStub(channel).WatchEvents(pb.WatchEventsRequest())
        received = [e.sequence for e in next(stalled).events]  # then it reads no more
        flood_until_a_watch_is_taken(direct, c)
        with pytest.raises(grpc.RpcError) as ended:
            for message in stalled:
                received.extend(e.sequence for e in message.events)
        assert proxy_metrics(proxy)["scaleset_proxy_slow_consumers_total"] == 1
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "took no message from this stream for 0.5 s" in str(ended.value.details())
    assert received == list(range(1, len(received) + 1)) and len(received) > 1


def test_proxy_roles_and_its_own_token_upstream(tmp_path: Path) -> None:
    """With tokens on the proxy, a watcher needs the reader role there; the proxy reaches a server with
    tokens through a token of its own."""
    tokens = {
        "r-token": ("reader-bot", "reader"),
        "p-token": ("proxy", "reader"),
        "o-token": ("ops", "operator"),
    }
    auth = Authenticator(tokens)
    with (
        ServerThread(str(tmp_path / "state.db"), REGION, authenticator=auth) as server,
        Client(server.target, token="o-token") as direct,
        WatchProxyThread(server.target, token="p-token", authenticator=auth) as proxy,
    ):
        direct.create_scale_set(zonal_spec("web"), 1)
        with Client(proxy.target) as anonymous, pytest.raises(Exception) as denied:
            next(anonymous.watch())
        assert getattr(denied.value, "code", "") == "Unauthenticated"
        with Client(proxy.target, token="r-token") as reader:
            assert next(reader.watch()).type == "ScaleSetCreated"


def test_the_proxy_speaks_tls_both_ways(tmp_path: Path) -> None:
    """A TLS server, reached by the proxy with its CA; the proxy serves TLS itself, and a plain-text
    client cannot watch through it."""
    from scaleset.auth import server_credentials

    from tests.test_security import authority, write

    ca, server_pem, _ = authority("ca-proxy")
    cert, key, _ = write(tmp_path, server_pem)
    with (
        ServerThread(str(tmp_path / "state.db"), REGION, credentials=server_credentials(cert, key)) as server,
        Client(server.target, root_certificates=ca.cert) as direct,
        WatchProxyThread(
            server.target,
            upstream_credentials=grpc.ssl_channel_credentials(ca.cert),
            credentials=server_credentials(cert, key),
        ) as proxy,
    ):
        direct.create_scale_set(zonal_spec("web"), 1)
        with Client(proxy.target, root_certificates=ca.cert) as c:
            assert next(c.watch()).type == "ScaleSetCreated"
        with Client(proxy.target, retries=0, timeout=5) as plain, pytest.raises(ScaleSetError):
            next(plain.watch())


def test_watch_proxy_command_follows_a_server_restart_without_a_gap(tmp_path: Path) -> None:
    """`scaleset watch-proxy` (the command operators run) keeps its watchers' streams open while the
    server restarts, is NOT_SERVING meanwhile, and goes on after the last event it held."""
    db, port, proxy_port = tmp_path / "state.db", free_port(), free_port()
    server = start_server_process(db, port, tmp_path / "server.log")
    target = f"127.0.0.1:{port}"
    proxy = start_proxy_process(target, proxy_port, tmp_path / "proxy.log")
    try:
        with Client(target) as direct:
            direct.create_scale_set(zonal_spec("web"), 1)
            direct.set_capacity("web", 2)
        channel = grpc.insecure_channel(f"127.0.0.1:{proxy_port}")
        watch = pb_grpc.ScaleSetsStub(channel).WatchEvents(pb.WatchEventsRequest())
        seen = [e.sequence for e in next(watch).events]
        while seen[-1] < 2:
            seen += [e.sequence for e in next(watch).events]
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(200):
            if health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.SERVING:
                break
            threading.Event().wait(0.05)
        assert (
            health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        server = start_server_process(db, port, tmp_path / "server.log")
        with Client(target) as direct:
            direct.set_capacity("web", 3)
        while seen[-1] < 3:
            seen += [e.sequence for e in next(watch).events]
        assert seen == [1, 2, 3]
        wait_serving(f"127.0.0.1:{proxy_port}")
        watch.cancel()
        channel.close()
    finally:
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(timeout=30) == 0
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def test_watch_proxy_refuses_to_listen_beyond_localhost_without_tls() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "scaleset", "watch-proxy", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "InsecureListenRefused" in done.stderr
