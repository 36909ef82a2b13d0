"""The gRPC service: scale sets, instances, the region and diagnostics over ``grpc.aio``.

This module (with ``convert`` and ``client``) is the gRPC edge: it turns requests into domain calls on
the :class:`~scaleset.control.ControlPlane` and domain results into replies. Every exception leaves
through one mapping (:func:`status_for`): a stable code in a ``google.rpc.ErrorInfo`` detail and the
gRPC status of its kind. Standard health checking and server reflection are served too.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import dataclasses
import datetime
import functools
import importlib.resources
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, NamedTuple

import grpc
from google.protobuf import any_pb2, descriptor_pb2, field_mask_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc._cython.cygrpc import ExecuteBatchError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from scaleset import commands as cmd
from scaleset import convert
from scaleset.control import WATCH_BACKLOG, WATCH_BUFFER_BYTES, ControlPlane, Outcome
from scaleset.controller import Controller
from scaleset.errors import (
    CapacityError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    ScaleSetError,
    UnavailableError,
    error,
    invalid_input,
    not_found,
)
from scaleset.limits import MAX_CONCURRENT_RPCS, MAX_CONNECTIONS, STREAM_SEND_TIMEOUT_S, LingeringStreams
from scaleset.model import AutoscaleSetting
from scaleset.store import EventRecord
from scaleset.v1 import scaleset_pb2 as pb
from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

__all__ = ["FORWARDED_FOR", "Metrics", "build_server", "status_for"]

ERROR_DOMAIN = "scaleset"
#: Capacity changes or imports larger than this run on a worker thread, off the event loop.
BIG_CHANGE = 2_000
#: Calls a second per client address (bursts as large); beyond it RESOURCE_EXHAUSTED, RateLimited.
DEFAULT_RATE_LIMIT = 10_000.0
#: The largest request and reply a server accepts and sends.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_REPLY_BYTES = 64 * 1024 * 1024
#: The most metric samples one ReportMetrics call may carry.
MAX_SAMPLES_PER_REPORT = 100_000
#: How far past the server's clock a metric sample may be (a series keeps its window back from its newest
#: sample, so one far in the future would push every real one out).
MAX_SAMPLE_AHEAD_S = 300

_STATUS_BY_KIND: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
]


#: Where a request carries a whole resource, errors about the resource's own fields ("zones") are
#: reported at their path in the request ("scale_set.zones").
_RESOURCE_FIELD = {
    "CreateScaleSetRequest": "scale_set",
    "UpdateScaleSetRequest": "scale_set",
    "SetAutoscaleSettingRequest": "setting",
}
#: How long a client should wait before retrying errors that pass by themselves (google.rpc.RetryInfo).
_RETRY_AFTER_S = {"StoreUnavailable": 1.0, "RateLimited": 0.1, "TooManyWatchers": 5.0}


async def send_within(context: grpc.aio.ServicerContext, message: Any, timeout: float) -> None:
    """Writes one message of a server stream, or raises SlowConsumer when the client has not taken it
    within ``timeout`` seconds (it reads too slowly, or not at all). The messages written before it reach
    the client ahead of the status, so a watcher resumes after the last event it received."""
    try:
        async with asyncio.timeout(timeout):
            await context.write(message)
    except TimeoutError:
        raise error(
            CapacityError,
            f"the client took no message from this stream for {timeout:g} s (it reads too slowly, or not at "
            "all), so the server ended it; open it again to go on (a watch: after the last event received, "
            "which the Python client does by itself).",
            "SlowConsumer",
        ) from None


async def abort_call(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    details: str,
    trailing_metadata: Any = (),
) -> None:
    """``context.abort``: raises gRPC's AbortError, which ends the handler; or, when the client went away
    before taking the status (gRPC fails the status's batch: a stream let go as too slow whose client
    then disconnected, see `LingeringStreams`), CancelledError, as for any call its client cancelled,
    which gRPC ends quietly. Raised as it was, that failure was an ERROR with a traceback in the log for
    every such stream."""
    try:
        await context.abort(code, details, tuple(trailing_metadata))
    except ExecuteBatchError:
        log.debug("the client went away before taking its status (%s: %s)", code.name, details[:200])
        raise asyncio.CancelledError from None


def field_path(field: str, request: Any = None) -> str:
    """``field`` as a path in ``request`` (AIP-193): prefixed with the resource field when the request
    has no top-level field of that name."""
    root = _RESOURCE_FIELD.get(type(request).__name__) if request is not None else None
    if root and field.split(".", 1)[0] not in request.DESCRIPTOR.fields_by_name:
        return f"{root}.{field}"
    return field


def _pack(message: Any) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


#: Codes whose gRPC status is more specific than their kind's (AIP-193).
_STATUS_BY_CODE = {
    "ScaleSetAlreadyExists": grpc.StatusCode.ALREADY_EXISTS,
    "InstanceAlreadyExists": grpc.StatusCode.ALREADY_EXISTS,
    "EtagMismatch": grpc.StatusCode.ABORTED,
}


def status_for(exc: BaseException, request: Any = None) -> grpc.Status:
    """The one mapping from exceptions to gRPC statuses. Details: ErrorInfo (the stable code as its
    reason, the field as the domain names it and any metadata), BadRequest with the field at fault for
    invalid input (its path in ``request``), RetryInfo for errors that a later retry can get past."""
    code = grpc.StatusCode.INTERNAL
    for kind, status in _STATUS_BY_KIND:
        if isinstance(exc, kind):
            code = status
            break
    metadata: dict[str, str] = {}
    details: list[any_pb2.Any] = []
    if isinstance(exc, ScaleSetError):
        reason, message = exc.code, str(exc)
        code = _STATUS_BY_CODE.get(reason, code)
        metadata = dict(getattr(exc, "metadata", None) or {})
        if field := getattr(exc, "field", None):
            metadata["field"] = field  # as the in-process API names it (the Python client's error.field)
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                violation = error_details_pb2.BadRequest.FieldViolation(
                    field=field_path(field, request), description=message
                )
                details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
        if (delay := _RETRY_AFTER_S.get(reason)) is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromTimedelta(datetime.timedelta(seconds=delay))
            details.append(_pack(retry))
    else:
        log.exception("internal error", exc_info=exc)
        reason, message = "InternalError", "internal error; the server logged the details."
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    status = status_pb2.Status(code=code.value[0], message=message, details=[_pack(info), *details])
    return rpc_status.to_status(status)


class _PolicyFailures(Collector):
    """``scaleset_policy_failures_total``: the control plane's count of failed policy steps."""

    def __init__(self, control: ControlPlane) -> None:
        self._control = control

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "scaleset_policy_failures",
            "Policy steps of a scale set that failed (logged; tried again at the next round).",
            value=self._control.policy_failures,
        )


class Metrics:
    """Prometheus metrics of one server (its own registry, so several servers can share a process)."""

    def __init__(self, control: ControlPlane) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "scaleset_rpc_requests_total",
            "RPCs handled, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "scaleset_rpc_latency_seconds",
            "RPC latency, by method.",
            ["method"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.slow_consumers = Counter(
            "scaleset_slow_consumers_total",
            "Server streams ended because their client took no message for --stream-send-timeout, by method.",
            ["method"],
            registry=self.registry,
        )
        self.gc_pauses = Histogram(
            "scaleset_gc_pause_seconds",
            "Garbage collections while serving (each stops the event loop), by generation (2: full).",
            ["generation"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1),
        )
        self.registry.register(_PolicyFailures(control))
        watchers = Gauge("scaleset_watchers", "WatchEvents streams being served.", registry=self.registry)
        watchers.set_function(lambda: control.watchers)
        lingering = Gauge(
            "scaleset_lingering_streams",
            "Server streams let go as too slow whose clients have not taken their status (open until those "
            "clients read or disconnect); while there are as many as allowed, new watches are refused.",
            registry=self.registry,
        )
        lingering.set_function(lambda: control.lingering.count)
        scale_sets = Gauge("scaleset_scale_sets", "Scale sets.", registry=self.registry)
        scale_sets.set_function(lambda: len(control.controller.scale_set_names()))
        instances = Gauge("scaleset_instances", "Instances across all scale sets.", registry=self.registry)
        instances.set_function(
            lambda: sum(control.controller.capacity(n) for n in control.controller.scale_set_names())
        )

        def ledger() -> Any:  # read each time: a reload after a failed commit replaces the controller
            return control.controller.policies.lifecycle

        for metric, text, read in (
            (
                "scaleset_pending_operations",
                "Operations waiting for an executor.",
                lambda: len(ledger().operations),
            ),
            (
                "scaleset_unavailable_pools",
                "Pools skipped after a failed allocation (the unavailable-capacity cache).",
                lambda: len(ledger().unavailable),
            ),
            (
                "scaleset_shortfall_instances",
                "Instances that could not be placed yet, across scale sets (retried with backoff).",
                lambda: sum(s.shortfall for s in ledger().status.values()),
            ),
            ("scaleset_lifecycle_actions", "Instances held by lifecycle hooks.", lambda: len(ledger().waits)),
        ):
            gauge = Gauge(metric, text, registry=self.registry)
            gauge.set_function(read)


class RateLimiter:
    """A token bucket per client address: ``rate`` calls a second, bursts of up to ``burst``. Clients
    beyond it get RESOURCE_EXHAUSTED (``RateLimited``) and retry later. Buckets of clients that went
    quiet are forgotten, so their number stays bounded too."""

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self._clock = rate, burst if burst is not None else rate, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, client: str) -> bool:
        now = self._clock()
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > 100_000:
            self._buckets.popitem(last=False)
        return allowed


#: Metadata the HTTP/JSON gateway sets to its caller's address; trusted only on the gateway's private
#: Unix socket (a directory only the server's process can open).
FORWARDED_FOR = "x-scaleset-forwarded-for"


#: The headers of a stream the server accepted (WatchEvents, LeaseOperations), sent before its first
#: message. A refused stream ends with trailers only, and gRPC's clients then report empty headers just
#: as they do for an accepted stream that sends none: this one tells them apart without a race.
STREAM_OPEN = (("scaleset-stream", "open"),)


def stream_opened(headers: Any) -> bool:
    """Whether a stream's headers say the server accepted it (`STREAM_OPEN`)."""
    return STREAM_OPEN[0] in tuple(headers or ())


def _client_address(context: grpc.aio.ServicerContext) -> str:
    """The caller's address without its port ("ipv4:127.0.0.1:5555" -> "ipv4:127.0.0.1"); through the
    gateway, the address the gateway was called from."""
    peer = str(context.peer() or "")
    if peer.startswith("unix:"):
        for key, value in context.invocation_metadata() or ():
            if key == FORWARDED_FOR:
                return f"http:{value}"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class _Interceptor(grpc.aio.ServerInterceptor):
    """Maps every exception through :func:`status_for` and records metrics, for every RPC; applies the
    per-client rate limit."""

    def __init__(
        self,
        metrics: Metrics,
        lingering: LingeringStreams,
        limiter: RateLimiter | None = None,
        send_timeout: float = STREAM_SEND_TIMEOUT_S,
    ) -> None:
        self._metrics = metrics
        self._lingering = lingering
        self._limiter = limiter
        self._send_timeout = send_timeout
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        path = handler_call_details.method
        if (wrapped := self._wrapped.get(path)) is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        wrapped = self._wrap(handler, path.rsplit("/", 1)[-1])
        self._wrapped[path] = wrapped
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        metrics = self._metrics
        limiter = self._limiter
        send_timeout = self._send_timeout
        lingering = self._lingering
        # Label children bound once per handler, not looked up on every call.
        ok = metrics.requests.labels(method, "OK")
        latency = metrics.latency.labels(method)
        let_go = metrics.slow_consumers.labels(method)

        async def abort(
            context: grpc.aio.ServicerContext, exc: BaseException, started: float, request: Any
        ) -> None:
            status = status_for(exc, request)
            metrics.requests.labels(method, status.code.name).inc()
            latency.observe(time.perf_counter() - started)
            await abort_call(context, status.code, status.details, status.trailing_metadata)

        # Handlers may return ready-made bytes (cached listings, replies replayed for a request_id).
        serialize = handler.response_serializer

        def response_serializer(reply: Any) -> bytes:
            return reply if isinstance(reply, bytes) else serialize(reply)

        # Garbage or truncated request bytes become INVALID_ARGUMENT in the handler (a deserializer that
        # raises would make gRPC answer UNKNOWN and log a traceback per call).
        deserialize = handler.request_deserializer

        def request_deserializer(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception as exc:
                return _Malformed(str(exc) or type(exc).__name__)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    if isinstance(request, _Malformed):
                        raise request.error()
                    if limiter is not None and not limiter.allow(_client_address(context)):
                        raise error(
                            CapacityError,
                            f"too many requests from this client (more than {limiter.rate:g} a second); retry shortly.",
                            "RateLimited",
                        )
                    reply = await inner(request, context)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    await abort(context, exc, started, request)
                    raise  # unreachable: abort raises
                ok.inc()
                latency.observe(time.perf_counter() - started)
                return reply

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=request_deserializer,
                response_serializer=response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            # Written here rather than yielded, so that a client that stops reading can be let go.
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                started = time.perf_counter()
                try:
                    if isinstance(request, _Malformed):
                        raise request.error()
                    items = inner_stream(request, context)
                    try:
                        async for item in items:
                            await send_within(context, item, send_timeout)
                            del item  # a watcher's last message is not kept while it waits for the next
                    finally:
                        # Closed as soon as the stream ends, however it ends: a watch frees its slot at
                        # once. Not while it is still running: that is gRPC closing this handler in the
                        # middle of a call it drops (GeneratorExit, the server stopping), where aclose()
                        # would raise; asyncio closes the generator once it is dropped.
                        if not items.ag_running:
                            await items.aclose()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if isinstance(exc, ScaleSetError) and exc.code == "SlowConsumer":
                        let_go.inc()
                        lingering.hold(context)
                    await abort(context, exc, started, request)
                ok.inc()

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=request_deserializer,
                response_serializer=response_serializer,
            )
        return handler


class _Malformed:
    """A request whose bytes did not decode; the handler answers INVALID_ARGUMENT."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def error(self) -> Exception:
        return invalid_input(
            f"the request is not a valid protobuf message for this method ({self.reason[:120]}).",
            "MalformedRequest",
        )


def _page_token(query: str, position: str) -> str:
    """An opaque token for the page after ``position`` of ``query`` (the method and what it lists):
    a token is only good for the query it came from (AIP-158)."""
    return base64.urlsafe_b64encode(f"{query}\0{position}".encode()).decode()


def _read_token(token: str, query: str) -> str:
    try:
        issued_for, _, position = base64.urlsafe_b64decode(token.encode()).decode().rpartition("\0")
    except (ValueError, UnicodeDecodeError):
        issued_for, position = "", ""
    if issued_for != query:
        raise invalid_input(
            "page_token is not one this server issued for this query; start again without it, or send the "
            "same request (only page_size may change) with it.",
            "InvalidPageToken",
            field="page_token",
        )
    return position


def _read_int_token(token: str, query: str) -> int:
    text = _read_token(token, query)
    if not (text.isascii() and text.isdigit()):
        raise invalid_input(
            "page_token is not one this server issued; start again without it.",
            "InvalidPageToken",
            field="page_token",
        )
    return int(text)


def _meaning(request: Any) -> bytes:
    """What a request asks for, as bytes to match a retry's request_id against: defaults spelled out
    (a view left unset is the full view) and deterministic encoding, so two requests that mean the same
    match even when their bytes differ."""
    if "view" in request.DESCRIPTOR.fields_by_name and request.view == pb.PLAN_VIEW_UNSPECIFIED:
        request = type(request).FromString(request.SerializeToString())
        request.view = pb.PLAN_VIEW_FULL
    return request.SerializeToString(deterministic=True)


def _require(value: str, field: str) -> str:
    if not value:
        raise invalid_input(f"{field} is required.")
    return value


class _Servicer:
    """What every servicer shares: the control plane, and durable changes through it."""

    def __init__(self, control: ControlPlane) -> None:
        self._control = control

    async def _mutate(
        self,
        method: str,
        request: Any,
        command: Any,
        encode: Callable[[Outcome], Any],
        *,
        etag: str = "",
        big: bool = False,
    ) -> Any:
        """A durable change; the reply is a message, or the bytes first sent for this request_id (the
        interceptor's serializer passes bytes through)."""
        return await self._control.mutate(
            method=method,
            command=command,
            encode=encode,
            request_id=request.request_id,
            payload=_meaning(request),
            etag=etag,
            big=big,
        )


class ScaleSetsServicer(_Servicer, pb_grpc.ScaleSetsServicer):
    def __init__(self, control: ControlPlane) -> None:
        super().__init__(control)
        # Encoded once per revision: a listing of an unchanged scale set is served from these bytes.
        self._pages: OrderedDict[tuple[str, int, int, int], bytes] = OrderedDict()
        self._columns: OrderedDict[tuple[str, int], dict[str, list[Any]]] = OrderedDict()
        #: Recent events as sent on WatchEvents, by sequence: every watcher shares one encoding.
        self._events: OrderedDict[int, bytes] = OrderedDict()
        self._events_bytes = 0
        #: Large batches (chunks of history that many watchers replay) as sent, shared by every watcher.
        self._batches: OrderedDict[tuple[int, int, int], list[bytes]] = OrderedDict()
        self._batches_bytes = 0
        #: Recent consecutive events end to end: a message of a run of them is one slice.
        self._stream = EncodedEvents(_event_entry)

    def _scale_set(self, controller: Controller, name: str) -> pb.ScaleSet:
        return pb.ScaleSet(
            spec=convert.spec_to_proto(controller.get_spec(name)),
            capacity=controller.capacity(name),
            desired_capacity=controller.desired_capacity(name),
            revision=self._control.revision(name),
            etag=self._control.etag(name),
        )

    async def CreateScaleSet(
        self, request: pb.CreateScaleSetRequest, context: Any
    ) -> pb.CreateScaleSetResponse:
        spec = convert.spec_from_proto(request.scale_set)
        summary = request.view == pb.PLAN_VIEW_SUMMARY

        def encode(o: Outcome) -> pb.CreateScaleSetResponse:
            return pb.CreateScaleSetResponse(
                scale_set=self._scale_set(self._control.controller, spec.name),
                plan=convert.plan_to_proto(o.result, summary),
            )

        return await self._mutate(
            "CreateScaleSet",
            request,
            cmd.CreateScaleSet(spec, request.capacity),
            encode,
            big=request.capacity > BIG_CHANGE,
        )

    async def GetScaleSet(self, request: pb.GetScaleSetRequest, context: Any) -> pb.ScaleSet:
        engine = await self._control.settled()
        return self._scale_set(engine, _require(request.name, "name"))

    async def ListScaleSets(self, request: pb.ListScaleSetsRequest, context: Any) -> pb.ListScaleSetsResponse:
        engine = await self._control.settled()
        size = min(request.page_size or 100, 1000)
        names = engine.scale_set_names()
        after = _read_token(request.page_token, "ListScaleSets") if request.page_token else None
        if after is not None:
            names = [n for n in names if n > after]
        page = names[:size]
        reply = pb.ListScaleSetsResponse(scale_sets=[self._scale_set(engine, n) for n in page])
        if len(names) > size:
            reply.next_page_token = _page_token("ListScaleSets", page[-1])
        return reply

    async def UpdateScaleSet(self, request: pb.UpdateScaleSetRequest, context: Any) -> pb.ScaleSet:
        """AIP-134: the mask's paths change; ``*`` replaces the whole spec; no mask means every field
        the request sets (so sending only a name and a sku changes only the sku)."""
        name = _require(request.scale_set.name, "scale_set.name")
        paths = list(request.update_mask.paths)
        replace = paths == ["*"]
        if "*" in paths and not replace:
            raise invalid_input(
                "update_mask '*' replaces everything and takes no other path.", field="update_mask"
            )
        if not paths:
            paths = [field.name for field, _ in request.scale_set.ListFields()]
        mask = field_mask_pb2.FieldMask(paths=paths)
        if not replace and not mask.IsValidForDescriptor(pb.ScaleSetSpec.DESCRIPTOR):
            raise invalid_input(
                f"update_mask has a path that is not a ScaleSetSpec field: {str(paths)[:200]}.",
                field="update_mask",
            )

        def command(current: Controller) -> cmd.Command:
            # Merged under the control plane's lock, against the spec as it is when the change applies.
            if replace:
                merged = request.scale_set
            else:
                merged = convert.spec_to_proto(current.get_spec(name))
                mask.MergeMessage(
                    request.scale_set, merged, replace_message_field=True, replace_repeated_field=True
                )
            return cmd.UpdateScaleSet(convert.spec_from_proto(merged))

        return await self._mutate(
            "UpdateScaleSet",
            request,
            command,
            lambda o: self._scale_set(self._control.controller, name),
            etag=request.etag,
        )

    async def DeleteScaleSet(
        self, request: pb.DeleteScaleSetRequest, context: Any
    ) -> pb.DeleteScaleSetResponse:
        name = _require(request.name, "name")
        return await self._mutate(
            "DeleteScaleSet",
            request,
            cmd.DeleteScaleSet(name),
            lambda o: pb.DeleteScaleSetResponse(revision=o.revision),
            etag=request.etag,
        )

    async def SetCapacity(self, request: pb.SetCapacityRequest, context: Any) -> pb.SetCapacityResponse:
        name = _require(request.name, "name")
        summary = request.view == pb.PLAN_VIEW_SUMMARY

        def encode(o: Outcome) -> pb.SetCapacityResponse:
            return pb.SetCapacityResponse(
                plan=convert.plan_to_proto(o.result, summary), revision=o.revision, etag=o.etag
            )

        if not request.HasField("capacity"):
            raise invalid_input(
                "capacity is required (0 is a valid capacity, but it must be sent).", field="capacity"
            )
        command = cmd.SetCapacity(name, request.capacity, request.dry_run)
        big = abs(request.capacity - self._control.controller.capacity(name)) > BIG_CHANGE
        if not command.mutates:
            return encode(await self._control.query(command, etag=request.etag, big=big))
        return await self._mutate("SetCapacity", request, command, encode, etag=request.etag, big=big)

    async def ImportInstances(
        self, request: pb.ImportInstancesRequest, context: Any
    ) -> pb.ImportInstancesResponse:
        name = _require(request.name, "name")
        command = cmd.ImportInstances(name, tuple(convert.instance_from_proto(i) for i in request.instances))
        return await self._mutate(
            "ImportInstances",
            request,
            command,
            lambda o: pb.ImportInstancesResponse(revision=o.revision, etag=o.etag),
            etag=request.etag,
            big=len(command.instances) > BIG_CHANGE,
        )

    async def ListInstances(self, request: pb.ListInstancesRequest, context: Any) -> bytes:
        name = _require(request.name, "name")
        controller = await self._control.settled()
        revision = self._control.revision(name)
        size = min(request.page_size or 1000, 10_000)
        query = f"ListInstances/{name}"
        after = _read_int_token(request.page_token, query) if request.page_token else -1
        key = (name, revision, after, size)
        if (cached := self._pages.get(key)) is not None:
            return cached
        cols = self._columns.get((name, revision))
        if cols is None:
            cols = controller.instance_columns(name)
            _remember(self._columns, (name, revision), cols, 4)
        ids = cols["instance_id"]
        start = bisect.bisect_right(ids, after)
        stop = min(start + size, len(ids))
        reply = pb.ListInstancesResponse(
            instances=convert.columns_to_proto(cols, start, stop), revision=revision
        )
        if stop < len(ids):
            reply.next_page_token = _page_token(query, str(ids[stop - 1]))
        encoded = reply.SerializeToString()
        _remember(self._pages, key, encoded, 64)
        return encoded

    async def DeleteInstances(
        self, request: pb.DeleteInstancesRequest, context: Any
    ) -> pb.DeleteInstancesResponse:
        name = _require(request.name, "name")
        command = cmd.DeleteInstances(name, tuple(request.instance_ids))
        return await self._mutate(
            "DeleteInstances",
            request,
            command,
            lambda o: pb.DeleteInstancesResponse(
                plan=convert.plan_to_proto(o.result), revision=o.revision, etag=o.etag
            ),
            etag=request.etag,
        )

    async def EvictInstances(
        self, request: pb.EvictInstancesRequest, context: Any
    ) -> pb.EvictInstancesResponse:
        name = _require(request.name, "name")
        command = cmd.EvictInstances(name, tuple(request.instance_ids))
        return await self._mutate(
            "EvictInstances",
            request,
            command,
            lambda o: pb.EvictInstancesResponse(
                deleted=o.result.deleted, deallocated=o.result.deallocated, revision=o.revision, etag=o.etag
            ),
            etag=request.etag,
        )

    async def SetInstanceProtection(
        self, request: pb.SetInstanceProtectionRequest, context: Any
    ) -> pb.SetInstanceProtectionResponse:
        name = _require(request.name, "name")
        command = cmd.SetProtection(
            name,
            tuple(request.instance_ids),
            request.protect_from_scale_in,
            request.protect_from_scale_set_actions,
        )
        return await self._mutate(
            "SetInstanceProtection",
            request,
            command,
            lambda o: pb.SetInstanceProtectionResponse(revision=o.revision, etag=o.etag),
            etag=request.etag,
        )

    async def ReportInstanceHealth(
        self, request: pb.ReportInstanceHealthRequest, context: Any
    ) -> pb.ReportInstanceHealthResponse:
        name = _require(request.name, "name")
        reports = tuple(
            (tuple(r.instance_ids), convert._enum(convert.HEALTH_FROM_PB, r.health, "reports.health"))
            for r in request.reports
        )
        return await self._mutate(
            "ReportInstanceHealth",
            request,
            cmd.ReportHealth(name, reports),
            lambda o: pb.ReportInstanceHealthResponse(revision=o.revision, etag=o.etag),
        )

    async def Rebalance(self, request: pb.RebalanceRequest, context: Any) -> pb.RebalanceResponse:
        name = _require(request.name, "name")
        command = cmd.Rebalance(
            name,
            max_replacements=request.max_replacements if request.HasField("max_replacements") else None,
            max_replacements_percent=(
                request.max_replacements_percent if request.HasField("max_replacements_percent") else None
            ),
            max_surge=request.max_surge or 1,
            time_limit_s=request.time_limit_s or None,
            dry_run=not request.HasField("dry_run") or request.dry_run,
        )

        def encode(o: Outcome) -> pb.RebalanceResponse:
            return pb.RebalanceResponse(
                plan=convert.rebalance_plan_to_proto(o.result), revision=o.revision, etag=o.etag
            )

        if not command.mutates:
            return encode(await self._control.query(command, etag=request.etag, big=True))
        # Solved under the control plane's lock against the state it applies to; the log keeps the
        # explicit moves, so a replay never runs the solver.
        return await self._mutate("Rebalance", request, command, encode, etag=request.etag, big=True)

    def _upgrade(self, name: str, o: Outcome | None = None) -> pb.RollingUpgradeStatus:
        revision = o.revision if o is not None else self._control.revision(name)
        return convert.rolling_upgrade_to_proto(
            name, self._control.controller.get_rolling_upgrade(name), revision
        )

    async def StartRollingUpgrade(self, request: pb.StartRollingUpgradeRequest, context: Any) -> Any:
        name = _require(request.name, "name")
        return await self._mutate(
            "StartRollingUpgrade",
            request,
            cmd.StartRollingUpgrade(name),
            lambda o: self._upgrade(name, o),
            etag=request.etag,
        )

    async def GetRollingUpgrade(
        self, request: pb.GetRollingUpgradeRequest, context: Any
    ) -> pb.RollingUpgradeStatus:
        name = _require(request.name, "name")
        await self._control.settled()
        return self._upgrade(name)

    async def CancelRollingUpgrade(self, request: pb.CancelRollingUpgradeRequest, context: Any) -> Any:
        name = _require(request.name, "name")
        return await self._mutate(
            "CancelRollingUpgrade", request, cmd.CancelRollingUpgrade(name), lambda o: self._upgrade(name, o)
        )

    async def UpgradeInstances(self, request: pb.UpgradeInstancesRequest, context: Any) -> Any:
        name = _require(request.name, "name")
        command = cmd.UpgradeInstances(name, tuple(request.instance_ids))
        return await self._mutate(
            "UpgradeInstances",
            request,
            command,
            lambda o: pb.UpgradeInstancesResponse(revision=o.revision, etag=o.etag),
            etag=request.etag,
        )

    async def SetRepairsServiceState(self, request: pb.SetRepairsServiceStateRequest, context: Any) -> Any:
        name = _require(request.name, "name")
        state = convert.enum_word(pb.RepairsServiceState.DESCRIPTOR, request.state, "state")
        command = cmd.SetRepairsServiceState(name, state)
        return await self._mutate(
            "SetRepairsServiceState",
            request,
            command,
            lambda o: pb.SetRepairsServiceStateResponse(state=request.state, revision=o.revision),
        )

    async def WatchEvents(self, request: pb.WatchEventsRequest, context: Any) -> AsyncIterator[bytes]:
        if request.after >= 2**63:
            raise invalid_input(
                f"after must be below 2**63, got {request.after}.", "InvalidParameter", field="after"
            )
        if request.resume_token:
            raise invalid_input(
                "resume_token comes from a cluster's watch of every scale set; on a single server, resume "
                "with after (the last event's sequence, or revision with scale_set).",
                "InvalidParameter",
                field="resume_token",
            )
        batches = await self._control.watch(request.scale_set, request.after)
        # Headers now, not with the first event: a client may open a watch and then make the change.
        await context.send_initial_metadata(STREAM_OPEN)
        every_set = not request.scale_set
        async for batch in batches:
            # Reversed into a list of this stream's own (a large batch's messages are shared by every
            # watcher replaying it) and popped as sent: nothing of this batch is held while waiting
            # for the next (see ControlPlane._follow).
            messages = self._messages(batch, every_set)[::-1]
            del batch
            while messages:
                yield messages.pop()

    def _messages(self, batch: list[EventRecord], every_set: bool = False) -> list[bytes]:
        """``batch`` as WatchEventsResponse messages of at most about WATCH_MESSAGE_BYTES each. A run of
        recent consecutive events (a watch of every scale set, following the changes) is sliced from the
        events encoded end to end, at no cost per event. A large batch (a chunk of history, which every
        watcher replaying from before it reads whole) is encoded once and its messages shared: (first
        sequence, last sequence, length) names a batch's events exactly, since a batch is every event of
        a range of sequences, or every event of one scale set in it."""
        if every_set and (sliced := self._stream.messages(batch)) is not None:
            return sliced
        shared = len(batch) >= SHARED_BATCH_EVENTS
        key = (batch[0].sequence, batch[-1].sequence, len(batch))
        if shared and (cached := self._batches.get(key)) is not None:
            self._batches.move_to_end(key)
            return cached
        messages: list[bytes] = []
        message: list[bytes] = []
        size = 0
        for event in batch:
            field = self._event_field(event)
            if message and size + len(field) > WATCH_MESSAGE_BYTES:
                messages.append(b"".join(message))
                message, size = [], 0
            message.append(field)
            size += len(field)
        messages.append(b"".join(message))
        if shared:
            self._batches[key] = messages
            self._batches_bytes += sum(map(len, messages))
            while len(self._batches) > 1 and self._batches_bytes > SHARED_BATCHES_BYTES:
                self._batches_bytes -= sum(map(len, self._batches.popitem(last=False)[1]))
        return messages

    def _event_field(self, event: EventRecord) -> bytes:
        """``event``'s ``events`` entry (`_event_entry`), encoded once for every watcher of one scale set
        or of old history (the last 4,096 kept)."""
        encoded = self._events.get(event.sequence)
        if encoded is None:
            encoded = self._events[event.sequence] = _event_entry(event)
            self._events_bytes += len(encoded)
            while len(self._events) > 1 and (len(self._events) > 4096 or self._events_bytes > 64 << 20):
                self._events_bytes -= len(self._events.popitem(last=False)[1])
        return encoded


#: A WatchEventsResponse carries events up to about this many bytes (more only for one larger event),
#: well under the 4 MB every stock gRPC client accepts by default. It is also what a stream whose client
#: takes nothing holds in gRPC's buffers until it is let go (its first message of a replay): 1 MB until
#: 2026-11-29 held a watch proxy with 500 such streams at 1.0 GB, 256 KB at 350 MB (docs/behaviour.md,
#: Watch); a full 128 MB replay is then 512 messages, each followed by the next at once.
WATCH_MESSAGE_BYTES = 256 << 10


#: Batches of at least this many events are encoded once for every watcher, the last few of them kept (at
#: most this many bytes): replays of history, read in shared chunks (control.REPLAY_CHUNK events).
SHARED_BATCH_EVENTS = 100
SHARED_BATCHES_BYTES = 32 << 20
_EVENTS_TAG = bytes([(pb.WatchEventsResponse.EVENTS_FIELD_NUMBER << 3) | 2])


def _event_entry(event: EventRecord) -> bytes:
    """``event`` encoded as one ``events`` entry of a WatchEventsResponse (field 1, length-delimited), so a
    message is these entries joined."""
    body = convert.event_to_proto(event).SerializeToString()
    return _EVENTS_TAG + _varint(len(body)) + body


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class EncodedEvents:
    """The most recent consecutive events, each encoded once as a WatchEventsResponse ``events`` entry, end
    to end in one buffer: a message of a run of them is a slice, whatever the run's length (with 1,000
    watchers of every scale set, each event goes out hundreds of times). Holds at most ``max_events`` and
    ``max_bytes`` (the oldest half goes first); runs older than it holds are left to the caller."""

    def __init__(
        self,
        encode: Callable[[EventRecord], bytes],
        max_events: int = WATCH_BACKLOG,
        max_bytes: int = WATCH_BUFFER_BYTES,
    ) -> None:
        self._encode, self._max_events, self._max_bytes = encode, max_events, max_bytes
        self._data = bytearray()
        #: Where each held event starts in ``_data``; the first is sequence ``_first``.
        self._starts: list[int] = []
        self._first = 0

    def messages(self, batch: list[EventRecord]) -> list[bytes] | None:
        """``batch`` as messages of at most about WATCH_MESSAGE_BYTES, or None unless it is a run of
        consecutive sequences this buffer holds or can extend to."""
        first, last = batch[0].sequence, batch[-1].sequence
        if last - first + 1 != len(batch) or first < self._first:
            return None
        end = self._first + len(self._starts)  # the next sequence to append
        if first > end or not self._starts:  # a gap (or nothing yet): start over at this run
            self._data.clear()
            self._starts.clear()
            self._first = end = first
        self._make_room(first)
        for event in batch[end - first :]:
            self._starts.append(len(self._data))
            self._data += self._encode(event)
        at, end_at = first - self._first, first - self._first + len(batch)
        start = self._starts[at]
        stop = self._starts[end_at] if end_at < len(self._starts) else len(self._data)
        messages = []
        with memoryview(self._data) as view:
            while stop - start > WATCH_MESSAGE_BYTES and at + 1 < end_at:
                # Cut at the last event boundary within the limit, after at least one event.
                cut_at = max(
                    bisect.bisect_right(self._starts, start + WATCH_MESSAGE_BYTES, at + 1, end_at) - 1, at + 1
                )
                messages.append(view[start : self._starts[cut_at]].tobytes())
                start, at = self._starts[cut_at], cut_at
            messages.append(view[start:stop].tobytes())
        return messages

    def _make_room(self, keep_from: int) -> None:
        """Past either bound, drops the oldest half of the events held (none from ``keep_from`` on)."""
        if len(self._starts) <= self._max_events and len(self._data) <= self._max_bytes:
            return
        drop = min(len(self._starts) // 2, keep_from - self._first)
        if drop <= 0:
            return
        cut = self._starts[drop]
        del self._data[:cut]
        self._starts = [s - cut for s in self._starts[drop:]]
        self._first += drop


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any, limit: int) -> None:
    cache[key] = value
    if len(cache) > limit:
        cache.popitem(last=False)


class AutoscaleServicer(_Servicer, pb_grpc.AutoscaleServicer):
    """Autoscale settings, pushed metrics, dry-run evaluations and the decision history."""

    def _setting(
        self, name: str, setting: AutoscaleSetting, o: Outcome | None = None
    ) -> pb.AutoscaleSettingResponse:
        return pb.AutoscaleSettingResponse(
            name=name,
            setting=convert.autoscale_setting_to_proto(setting),
            revision=o.revision if o is not None else self._control.revision(name),
            etag=o.etag if o is not None else self._control.etag(name),
        )

    async def SetAutoscaleSetting(self, request: pb.SetAutoscaleSettingRequest, context: Any) -> Any:
        name = _require(request.name, "name")
        if not request.HasField("setting"):
            raise invalid_input("setting is required.", field="setting")
        command = cmd.SetAutoscaleSetting(name, convert.autoscale_setting_from_proto(request.setting))
        return await self._mutate(
            "SetAutoscaleSetting",
            request,
            command,
            lambda o: self._setting(name, o.result, o),
            etag=request.etag,
        )

    async def GetAutoscaleSetting(self, request: pb.GetAutoscaleSettingRequest, context: Any) -> Any:
        name = _require(request.name, "name")
        setting = (await self._control.settled()).get_autoscale_setting(name)
        if setting is None:
            raise not_found(f"scale set '{name}' has no autoscale setting.", "AutoscaleSettingNotFound")
        return self._setting(name, setting)

    async def DeleteAutoscaleSetting(self, request: pb.DeleteAutoscaleSettingRequest, context: Any) -> Any:
        name = _require(request.name, "name")
        return await self._mutate(
            "DeleteAutoscaleSetting",
            request,
            cmd.DeleteAutoscaleSetting(name),
            lambda o: pb.DeleteAutoscaleSettingResponse(revision=o.revision),
            etag=request.etag,
        )

    async def ReportMetrics(self, request: pb.ReportMetricsRequest, context: Any) -> Any:
        name = _require(request.name, "name")
        count = sum(len(s.samples) for s in request.series)
        if count > MAX_SAMPLES_PER_REPORT:
            raise invalid_input(
                f"{count} samples in one report; send at most {MAX_SAMPLES_PER_REPORT} per call.",
                field="series",
            )
        latest = max((x.time_unix_ms for s in request.series for x in s.samples), default=0) / 1000
        if latest > (now := self._control.time()) + MAX_SAMPLE_AHEAD_S:
            raise invalid_input(
                f"a sample is timed {latest - now:.0f} s after the server's clock; samples may be at most "
                f"{MAX_SAMPLE_AHEAD_S} s ahead (time_unix_ms is in milliseconds since the Unix epoch).",
                field="series.samples.time_unix_ms",
            )
        series = tuple(
            (
                s.metric_name,
                tuple(x.time_unix_ms / 1000 for x in s.samples),
                tuple(x.value for x in s.samples),
            )
            for s in request.series
        )
        return await self._mutate(
            "ReportMetrics",
            request,
            cmd.ReportMetrics(name, series),
            lambda o: pb.ReportMetricsResponse(accepted_samples=count, revision=o.revision),
            big=count > BIG_CHANGE,
        )

    async def EvaluateAutoscale(self, request: pb.EvaluateAutoscaleRequest, context: Any) -> Any:
        name = _require(request.name, "name")
        controller = await self._control.settled()
        return convert.decision_to_proto(controller.evaluate_autoscale(name, self._control.time()))

    async def ListAutoscaleHistory(self, request: pb.ListAutoscaleHistoryRequest, context: Any) -> Any:
        name = _require(request.name, "name")
        history = (await self._control.settled()).autoscale_history(name)[::-1]  # newest first
        size = min(request.page_size or 50, 200)
        query = f"ListAutoscaleHistory/{name}"
        start = _read_int_token(request.page_token, query) if request.page_token else 0
        page = history[start : start + size]
        reply = pb.ListAutoscaleHistoryResponse(decisions=[convert.decision_to_proto(d) for d in page])
        if start + size < len(history):
            reply.next_page_token = _page_token(query, str(start + size))
        return reply


class RegionsServicer(pb_grpc.RegionsServicer):
    def __init__(self, control: ControlPlane) -> None:
        self._control = control

    def _region(self) -> pb.Region:
        return convert.region_to_proto(
            self._control.controller.describe_region(), self._control.region_revision
        )

    async def GetRegion(self, request: pb.GetRegionRequest, context: Any) -> pb.Region:
        await self._control.settled()
        return self._region()

    async def SetZoneAvailability(self, request: pb.SetZoneAvailabilityRequest, context: Any) -> Any:
        command = cmd.SetZoneAvailability(_require(request.zone, "zone"), request.available)
        return await self._control.mutate(
            method="SetZoneAvailability",
            command=command,
            encode=lambda o: self._region(),
            request_id=request.request_id,
            payload=_meaning(request),
        )

    async def SetPoolCapacity(self, request: pb.SetPoolCapacityRequest, context: Any) -> Any:
        pool = request.pool
        command = cmd.SetPoolCapacity(
            zone=pool.zone or None,
            vm_size=_require(pool.vm_size, "pool.vm_size"),
            priority=convert.priority_word(pool.priority, "pool.priority"),
            available=pool.available if pool.HasField("available") else None,
            price=pool.price if pool.HasField("price") else None,
            restricted=pool.restricted if pool.HasField("restricted") else None,
        )
        return await self._control.mutate(
            method="SetPoolCapacity",
            command=command,
            encode=lambda o: self._region(),
            request_id=request.request_id,
            payload=_meaning(request),
        )

    async def SetCoreQuota(self, request: pb.SetCoreQuotaRequest, context: Any) -> Any:
        command = cmd.SetCoreQuota(
            _require(request.family, "family"), request.cores if request.HasField("cores") else None
        )
        return await self._control.mutate(
            method="SetCoreQuota",
            command=command,
            encode=lambda o: self._region(),
            request_id=request.request_id,
            payload=_meaning(request),
        )


class ExecutorsServicer(pb_grpc.ExecutorsServicer):
    """Executors lease operations and report outcomes (see :mod:`scaleset.dispatch`)."""

    def __init__(self, control: ControlPlane) -> None:
        from scaleset.dispatch import Dispatcher

        self._control = control
        self.dispatcher = Dispatcher(control)

    async def LeaseOperations(self, request: pb.LeaseOperationsRequest, context: Any) -> AsyncIterator[Any]:
        if self._control.controller.execution_mode != "Executors":
            raise error(
                ConflictError,
                "this server applies plans immediately; start it with --executors to hand them to executors.",
                "ExecutorsDisabled",
            )
        batches = self.dispatcher.stream(
            request.executor_id, list(request.zones), request.max_in_flight, request.lease_seconds
        )
        await context.send_initial_metadata(STREAM_OPEN)
        async for leased, cancelled, events in batches:
            yield pb.LeaseOperationsResponse(
                operations=[convert.operation_to_proto(o) for o in leased],
                cancelled_operation_ids=cancelled,
                scheduled_events=[convert.scheduled_event_to_proto(e) for e in events],
            )

    async def ReportOperation(self, request: pb.ReportOperationRequest, context: Any) -> Any:
        outcome = request.outcome
        if outcome not in (
            pb.OPERATION_OUTCOME_IN_PROGRESS,
            pb.OPERATION_OUTCOME_SUCCEEDED,
            pb.OPERATION_OUTCOME_FAILED,
        ):
            raise invalid_input("outcome must be IN_PROGRESS, SUCCEEDED or FAILED.", field="outcome")
        if outcome == pb.OPERATION_OUTCOME_FAILED and not request.error_code:
            raise invalid_input(
                "a failed operation needs its error_code (Azure's, such as AllocationFailed).",
                field="error_code",
            )
        op = self._control.controller.policies.lifecycle.operations.get(request.operation_id)
        if op is None:  # reported before, or cancelled: applied once, so nothing to do
            self.dispatcher.release(request.operation_id)
            return pb.ReportOperationResponse(applied=False)
        if outcome == pb.OPERATION_OUTCOME_IN_PROGRESS:
            self.dispatcher.renew(request.operation_id)
            return pb.ReportOperationResponse(applied=True, revision=self._control.revision(op.scale_set))
        command = cmd.ReportOperation(
            op.scale_set,
            request.operation_id,
            outcome == pb.OPERATION_OUTCOME_SUCCEEDED,
            request.error_code,
            request.error_message,
            request.address,
            request.provider_id,
        )
        reply = await self._control.mutate(
            method="ReportOperation",
            command=command,
            encode=lambda o: pb.ReportOperationResponse(applied=o.result is not None, revision=o.revision),
        )
        self.dispatcher.release(request.operation_id)
        return reply

    async def AcknowledgeScheduledEvent(
        self, request: pb.AcknowledgeScheduledEventRequest, context: Any
    ) -> Any:
        name = _require(request.name, "name")
        event = self._control.controller.policies.lifecycle.events.get(request.event_id)
        if event is None or event.scale_set != name:
            # Carried out already (or never scheduled): nothing to do, and nothing is logged.
            return pb.AcknowledgeScheduledEventResponse(applied=False, revision=self._control.revision(name))
        return await self._control.mutate(
            method="AcknowledgeScheduledEvent",
            command=cmd.AcknowledgeScheduledEvent(name, request.event_id),
            encode=lambda o: pb.AcknowledgeScheduledEventResponse(
                applied=o.result is not None, revision=o.revision
            ),
        )

    async def CompleteLifecycleAction(self, request: pb.CompleteLifecycleActionRequest, context: Any) -> Any:
        name = _require(request.name, "name")
        result = (
            convert.enum_word(pb.LifecycleHookDefaultResult.DESCRIPTOR, request.result, "result")
            if request.result
            else "Continue"
        )
        command = cmd.CompleteLifecycleAction(
            name, request.instance_id, _require(request.hook, "hook"), result
        )
        return await self._control.mutate(
            method="CompleteLifecycleAction",
            command=command,
            encode=lambda o: pb.CompleteLifecycleActionResponse(
                applied=o.result is not None, revision=o.revision
            ),
        )

    async def RecordLifecycleActionHeartbeat(
        self, request: pb.RecordLifecycleActionHeartbeatRequest, context: Any
    ) -> Any:
        name = _require(request.name, "name")
        command = cmd.RecordLifecycleActionHeartbeat(
            name, request.instance_id, _require(request.hook, "hook")
        )
        return await self._control.mutate(
            method="RecordLifecycleActionHeartbeat",
            command=command,
            encode=lambda o: pb.RecordLifecycleActionHeartbeatResponse(
                applied=bool(o.result), revision=o.revision
            ),
        )

    async def GetFleetStatus(self, request: pb.GetFleetStatusRequest, context: Any) -> pb.FleetStatus:
        await self._control.settled()
        name = _require(request.name, "name")
        report = await self._control.inspect(lambda c: c.fleet_report(name))
        return convert.fleet_report_to_proto(
            dataclasses.replace(report, revision=self._control.revision(name))
        )


class DiagnosticsServicer(pb_grpc.DiagnosticsServicer):
    async def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        return pb.EchoResponse(payload=request.payload)


class _Reflection(reflection_aio.ReflectionServicer):
    """Server reflection whose descriptors of our own file carry its comments (source info), so tools
    such as grpcurl ``describe`` show the documentation; served as both grpc.reflection.v1 and v1alpha
    (the messages are the same on the wire)."""

    def __init__(self, service_names: list[str]) -> None:
        super().__init__(service_names)
        data = importlib.resources.files("scaleset.v1").joinpath("scaleset.binpb").read_bytes()
        self._documented = {
            f.name: f.SerializeToString() for f in descriptor_pb2.FileDescriptorSet.FromString(data).file
        }

    async def ServerReflectionInfo(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for response in super().ServerReflectionInfo(request_iterator, context):
            if response.HasField("file_descriptor_response"):
                files = response.file_descriptor_response.file_descriptor_proto
                for i, serialized in enumerate(files):
                    name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
                    files[i] = self._documented.get(name, serialized)
            yield response


def _serve_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    v1 = "grpc.reflection.v1.ServerReflection"
    servicer = _Reflection([*service_names, reflection.SERVICE_NAME, v1])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(v1, {"ServerReflectionInfo": method}),)
    )


class _CallDetails(NamedTuple):
    method: str
    invocation_metadata: Any


class InProcess:
    """A server's services called in this process, with the caller's own call context: what the server
    would run for a method (its interceptors included), without another gRPC hop. A cluster's front
    calls the partitions it owns this way."""

    def __init__(self) -> None:
        self._handlers: list[Any] = []
        #: The server's interceptors, set by :func:`build_server`.
        self.interceptors: list[Any] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        self._handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        pass  # the generic handlers above serve the same methods

    async def handler(self, method: str, metadata: Any) -> grpc.RpcMethodHandler | None:
        """The handler the server would run for ``method``, through its interceptors (outermost first)."""

        async def innermost(details: Any) -> Any:
            return next((h for g in self._handlers if (h := g.service(details)) is not None), None)

        continuation: Callable[[Any], Awaitable[Any]] = innermost
        for interceptor in reversed(self.interceptors):
            continuation = functools.partial(interceptor.intercept_service, continuation)
        return await continuation(_CallDetails(method, metadata))


#: Every gRPC server's bounds (a single server's, a cluster's front and partitions): message sizes both
#: ways, streams per connection, keepalives.
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", MAX_REPLY_BYTES),
    ("grpc.max_concurrent_streams", 256),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


def server_options(max_connections: int) -> list[tuple[str, Any]]:
    """SERVER_OPTIONS with the bound on client connections at once (see ``limits.MAX_CONNECTIONS``)."""
    return [*SERVER_OPTIONS, ("grpc.max_allowed_incoming_connections", max_connections)]


async def build_server(
    control: ControlPlane,
    address: str,
    *,
    authenticator: Any = None,
    credentials: Any = None,
    rate_limit: float | None = DEFAULT_RATE_LIMIT,
    in_process: InProcess | None = None,
    stream_send_timeout: float = STREAM_SEND_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
) -> tuple[grpc.aio.Server, int, Metrics]:
    """A server with every service, health checking and reflection, bound to ``address``
    (``host:port``; port 0 picks a free one). Returns the server, its port and its metrics. Given
    ``in_process``, the same services (same interceptors, same metrics) are also callable through it."""
    metrics = Metrics(control)
    limiter = RateLimiter(rate_limit) if rate_limit else None
    interceptors: list[Any] = [_Interceptor(metrics, control.lingering, limiter, stream_send_timeout)]
    if authenticator is not None:
        from scaleset.auth import AuthInterceptor

        interceptors.insert(0, AuthInterceptor(authenticator))  # outermost: a denied call reaches nothing
    server = grpc.aio.server(
        interceptors=interceptors,
        # Bounds on what a client can make the server hold: calls at once, and message sizes both ways
        # (replies up to 64 MB carry a 100,000-instance plan; the client accepts as much).
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        options=server_options(max_connections),
    )
    servicers = (ScaleSetsServicer(control), RegionsServicer(control), AutoscaleServicer(control))
    for target in (server, in_process) if in_process is not None else (server,):
        pb_grpc.add_ScaleSetsServicer_to_server(servicers[0], target)
        pb_grpc.add_RegionsServicer_to_server(servicers[1], target)
        pb_grpc.add_AutoscaleServicer_to_server(servicers[2], target)
    if in_process is not None:
        in_process.interceptors = interceptors
    pb_grpc.add_DiagnosticsServicer_to_server(DiagnosticsServicer(), server)
    pb_grpc.add_ExecutorsServicer_to_server(ExecutorsServicer(control), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [
        pb.DESCRIPTOR.services_by_name[s].full_name
        for s in ("ScaleSets", "Autoscale", "Regions", "Diagnostics", "Executors")
    ]

    async def set_health(serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *names]:
            await health_servicer.set(name, status)

    # Set before the server starts accepting, so checks never see UNKNOWN; NOT_SERVING while the state is
    # rebuilt after a failed commit.
    await set_health(True)
    control.serving_listeners.append(set_health)
    _serve_reflection(server, [*names, health.SERVICE_NAME])
    return server, listen(server, address, credentials), metrics


def listen(server: grpc.aio.Server, address: str, credentials: Any = None) -> int:
    """Binds ``server`` to ``address`` (TLS when given ``credentials``); returns the port."""
    port = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return int(port)
