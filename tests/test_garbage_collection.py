"""How a serving process collects garbage (scaleset.cli.collect_garbage): objects that pass through the
oldest generation and are freed by their reference counts cause no full collection, while garbage in
reference cycles that makes what the interpreter holds (its memory blocks) grow is collected; each pause is
observed. And memory freed in bulk goes back to the system (scaleset.limits.FreedMemory)."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from scaleset.cli import (
    FULL_COLLECTION_GROWTH,
    FULL_COLLECTION_MIN_GROWTH,
    YOUNG_GC_THRESHOLDS,
    collect_garbage,
)
from scaleset.limits import FreedMemory


class Node:
    __slots__ = ("__weakref__", "other")

    def __init__(self) -> None:
        self.other: object = None


def full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])


def observed(pauses: Histogram, generation: str) -> float:
    return next(
        s.value
        for m in pauses.collect()
        for s in m.samples
        if s.name.endswith("_count") and s.labels["generation"] == generation
    )


def serving(scenario: Callable[[], Awaitable[None]], **options: Any) -> None:
    """Runs ``scenario`` on an event loop beside collect_garbage (checking every 10 ms, with ``options``),
    as in a serving process; checks that the collector restores the interpreter's thresholds as it stops
    (and restores them itself whatever happens)."""
    thresholds = gc.get_threshold()

    async def run() -> None:
        stop = asyncio.Event()
        collector = asyncio.create_task(collect_garbage(stop, interval=0.01, **options))
        try:
            await scenario()
        finally:
            stop.set()
            await collector

    try:
        asyncio.run(run())
        assert gc.get_threshold() == thresholds  # restored when serving stops
    finally:
        gc.set_threshold(*thresholds)


def test_a_full_collection_runs_when_what_is_held_grows_not_for_what_passes_through() -> None:
    pauses = Histogram("pauses", "GC pauses.", ["generation"], registry=CollectorRegistry())

    async def scenario() -> None:
        await asyncio.sleep(0.05)
        assert gc.get_threshold()[:2] == YOUNG_GC_THRESHOLDS
        oldest = len(gc.get_objects(generation=2))
        before = full_collections()

        # Objects that live long enough to reach the oldest generation and are then freed by their
        # reference counts: 40 times as many as it holds moved through it (CPython's own rule collects
        # it each time a quarter as many have), and it has not grown.
        for _ in range(40):
            passing = [[] for _ in range(oldest)]
            gc.collect(1)  # survivors of the young generations move to the oldest
            del passing
            await asyncio.sleep(0.02)
        assert full_collections() == before

        # Garbage in reference cycles (a memory block each), more than the growth that triggers a
        # collection: freed within a few checks.
        held = sys.getallocatedblocks()
        count = int(max(FULL_COLLECTION_MIN_GROWTH, held * FULL_COLLECTION_GROWTH)) + 10_000
        nodes = [Node() for _ in range(count)]
        for a, b in zip(nodes, nodes[1:] + nodes[:1], strict=True):
            a.other = b
        gc.collect(1)
        canary = weakref.ref(nodes[0])
        del nodes, a, b
        for _ in range(200):
            if canary() is None:
                break
            await asyncio.sleep(0.01)
        assert canary() is None, "the cycles were not collected"
        assert full_collections() > before
        assert observed(pauses, "2") >= 1 and observed(pauses, "0") + observed(pauses, "1") >= 1

    serving(scenario, pauses=pauses)


def freed_megabytes(count: int) -> list[bytearray]:
    """Frees ``count`` blocks of 1 MB from glibc's heap, each between two that stay (returned): freed, they
    cannot join each other or the heap's top, which glibc gives back by itself."""
    big = bytearray(4 << 20)
    del big  # freed: glibc's mmap threshold rises past 1 MB, so the blocks below come from its heap
    blocks = [bytearray(1 << 20) for _ in range(2 * count + 1)]
    del blocks[1::2]
    return blocks


def test_memory_freed_in_bulk_goes_back_to_the_system_once_and_again_after_reuse() -> None:
    freed = FreedMemory(threshold=16 << 20)
    assert freed.free_held() > 0  # glibc, as on the Debian machines this runs on
    if freed.due():
        freed.trim()  # what the test process piled up before

    async def trimmed(after: int) -> None:
        for _ in range(300):
            if freed.trims > after:
                return
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        trims, returned = freed.trims, freed.returned
        kept = [bytearray(1 << 20) for _ in range(64)]
        await asyncio.sleep(0.1)
        assert freed.trims == trims  # in use: nothing to give back

        kept += freed_megabytes(64)
        await trimmed(trims)
        assert freed.trims == trims + 1 and freed.returned - returned >= 32 << 20
        await asyncio.sleep(0.1)
        assert freed.trims == trims + 1  # freed memory held steady: not trimmed over and over

        blocks = [bytearray(1 << 20) for _ in range(64)]  # the freed memory used again, then freed again
        await asyncio.sleep(0.1)
        del blocks
        await trimmed(trims + 1)
        assert freed.trims == trims + 2

    serving(scenario, freed=freed)
