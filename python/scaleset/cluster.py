"""Several active servers on one PostgreSQL database (``scaleset serve --cluster``).

The database's scale sets are hashed onto a fixed number of partitions (12 by default, chosen when the
cluster's database is created). Each partition is a whole state of its own: its own schema with the
event log, snapshots and request replies of the single-server store, its own engine and control plane,
and one owner at a time, the server whose database session holds the partition's advisory lock. A
partition's owner orders its mutations and runs its background work (upgrades, repairs, zone balance,
autoscale), exactly as a single server does for the whole database.

Each server is a front and a set of cells. The front listens on the server's address and forwards every
request to the cell that serves the scale set's partition, on this server or another (the owners'
addresses are in ``partition_owners``), so any client may talk to any server. A cell is a partition's
store, control plane and gRPC server on a loopback port. Every second each server says it is alive and
takes its fair share of partitions (ceil(partitions / live servers)): free ones it takes, extra ones it
hands back (a clean stop: committed, snapshotted, unlocked) for a server below its share to take. A
server that dies loses its sessions and with them its locks, within ``LEASE_S``; the others take its
partitions over and replay their logs.

A few requests span partitions. ListScaleSets asks every partition and merges the pages by name. A zone's
availability or a pool's capacity is a fact about the region that every partition's engine needs: the
front applies the change to each partition in turn with one request_id (a retry completes it; no
partition applies it twice), and answers with partition 0's region. A watch of every scale set, and an
executor's lease stream, merge a stream from each partition's owner (events resume by a vector of
partition positions, the resume_token; operations are numbered uniquely in the cluster). vCPU quotas (a
sum over every partition, which no one server sees) are refused with FAILED_PRECONDITION
(``NotInCluster``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import math
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric

from scaleset.control import WATCH_MESSAGES_PER_SECOND, ControlPlane
from scaleset.errors import CapacityError, ConflictError, ScaleSetError, error, invalid_input, unavailable
from scaleset.gateway import Gateway
from scaleset.limits import MAX_CONCURRENT_RPCS, MAX_CONNECTIONS, STREAM_SEND_TIMEOUT_S, LingeringStreams
from scaleset.model import Region
from scaleset.postgres import LEASE_S, ClusterDirectory, PostgresStore
from scaleset.service import (
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    STREAM_OPEN,
    DiagnosticsServicer,
    InProcess,
    Metrics,
    RateLimiter,
    _client_address,
    _page_token,
    _read_token,
    _serve_reflection,
    abort_call,
    build_server,
    listen,
    send_within,
    server_options,
    status_for,
    stream_opened,
)
from scaleset.v1 import scaleset_pb2 as pb
from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

__all__ = ["PARTITIONS", "ClusterServer", "partition_of"]

#: Partitions of a new cluster's database: 12 share evenly among 1, 2, 3, 4 or 6 servers.
PARTITIONS = 12
#: How long a request waits for its partition to have an owner (a takeover: the dead owner's session
#: ends within LEASE_S, then a survivor loads the partition) before it is answered UNAVAILABLE.
OWNER_WAIT_S = 3 * LEASE_S
#: How often each server says it is alive and rebalances (and each owner that it still owns its partitions).
MANAGE_INTERVAL_S = 1.0
#: An owner's address is used for forwarding while it said so within this long (three of its beats).
ROUTE_TTL_S = 3 * MANAGE_INTERVAL_S
#: A channel to an address that has served no partition for this long is closed.
CHANNEL_IDLE_S = 60.0

_ROUTED_SERVICES = ("ScaleSets", "Autoscale", "Regions", "Executors")
#: Region changes every partition applies; the other region RPCs are answered by partition 0, or refused.
_BROADCAST = {"SetZoneAvailability", "SetPoolCapacity"}
_NOT_SHARED = {
    "SetCoreQuota": "vCPU quotas bound the sum over every partition, which no one server sees",
}


def partition_of(name: str, partitions: int) -> int:
    """The partition that holds scale set ``name`` (stable across servers and restarts)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % partitions


def _scale_set_name(request: Any) -> str:
    if isinstance(request, pb.CreateScaleSetRequest | pb.UpdateScaleSetRequest):
        return str(request.scale_set.name)
    if isinstance(request, pb.WatchEventsRequest):
        return str(request.scale_set)
    return str(getattr(request, "name", ""))


#: Stream errors after which a partition's stream is opened again (on its next owner), and the errors of
#: an executor's own making, which end its merged lease stream.
_FOLLOW_AGAIN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
_EXECUTOR_FAULTS = {
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


async def abort_with(context: grpc.aio.ServicerContext, failure: grpc.aio.AioRpcError) -> None:
    """Ends the caller's call with the status an owner answered (its code, message and details)."""
    await abort_call(context, failure.code(), failure.details() or "", failure.trailing_metadata() or ())


def _not_in_cluster(what: str) -> ScaleSetError:
    return error(ConflictError, f"not available on a cluster (serve --cluster): {what}.", "NotInCluster")


@dataclass(frozen=True, slots=True)
class CellSettings:
    """What every cell's control plane and gRPC server are built with (the server's flags)."""

    region: Region
    host: str
    instance_limit: int | None = None
    advance_interval: float = 30.0
    event_retention: int = 100_000
    request_retention: int = 100_000
    max_watchers: int = 1000
    watch_messages_per_second: float = WATCH_MESSAGES_PER_SECOND
    #: A client of a server stream that takes no message for this long is let go (``SlowConsumer``).
    stream_send_timeout: float = STREAM_SEND_TIMEOUT_S
    #: Client connections at once, on the front (cells are reached by the fronts only).
    max_connections: int = MAX_CONNECTIONS
    #: Hand plans to executors (``serve --executors``) instead of applying them at once.
    executors: bool = False
    authenticator: Any = None
    pull: Callable[[ControlPlane], Awaitable[object]] | None = None
    #: TLS: makes what the front and every cell serve with (one credentials object per server), and what
    #: a front forwards to other servers with (their CA, and this server's own certificate for mutual
    #: TLS); None for both is plain text.
    credentials: Callable[[], grpc.ServerCredentials] | None = None
    peer_credentials: grpc.ChannelCredentials | None = None


class Cell:
    """One partition served by this server: its store (holding the partition's lock), its control plane
    and policies, and its gRPC server on a loopback port, which the fronts forward to."""

    def __init__(self, partition: int, store: PostgresStore, control: ControlPlane) -> None:
        self.partition = partition
        self.store = store
        self.control = control
        self.server: grpc.aio.Server | None = None
        self.metrics: Metrics | None = None
        #: The partition's services for this server's own front, called without a gRPC hop.
        self.local = InProcess()
        self.address = ""
        self.stopping = asyncio.Event()
        self.lost = False
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, url: str, partition: int, front: str, settings: CellSettings) -> Cell | None:
        """Takes ``partition`` if no server holds it (None if one does), loads its state and serves it."""
        try:
            store = await asyncio.to_thread(
                PostgresStore, url, pool_size=2, address=front, partition=partition
            )
        except ScaleSetError as e:
            if e.code == "DatabaseInUse":
                return None
            raise
        control = ControlPlane(
            store,
            settings.region,
            instance_limit=settings.instance_limit,
            event_retention=settings.event_retention,
            request_retention=settings.request_retention,
            max_watchers=settings.max_watchers,
            watch_messages_per_second=settings.watch_messages_per_second,
        )
        cell = cls(partition, store, control)
        try:
            await control.start()
            await control.set_execution_mode("Executors" if settings.executors else "Immediate")
            cell.server, port, cell.metrics = await build_server(
                control,
                f"{settings.host}:0",
                authenticator=settings.authenticator,
                credentials=None if settings.credentials is None else settings.credentials(),
                rate_limit=None,
                in_process=cell.local,
                stream_send_timeout=settings.stream_send_timeout,
            )
            await cell.server.start()
        except BaseException:
            await asyncio.to_thread(store.close)
            raise
        cell.address = f"{settings.host}:{port}"
        store.cell = cell.address
        await asyncio.to_thread(store.heartbeat)  # announces where the partition is served now
        pull = None if settings.pull is None else functools.partial(settings.pull, control)
        cell._tasks = [
            asyncio.create_task(control.run_policies(settings.advance_interval, cell.stopping, pull)),
            asyncio.create_task(cell._hold()),
        ]
        log.info("partition %d: serving on %s (sequence %d)", partition, cell.address, control.sequence)
        return cell

    async def _hold(self) -> None:
        """Proves every second that this server still holds the partition; stops serving it at once when
        it does not (another server may own it now)."""
        while not self.stopping.is_set():
            try:
                await asyncio.to_thread(self.store.heartbeat)
            except ScaleSetError as e:
                log.error("partition %d: %s; no longer serving it", self.partition, e)
                self.lost = True
                self.stopping.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), MANAGE_INTERVAL_S)

    async def stop(self, grace: float) -> None:
        """Stops serving the partition: cleanly (commits, snapshots, releases the lock) unless the lock
        was lost, when nothing more is written and what was queued is answered UNAVAILABLE."""
        self.stopping.set()
        for task in self._tasks:
            await task
        if self.lost:
            self.control.abandon()
            if self.server is not None:
                await self.server.stop(0.5)
            await asyncio.to_thread(self.store.close)
            return
        if self.server is not None:
            await self.server.stop(grace)
        await self.control.stop()
        log.info("partition %d: handed back", self.partition)


class ClusterServer:
    """This server's part of the cluster: its membership, its cells, and the front that routes requests."""

    def __init__(
        self, url: str, address: str, settings: CellSettings, *, partitions: int = PARTITIONS
    ) -> None:
        self._url = url
        self.address = address
        self._settings = settings
        self._wanted_partitions = partitions
        self.directory: ClusterDirectory | None = None
        self.cells: dict[int, Cell] = {}
        #: partition -> where it is served (the forwarding table), refreshed every MANAGE_INTERVAL_S.
        self.routes: dict[int, str] = {}
        self._routes_changed = asyncio.Event()
        self._channels: dict[str, grpc.aio.Channel] = {}
        #: target -> when it last served a partition (the event loop's clock).
        self._routed: dict[str, float] = {}
        self._stop = asyncio.Event()
        self._manager: asyncio.Task[None] | None = None
        self._free_last_round: set[int] = set()

    @property
    def partitions(self) -> int:
        assert self.directory is not None
        return self.directory.partitions

    async def start(self) -> None:
        self.directory = await asyncio.to_thread(
            ClusterDirectory, self._url, address=self.address, partitions=self._wanted_partitions
        )
        await asyncio.to_thread(self.directory.beat)
        self._manager = asyncio.create_task(self._manage(), name="scaleset-cluster")

    async def stop(self, grace: float) -> None:
        """Hands every partition back (so survivors take them at once, not after a lease) and leaves."""
        self._stop.set()
        if self._manager is not None:
            await self._manager
        await asyncio.gather(*(cell.stop(grace) for cell in self.cells.values()))
        self.cells.clear()
        for channel in self._channels.values():
            await channel.close()
        if self.directory is not None:
            await asyncio.to_thread(self.directory.close)

    # ----- membership ---------------------------------------------------------------------------------

    async def _manage(self) -> None:
        # One beat before the first share-out, so servers starting together see one another.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), MANAGE_INTERVAL_S)
        while not self._stop.is_set():
            try:
                await self._rebalance()
            except Exception:
                log.exception("cluster: this round of share-out failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), MANAGE_INTERVAL_S)

    async def _rebalance(self) -> None:
        directory = self.directory
        assert directory is not None
        for partition, cell in list(self.cells.items()):
            if cell.lost:
                del self.cells[partition]
                await cell.stop(0)
        await asyncio.to_thread(directory.beat)
        live = await asyncio.to_thread(directory.live_servers, ROUTE_TTL_S)
        share = math.ceil(self.partitions / max(1, len(live)))
        held = await asyncio.to_thread(directory.held)
        free = [p for p in range(self.partitions) if p not in held]
        # A partition free for a whole round has no server about to take it (its owner died, or every
        # server is at its share while one that left still counts as live): take it beyond the share,
        # and hand extras back later. Being served comes before being shared evenly.
        orphans = [p for p in free if p in self._free_last_round]
        self._free_last_round = set(free)
        if len(self.cells) > share and not free:
            # One a round, the highest first: a server below its share takes it in its next round.
            partition = max(self.cells)
            cell = self.cells.pop(partition)
            await cell.stop(5.0)
        elif len(self.cells) < share or orphans:
            # Servers start their search at different partitions, so they rarely race for the same one.
            me = live.index(self.address) if self.address in live else 0
            free.sort(key=lambda p: (p not in orphans, (p - me * share) % self.partitions))
            for partition in free[: max(share - len(self.cells), len(orphans))]:
                opened = await Cell.open(self._url, partition, self.address, self._settings)
                if opened is not None:
                    self.cells[partition] = opened
        await self._refresh_routes()

    async def _refresh_routes(self) -> None:
        assert self.directory is not None
        owners = await asyncio.to_thread(self.directory.owners)
        routes = {p: cell for p, (_, cell, age) in owners.items() if age < ROUTE_TTL_S}
        routes.update({p: cell.address for p, cell in self.cells.items() if not cell.stopping.is_set()})
        if routes != self.routes:
            self.routes = routes
            self._routes_changed.set()
            self._routes_changed = asyncio.Event()
        # Channels to where no partition has been served for a while (a cell's port lives as long as
        # its owner holds the partition) are closed: they are bounded by the partitions, not the takeovers.
        now = asyncio.get_running_loop().time()
        self._routed.update(dict.fromkeys(routes.values(), now))
        for target, seen in list(self._routed.items()):
            if now - seen > CHANNEL_IDLE_S:
                del self._routed[target]
                if (channel := self._channels.pop(target, None)) is not None:
                    await channel.close()

    # ----- forwarding ---------------------------------------------------------------------------------

    def _channel(self, target: str) -> grpc.aio.Channel:
        channel = self._channels.get(target)
        if channel is None:
            options = [
                ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
                ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
            ]
            tls = self._settings.peer_credentials
            channel = self._channels[target] = (
                grpc.aio.insecure_channel(target, options=options)
                if tls is None
                else grpc.aio.secure_channel(target, tls, options=options)
            )
        return channel

    async def route(self, partition: int, deadline: float | None) -> str:
        """Where ``partition`` is served; waits (up to OWNER_WAIT_S, or the call's deadline) while it has no
        owner, as during a takeover."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + min(OWNER_WAIT_S, deadline if deadline is not None else OWNER_WAIT_S)
        while (target := self.routes.get(partition)) is None:
            remaining = give_up - loop.time()
            if remaining <= 0:
                raise unavailable(
                    f"partition {partition} has no server now (a takeover in progress?); retry with the same "
                    "request_id."
                )
            changed = self._routes_changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, MANAGE_INTERVAL_S))
        return target

    async def forward(
        self,
        method: str,
        partition: int,
        payload: bytes,
        metadata: list[tuple[str, str]],
        deadline: float | None,
    ) -> bytes:
        """Sends a unary call to ``partition``'s cell. A cell that is gone (stopped, or its server died)
        is dropped from the routes and the call waits for the partition's next owner: the call never
        reached it, so sending it again cannot apply it twice."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            remaining = None if deadline is None else deadline - (loop.time() - started)
            target = await self.route(partition, remaining)
            channel = self._channel(target)
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout=1.0)
            except TimeoutError:
                log.warning(
                    "partition %d: %s does not answer; waiting for the partition's owner", partition, target
                )
                if self.routes.get(partition) == target:
                    del self.routes[partition]
                continue
            call = channel.unary_unary(method)
            try:
                return await call(payload, metadata=metadata, timeout=remaining)  # type: ignore[no-any-return]
            finally:
                if (took := loop.time() - started) > 2.0:
                    log.warning(
                        "%s on partition %d took %.1f s (through %s)", method, partition, took, target
                    )

    async def stream(
        self,
        method: str,
        partition: int,
        payload: bytes,
        metadata: list[tuple[str, str]],
        accepted: Callable[[], Awaitable[None]],
    ) -> AsyncIterator[bytes]:
        """The partition's stream of ``method`` on its owner; ``accepted`` is awaited once the owner's
        headers say it accepted the stream (`STREAM_OPEN`), before its first message."""
        target = await self.route(partition, None)
        call = self._channel(target).unary_stream(method)(payload, metadata=metadata)
        if stream_opened(await call.initial_metadata()):
            await accepted()
        async for message in call:
            yield message


class Router:
    """The front's handler for every routed method: decodes the request to find its scale set, and
    forwards the request's bytes (and the caller's metadata: its token) to the partition's cell."""

    def __init__(
        self,
        cluster: ClusterServer,
        limiter: RateLimiter | None,
        send_timeout: float = STREAM_SEND_TIMEOUT_S,
        max_watchers: int = 1000,
    ) -> None:
        self._cluster = cluster
        self._limiter = limiter
        self._send_timeout = send_timeout
        #: Streams this front let go as too slow whose calls are still open (their partitions' streams
        #: are closed): while full, the front refuses new streams, as a single server does.
        self._lingering = LingeringStreams(LingeringStreams.limit_for(max_watchers))
        self._methods: dict[str, tuple[str, type[Any], bool]] = {}
        for service in _ROUTED_SERVICES:
            descriptor = pb.DESCRIPTOR.services_by_name[service]
            for m in descriptor.methods:
                request_type = getattr(pb, m.input_type.name)
                self._methods[f"/{descriptor.full_name}/{m.name}"] = (
                    m.name,
                    request_type,
                    m.server_streaming,
                )

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        entry = self._methods.get(method)
        if entry is None:
            return None
        name, request_type, streaming = entry
        if streaming:
            return grpc.unary_stream_rpc_method_handler(
                functools.partial(self._stream, method, name, request_type)
            )
        return grpc.unary_unary_rpc_method_handler(functools.partial(self._unary, method, name, request_type))

    @staticmethod
    def _metadata(context: grpc.aio.ServicerContext) -> list[tuple[str, str]]:
        return [
            (k, v)
            for k, v in (context.invocation_metadata() or ())
            if not k.startswith((":", "grpc-")) and k not in ("user-agent", "content-type", "te")
        ]

    async def _admit(self, context: grpc.aio.ServicerContext, request_type: type[Any], payload: bytes) -> Any:
        limiter = self._limiter
        if limiter is not None and not limiter.allow(_client_address(context)):
            await self._fail(  # as a single server says it: RESOURCE_EXHAUSTED, RateLimited, RetryInfo
                context,
                error(
                    CapacityError,
                    f"too many requests from this client (more than {limiter.rate:g} a second); retry shortly.",
                    "RateLimited",
                ),
            )
        try:
            return request_type.FromString(payload)
        except Exception:
            # Malformed bytes: let the owning cell's service answer (INVALID_ARGUMENT), via partition 0.
            return None

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        status = status_for(exc)
        await abort_call(context, status.code, status.details, status.trailing_metadata)

    async def _relay(self, context: grpc.aio.ServicerContext, call: Awaitable[bytes]) -> bytes:
        try:
            return await call
        except grpc.aio.AioRpcError as e:
            await abort_with(context, e)
            raise  # unreachable: abort raises

    async def _unary(
        self,
        method: str,
        name: str,
        request_type: type[Any],
        payload: bytes,
        context: grpc.aio.ServicerContext,
    ) -> bytes:
        request = await self._admit(context, request_type, payload)
        cluster, metadata, deadline = self._cluster, self._metadata(context), context.time_remaining()
        try:
            if name in _NOT_SHARED:
                raise _not_in_cluster(_NOT_SHARED[name])
            if request is not None and name in _BROADCAST:
                return await self._broadcast(method, request, metadata, deadline, context)
            if request is not None and name == "ListScaleSets":
                return await self._list_scale_sets(method, request, metadata, deadline, context)
            if isinstance(request, pb.ReportOperationRequest):
                # Operation ids are the cluster's (see _lease_operations): the partition is in the id.
                partition, request.operation_id = self._local_operation(request.operation_id)
                payload = request.SerializeToString()
            else:
                scale_set = "" if request is None else _scale_set_name(request)
                partition = partition_of(scale_set, cluster.partitions) if scale_set else 0
        except ScaleSetError as e:
            await self._fail(context, e)
            raise
        reply = await self._call(method, partition, payload, metadata, deadline, context)
        if name == "GetFleetStatus":
            status = pb.FleetStatus.FromString(reply)
            for operation in status.pending_operations:
                operation.operation_id = self._cluster_operation(operation.operation_id, partition)
            reply = status.SerializeToString()
        return reply

    async def _call(
        self,
        method: str,
        partition: int,
        payload: bytes,
        metadata: list[tuple[str, str]],
        deadline: float | None,
        context: grpc.aio.ServicerContext,
    ) -> bytes:
        cell = self._cluster.cells.get(partition)
        if cell is not None and not cell.stopping.is_set():
            # This server owns the partition: its services run here, on this call's own context.
            handler = await cell.local.handler(method, context.invocation_metadata())
            if handler is not None and handler.unary_unary is not None:
                reply = await handler.unary_unary(handler.request_deserializer(payload), context)
                return bytes(handler.response_serializer(reply))
        return await self._relay(
            context, self._cluster.forward(method, partition, payload, metadata, deadline)
        )

    # Each partition numbers its operations; executors see ids unique in the cluster, the partition's id
    # times the number of partitions plus the partition.
    def _cluster_operation(self, local: int, partition: int) -> int:
        return local * self._cluster.partitions + partition

    def _local_operation(self, operation_id: int) -> tuple[int, int]:
        return operation_id % self._cluster.partitions, operation_id // self._cluster.partitions

    def _resume_positions(self, token: str) -> list[int]:
        """The per-partition sequences a resume_token stands for (see :meth:`_watch_all`)."""
        partitions = self._cluster.partitions
        try:
            text = base64.urlsafe_b64decode(token.encode()).decode()
            issued_for, _, listed = text.partition(":")
            positions = [int(x) for x in listed.split(",")]
        except (ValueError, UnicodeDecodeError):
            issued_for, positions = "", []
        if issued_for != "all" or len(positions) != partitions or not all(0 <= p < 2**63 for p in positions):
            raise invalid_input(
                "resume_token is not one this cluster issued; start again without it, or with the last "
                "event's resume_token.",
                "InvalidParameter",
                field="resume_token",
            )
        return positions

    @staticmethod
    def _resume_token(positions: list[int]) -> str:
        return base64.urlsafe_b64encode(("all:" + ",".join(map(str, positions))).encode()).decode()

    async def _watch_all(
        self,
        method: str,
        request: pb.WatchEventsRequest,
        metadata: list[tuple[str, str]],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        """A watch of every scale set on a cluster: every partition's watch, merged. There is no order
        between partitions, so an event's position is a vector of each partition's sequence, sent as
        its resume_token; its sequence is the partition's times the number of partitions, plus the
        partition. A partition's stream that ends (its owner changed) is opened again where it was."""
        partitions = self._cluster.partitions
        try:
            if request.after and not request.resume_token:
                raise invalid_input(
                    "on a cluster, a watch of every scale set resumes with resume_token (an event's), not "
                    "after: there is no one sequence across partitions.",
                    "InvalidParameter",
                    field="after",
                )
            positions = (
                self._resume_positions(request.resume_token) if request.resume_token else [0] * partitions
            )
        except ScaleSetError as e:
            await self._fail(context, e)
            return

        def upstream(partition: int) -> bytes:
            return bytes(pb.WatchEventsRequest(after=positions[partition]).SerializeToString())

        # Compacted, refused, unauthenticated: the client's to know; anything else, follow the next owner.
        merged = self._fan_in(method, upstream, metadata, context, lambda code: code not in _FOLLOW_AGAIN)
        async for partition, message in merged:
            reply = pb.WatchEventsResponse.FromString(message)
            fresh = pb.WatchEventsResponse()
            for event in reply.events:
                if event.sequence <= positions[partition]:
                    continue  # sent before the partition's stream was opened again
                positions[partition] = event.sequence
                event.sequence = event.sequence * partitions + partition
                event.resume_token = self._resume_token(positions)
                fresh.events.append(event)
            if fresh.events:
                yield fresh.SerializeToString()

    async def _lease_operations(
        self, method: str, payload: bytes, metadata: list[tuple[str, str]], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """One executor stream of the whole cluster: a stream from every partition's owner, merged, with
        the cluster's operation ids. When a partition changes owner its stream is opened again on the
        new one (leases are not durable: the new owner offers every pending operation again)."""
        # The executor's own fault (or executors are off) ends the stream; anything else is followed.
        merged = self._fan_in(
            method, lambda _: payload, metadata, context, lambda code: code in _EXECUTOR_FAULTS
        )
        async for partition, message in merged:
            reply = pb.LeaseOperationsResponse.FromString(message)
            for operation in reply.operations:
                operation.operation_id = self._cluster_operation(operation.operation_id, partition)
            reply.cancelled_operation_ids[:] = [
                self._cluster_operation(i, partition) for i in reply.cancelled_operation_ids
            ]
            yield reply.SerializeToString()

    async def _fan_in(
        self,
        method: str,
        upstream: Callable[[int], bytes],
        metadata: list[tuple[str, str]],
        context: grpc.aio.ServicerContext,
        final: Callable[[grpc.StatusCode], bool],
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Every partition's stream of ``method``, merged as (partition, message). Each is opened on the
        partition's owner with ``upstream(partition)`` (asked at each opening, so it can resume) and
        opened again when it ends or its owner goes; an error ``final`` calls the client's ends it all."""
        partitions = self._cluster.partitions
        merged: asyncio.Queue[tuple[int, bytes] | grpc.aio.AioRpcError] = asyncio.Queue(
            maxsize=4 * partitions
        )
        # The client's stream is accepted (its headers sent) once every partition's first stream has
        # answered: accepted, or failed in a way that is followed (no owner, within the route's wait).
        # A partition's refusal before that ends it with trailers only, as a single server's would.
        unanswered = set(range(partitions))
        decided = asyncio.Event()
        refusals: list[grpc.aio.AioRpcError] = []

        def answered(partition: int) -> None:
            unanswered.discard(partition)
            if not unanswered:
                decided.set()

        async def follow(partition: int) -> None:
            async def accepted() -> None:
                answered(partition)

            while True:
                try:
                    stream = self._cluster.stream(method, partition, upstream(partition), metadata, accepted)
                    async for message in stream:
                        await merged.put((partition, message))
                except grpc.aio.AioRpcError as e:
                    if final(e.code()):
                        refusals.append(e)
                        decided.set()
                        await merged.put(e)
                        return
                except ScaleSetError:
                    pass  # no owner yet
                answered(partition)
                await asyncio.sleep(MANAGE_INTERVAL_S / 2)  # the owner went: follow the next one

        followers = [asyncio.create_task(follow(p)) for p in range(partitions)]
        try:
            await decided.wait()
            if refusals:
                await abort_with(context, refusals[0])
                return
            await context.send_initial_metadata(STREAM_OPEN)
            while True:
                item = await merged.get()
                if isinstance(item, grpc.aio.AioRpcError):
                    await abort_with(context, item)
                    return
                yield item
        finally:
            for task in followers:
                task.cancel()

    async def _broadcast(
        self,
        method: str,
        request: Any,
        metadata: list[tuple[str, str]],
        deadline: float | None,
        context: grpc.aio.ServicerContext,
    ) -> bytes:
        """A region change, applied to every partition in turn under one request_id: a retry after a
        partial failure finishes it, and each partition applies it once."""
        if not request.request_id:
            request.request_id = f"cluster-{uuid.uuid4()}"
        payload = request.SerializeToString()
        replies = [
            await self._relay(context, self._cluster.forward(method, p, payload, metadata, deadline))
            for p in range(self._cluster.partitions)
        ]
        return replies[0]

    async def _list_scale_sets(
        self,
        method: str,
        request: pb.ListScaleSetsRequest,
        metadata: list[tuple[str, str]],
        deadline: float | None,
        context: grpc.aio.ServicerContext,
    ) -> bytes:
        """Every partition's page after the same name, merged: the first ``page_size`` by name."""
        size = min(request.page_size or 100, 1000)
        if request.page_token:
            _read_token(request.page_token, "ListScaleSets")  # INVALID_ARGUMENT for a foreign token, here
        payload = request.SerializeToString()
        pages = await asyncio.gather(
            *(
                self._relay(context, self._cluster.forward(method, p, payload, metadata, deadline))
                for p in range(self._cluster.partitions)
            )
        )
        replies = [pb.ListScaleSetsResponse.FromString(page) for page in pages]
        merged = sorted((s for r in replies for s in r.scale_sets), key=lambda s: s.spec.name)
        more = len(merged) > size or any(r.next_page_token for r in replies)
        reply = pb.ListScaleSetsResponse(scale_sets=merged[:size])
        if more and merged:
            reply.next_page_token = _page_token("ListScaleSets", merged[:size][-1].spec.name)
        return bytes(reply.SerializeToString())

    async def _stream(
        self,
        method: str,
        name: str,
        request_type: type[Any],
        payload: bytes,
        context: grpc.aio.ServicerContext,
    ) -> None:
        """A routed server stream, written here (see ``send_within``): a client that stops reading is let
        go, and with it the partitions' streams that feed it."""
        if self._lingering.full:
            await self._fail(context, self._lingering.refusal("server", elsewhere=True))
        # Closed as soon as the stream ends, however it ends: the partitions' streams go with it.
        messages = self._stream_messages(method, name, request_type, payload, context)
        async with contextlib.aclosing(messages):
            async for message in messages:
                try:
                    await send_within(context, message, self._send_timeout)
                except ScaleSetError as e:  # SlowConsumer
                    self._lingering.hold(context)
                    await self._fail(context, e)

    async def _stream_messages(
        self,
        method: str,
        name: str,
        request_type: type[Any],
        payload: bytes,
        context: grpc.aio.ServicerContext,
    ) -> AsyncGenerator[bytes, None]:
        request = await self._admit(context, request_type, payload)
        if name == "LeaseOperations":
            async for message in self._lease_operations(method, payload, self._metadata(context), context):
                yield message
            return
        scale_set = "" if request is None else _scale_set_name(request)
        if isinstance(request, pb.WatchEventsRequest) and not scale_set:
            async for message in self._watch_all(method, request, self._metadata(context), context):
                yield message
            return
        if isinstance(request, pb.WatchEventsRequest) and request.resume_token:
            await self._fail(
                context,
                invalid_input(
                    "resume_token resumes a watch of every scale set; a scale set's watch resumes with after "
                    "(its last revision).",
                    "InvalidParameter",
                    field="resume_token",
                ),
            )
        partition = partition_of(scale_set, self._cluster.partitions) if scale_set else 0

        async def accepted() -> None:
            await context.send_initial_metadata(STREAM_OPEN)

        try:
            stream = self._cluster.stream(method, partition, payload, self._metadata(context), accepted)
            async for message in stream:
                yield message
        except grpc.aio.AioRpcError as e:
            await abort_with(context, e)
        except ScaleSetError as e:
            await self._fail(context, e)


class CellMetrics:
    """A Prometheus collector: the metrics of every partition this server owns, each sample labelled
    with its ``partition``, and how many partitions it owns."""

    def __init__(self, cluster: ClusterServer) -> None:
        self._cluster = cluster

    def collect(self) -> Iterator[Metric]:
        owned = Metric("scaleset_partitions_owned", "Partitions this server owns.", "gauge")
        owned.add_sample("scaleset_partitions_owned", {}, len(self._cluster.cells))
        yield owned
        families: dict[str, Metric] = {}
        for partition, cell in sorted(self._cluster.cells.items()):
            if cell.metrics is None:
                continue
            for family in cell.metrics.registry.collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                merged.samples += [
                    s._replace(labels={**s.labels, "partition": str(partition)}) for s in family.samples
                ]
        yield from families.values()


async def build_front(
    cluster: ClusterServer,
    address: str,
    *,
    rate_limit: float | None,
    credentials: Any = None,
    stream_send_timeout: float = STREAM_SEND_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    max_watchers: int = 1000,
) -> tuple[grpc.aio.Server, int]:
    """The server's public face in a cluster: routed services, health checking, reflection, Echo."""
    server = grpc.aio.server(
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS, options=server_options(max_connections)
    )
    limiter = RateLimiter(rate_limit) if rate_limit else None
    server.add_generic_rpc_handlers((Router(cluster, limiter, stream_send_timeout, max_watchers),))
    pb_grpc.add_DiagnosticsServicer_to_server(DiagnosticsServicer(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [pb.DESCRIPTOR.services_by_name[s].full_name for s in (*_ROUTED_SERVICES, "Diagnostics")]
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _serve_reflection(server, [*names, health.SERVICE_NAME])
    return server, listen(server, address, credentials)


async def serve_cluster(
    url: str,
    address: str,
    settings: CellSettings,
    *,
    stop: asyncio.Event,
    partitions: int = PARTITIONS,
    rate_limit: float | None = None,
    grace: float = 5.0,
    metrics_port: int = 0,
    http_port: int | None = None,
    http_tls: Any = None,
) -> int:
    """Runs this server as a member of the cluster on ``url`` until ``stop``, then hands its partitions
    back (so the others take them at once) and leaves."""
    cluster = ClusterServer(url, "", settings, partitions=partitions)
    tls = None if settings.credentials is None else settings.credentials()
    server, port = await build_front(
        cluster,
        address,
        rate_limit=rate_limit,
        credentials=tls,
        stream_send_timeout=settings.stream_send_timeout,
        max_connections=settings.max_connections,
        max_watchers=settings.max_watchers,
    )
    cluster.address = f"{address.rsplit(':', 1)[0]}:{port}"  # who this server is, to the others
    if metrics_port:
        registry = CollectorRegistry()
        registry.register(CellMetrics(cluster))
        start_http_server(metrics_port, addr=settings.host.strip("[]") or "127.0.0.1", registry=registry)
    gateway = None if http_port is None else Gateway.attach(server, tls=http_tls)
    await cluster.start()
    await server.start()
    if gateway is not None and http_port is not None:
        await gateway.start(settings.host.strip("[]") or "127.0.0.1", http_port)
    log.info(
        "scaleset listening on %s (port %d), a member of the cluster on %s (%d partitions)",
        address,
        port,
        url if cluster.directory is None else cluster.directory.path,
        cluster.partitions,
    )
    await stop.wait()
    log.info("shutting down: handing partitions back")
    if gateway is not None:
        await gateway.stop()
    await cluster.stop(grace)
    await server.stop(grace)
    log.info("stopped")
    return 0
