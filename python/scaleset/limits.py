"""Bounds on what clients can make a server hold, and their defaults (``scaleset serve`` flags). Nothing
imported: the CLI reads the defaults without loading gRPC."""

#: A server stream (WatchEvents, LeaseOperations) whose client takes no message for this long is ended
#: with RESOURCE_EXHAUSTED `SlowConsumer` (`serve --stream-send-timeout`): gRPC's flow control lets a
#: client hold a few MB unread, then the server's next write waits, and without a bound a client that stops
#: reading would hold its stream (a watch slot, the waiting message) for good.
STREAM_SEND_TIMEOUT_S = 30.0
#: Client connections at once (`serve --max-connections`): gRPC closes any more as they arrive (the client
#: sees UNAVAILABLE) until one ends, so idle connections cannot pile up without bound.
MAX_CONNECTIONS = 4096
