"""Bounds on what clients can make a server hold, and their defaults (``scaleset serve`` flags). Only the
standard library imported: the CLI reads the defaults without loading gRPC."""

import asyncio

#: A server stream (WatchEvents, LeaseOperations) whose client takes no message for this long is ended
#: with RESOURCE_EXHAUSTED `SlowConsumer` (`serve --stream-send-timeout`): gRPC's flow control lets a
#: client hold a few MB unread, then the server's next write waits, and without a bound a client that stops
#: reading would hold its stream (a watch slot, the waiting message) for good.
STREAM_SEND_TIMEOUT_S = 30.0
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
