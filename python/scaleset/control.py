"""The control plane: one engine, its durable event log, and the rules every mutation follows.

A mutation is applied to the engine under one lock (so the global order of changes is the order of the
log, and replay reproduces it exactly), then handed to a group committer that writes whole batches in
one transaction: one fsync for many concurrent mutations. The caller gets its answer only once its
batch is on disk. Reads wait until everything they could observe is committed, so nothing a client
sees can be lost.

This module knows nothing of gRPC: the service passes an ``encode`` callback that turns an outcome into
its reply, which is cached (as bytes) for ``request_id`` retries in the same transaction as the event.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import functools
import hashlib
import json
import logging
import random
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from scaleset.commands import Advance, Command, SetExecutionMode, decode
from scaleset.controller import Controller
from scaleset.errors import (
    CapacityError,
    NotFoundError,
    ScaleSetError,
    conflict,
    error,
    invalid_input,
    unavailable,
)
from scaleset.limits import LingeringStreams, SendTurns
from scaleset.model import Region
from scaleset.policies import Action
from scaleset.policies.runner import PolicyRunner
from scaleset.store import EventRecord, RequestRecord, Snapshot, Store, decode_part, encode_part

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["ControlPlane", "Outcome", "current_actor"]

#: Who makes the change being applied (set by the service's authentication); recorded with each event.
current_actor: ContextVar[str] = ContextVar("scaleset_actor", default="")

#: Recent committed events every watcher reads from (one shared buffer, not one queue per watcher), at
#: most this many and this many bytes (as stored): a watcher that falls further behind than the buffer
#: reaches catches up from the store instead.
WATCH_BACKLOG = 10_000
WATCH_BUFFER_BYTES = 64 * 1024 * 1024
#: While changes stream, a watcher sends at most one message per this interval (each carrying every
#: event since its last): the cost of many watchers grows with their number, not with the change rate.
WATCH_INTERVAL_S = 0.05
#: ... and all of them together send at most this many messages a second, evenly spaced (1,000 watchers:
#: one message each per 2 s, each with every event since the last), so the fan-out cannot crowd out the
#: mutations it reports (`serve --watch-messages-per-second`).
WATCH_MESSAGES_PER_SECOND = 500
#: Watchers replaying history read the store in aligned chunks of this many events, and the last few
#: chunks read are shared (at most REPLAY_CACHE_BYTES): many watchers replaying the same history decode it once.
REPLAY_CHUNK = 500
REPLAY_CACHE_BYTES = 32 * 1024 * 1024
#: A snapshot is taken once the log since the last one reaches half its size, but not before this much.
SNAPSHOT_MIN_LOG_BYTES = 1 << 20


#: A chunk read of the store under way (see ``ControlPlane._stored_events``).
_Read = tuple[int, "asyncio.Future[list[EventRecord]]"]


class Encodable(Protocol):
    def SerializeToString(self) -> bytes: ...


def fingerprint(method: str, payload: bytes) -> str:
    return hashlib.sha256(method.encode() + b"\0" + payload).hexdigest()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a mutation did: the engine's result, and the scale set's (or region's) new revision."""

    result: Any
    revision: int
    etag: str
    sequence: int


def make_etag(name: str, revision: int) -> str:
    """``W/"<revision>-<8 hex digits of the name's hash>"``: tied to its scale set, so one set's etag is
    never accepted as another's."""
    return f'W/"{revision}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"'


@dataclass(slots=True)
class _Pending:
    event: EventRecord
    request: RequestRecord | None
    future: asyncio.Future[None]


class ControlPlane:
    """Owns the controller (engine and policies) and its log. All methods run on one asyncio event loop.

    Args:
        store: where events, replies and snapshots go.
        region: the region to start with when the store is empty (a stored state wins).
        instance_limit: the engine's instance ceiling override (stored with the state; see README).
        clock: seconds since the epoch; injectable for tests.
        snapshot_every: take a snapshot after at most this many events; sooner once the log written since
            the last one reaches half that snapshot's size (at least SNAPSHOT_MIN_LOG_BYTES), so a
            snapshot costs about what the log it replaces costs, whatever the size of the state.
    """

    def __init__(
        self,
        store: Store,
        region: Region,
        *,
        instance_limit: int | None = None,
        clock: Callable[[], float] = time.time,
        snapshot_every: int = 100_000,
        event_retention: int = 100_000,
        request_retention: int = 100_000,
        max_watchers: int = 1000,
        max_lingering: int | None = None,
        watch_messages_per_second: float = WATCH_MESSAGES_PER_SECOND,
    ) -> None:
        if not watch_messages_per_second > 0:
            raise invalid_input(
                f"watch_messages_per_second must be above 0, got {watch_messages_per_second}.",
                field="watch_messages_per_second",
            )
        self._store = store
        self._initial_region = region
        self._instance_limit = instance_limit
        self._clock = clock
        self._snapshot_every = snapshot_every
        #: Events kept before the newest snapshot, for watchers that resume (older ones are compacted).
        self._event_retention = event_retention
        #: request_id replies kept, newest first: a retry older than that is a new request.
        self._request_retention = request_retention
        #: Concurrent WatchEvents streams at most (each costs a buffer and a share of every publish).
        self._max_watchers = max_watchers
        #: Every watch message takes a turn, evenly spaced across all watchers.
        self._send_turns = SendTurns(watch_messages_per_second)
        self._lock = asyncio.Lock()
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._committer: asyncio.Task[None] | None = None
        self._last_commit: asyncio.Future[None] | None = None
        #: Set while the state is rebuilt from the store after a failed commit; reads wait for it.
        self._reloading: asyncio.Event | None = None
        #: Told False while the state is rebuilt (and for good if that fails), True when it serves again:
        #: the service's health checking listens, so probes see NOT_SERVING meanwhile.
        self.serving_listeners: list[Callable[[bool], Awaitable[None]]] = []
        #: Committed events, oldest first, with their sizes, that live watchers read from (bounded by
        #: WATCH_BACKLOG and WATCH_BUFFER_BYTES); ``_published`` is replaced on every publish, so a wait
        #: covers exactly one generation.
        self._recent_events: list[EventRecord] = []
        self._recent_sizes: collections.deque[int] = collections.deque()
        self._recent_bytes = 0
        #: The last committed (and published) sequence and revision of each scale set; ``sequence`` and
        #: ``revisions`` run ahead of them by what is in flight.
        self._published_sequence = 0
        self._committed: dict[str, int] = {}
        #: (scale_set, first position) -> a full chunk of stored events; LRU, bounded by bytes.
        self._replay_cache: collections.OrderedDict[tuple[str, int], list[EventRecord]] = (
            collections.OrderedDict()
        )
        self._replay_bytes = 0
        #: (scale_set, first position) -> the read of that chunk under way: (the published sequence when it
        #: started, its result), awaited by every watcher that wants the chunk meanwhile.
        self._replay_reads: dict[tuple[str, int], _Read] = {}
        self._published = asyncio.Event()
        self._watchers = 0
        #: Streams let go as too slow whose calls are still open (held by the service's streams).
        self.lingering = LingeringStreams(max_lingering or LingeringStreams.limit_for(max_watchers))
        #: request_id -> (method, fingerprint, the reply's future) of changes applied but not yet committed.
        self._inflight: dict[str, tuple[str, str, asyncio.Future[bytes]]] = {}
        self._recent: dict[str, RequestRecord] = {}
        self._snapshot_task: asyncio.Task[None] | None = None
        self.controller: Controller
        self.revisions: dict[str, int] = {}
        self.region_revision = 0
        self.sequence = 0
        self._snapshot_sequence = 0
        #: Bytes of events logged since the last snapshot, and the stored snapshot's size (its document
        #: and every part).
        self._log_bytes = 0
        self._snapshot_bytes = 0
        #: The stored size of each scale set's snapshot part, and the scale sets whose changes a failed
        #: snapshot did not store (the next one writes them).
        self._part_bytes: dict[str, int] = {}
        self._unsaved: set[str] = set()
        self.healthy = True
        #: Policy steps that raised in this server's rounds (not in replays of them), and rounds of a scale
        #: set that failed outside its steps (see :meth:`advance`), since start.
        self.policy_failures = 0
        #: The time of the change being applied (live: the clock; replay: the logged time).
        self.now = 0.0

    # ----- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._committer = asyncio.create_task(self._commit_loop(), name="scaleset-group-commit")

    def check(self) -> dict[str, int]:
        """Rebuilds the state from the store without serving it (``scaleset db check``): the store's own
        integrity check, then the newest snapshot and every event after it replayed. Raises on damage."""
        self._store.check()
        self._load()
        return {
            "scale_sets": len(self.controller.scale_set_names()),
            "sequence": self.sequence,
            "instances": sum(self.controller.capacity(n) for n in self.controller.scale_set_names()),
        }

    def _load(self) -> None:
        limit = self._store.get_meta("instance_limit")
        if limit is None:
            self._store.set_meta("instance_limit", json.dumps(self._instance_limit))
        elif json.loads(limit) != self._instance_limit:
            log.warning(
                "instance_limit %s differs from the stored %s; using the stored one",
                self._instance_limit,
                limit,
            )
            self._instance_limit = json.loads(limit)
        stored_region = self._store.get_meta("initial_region")
        if stored_region is None:
            self._store.set_meta("initial_region", json.dumps(self._initial_region.to_dict()))
            initial = self._initial_region
        else:
            initial = Region.from_dict(json.loads(stored_region))
        snapshot, events = self._store.load()
        self._unsaved = set()
        self._part_bytes = {}
        if snapshot is not None:
            state = snapshot.state
            if "engine" in state:  # a whole-state snapshot (before parts): the next one writes every part
                self.controller = Controller.from_state(state["engine"], instance_limit=self._instance_limit)
            else:
                self.controller = self._restore(state["controller"], snapshot.parts)
                # A document that still holds scale sets' policy state (as versions before per-set parts
                # wrote it): the next snapshot writes those sets' parts with it.
                held = PolicyRunner.scale_sets_in(state["controller"].get("policies", {}))
                self._unsaved.update(held & set(self.controller.scale_set_names()))
            self.revisions = dict(state["revisions"])
            self.region_revision = state["region_revision"]
            self.sequence = self._snapshot_sequence = snapshot.sequence
        else:
            self.controller = Controller(initial, instance_limit=self._instance_limit)
            self.revisions, self.region_revision, self.sequence = {}, 0, 0
        for event in events:
            self.now = event.time_ms / 1000
            try:
                self.controller.execute(decode(event.command), self.now)
            except Exception as exc:
                raise RuntimeError(
                    f"the stored log cannot be replayed at sequence {event.sequence} ({event.type}): {exc}"
                ) from exc
            if event.scale_set:
                self._unsaved.add(event.scale_set)  # changed since the snapshot: the next one writes it
            self._count(event)
        self._published_sequence = self.sequence  # everything loaded is committed
        self._committed = dict(self.revisions)
        log.info("loaded state at sequence %d (%d events replayed)", self.sequence, len(events))

    def _restore(self, state: dict[str, Any], parts: Mapping[str, bytes | None]) -> Controller:
        """The controller of a snapshot stored in parts: the document, with each scale set's part (its
        instances and its policies' state)."""
        controller = Controller.from_state(state, instance_limit=self._instance_limit)
        for name, data in parts.items():
            try:
                controller.restore_scale_set(decode_part(data or b""))
            except (zlib.error, ValueError, KeyError, ScaleSetError) as exc:
                raise RuntimeError(
                    f"the stored snapshot of scale set '{name}' is damaged ({exc}); restore the database from a "
                    "backup"
                ) from exc
            self._part_bytes[name] = len(data or b"")
        controller.engine.take_changed()  # as stored: nothing to write again
        return controller

    def _count(self, event: EventRecord) -> None:
        self.sequence = event.sequence
        if event.scale_set:
            self.revisions[event.scale_set] = event.revision
        else:
            self.region_revision = event.revision

    async def stop(self) -> None:
        """Commits what is queued, takes a snapshot and closes the store. No change is half-applied when
        it begins (it takes the lock), and none starts after (see :meth:`_check_open`)."""
        async with self._lock:
            self._closing = True
        self._wake.set()
        if self._committer is not None:
            await self._committer
        if self._snapshot_task is not None:
            await self._snapshot_task
        if self.healthy and self.sequence > self._snapshot_sequence:
            await self._snapshot()
        self._published.set()
        await asyncio.to_thread(self._store.close)

    def abandon(self) -> None:
        """Stops without writing anything more (another server owns the store now): what is queued was
        never acknowledged, and fails as unavailable."""
        self._closing = True
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(
                    unavailable("this server lost its database; retry on the server that holds it.")
                )
                p.future.exception()
        self._queue = []
        self._wake.set()
        self._published.set()

    async def run_policies(
        self, interval: float, stop: asyncio.Event, pull: Callable[[], Awaitable[object]] | None = None
    ) -> None:
        """Until ``stop``: every ``interval`` seconds, ``pull`` (the autoscale queries, read from
        Prometheus) and then :meth:`advance`; a failed round is logged and tried again next interval."""
        while not stop.is_set() and not self._closing:
            try:
                if pull is not None:
                    await pull()
                for action in await self.advance():
                    log.info("%s %s: %s", action.scale_set, action.kind, action.reason)
            except Exception:
                log.exception("advancing the time-driven policies failed; retrying next interval")
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass

    # ----- reads --------------------------------------------------------------------------------------

    async def settled(self) -> Controller:
        """The engine, once every change applied so far is committed (so a read never shows a change
        that a crash could still lose)."""
        last = self._last_commit
        if last is not None and not last.done():
            await asyncio.shield(last)
        if (reloading := self._reloading) is not None:
            await reloading.wait()
        return self.controller

    async def inspect(self, read: Callable[[Controller], T]) -> T:
        """``read(controller)`` with no change in progress: for state that a change running on a worker
        thread may be rewriting (the lifecycle ledger)."""
        async with self._lock:
            return read(self.controller)

    def time(self) -> float:
        """The server's clock (for reads that ask about "now", such as an autoscale dry run)."""
        return self._clock()

    def _check_open(self) -> None:
        """Refuses a change once the control plane is stopping (its state is being handed over, as a
        cluster's partition is): it would be applied and never committed. Call holding the lock."""
        if self._closing:
            raise unavailable("this server is stopping (or handing the scale set over); retry.")

    async def record(self, command: Command) -> None:
        """Applies and logs a change the server makes itself (metrics it pulled): durable, no reply."""
        async with self._lock:
            self._check_open()
            time_ms = self._tick()
            future = self._queue_event(command, self.controller.execute(command, self.now), time_ms)
        await asyncio.shield(future)

    async def set_execution_mode(self, mode: str) -> None:
        """Makes the stored execution mode ``mode`` (``Immediate`` or ``Executors``), durably; the mode
        is the server's, chosen at start (``serve --executors``)."""
        if self.controller.execution_mode != mode:
            await self.record(SetExecutionMode(mode))
            log.info("execution mode is now %s", mode)

    @property
    def watchers(self) -> int:
        """WatchEvents streams being served now."""
        return self._watchers

    def revision(self, name: str) -> int:
        return self.revisions.get(name, 0)

    def etag(self, name: str) -> str:
        return make_etag(name, self.revision(name))

    def check_etag(self, name: str, etag: str) -> None:
        """Optimistic concurrency: a given etag must be the scale set's current one."""
        if not etag or not name or etag == self.etag(name):
            return
        raise conflict(
            f"etag {etag} is stale: '{name}' is at revision {self.revision(name)} (etag {self.etag(name)}); "
            "read it again and retry.",
            "EtagMismatch",
            metadata={"current_etag": self.etag(name), "current_revision": str(self.revision(name))},
        )

    # ----- mutations ----------------------------------------------------------------------------------

    async def query(self, command: Command, *, etag: str = "", big: bool = False) -> Outcome:
        """Answers a command that changes nothing (a dry run) against the committed state."""
        controller = await self.settled()
        name = command.scale_set
        self.check_etag(name, etag)
        if big:
            result = await asyncio.to_thread(controller.execute, command, self.now)
        else:
            result = controller.execute(command, self.now)
        return Outcome(result, self.revision(name), self.etag(name), self.sequence)

    async def mutate(
        self,
        *,
        method: str,
        command: Command | Callable[[Controller], Command],
        encode: Callable[[Outcome], Encodable],
        request_id: str = "",
        payload: bytes = b"",
        etag: str = "",
        big: bool = False,
    ) -> Encodable | bytes:
        """Applies ``command`` durably and returns its reply, or the cached reply bytes of an earlier
        request with the same ``request_id``. ``big`` runs the engine call on a worker thread.
        ``command`` may be a function of the controller, evaluated under the lock (for read-modify-write
        changes such as masked updates)."""
        if not self.healthy:
            raise unavailable("the store failed and the state could not be reloaded; restart the server.")
        fp = fingerprint(method, payload)
        if request_id:
            cached = await self._cached_reply(request_id, method, fp)
            if cached is not None:
                return cached
        async with self._lock:
            self._check_open()
            if request_id and (earlier := self._recent.get(request_id)) is not None:
                # Committed while we looked in the store.
                self._check_same_request(earlier, request_id, method, fp)
                return earlier.response
            duplicate = self._inflight.get(request_id) if request_id else None
            if duplicate is None:
                future, reply, request = await self._apply(method, command, encode, request_id, fp, etag, big)
            elif duplicate[:2] != (method, fp):
                # The same id in flight for another request: never answer with that request's reply.
                raise invalid_input(
                    f"request_id {request_id!r} is in use by a different request ({duplicate[0]}); "
                    "use a new request_id for a new request.",
                    code="RequestIdReused",
                    field="request_id",
                )
        if duplicate is not None:
            return await asyncio.shield(duplicate[2])
        try:
            await asyncio.shield(future)
        finally:
            if request_id:
                waiting = self._inflight.pop(request_id)[2]
                if future.done() and future.exception() is None and request is not None:
                    waiting.set_result(request.response)
                elif future.done():
                    waiting.set_exception(unavailable("the change was not committed"))
                    waiting.exception()  # retrieved here: a duplicate request may not be waiting
                else:
                    waiting.cancel()
        return reply

    async def _apply(
        self,
        method: str,
        command: Command | Callable[[Controller], Command],
        encode: Callable[[Outcome], Encodable],
        request_id: str,
        fp: str,
        etag: str,
        big: bool,
    ) -> tuple[asyncio.Future[None], Encodable, RequestRecord | None]:
        """Applies and queues one mutation; the caller holds the lock."""
        if not isinstance(command, Command):
            command = await asyncio.to_thread(command, self.controller) if big else command(self.controller)
        self.check_etag(command.scale_set, etag)
        time_ms = self._tick()
        if big:
            result = await asyncio.to_thread(self.controller.execute, command, self.now)
        else:
            result = self.controller.execute(command, self.now)
        future, outcome, event = self._record(command, result, time_ms, request_id)
        reply = encode(outcome)
        request = (
            RequestRecord(request_id, method, fp, reply.SerializeToString(), self.sequence)
            if request_id
            else None
        )
        self._queue.append(_Pending(event, request, future))
        if request_id:
            self._inflight[request_id] = (method, fp, asyncio.get_running_loop().create_future())
        self._wake.set()
        return future, reply, request

    def _tick(self) -> int:
        """The time of the change being applied, in ms; the engine's clock reads it (see ``now``)."""
        time_ms = int(self._clock() * 1000)
        self.now = time_ms / 1000
        return time_ms

    def _record(
        self, command: Command, result: Any, time_ms: int, request_id: str = ""
    ) -> tuple[asyncio.Future[None], Outcome, EventRecord]:
        """Numbers an applied change and makes its event; the caller queues it (holding the lock)."""
        scale_set = command.scale_set
        self.sequence += 1
        if scale_set:
            revision = self.revisions.get(scale_set, 0) + 1
            self.revisions[scale_set] = revision
        else:
            self.region_revision += 1
            revision = self.region_revision
        if scale_set:  # its part (instances or policies' state) changed: the next snapshot writes it
            self._unsaved.add(scale_set)
        event = EventRecord.of(
            sequence=self.sequence,
            scale_set=scale_set,
            revision=revision,
            type=command.event(result),
            command=command.logged(result).encode(),
            # The audit trail: who, what (the command), and the request_id it came with.
            summary={
                **command.describe(result),
                "actor": current_actor.get() or "scaleset (its own policies)",
                **({"request_id": request_id} if request_id else {}),
            },
            time_ms=time_ms,
        )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last_commit = future
        return future, Outcome(result, revision, make_etag(scale_set, revision), self.sequence), event

    async def advance(self) -> list[Action]:
        """Advances every scale set's time-driven policies to the control plane's clock; each scale set
        that changed gets one durable event (replayed as the same ``advance`` at the same time)."""
        done: list[Action] = []
        futures = []
        for name in self.controller.scale_set_names():
            await asyncio.sleep(0)  # one scale set at a time: requests (and health checks) go in between
            async with self._lock:
                if self._closing:
                    break  # stopping: the next owner (or the next start) advances from here
                time_ms = self._tick()
                command = Advance(name)
                policies = self.controller.policies
                failed = policies.failed_steps
                try:
                    actions = self.controller.execute(command, self.now)
                except NotFoundError:
                    continue  # deleted since the list was taken
                except Exception:
                    # A failure outside the policies' steps (each step's own is caught, logged and counted
                    # by the runner): the other scale sets still go on. Logged, counted, tried next round.
                    self.policy_failures += 1
                    log.exception("advancing the policies of '%s' failed; trying again next round", name)
                    continue
                finally:
                    self.policy_failures += policies.failed_steps - failed
                if not actions:
                    continue
                futures.append(self._queue_event(command, actions, time_ms))
                done += actions
        for f in futures:
            await asyncio.shield(f)
        return done

    def _queue_event(self, command: Command, result: Any, time_ms: int) -> asyncio.Future[None]:
        """Logs a change the server made itself (no request, no reply); the caller holds the lock."""
        future, _, event = self._record(command, result, time_ms)
        self._queue.append(_Pending(event, None, future))
        self._wake.set()
        return future

    @staticmethod
    def _check_same_request(record: RequestRecord, request_id: str, method: str, fp: str) -> None:
        if record.method != method or record.fingerprint != fp:
            raise invalid_input(
                f"request_id {request_id!r} was already used for a different request ({record.method}); "
                "use a new request_id for a new request.",
                code="RequestIdReused",
            )

    async def _cached_reply(self, request_id: str, method: str, fp: str) -> bytes | None:
        record = self._recent.get(request_id) or await asyncio.to_thread(
            self._store.lookup_request, request_id
        )
        if record is None:
            return None
        self._check_same_request(record, request_id, method, fp)
        return record.response

    # ----- group commit -------------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if batch:
                try:
                    sizes = await asyncio.to_thread(
                        self._store.append,
                        [p.event for p in batch],
                        [p.request for p in batch if p.request is not None],
                    )
                except Exception as exc:
                    log.exception(
                        "commit of %d events failed; rolling the engine back to the store", len(batch)
                    )
                    await self._fail_and_reload(batch, exc)
                else:
                    for p in batch:
                        p.future.set_result(None)
                        if p.request is not None:
                            self._remember(p.request)
                    self._publish([p.event for p in batch], sizes)
                    self._log_bytes += sum(sizes)
                    if self._snapshot_task is None and (
                        self.sequence - self._snapshot_sequence >= self._snapshot_every
                        or self._log_bytes >= max(SNAPSHOT_MIN_LOG_BYTES, self._snapshot_bytes // 2)
                    ):
                        self._snapshot_task = asyncio.create_task(self._snapshot_soon())
            if self._closing and not self._queue:
                return

    async def _fail_and_reload(self, batch: list[_Pending], exc: Exception) -> None:
        async with self._lock:
            # Reads wait until the state is rebuilt: none may see the changes that were not committed.
            reloading = self._reloading = asyncio.Event()
            await self._tell_serving(False)
            failed = batch + self._queue
            self._queue = []
            for p in failed:
                if not p.future.done():
                    p.future.set_exception(unavailable(f"the change was not committed: {exc}"))
                    p.future.exception()  # mark retrieved: the waiter may have gone
            try:
                await asyncio.to_thread(self._load)
            except Exception:
                log.exception("reloading the state from the store failed; refusing further changes")
                self.healthy = False
            else:
                await self._tell_serving(True)
            finally:
                self._reloading = None
                reloading.set()

    async def _tell_serving(self, serving: bool) -> None:
        for listener in self.serving_listeners:
            await listener(serving)

    def _remember(self, record: RequestRecord) -> None:
        self._recent[record.request_id] = record
        if len(self._recent) > 10_000:
            del self._recent[next(iter(self._recent))]

    def _publish(self, events: list[EventRecord], sizes: list[int]) -> None:
        """O(events), whatever the number of watchers: they read the shared buffer when woken."""
        self._recent_events.extend(events)
        for e in events:
            self._published_sequence = e.sequence
            if e.scale_set:
                self._committed[e.scale_set] = e.revision
        self._recent_sizes.extend(sizes)
        self._recent_bytes += sum(sizes)
        drop = 0
        while len(self._recent_sizes) > 1 and (
            len(self._recent_sizes) > WATCH_BACKLOG or self._recent_bytes > WATCH_BUFFER_BYTES
        ):
            self._recent_bytes -= self._recent_sizes.popleft()
            drop += 1
        if drop:
            del self._recent_events[:drop]
        woken, self._published = self._published, asyncio.Event()
        woken.set()

    def _events_since(self, sequence: int) -> list[EventRecord] | None:
        """Published events after ``sequence``; None when the buffer no longer reaches back that far."""
        recent = self._recent_events
        if not recent or sequence >= recent[-1].sequence:
            return []
        if sequence < recent[0].sequence - 1:
            return None
        return recent[bisect.bisect_right(recent, sequence, key=lambda e: e.sequence) :]

    # ----- snapshots ----------------------------------------------------------------------------------

    async def _snapshot_soon(self) -> None:
        try:
            await self._snapshot()
        finally:
            self._snapshot_task = None

    async def _snapshot(self) -> None:
        """Stores the state: a document (region, global policy state, revisions) and a part for each scale
        set changed since the last snapshot (its instances, encoded by the core under the lock: a copy, a
        few bytes per instance; and its policies' state), compressed outside the lock. A scale set
        changes only by a logged command, so the sets named by events since the last snapshot, with
        those the engine reports, are every set whose part is out of date."""
        async with self._lock:
            sequence = self.sequence
            state = {
                "controller": self.controller.export_state(scale_sets=False),
                "revisions": dict(self.revisions),
                "region_revision": self.region_revision,
            }
            engine = self.controller.engine
            self._unsaved.update(engine.take_changed())
            changed = sorted(self._unsaved)
            live = set(engine.scale_set_names())
            exported = {
                name: self.controller.export_scale_set(name) if name in live else None for name in changed
            }
            last = self._last_commit
        if last is not None and not last.done():
            await asyncio.shield(last)
        logged = self._log_bytes
        parts = await asyncio.to_thread(
            lambda: {name: None if e is None else encode_part(e) for name, e in exported.items()}
        )
        document = await asyncio.to_thread(self._store.save_snapshot, Snapshot(sequence, state, parts))
        self._unsaved.difference_update(changed)
        for name, data in parts.items():
            if data is None:
                self._part_bytes.pop(name, None)
            else:
                self._part_bytes[name] = len(data)
        self._snapshot_bytes = document + sum(self._part_bytes.values())
        self._snapshot_sequence = sequence
        self._log_bytes -= logged  # what was logged while the snapshot was written still counts
        # Bounded history: what the snapshot holds no longer needs its events, beyond the retention
        # that resuming watchers use; request_id replies are kept for the last N requests.
        await asyncio.to_thread(
            self._store.compact,
            sequence - self._event_retention,
            min(sequence, self.sequence - self._request_retention),
        )
        log.info("snapshot at sequence %d", sequence)

    # ----- watching -----------------------------------------------------------------------------------

    async def _check_retained(self, scale_set: str, after: int) -> None:
        """A watch may resume only where the stored events still reach; older positions were compacted.
        Positions are compared with what is committed (changes in flight are not in the store yet)."""
        current = self._committed.get(scale_set, 0) if scale_set else self._published_sequence
        if after >= current:
            return
        first = await asyncio.to_thread(self._store.first_retained, scale_set or None)
        if first is None or after < first - 1:
            raise conflict(
                f"events after {after} were compacted (the oldest kept is {first}); read the current state, "
                f"then watch from {'its revision' if scale_set else 'the current sequence'} ({current}).",
                "EventsCompacted",
                metadata={"oldest_retained": str(first or current), "current": str(current)},
            )

    async def _stored_events(self, scale_set: str, after: int, cursor: int) -> list[EventRecord]:
        """Stored events after position ``after`` (a revision of ``scale_set``, or a sequence), up to the
        end of the aligned chunk that holds ``after + 1``, as the store holds them once ``cursor`` (a
        published sequence) is. Chunks are shared between watchers, so many watchers replaying the same
        history read and decode it once: full chunks from the cache, and a read under way by any watcher
        whose read started at or after ``cursor`` (1,000 watchers arriving together wait for one read,
        not a thousand)."""
        start = after // REPLAY_CHUNK * REPLAY_CHUNK
        key = (scale_set, start)
        chunk = self._replay_cache.get(key)
        if chunk is not None:
            self._replay_cache.move_to_end(key)
        else:
            pending = self._replay_reads.get(key)
            if pending is None or pending[0] < cursor:
                read = asyncio.ensure_future(
                    asyncio.to_thread(self._store.events_after, scale_set or None, start, REPLAY_CHUNK)
                )
                pending = self._replay_reads[key] = (self._published_sequence, read)
                read.add_done_callback(functools.partial(self._replay_read_done, key, pending))
            chunk = await asyncio.shield(pending[1])
            if len(chunk) == REPLAY_CHUNK and key not in self._replay_cache:  # complete: the log only grows
                self._replay_cache[key] = chunk
                self._replay_bytes += sum(e.size for e in chunk)
                while len(self._replay_cache) > 1 and self._replay_bytes > REPLAY_CACHE_BYTES:
                    _, dropped = self._replay_cache.popitem(last=False)
                    self._replay_bytes -= sum(e.size for e in dropped)
        if after == start:
            return chunk
        position = (lambda e: e.revision) if scale_set else (lambda e: e.sequence)
        return chunk[bisect.bisect_right(chunk, after, key=position) :]

    def _replay_read_done(self, key: tuple[str, int], pending: _Read, _: object) -> None:
        if self._replay_reads.get(key) is pending:
            del self._replay_reads[key]

    async def watch(self, scale_set: str, after: int) -> AsyncIterator[list[EventRecord]]:
        """Committed events after ``after`` (a revision of ``scale_set``, or a global sequence when
        ``scale_set`` is empty), in batches: history from the store first, then live ones, with no gaps. A watch of
        one scale set ends after its deletion; one of a scale set that does not exist (and has nothing
        after ``after`` to replay) is NOT_FOUND. The checks run here, before the first event is awaited,
        so a caller can answer them (and send its headers) at once."""
        if scale_set and after >= self.revisions.get(scale_set, 0):
            self.controller.get_spec(scale_set)  # NOT_FOUND unless it exists (nothing to replay)
        await self._check_retained(scale_set, after)
        if self._watchers >= self._max_watchers:
            raise error(
                CapacityError,
                f"this server already serves {self._max_watchers} watch streams; retry later or watch through "
                "fewer streams (one stream with an empty scale_set sees every change).",
                "TooManyWatchers",
            )
        if self.lingering.full:
            raise self.lingering.refusal("server")
        return self._follow(scale_set, after)

    async def _follow(self, scale_set: str, after: int) -> AsyncIterator[list[EventRecord]]:
        """The events of a watch, in batches: each stored chunk, then whatever was published since the
        last batch (a watcher busy sending one batch finds the next one bigger, not later)."""

        def key(e: EventRecord) -> int:
            return e.revision if scale_set else e.sequence

        def wanted(events: list[EventRecord], last: int) -> list[EventRecord]:
            if not scale_set and (not events or events[0].sequence > last):
                return events  # every scale set, all new: nothing to filter (the common case, in O(1))
            batch = [e for e in events if (not scale_set or e.scale_set == scale_set) and key(e) > last]
            if scale_set:  # a watch of one scale set ends with its deletion
                ends = next((i for i, e in enumerate(batch) if e.type == "ScaleSetDeleted"), None)
                if ends is not None:
                    del batch[ends + 1 :]
            return batch

        self._watchers += 1
        try:
            last = after
            while not self._closing:
                # Everything published up to here is in the store: read it from there, then follow the
                # shared buffer from this point (duplicates are skipped by position).
                cursor = self._published_sequence
                while stored := await self._stored_events(scale_set, last, cursor):
                    batch = wanted(stored, last)
                    yield batch
                    last = key(batch[-1])
                    if batch[-1].type == "ScaleSetDeleted" and scale_set:
                        return
                while not self._closing:
                    published = self._published
                    live = self._events_since(cursor)
                    if live is None:
                        break  # fell behind the buffer: catch up from the store
                    if not live:
                        await published.wait()
                        # Every watcher's next message takes a turn: WATCH_MESSAGES_PER_SECOND across all
                        # of them, evenly spaced, so a change that wakes 1,000 watchers is sent over two
                        # seconds instead of in one burst that holds up the changes behind it.
                        await self._send_turns.take()
                        continue
                    cursor = live[-1].sequence
                    if batch := wanted(live, last):
                        yield batch
                        last = key(batch[-1])
                        if batch[-1].type == "ScaleSetDeleted" and scale_set:
                            return
                        # Nothing held while this watcher waits for its next turn (a second or two with
                        # 1,000 watchers): batches pinned by every waiting watcher are lists the garbage
                        # collector walks again and again, each walk a pause of the event loop.
                        del batch, live
                        # At most one message per watcher per interval while changes stream: a burst
                        # goes out in fewer messages. Jittered, so watchers do not wake together.
                        await asyncio.sleep(WATCH_INTERVAL_S * random.uniform(0.5, 1.5))
                        await self._send_turns.take()
        finally:
            self._watchers -= 1
