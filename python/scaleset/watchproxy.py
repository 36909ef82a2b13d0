"""The watch proxy (``scaleset watch-proxy``): serves WatchEvents to many watchers from one watch of
every scale set on the server, as etcd's gRPC proxy coalesces watchers.

A server sends each of its watchers every change itself, on the event loop that also answers the
changes: a thousand watchers add a fifth to two fifths to its work, and to the wait of every call
(docs/soak.md). A proxy, in a process of its own and on as many machines as needed, takes that work
away: the server serves it one stream, and the proxy writes each change to its watchers from a log of
the most recent events as the server encoded them, end to end in one buffer (a message of any run of
them is one slice: nothing decoded or encoded per watcher).

What a watcher of the proxy sees is what it would see on the server: the same events, in the same
messages (a message carries every event since the stream's last), the same statuses. A watch of one scale
set is served from the log too, when it holds that scale set's events from the watch's revision on.
Watches the log cannot serve go to the server as they are, stream for stream: a watch of one scale set
from before the log holds its events (or from beyond them, or of a scale set it holds nothing of), a
cluster's resume_token or any watch of one scale set on a cluster, and a watch of every scale set resuming
from before the log's oldest event (it reads that history from the server, then moves onto the log); a
watch of one scale set whose next event the log dropped goes on from the server. The proxy keeps the
server's bounds: watchers at once, messages a second across them, and a stream whose client takes no
message for --stream-send-timeout is ended with RESOURCE_EXHAUSTED ``SlowConsumer``; with tokens or JWT
it asks each watcher for the reader role, as the server does, and reaches the server with a token of its
own.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from scaleset.client import error_of
from scaleset.cluster import abort_with
from scaleset.control import WATCH_INTERVAL_S, WATCH_MESSAGES_PER_SECOND
from scaleset.errors import CapacityError, ScaleSetError, error, invalid_input
from scaleset.limits import (
    MAX_CONCURRENT_RPCS,
    MAX_CONNECTIONS,
    STREAM_SEND_TIMEOUT_S,
    LingeringStreams,
    SendTurns,
)
from scaleset.service import (
    MAX_REPLY_BYTES,
    STREAM_OPEN,
    WATCH_MESSAGE_BYTES,
    abort_call,
    listen,
    send_within,
    server_options,
    status_for,
    stream_opened,
)
from scaleset.v1 import scaleset_pb2 as pb

__all__ = ["EventLog", "Served", "WatchProxy", "serve_watch_proxy"]

log = logging.getLogger(__name__)

WATCH_PATH = "/scaleset.v1.ScaleSets/WatchEvents"
#: Events the proxy's log holds at most, and bytes (as encoded): watchers resuming from within them are
#: served from the log; from before them, from the server (`watch-proxy --buffer-events`, `--buffer-mb`).
BUFFER_EVENTS = 100_000
BUFFER_BYTES = 128 * 1024 * 1024
#: Watches passed to the server at once (what the log cannot serve): they share one connection, on which
#: the server takes at most 256 streams (service.SERVER_OPTIONS). Watches that only need history, or whose
#: next event the log dropped, wait for a turn; other watches beyond it are refused.
PASS_THROUGH_STREAMS = 200
#: Seconds between attempts to reach the server again, doubling up to the most.
RECONNECT_S, RECONNECT_MAX_S = 0.5, 10.0
_EVENTS_TAG = (pb.WatchEventsResponse.EVENTS_FIELD_NUMBER << 3) | 2


def split_events(message: bytes) -> list[tuple[int, bytes]]:
    """A WatchEventsResponse's events as (sequence, the event's ``events`` entry as sent): entries joined
    end to end make a WatchEventsResponse of those events."""
    return [(event.sequence, entry) for event, entry in _entries(message)]


def _entries(message: bytes) -> list[tuple[pb.Event, bytes]]:
    """A WatchEventsResponse's events, each decoded and as its ``events`` entry as sent."""
    entries: list[tuple[pb.Event, bytes]] = []
    at = 0
    while at < len(message):
        start = at
        if message[at] != _EVENTS_TAG:
            raise DecodeError(f"unexpected field tag {message[at]} in a WatchEventsResponse")
        at += 1
        length = shift = 0
        while True:
            if at >= len(message):
                raise DecodeError("truncated WatchEventsResponse")
            byte = message[at]
            at += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        end = at + length
        if end > len(message):
            raise DecodeError("truncated WatchEventsResponse")
        entries.append((pb.Event.FromString(message[at:end]), message[start:end]))
        at = end
    return entries


def _last_sequence(message: bytes) -> int:
    return split_events(message)[-1][0]


class Served(NamedTuple):
    """What the log serves a watcher next: one message (empty when it has nothing after the watcher's
    position yet), the position of its last event, whether the log held more events after it when it was
    cut at the size of a message (the watcher's next message follows at once, without waiting for a turn,
    as a replay does on the server), and, in a watch of one scale set, whether it ends with that scale
    set's deletion. One message at a time: what a watcher replaying the log holds is the message it is
    sending, not copies of every event it has yet to receive."""

    message: bytes
    last: int
    more: bool = False
    ended: bool = False


class EventLog:
    """The most recent events of every scale set, as the server sent them, in order and end to end in one
    buffer (a message of any run of them is one slice): at most ``max_events`` and ``max_bytes`` (the
    oldest half goes first). It holds every event after ``start``, and indexes them by scale set, so that
    a watch of one scale set is served from it too: a scale set's revisions count its events one by one
    (deleted and created again, it goes on counting), so the events it holds of a scale set are every one
    after the oldest of them."""

    def __init__(self, max_events: int = BUFFER_EVENTS, max_bytes: int = BUFFER_BYTES) -> None:
        self._max_events, self._max_bytes = max_events, max_bytes
        self._sequences: list[int] = []
        #: Where each event's entry starts in ``_data``.
        self._starts: list[int] = []
        self._data = bytearray()
        #: Every event after this sequence is held (None: nothing followed yet).
        self.start: int | None = None
        #: Set, and replaced, on every append: what a watcher with nothing to send waits on.
        self.changed = asyncio.Event()
        #: Each scale set's events held: their revisions and sequences, in order.
        self._sets: dict[str, tuple[list[int], list[int]]] = {}
        #: The sequences of the ScaleSetDeleted events held (a watch of one scale set ends with one).
        self._deletions: set[int] = set()
        #: Each scale set's newest revision since the log started, or as listed then (`known`): its events
        #: after that are all in the log. One number a name, as the server keeps.
        self._revisions: dict[str, int] = {}
        #: The scale sets whose newest event is their deletion.
        self._gone: set[str] = set()
        #: What a watcher of one scale set with nothing to send waits on (set on its next event).
        self._set_changed: dict[str, asyncio.Event] = {}
        #: Counts the log's starts over (`reset`): a watcher of one scale set from before one goes upstream.
        self.generation = 0
        #: Whether the server is a single server (not a cluster's member, whose watch of one scale set numbers
        #: the events by partition and carries no resume_token, so the server serves those); None until the
        #: first event tells (a cluster's carry a resume_token).
        self.single_server: bool | None = None

    @property
    def last(self) -> int | None:
        """The sequence of the newest event held (or ``start`` when none is)."""
        return self._sequences[-1] if self._sequences else self.start

    def __len__(self) -> int:
        return len(self._sequences)

    @property
    def size(self) -> int:
        return len(self._data)

    def reset(self, start: int) -> None:
        """Forgets every event: the log follows on from ``start``."""
        self._sequences, self._starts, self._data, self.start = [], [], bytearray(), start
        self._sets, self._deletions, self._revisions, self._gone = {}, set(), {}, set()
        self.generation += 1
        for changed in self._set_changed.values():
            changed.set()
        self._set_changed = {}

    def append(self, message: bytes) -> None:
        """Adds a message's events (any already held are skipped) and wakes the waiting watchers."""
        last = self.last
        touched = set()
        for event, entry in _entries(message):
            sequence = event.sequence
            if last is None or sequence > last:
                self._sequences.append(sequence)
                self._starts.append(len(self._data))
                self._data += entry
                last = sequence
                if self.single_server is None:
                    self.single_server = not event.resume_token
                if event.scale_set:
                    revisions, sequences = self._sets.setdefault(event.scale_set, ([], []))
                    revisions.append(event.revision)
                    sequences.append(sequence)
                    # A listed revision (`known`) may be newer than events still on their way.
                    self._revisions[event.scale_set] = max(
                        event.revision, self._revisions.get(event.scale_set, 0)
                    )
                    if event.type == "ScaleSetDeleted":
                        self._deletions.add(sequence)
                        self._gone.add(event.scale_set)
                    else:
                        self._gone.discard(event.scale_set)
                    touched.add(event.scale_set)
        if len(self._sequences) > self._max_events or len(self._data) > self._max_bytes:
            # The oldest half, or more when one message brought more than that: both bounds hold after.
            held = len(self._sequences)
            over_bytes = bisect.bisect_left(self._starts, len(self._data) - self._max_bytes)
            drop = min(held, max(1, held // 2, held - self._max_events, over_bytes))
            self.start = self._sequences[drop - 1]
            cut = self._starts[drop] if drop < len(self._starts) else len(self._data)
            del self._data[:cut], self._sequences[:drop]
            self._starts = [at - cut for at in self._starts[drop:]]
            for name, (revisions, sequences) in list(self._sets.items()):
                if gone := bisect.bisect_right(sequences, self.start):
                    del revisions[:gone], sequences[:gone]
                    if not revisions:
                        del self._sets[name]
            self._deletions = {s for s in self._deletions if s > self.start}
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()
        for name in touched:
            if (set_changed := self._set_changed.pop(name, None)) is not None:
                set_changed.set()

    def known(self, scale_set: str, revision: int) -> None:
        """``scale_set`` is at ``revision`` (listed by the server): every later event of it will be in the
        log, so a watch of it from there is the log's to serve."""
        self._revisions.setdefault(scale_set, revision)

    def serves_set(self, scale_set: str, after: int) -> bool:
        """Whether a watch of ``scale_set`` after revision ``after`` is the log's to serve: every event of
        it after ``after`` is, or will be, in the log (``after`` is no older than the revision before the
        oldest it holds of it, or than its newest when it holds none), and the server would not answer
        NOT_FOUND (after the newest, or at a deletion). A cluster's are the server's."""
        newest = self._revisions.get(scale_set)
        if not self.single_server or newest is None:
            return False
        revisions, _ = self._sets.get(scale_set, ([], []))
        oldest = revisions[0] - 1 if revisions else newest
        return oldest <= after < newest or (after == newest and scale_set not in self._gone)

    def set_changed(self, scale_set: str) -> asyncio.Event:
        """Set on ``scale_set``'s next event (or when the log starts over)."""
        return self._set_changed.setdefault(scale_set, asyncio.Event())

    def set_message(self, scale_set: str, after: int) -> Served | None:
        """``scale_set``'s events after revision ``after``, from the first, up to its next deletion, as one
        message of at most about WATCH_MESSAGE_BYTES (its ``last`` a revision); None when the log no
        longer holds the event after ``after``."""
        revisions, sequences = self._sets.get(scale_set, ([], []))
        at = bisect.bisect_right(revisions, after)
        if at == len(revisions):
            return None if self._revisions.get(scale_set, 0) > after else Served(b"", after)
        if revisions[at] != after + 1:
            return None
        message, last = bytearray(), at
        with memoryview(self._data) as view:
            for k in range(at, len(sequences)):
                i = bisect.bisect_left(self._sequences, sequences[k])
                entry = view[self._starts[i] : self._starts[i + 1] if i + 1 < len(self._starts) else None]
                if message and len(message) + len(entry) > WATCH_MESSAGE_BYTES:
                    return Served(bytes(message), revisions[last], more=True)
                message += entry
                last = k
                if sequences[k] in self._deletions:
                    return Served(bytes(message), revisions[last], ended=True)
        return Served(bytes(message), revisions[last])

    def message(self, after: int) -> Served | None:
        """The events after sequence ``after``, from the first, as one message of at most about
        WATCH_MESSAGE_BYTES (more only for one larger event; ``last`` a sequence, ``after`` when there is
        none yet); None when the log does not reach back to ``after``."""
        if self.start is None or after < self.start:
            return None
        at, end = bisect.bisect_right(self._sequences, after), len(self._sequences)
        if at == end:
            return Served(b"", after)
        starts, begin = self._starts, self._starts[at]
        cut_at = end
        if len(self._data) - begin > WATCH_MESSAGE_BYTES and at + 1 < end:
            # At the last event boundary within the limit, after at least one event.
            cut_at = max(bisect.bisect_right(starts, begin + WATCH_MESSAGE_BYTES, at + 1, end) - 1, at + 1)
        with memoryview(self._data) as view:
            message = view[begin : starts[cut_at] if cut_at < end else None].tobytes()
        return Served(message, self._sequences[cut_at - 1], more=cut_at < end)


class WatchProxy:
    """The log, the one upstream watch that fills it, and the watchers served from it."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        upstream: str,
        token: str = "",
        max_watchers: int = 1000,
        messages_per_second: float = WATCH_MESSAGES_PER_SECOND,
        stream_send_timeout: float = STREAM_SEND_TIMEOUT_S,
        buffer_events: int = BUFFER_EVENTS,
        buffer_bytes: int = BUFFER_BYTES,
    ) -> None:
        self._watch = channel.unary_stream(WATCH_PATH)
        self._list = channel.unary_unary("/scaleset.v1.ScaleSets/ListScaleSets")
        #: The log's generation whose scale sets were listed into it (`_list_scale_sets`).
        self._listed = 0
        self._upstream = upstream
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._max_watchers = max_watchers
        self._turns = SendTurns(messages_per_second)
        self._send_timeout = stream_send_timeout
        self._upstream_streams = asyncio.Semaphore(PASS_THROUGH_STREAMS)
        self.log = EventLog(buffer_events, buffer_bytes)
        self.watchers = 0
        self._lingering = LingeringStreams(LingeringStreams.limit_for(max_watchers))
        #: Whether the upstream watch is open; told to each listener (health) when it changes.
        self.following = False
        self.listeners: list[Callable[[bool], Awaitable[None]]] = []
        self.registry = CollectorRegistry()
        self._let_go = Counter(
            "scaleset_proxy_slow_consumers_total",
            "Watch streams ended because their client took no message for --stream-send-timeout.",
            registry=self.registry,
        )
        self._reconnects = Counter(
            "scaleset_proxy_upstream_reconnects_total",
            "Times the upstream watch was opened again after it ended or failed.",
            registry=self.registry,
        )
        self._passed_through = Counter(
            "scaleset_proxy_passed_through_total",
            "Watches (or the history of one) read from the server stream for stream, not from the log.",
            registry=self.registry,
        )
        for name, text, read in (
            ("scaleset_proxy_watchers", "WatchEvents streams being served.", lambda: self.watchers),
            (
                "scaleset_proxy_lingering_streams",
                "Streams let go as too slow whose clients have not taken their status (open until those "
                "clients read or disconnect); while there are as many as allowed, new watches are refused.",
                lambda: self._lingering.count,
            ),
            ("scaleset_proxy_log_events", "Events in the proxy's log.", lambda: len(self.log)),
            ("scaleset_proxy_log_bytes", "Bytes of the events in the proxy's log.", lambda: self.log.size),
            (
                "scaleset_proxy_upstream_up",
                "1 while the upstream watch is open.",
                lambda: int(self.following),
            ),
        ):
            Gauge(name, text, registry=self.registry).set_function(read)

    async def _set_following(self, following: bool) -> None:
        if following != self.following:
            self.following = following
            for listener in self.listeners:
                await listener(following)

    async def follow(self) -> None:
        """Keeps the upstream watch of every scale set open (until cancelled), from the start of the
        server's history, each reconnect resuming after the last event held."""
        delay = RECONNECT_S
        while True:
            after = self.log.last or 0
            call = self._watch(
                pb.WatchEventsRequest(after=after).SerializeToString(), metadata=self._metadata
            )
            try:
                if not stream_opened(await call.initial_metadata()):
                    # Not accepted (say, compacted): a refusal is trailers only, and reading it raises
                    # it. Until it is known, the log must not claim to start at ``after``.
                    async for _ in call:
                        break
                    log.error(
                        "the upstream on %s answered the watch without the %s header that accepts it: "
                        "it is not a scaleset server this proxy can follow",
                        self._upstream,
                        STREAM_OPEN[0][0],
                    )
                else:
                    if self.log.start is None:
                        self.log.reset(after)
                    if self._listed != self.log.generation:
                        await self._list_scale_sets()
                    await self._set_following(True)
                    async for message in call:
                        self.log.append(message)
                        delay = RECONNECT_S
                    log.warning("the upstream watch on %s ended; opening it again", self._upstream)
            except grpc.aio.AioRpcError as e:
                failure = error_of(e)
                if failure.code == "EventsCompacted" and "oldest_retained" in failure.metadata:
                    # The server compacted the history after the log's newest event: follow on from its
                    # oldest kept. Watchers within the log now resume from the server, which tells them.
                    self.log.reset(int(failure.metadata["oldest_retained"]) - 1)
                    continue
                log.warning(
                    "the upstream watch on %s failed: %s %s", self._upstream, e.code().name, e.details()
                )
            except DecodeError as e:
                log.error(
                    "the upstream watch on %s sent a message the proxy cannot read: %s", self._upstream, e
                )
            finally:
                call.cancel()
            await self._set_following(False)
            self._reconnects.inc()
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _list_scale_sets(self) -> None:
        """Tells the log each scale set's revision (`EventLog.known`), once the watch that fills it is open,
        so that a watch of a scale set that has not changed since the server's oldest kept event, from its
        revision, is the log's too. Without it (the call failed) such watches go to the server."""
        token = ""
        try:
            while True:
                request = pb.ListScaleSetsRequest(page_size=1000, page_token=token).SerializeToString()
                page = pb.ListScaleSetsResponse.FromString(
                    await self._list(request, metadata=self._metadata, timeout=30)
                )
                for scale_set in page.scale_sets:
                    self.log.known(scale_set.spec.name, scale_set.revision)
                if not (token := page.next_page_token):
                    break
            self._listed = self.log.generation
        except grpc.aio.AioRpcError as e:
            log.warning(
                "listing the scale sets on %s failed (%s %s): watches of scale sets the log holds no event "
                "of go to the server",
                self._upstream,
                e.code().name,
                e.details(),
            )

    async def serve(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        """One watcher's stream (``request`` as bytes: what the log cannot serve goes upstream as is)."""
        try:
            try:
                watch = pb.WatchEventsRequest.FromString(request)
            except DecodeError as e:
                raise invalid_input(
                    f"the request is not a valid protobuf message for this method ({str(e)[:120]}).",
                    "MalformedRequest",
                ) from None
            if self.watchers >= self._max_watchers:
                raise error(
                    CapacityError,
                    f"this proxy already serves {self._max_watchers} watch streams; retry later, or through "
                    "another proxy.",
                    "TooManyWatchers",
                )
            if self._lingering.full:
                raise self._lingering.refusal("proxy", elsewhere=True)
            from_log = (
                not watch.resume_token
                and watch.after < 2**63
                and (not watch.scale_set or self.log.serves_set(watch.scale_set, watch.after))
            )
            if not from_log and self._upstream_streams.locked():
                raise error(
                    CapacityError,
                    f"this proxy already passes {PASS_THROUGH_STREAMS} watches to the server (what its log "
                    "does not hold); retry later, or watch the server.",
                    "TooManyWatchers",
                )
            self.watchers += 1
            try:
                if not from_log:
                    await self._pass_through(request, context)
                elif watch.scale_set:
                    await context.send_initial_metadata(STREAM_OPEN)
                    await self._follow_set(watch.scale_set, watch.after, context)
                else:
                    await self._follow_log(watch.after, context)
            finally:
                self.watchers -= 1
        except (ScaleSetError, DecodeError) as exc:  # DecodeError: the server's message, not the client's
            if isinstance(exc, ScaleSetError) and exc.code == "SlowConsumer":
                self._let_go.inc()
                self._lingering.hold(context)
            status = status_for(exc)
            await abort_call(context, status.code, status.details, status.trailing_metadata)

    async def _follow_log(self, last: int, context: grpc.aio.ServicerContext) -> None:
        """A watch of every scale set: from the log, and what it no longer holds from the server first
        (whose headers, or refusal, are the watch's when that comes first)."""
        headers_sent = False
        while True:
            changed = self.log.changed
            served = self.log.message(last)
            if served is None:
                last = await self._catch_up(last, context, headers_sent=headers_sent)
                headers_sent = True
                continue
            if not headers_sent:
                await context.send_initial_metadata(STREAM_OPEN)
                headers_sent = True
            last, more, outgoing = served.last, served.more, [served.message]
            del served  # see _deliver
            await self._deliver(outgoing, more, changed, context)

    async def _deliver(
        self, outgoing: list[bytes], more: bool, changed: asyncio.Event, context: grpc.aio.ServicerContext
    ) -> None:
        """Sends the message in ``outgoing`` (empty: waits for ``changed``), then, unless ``more`` follows
        at once, waits for the watcher's next turn. As on the server: at most one message per watcher per
        interval while changes stream, jittered so that watchers do not wake together, each in its turn
        across all of them. The message is taken out of ``outgoing``, which the caller holds in its place:
        a watcher waiting for its turn holds nothing of what it sent (1,000 of them would otherwise hold
        up to a message of about 256 KB each)."""
        if message := outgoing.pop():
            await send_within(context, message, self._send_timeout)
            del message
            if more:
                return
            await asyncio.sleep(WATCH_INTERVAL_S * random.uniform(0.5, 1.5))
        else:
            await changed.wait()
        await self._turns.take()

    async def _follow_set(self, scale_set: str, last: int, context: grpc.aio.ServicerContext) -> None:
        """A watch of one scale set from the log, ending with its deletion; once the log no longer holds
        its next event (it dropped it, or started over), the rest of the stream is the server's."""
        generation = self.log.generation
        while True:
            changed = self.log.set_changed(scale_set)
            served = self.log.set_message(scale_set, last) if self.log.generation == generation else None
            if served is None:
                request = pb.WatchEventsRequest(scale_set=scale_set, after=last).SerializeToString()
                await self._pass_through(request, context, headers_sent=True)
                return
            if served.ended:  # its deletion: the last message
                await send_within(context, served.message, self._send_timeout)
                return
            last, more, outgoing = served.last, served.more, [served.message]
            del served  # see _deliver
            await self._deliver(outgoing, more, changed, context)

    async def _catch_up(self, last: int, context: grpc.aio.ServicerContext, *, headers_sent: bool) -> int:
        """Relays the server's watch after ``last`` until the log reaches back to where it got to; returns
        that sequence."""
        self._passed_through.inc()
        async with self._upstream_streams:
            call = self._watch(pb.WatchEventsRequest(after=last).SerializeToString(), metadata=self._metadata)
            try:
                if not headers_sent and stream_opened(await call.initial_metadata()):
                    await context.send_initial_metadata(STREAM_OPEN)
                async for message in call:
                    await send_within(context, message, self._send_timeout)
                    last = _last_sequence(message)
                    if self.log.start is not None and last >= self.log.start:
                        break
            except grpc.aio.AioRpcError as e:
                await abort_with(context, e)
            finally:
                call.cancel()
        return last

    async def _pass_through(
        self, request: bytes, context: grpc.aio.ServicerContext, *, headers_sent: bool = False
    ) -> None:
        """Relays the server's answer to ``request`` as it is, message for message, status and all."""
        self._passed_through.inc()
        async with self._upstream_streams:
            call = self._watch(request, metadata=self._metadata)
            try:
                if not headers_sent and stream_opened(await call.initial_metadata()):
                    await context.send_initial_metadata(STREAM_OPEN)
                async for message in call:
                    await send_within(context, message, self._send_timeout)
            except grpc.aio.AioRpcError as e:
                await abort_with(context, e)
            finally:
                call.cancel()


class _Handlers:
    """WatchEvents from the proxy; any other scaleset method UNIMPLEMENTED, naming the server to call."""

    def __init__(self, proxy: WatchProxy, upstream: str) -> None:
        self._watch = grpc.unary_stream_rpc_method_handler(proxy.serve)
        self._upstream = upstream

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path = handler_call_details.method
        if path == WATCH_PATH:
            return self._watch
        if not path.startswith("/scaleset.v1."):
            return None
        message = (
            f"this is a watch proxy: it serves WatchEvents only; call {path.rsplit('/', 1)[-1][:100]} on the "
            f"server at {self._upstream}."
        )

        async def elsewhere(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
            return b""  # unreachable: abort raises

        return grpc.unary_unary_rpc_method_handler(elsewhere)


async def serve_watch_proxy(
    upstream: str,
    address: str,
    *,
    stop: asyncio.Event,
    upstream_credentials: grpc.ChannelCredentials | None = None,
    token: str = "",
    credentials: grpc.ServerCredentials | None = None,
    authenticator: Any = None,
    max_watchers: int = 1000,
    messages_per_second: float = WATCH_MESSAGES_PER_SECOND,
    stream_send_timeout: float = STREAM_SEND_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    buffer_events: int = BUFFER_EVENTS,
    buffer_bytes: int = BUFFER_BYTES,
    metrics_port: int = 0,
    grace: float = 5.0,
    started: Callable[[WatchProxy, int], None] | None = None,
) -> int:
    """Runs a watch proxy of the server at ``upstream`` on ``address`` until ``stop``; tells ``started``
    the proxy and the port it listens on."""
    options = [("grpc.max_receive_message_length", MAX_REPLY_BYTES)]
    channel = (
        grpc.aio.secure_channel(upstream, upstream_credentials, options=options)
        if upstream_credentials is not None
        else grpc.aio.insecure_channel(upstream, options=options)
    )
    proxy = WatchProxy(
        channel,
        upstream=upstream,
        token=token,
        max_watchers=max_watchers,
        messages_per_second=messages_per_second,
        stream_send_timeout=stream_send_timeout,
        buffer_events=buffer_events,
        buffer_bytes=buffer_bytes,
    )
    interceptors: list[Any] = []
    if authenticator is not None:
        from scaleset.auth import AuthInterceptor

        interceptors.append(AuthInterceptor(authenticator))
    server = grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        options=server_options(max_connections),
    )
    server.add_generic_rpc_handlers((_Handlers(proxy, upstream),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    async def set_health(serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", pb.DESCRIPTOR.services_by_name["ScaleSets"].full_name):
            await health_servicer.set(name, status)

    # NOT_SERVING until the upstream watch is open, and whenever it is lost.
    await set_health(False)
    proxy.listeners.append(set_health)
    port = listen(server, address, credentials)
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(
            metrics_port, addr=address.rsplit(":", 1)[0].strip("[]") or "127.0.0.1", registry=proxy.registry
        )
    following = asyncio.create_task(proxy.follow())
    await server.start()
    log.info("scaleset watch proxy listening on %s (port %d), following %s", address, port, upstream)
    if started is not None:
        started(proxy, port)
    try:
        await stop.wait()
    finally:
        following.cancel()
        await server.stop(grace)
        await channel.close()
    log.info("stopped")
    return 0
