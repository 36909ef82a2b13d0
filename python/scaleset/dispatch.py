"""Hands the pending operations of the lifecycle ledger to executors, under leases.

Leases are the server's memory, never logged: an operation is leased to one executor stream at a time;
a report of progress renews the lease; a lease that lapses (the executor died, hung or lost its
connection) makes the operation available again, to any executor. After a restart every pending
operation is simply available again, so an executor must carry out an operation idempotently (create
an instance that already exists: success; delete one that does not: success), keyed by the
operation's instance name. Outcomes are durable commands (:class:`~scaleset.commands.ReportOperation`);
the ledger applies each one once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from scaleset.control import ControlPlane
from scaleset.controller import Controller
from scaleset.errors import invalid_input, unavailable
from scaleset.policies.lifecycle import Operation, ScheduledEvent

__all__ = [
    "DEFAULT_IN_FLIGHT",
    "DEFAULT_LEASE_S",
    "MAX_IN_FLIGHT",
    "MAX_STREAMS",
    "Dispatcher",
]

DEFAULT_IN_FLIGHT = 16
MAX_IN_FLIGHT = 1000
DEFAULT_LEASE_S = 60
LEASE_RANGE_S = (5, 3600)
#: Executor streams one server holds at once.
MAX_STREAMS = 64
#: How often a stream looks for new work and lapsed leases.
POLL_S = 0.05


@dataclass(slots=True)
class Lease:
    stream: int
    executor_id: str
    expires: float
    seconds: float


class Dispatcher:
    """Leases of one control plane's pending operations to executor streams."""

    def __init__(self, control: ControlPlane) -> None:
        self._control = control
        self._leases: dict[int, Lease] = {}
        self._streams = 0
        self._next_stream = 1
        #: One event per open stream, set when an operation is released: a stream with room leases more
        #: at once instead of at its next poll.
        self._wakes: set[asyncio.Event] = set()

    def _now(self) -> float:
        return self._control.time()

    async def stream(
        self, executor_id: str, zones: Sequence[str], max_in_flight: int, lease_seconds: int
    ) -> AsyncIterator[tuple[list[Operation], list[int], list[ScheduledEvent]]]:
        """Batches of (newly leased operations, cancelled operation ids, newly scheduled evictions) for one
        executor stream, until the caller stops iterating. Leases it holds stay until they lapse (the executor may still report)."""
        if not executor_id or len(executor_id) > 128:
            raise invalid_input("executor_id must be 1 to 128 characters.", field="executor_id")
        in_flight = max_in_flight or DEFAULT_IN_FLIGHT
        if in_flight > MAX_IN_FLIGHT:
            raise invalid_input(f"max_in_flight may be at most {MAX_IN_FLIGHT}.", field="max_in_flight")
        lease_s = lease_seconds or DEFAULT_LEASE_S
        if not LEASE_RANGE_S[0] <= lease_s <= LEASE_RANGE_S[1]:
            raise invalid_input(
                f"lease_seconds must be between {LEASE_RANGE_S[0]} and {LEASE_RANGE_S[1]}, got {lease_s}.",
                field="lease_seconds",
            )
        if self._streams >= MAX_STREAMS:
            raise unavailable(
                f"this server already serves {MAX_STREAMS} executor streams; try another server or later."
            )
        wanted = {z or None for z in zones} if zones else None
        stream = self._next_stream
        self._next_stream += 1
        self._streams += 1
        mine: set[int] = set()
        announced: set[int] = set()
        wake = asyncio.Event()
        self._wakes.add(wake)
        try:
            while True:
                wake.clear()
                leased, cancelled, events = await self._control.inspect(
                    lambda c: (
                        *self._lease(c, stream, executor_id, wanted, in_flight, lease_s, mine),
                        self._new_events(c, announced),
                    )
                )
                if leased or cancelled or events:
                    yield leased, cancelled, events
                try:
                    await asyncio.wait_for(wake.wait(), POLL_S)
                except TimeoutError:
                    pass
        finally:
            self._wakes.discard(wake)
            self._streams -= 1

    def _lease(
        self,
        controller: Controller,
        stream: int,
        executor_id: str,
        zones: set[str | None] | None,
        in_flight: int,
        lease_s: float,
        mine: set[int],
    ) -> tuple[list[Operation], list[int]]:
        now = self._now()
        pending = controller.policies.lifecycle.operations
        # Gone from the ledger: reported (its lease released) or cancelled (its lease still here).
        gone = [i for i in mine if i not in pending]
        cancelled = sorted(i for i in gone if i in self._leases)
        for i in gone:
            mine.discard(i)
            self._leases.pop(i, None)
        if len(self._leases) > 2 * len(pending) + 1000:  # leases of streams gone, on operations gone
            self._leases = {i: lease for i, lease in self._leases.items() if i in pending}
        for i in [
            i
            for i in mine
            if (lease := self._leases.get(i)) is None or lease.stream != stream or lease.expires <= now
        ]:
            mine.discard(i)  # lapsed: offered to anyone again (this stream included)
        room = in_flight - len(mine)
        leased: list[Operation] = []
        if room <= 0:
            return leased, cancelled
        ledger = controller.policies.lifecycle
        for op in pending.values():
            if op.not_before > now or (zones is not None and op.zone not in zones) or not ledger.ready(op):
                continue
            lease = self._leases.get(op.operation_id)
            if lease is not None and lease.expires > now:
                continue
            self._leases[op.operation_id] = Lease(stream, executor_id, now + lease_s, lease_s)
            mine.add(op.operation_id)
            leased.append(op)
            if len(leased) >= room:
                break
        return leased, cancelled

    @staticmethod
    def _new_events(controller: Controller, announced: set[int]) -> list[ScheduledEvent]:
        events = controller.policies.lifecycle.events
        announced.intersection_update(events)  # forget carried-out events: the set stays bounded
        new = [e for i, e in sorted(events.items()) if i not in announced]
        announced.update(e.event_id for e in new)
        return new

    def renew(self, operation_id: int) -> bool:
        """Extends a lease by its length after a progress report; False if nobody holds it."""
        lease = self._leases.get(operation_id)
        if lease is None:
            return False
        lease.expires = self._now() + lease.seconds
        return True

    def release(self, operation_id: int) -> None:
        """The operation is done (or no longer pending): its stream has room for another."""
        self._leases.pop(operation_id, None)
        for wake in self._wakes:
            wake.set()

    def leased(self) -> int:
        """How many operations are leased now (lapsed leases included until they are taken again)."""
        return len(self._leases)
