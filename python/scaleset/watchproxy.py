"""The watch proxy (``scaleset watch-proxy``): serves WatchEvents to many watchers from one watch of
every scale set on the server, as etcd's gRPC proxy coalesces watchers.

A server sends each of its watchers every change itself, on the event loop that also answers the
changes: a thousand watchers add a fifth to two fifths to its work, and to the wait of every call
(docs/soak.md). A proxy, in a process of its own and on as many machines as needed, takes that work
away: the server serves it one stream, and the proxy writes each change to its watchers from a log of
the most recent events as the server encoded them, end to end in one buffer (a message of any run of
them is one slice: nothing decoded or encoded per watcher).

What a watcher of the proxy sees is what it would see on the server: the same events, in the same
messages (a message carries every event since the stream's last), the same statuses. Watches the log
cannot serve go to the server as they are, stream for stream: a watch of one scale set, a cluster's
resume_token, and a watch resuming from before the log's oldest event (it reads that history from the
server, then moves onto the log). The proxy keeps the server's bounds: watchers at once, messages a
second across them, and a stream whose client takes no message for --stream-send-timeout is ended with
RESOURCE_EXHAUSTED ``SlowConsumer``; with tokens or JWT it asks each watcher for the reader role, as the
server does, and reaches the server with a token of its own.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from scaleset.client import error_of
from scaleset.cluster import abort_with
from scaleset.control import WATCH_INTERVAL_S, WATCH_MESSAGES_PER_SECOND
from scaleset.errors import CapacityError, ScaleSetError, error, invalid_input
from scaleset.limits import MAX_CONNECTIONS, STREAM_SEND_TIMEOUT_S, SendTurns
from scaleset.service import (
    MAX_CONCURRENT_RPCS,
    MAX_REPLY_BYTES,
    WATCH_MESSAGE_BYTES,
    listen,
    send_within,
    server_options,
    status_for,
)
from scaleset.v1 import scaleset_pb2 as pb

__all__ = ["EventLog", "WatchProxy", "serve_watch_proxy"]

log = logging.getLogger(__name__)

WATCH_PATH = "/scaleset.v1.ScaleSets/WatchEvents"
#: Events the proxy's log holds at most, and bytes (as encoded): watchers resuming from within them are
#: served from the log; from before them, from the server (`watch-proxy --buffer-events`, `--buffer-mb`).
BUFFER_EVENTS = 100_000
BUFFER_BYTES = 128 * 1024 * 1024
#: Watches passed to the server at once (a watch of one scale set, or the history before the log): they
#: share one connection, on which the server takes at most 256 streams (service.SERVER_OPTIONS). Watches
#: that only need history wait for a turn; watches of one scale set beyond it are refused.
PASS_THROUGH_STREAMS = 200
#: Seconds between attempts to reach the server again, doubling up to the most.
RECONNECT_S, RECONNECT_MAX_S = 0.5, 10.0
_EVENTS_TAG = (pb.WatchEventsResponse.EVENTS_FIELD_NUMBER << 3) | 2


def split_events(message: bytes) -> list[tuple[int, bytes]]:
    """A WatchEventsResponse's events as (sequence, the event's ``events`` entry as sent): entries joined
    end to end make a WatchEventsResponse of those events."""
    entries: list[tuple[int, bytes]] = []
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
        entries.append((pb.Event.FromString(message[at:end]).sequence, message[start:end]))
        at = end
    return entries


def _last_sequence(message: bytes) -> int:
    return split_events(message)[-1][0]


class EventLog:
    """The most recent events of every scale set, as the server sent them, in order and end to end in one
    buffer (a message of any run of them is one slice): at most ``max_events`` and ``max_bytes`` (the
    oldest half goes first). It holds every event after ``start``."""

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

    def append(self, message: bytes) -> None:
        """Adds a message's events (any already held are skipped) and wakes the waiting watchers."""
        last = self.last
        for sequence, entry in split_events(message):
            if last is None or sequence > last:
                self._sequences.append(sequence)
                self._starts.append(len(self._data))
                self._data += entry
                last = sequence
        if len(self._sequences) > self._max_events or len(self._data) > self._max_bytes:
            drop = max(1, len(self._sequences) // 2)
            self.start = self._sequences[drop - 1]
            cut = self._starts[drop] if drop < len(self._starts) else len(self._data)
            del self._data[:cut], self._sequences[:drop]
            self._starts = [at - cut for at in self._starts[drop:]]
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def messages(self, after: int) -> tuple[list[bytes], int] | None:
        """Every event after sequence ``after`` as messages of at most about WATCH_MESSAGE_BYTES (more only
        for one larger event), and the sequence of the last of them (``after`` when there is none yet);
        None when the log does not reach back to ``after``."""
        if self.start is None or after < self.start:
            return None
        at, end = bisect.bisect_right(self._sequences, after), len(self._sequences)
        if at == end:
            return [], after
        starts, begin = self._starts, self._starts[at]
        messages = []
        with memoryview(self._data) as view:
            while len(self._data) - begin > WATCH_MESSAGE_BYTES and at + 1 < end:
                # Cut at the last event boundary within the limit, after at least one event.
                cut_at = max(
                    bisect.bisect_right(starts, begin + WATCH_MESSAGE_BYTES, at + 1, end) - 1, at + 1
                )
                messages.append(view[begin : starts[cut_at]].tobytes())
                begin, at = starts[cut_at], cut_at
            messages.append(view[begin:].tobytes())
        return messages, self._sequences[-1]


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
        self._upstream = upstream
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._max_watchers = max_watchers
        self._turns = SendTurns(messages_per_second)
        self._send_timeout = stream_send_timeout
        self._upstream_streams = asyncio.Semaphore(PASS_THROUGH_STREAMS)
        self.log = EventLog(buffer_events, buffer_bytes)
        self.watchers = 0
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
                await call.initial_metadata()
                if self.log.start is None:
                    self.log.reset(after)
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
            passed = watch.scale_set or watch.resume_token or watch.after >= 2**63
            if passed and self._upstream_streams.locked():
                raise error(
                    CapacityError,
                    f"this proxy already passes {PASS_THROUGH_STREAMS} watches to the server (watches of one "
                    "scale set); retry later, watch every scale set (served by the proxy itself), or watch "
                    "the server.",
                    "TooManyWatchers",
                )
            self.watchers += 1
            try:
                if passed:
                    await self._pass_through(request, context)
                else:
                    await context.send_initial_metadata(())
                    await self._follow_log(watch.after, context)
            finally:
                self.watchers -= 1
        except (ScaleSetError, DecodeError) as exc:  # DecodeError: the server's message, not the client's
            if isinstance(exc, ScaleSetError) and exc.code == "SlowConsumer":
                self._let_go.inc()
            status = status_for(exc)
            await context.abort(status.code, status.details, status.trailing_metadata)

    async def _follow_log(self, last: int, context: grpc.aio.ServicerContext) -> None:
        while True:
            changed = self.log.changed
            served = self.log.messages(last)
            if served is None:
                last = await self._catch_up(last, context)
                continue
            messages, newest = served
            if not messages:
                await changed.wait()
                await self._turns.take()
                continue
            del served
            messages.reverse()
            while messages:
                await send_within(context, messages.pop(), self._send_timeout)
            last = newest
            # As on the server: at most one message per watcher per interval while changes stream,
            # jittered so that watchers do not wake together, each in its turn across all of them.
            await asyncio.sleep(WATCH_INTERVAL_S * random.uniform(0.5, 1.5))
            await self._turns.take()

    async def _catch_up(self, last: int, context: grpc.aio.ServicerContext) -> int:
        """Relays the server's watch after ``last`` until the log reaches back to where it got to; returns
        that sequence."""
        self._passed_through.inc()
        async with self._upstream_streams:
            call = self._watch(pb.WatchEventsRequest(after=last).SerializeToString(), metadata=self._metadata)
            try:
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

    async def _pass_through(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        """Relays the server's answer to ``request`` as it is, message for message, status and all."""
        self._passed_through.inc()
        async with self._upstream_streams:
            call = self._watch(request, metadata=self._metadata)
            try:
                await context.send_initial_metadata(())
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
