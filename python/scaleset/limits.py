"""Bounds on what clients can make a server hold, and their defaults (``scaleset serve`` flags). Only the
standard library imported: the CLI reads the defaults without loading gRPC."""

import asyncio
import ctypes
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from scaleset.errors import CapacityError, ScaleSetError, error

log = logging.getLogger(__name__)

#: A server stream (WatchEvents, LeaseOperations) whose client takes no message for this long is ended
#: with RESOURCE_EXHAUSTED `SlowConsumer` (`serve --stream-send-timeout`): gRPC's flow control lets a
#: client hold a few MB unread, then the server's next write waits, and without a bound a client that stops
#: reading would hold its stream (a watch slot, the waiting message) for good.
STREAM_SEND_TIMEOUT_S = 30.0
#: RPCs a server (or a watch proxy) serves at once; more are refused with RESOURCE_EXHAUSTED rather than
#: queued without bound.
MAX_CONCURRENT_RPCS = 2000
#: Of those, how many are kept from watch streams and streams let go as too slow (`LingeringStreams`), for
#: every other call: with every watch slot taken and as many lingering streams as allowed, a server still
#: answers its other calls and health checks.
RPC_HEADROOM = 500
#: Client connections at once (`serve --max-connections`): gRPC closes any more as they arrive (the client
#: sees UNAVAILABLE) until one ends, so idle connections cannot pile up without bound.
MAX_CONNECTIONS = 4096


class SendTurns:
    """Paces the messages of many server streams: each waits for its turn, and turns are ``1 / per_second``
    apart across every stream (immediate while they are fewer than that allows), so waking a thousand
    watchers at once sends their messages evenly over the next seconds instead of in one burst."""

    def __init__(self, per_second: float) -> None:
        self._every = 1 / per_second
        #: The loop time of the next turn.
        self._next = 0.0

    @property
    def next_turn(self) -> float:
        """The loop time of the next free turn."""
        return self._next

    async def take(self) -> None:
        now = asyncio.get_running_loop().time()
        turn = max(now, self._next)
        self._next = turn + self._every
        if turn > now:
            await asyncio.sleep(turn - now)


class LingeringStreams:
    """Server streams let go as too slow (``SlowConsumer``) whose gRPC calls are still open. gRPC ends a
    call only once its client has taken the status, which waits behind the messages already queued for
    it: a client that takes nothing at all, not even into its gRPC library's buffers, keeps the call,
    and the message queued for it, until it reads or disconnects. A stream let go frees its watch slot at
    once, but while ``full`` new watches are refused (before, nothing bounded these calls, and a client
    that never read could hold them up to the server's limit on concurrent RPCs, which then refused every
    call). ``hold`` counts a stream until gRPC finishes its call."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    @staticmethod
    def limit_for(max_watchers: int) -> int:
        """The most a server with ``max_watchers`` watch slots holds: what is left of MAX_CONCURRENT_RPCS
        after those and RPC_HEADROOM (500 with the defaults), and at least 1."""
        return max(1, MAX_CONCURRENT_RPCS - RPC_HEADROOM - max_watchers)

    @property
    def full(self) -> bool:
        return self.count >= self.limit

    def refusal(self, server: str, *, elsewhere: bool = False) -> ScaleSetError:
        """What a new watch gets while ``full``: ``TooManyWatchers``, from this ``server`` ("server",
        "proxy"), pointing to another one when the client has one to go to (``elsewhere``)."""
        return error(
            CapacityError,
            f"this {server} holds {self.count} streams let go as too slow whose clients have not taken their "
            "status (they stay open until those clients read or disconnect); retry later"
            + (f", or through another {server}." if elsewhere else "."),
            "TooManyWatchers",
        )

    def hold(self, context: Any) -> None:
        """Counts the stream of ``context`` (a grpc.aio.ServicerContext) until its call is over."""
        self.count += 1
        context.add_done_callback(self._release)

    def _release(self, _context: Any) -> None:
        self.count -= 1


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost",
        )
    ]  # fmt: skip


class FreedMemory:
    """Gives the memory the process has freed back to the system once enough of it has piled up in the
    allocator (glibc's ``malloc_trim``). A stream whose client stopped reading holds up to a message of
    about 256 KB in gRPC's buffers, and its connection more, until they are let go; glibc keeps what they
    free in its arenas, so a server (or a watch proxy) otherwise stays at the peak that a crowd of stalled
    watchers took it to. ``due`` reads how much the arenas hold free (``mallinfo2``, microseconds) and
    trims when that grew by ``threshold`` bytes from the least it held since the last trim (a trim does
    not lower it: the pages go back, the chunks stay free), so memory freed again after being reused is
    given back too, and a steady state is not trimmed over and over. Where the C library is not glibc
    (2.33 or later) it does nothing."""

    def __init__(self, threshold: int = 16 << 20) -> None:
        self._threshold = threshold
        try:
            libc = ctypes.CDLL(None)
            info = libc.mallinfo2
            info.restype = _MallInfo2
            self._trim: Callable[[int], int] | None = libc.malloc_trim
            self._info: Callable[[], _MallInfo2] | None = info
        except (OSError, AttributeError):
            self._trim = self._info = None
        #: The least the arenas held free since the last trim.
        self._least = 0
        #: Trims run, and the resident memory they gave back (bytes).
        self.trims = 0
        self.returned = 0

    def free_held(self) -> int:
        """Bytes the allocator holds free (0 where it cannot tell)."""
        return int(self._info().fordblks) if self._info is not None else 0

    def due(self) -> bool:
        """Whether enough freed memory piled up since the last trim to give back (call it now and then)."""
        held = self.free_held()
        self._least = min(self._least, held)
        return self._trim is not None and held - self._least >= self._threshold

    def trim(self) -> int:
        """Gives freed memory back to the system; returns the resident bytes that went. It takes the
        allocator's locks for a few milliseconds: call it off the event loop."""
        assert self._trim is not None
        before = _rss_bytes()
        started = time.perf_counter()
        self._trim(0)
        returned = max(0, before - _rss_bytes())
        self._least = self.free_held()
        self.trims += 1
        self.returned += returned
        log.info(
            "gave %.1f MB of freed memory back to the system in %.1f ms",
            returned / 2**20,
            (time.perf_counter() - started) * 1000,
        )
        return returned


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
