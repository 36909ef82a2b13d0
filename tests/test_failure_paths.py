"""Paths that only run when something goes wrong: a store that cannot commit (a real SQLite "database or
disk is full"), a watcher that falls behind, a client that retries, and the INTERNAL mapping."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from scaleset import Instance, Region
from scaleset.client import Client
from scaleset.errors import InvalidInputError, UnavailableError
from scaleset.service import status_for
from scaleset.testing.server import ServerThread

from tests.conftest import SIZE, flood, flood_until_a_watch_is_taken, wait_until, zonal_spec

REGION = Region(zones=["1", "2", "3"], fault_domains_per_zone=3)
MANY = [Instance(instance_id=1000 + i, zone="1", vm_size=SIZE, name="x" * 200) for i in range(900)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(str(tmp_path / "state.db"), REGION) as s:
        yield s


def disk_full(server: ServerThread, full: bool) -> None:
    """Caps (or uncaps) the database file at its current size, as a full disk would."""
    writer = server.control._store._writer  # type: ignore[attr-defined]
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count = {pages if full else 2**30}")


def test_a_failed_commit_is_not_acknowledged_and_leaves_no_trace(server: ServerThread) -> None:
    with Client(server.target, retries=0) as c:
        c.create_scale_set(zonal_spec(), 3)
        info = c.get_scale_set("web")
        disk_full(server, True)
        with pytest.raises(UnavailableError) as caught:
            c.import_instances("web", MANY, request_id="big-import")
        assert caught.value.code == "StoreUnavailable"
        # The engine was rolled back to the store: nothing of the failed change is visible.
        after = c.get_scale_set("web")
        assert (after.capacity, after.revision) == (3, info.revision)
        disk_full(server, False)
        # The same request, retried, applies exactly once.
        c.import_instances("web", MANY, request_id="big-import")
        c.import_instances("web", MANY, request_id="big-import")
        again = c.get_scale_set("web")
        assert (again.capacity, again.revision) == (3 + len(MANY), info.revision + 1)


def test_health_is_not_serving_while_the_state_is_rebuilt(server: ServerThread) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    seen: list[bool] = []

    async def record(serving: bool) -> None:
        seen.append(serving)

    server.control.serving_listeners.insert(0, record)
    with Client(server.target, retries=0) as c, grpc.insecure_channel(server.target) as channel:
        c.create_scale_set(zonal_spec(), 3)
        disk_full(server, True)
        with pytest.raises(UnavailableError):
            c.import_instances("web", MANY)
        disk_full(server, False)
        c.get_scale_set("web")  # reads wait for the reload
        assert seen == [False, True]  # NOT_SERVING during the reload, SERVING after it
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_the_client_retries_unavailable_with_the_same_request_id(server: ServerThread) -> None:
    with Client(server.target, retries=6) as c:
        c.create_scale_set(zonal_spec(), 3)
        disk_full(server, True)
        # The disk frees up while the client backs off (0.1 s, 0.2 s, 0.4 s, ...).
        timer = threading.Timer(0.25, disk_full, (server, False))
        timer.start()
        c.import_instances("web", MANY)
        timer.join()
        assert c.get_scale_set("web").capacity == 3 + len(MANY)


def test_a_watcher_that_falls_behind_catches_up_from_the_store_without_gaps(server: ServerThread) -> None:
    import scaleset.control as control_module

    control = server.control
    backlog = control_module.WATCH_BACKLOG

    async def watch_slowly() -> list[int]:
        control_module.WATCH_BACKLOG = 5  # a small buffer, so a short burst overflows it
        try:
            stream = await control.watch("", 0)
            seen = [e.sequence for e in await anext(stream)]
            with Client(server.target) as c:
                await asyncio.to_thread(lambda: [c.set_capacity("web", n) for n in range(1, 21)])
            assert len(control._recent_events) == 5  # the shared buffer stays bounded
            while len(seen) < 21:
                seen.extend(e.sequence for e in await anext(stream))
            await stream.aclose()
            return seen
        finally:
            control_module.WATCH_BACKLOG = backlog

    with Client(server.target) as c:
        c.create_scale_set(zonal_spec(), 0)
    assert server.call(watch_slowly()) == list(range(1, 22))


def test_anything_unexpected_is_internal_and_says_nothing_of_its_cause() -> None:
    status = status_for(KeyError("secret detail"))
    assert status.code == grpc.StatusCode.INTERNAL
    assert "secret" not in status.details and "logged" in status.details


def test_errors_carry_the_field_at_fault_across_the_wire(server: ServerThread) -> None:
    with Client(server.target) as c:
        c.create_scale_set(zonal_spec(), 1)
        with pytest.raises(InvalidInputError) as caught:
            c.set_repairs_service_state("web", "Sometimes")
        assert caught.value.field == "state" and caught.value.code == "InvalidParameter"


def test_history_is_bounded_and_a_compacted_watch_position_says_so(tmp_path: Path) -> None:
    from scaleset.errors import ConflictError

    db = str(tmp_path / "state.db")
    options = {"snapshot_every": 5, "event_retention": 3, "request_retention": 2}
    with ServerThread(db, REGION, **options) as server, Client(server.target) as c:
        c.create_scale_set(zonal_spec(), 1)
        for n in range(40):
            c.set_capacity("web", n % 3, request_id=f"r{n}")
        server.call(server.control._snapshot())
        store = server.control._store
        events = list(store.iter_all_events())  # type: ignore[attr-defined]
        assert len(events) <= 5 + 3  # since the last snapshots, plus the retention
        stored = store._reader.execute("SELECT count(*) FROM requests").fetchone()[0]  # type: ignore[attr-defined]
        assert stored <= 5 + 2
        with pytest.raises(ConflictError) as caught:
            next(iter(c.watch("web", after=0)))
        assert caught.value.code == "EventsCompacted" and caught.value.metadata["current"] == "41"
        with pytest.raises(ConflictError):
            next(iter(c.watch("", after=1)))
        recent = next(iter(c.watch("web", after=events[-1].revision - 1)))
        assert recent.revision == events[-1].revision
    with (
        ServerThread(db, REGION, **options) as again,
        Client(again.target) as c,
    ):  # restarts from the snapshot
        assert c.get_scale_set("web").capacity == 39 % 3 and c.get_scale_set("web").revision == 41


def test_a_database_copied_without_its_write_ahead_log_is_refused_not_served_stale(tmp_path: Path) -> None:
    from scaleset.store import EventRecord, SQLiteStore

    live = tmp_path / "live.db"
    store = SQLiteStore(str(live))
    store.append([EventRecord.of(n, "web", n, "CapacitySet", {}, {}, 0) for n in range(1, 4)], [])
    # Copied while the server runs, without live.db-wal: the copy would silently miss the changes.
    stale = tmp_path / "stale.db"
    shutil.copy(live, stale)
    with pytest.raises(UnavailableError) as refused:
        SQLiteStore(str(stale))
    assert refused.value.code == "WriteAheadLogMissing" and "-wal" in str(refused.value)
    assert "scaleset db backup" in str(refused.value)  # the way to copy it that works
    # After a clean close the file alone holds everything, and a copy of it opens.
    store.close()
    assert not Path(f"{live}-wal").exists()
    clean = tmp_path / "clean.db"
    shutil.copy(live, clean)
    copy = SQLiteStore(str(clean))
    assert [e.sequence for e in copy.iter_all_events()] == [1, 2, 3]
    copy.close()


def test_db_backup_copies_a_running_servers_database_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`scaleset db backup` while the server runs: the copy holds every acknowledged change (those still in
    the write-ahead log too), opens on its own, and rebuilds to the server's state; a copy that would
    replace the database itself, or a database in use, is refused."""
    from scaleset.cli import main

    db = tmp_path / "state.db"
    copy = tmp_path / "backup.db"
    with ServerThread(str(db), REGION) as server, Client(server.target) as c:
        c.create_scale_set(zonal_spec(), 2)
        for capacity in (5, 4):
            c.set_capacity("web", capacity)
        assert Path(f"{db}-wal").stat().st_size > 0  # changes the database file alone does not have yet
        assert main(["db", "backup", "--db", str(db), "--to", str(copy)]) == 0
        sequence = server.control.sequence
        assert capsys.readouterr().out.strip().endswith(f"at sequence {sequence}")
        assert main(["db", "backup", "--db", str(db), "--to", str(db)]) == 2
        assert "error [BackupOntoSource]" in capsys.readouterr().err
        assert main(["db", "backup", "--db", str(copy), "--to", str(db)]) == 2
        assert "error [BackupOntoDatabaseInUse]" in capsys.readouterr().err
        for nowhere in (tmp_path / "no such directory" / "backup.db", tmp_path):
            assert main(["db", "backup", "--db", str(db), "--to", str(nowhere)]) == 2
            assert "error [BackupDestinationInvalid]" in capsys.readouterr().err
        c.set_capacity("web", 9)  # after the backup: not in it
    assert not Path(f"{copy}-wal").exists()
    assert main(["db", "check", "--db", str(copy)]) == 0
    assert f"1 scale sets, 4 instances, state rebuilt at sequence {sequence}" in capsys.readouterr().out
    # Again onto the same file, from the stopped server's database: the newer copy replaces the older.
    assert main(["db", "backup", "--db", str(db), "--to", str(copy)]) == 0
    assert main(["db", "check", "--db", str(copy)]) == 0
    assert "9 instances" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "backup.db",
        "backup.db.lock",
        "state.db",
        "state.db.lock",
    ]
    assert main(["db", "backup", "--store", "postgresql://localhost/x", "--to", str(copy)]) == 2
    assert "pg_dump" in capsys.readouterr().err


def test_a_scale_sets_failing_policy_step_does_not_hold_back_the_others(tmp_path: Path) -> None:
    """A policy step that raises for one scale set is logged and counted (`scaleset_policy_failures_total`),
    and the round goes on to the scale sets after it (it ended there, every round, so one scale set's repair
    in a zone that was down stopped every later set's autoscale)."""
    from prometheus_client import generate_latest
    from scaleset import AutoscaleCapacity, AutoscaleProfile, AutoscaleSetting

    with ServerThread(str(tmp_path / "state.db"), REGION) as server, Client(server.target) as c:
        for name in ("a", "b"):
            c.create_scale_set(dataclasses.replace(zonal_spec(), name=name), 1)
            c.set_autoscale_setting(
                name, AutoscaleSetting([AutoscaleProfile("default", AutoscaleCapacity(2, 4, 2))])
            )
        policies = server.control.controller.policies
        advance = policies.advance

        def fails_for_a(engine: Any, now: float, name: str | None = None) -> Any:
            if name == "a":
                raise RuntimeError("a policy step failed")
            return advance(engine, now, name)

        policies.advance = fails_for_a  # type: ignore[method-assign]
        actions = server.call(server.control.advance())
        assert {a.scale_set for a in actions} == {"b"}
        assert (c.get_scale_set("a").capacity, c.get_scale_set("b").capacity) == (1, 2)
        assert server.control.policy_failures == 1
        assert "scaleset_policy_failures_total 1.0" in generate_latest(server.metrics.registry).decode()


def test_a_failing_policy_step_holds_back_no_other_policy_and_replays_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A policy step that raises (here a's repairs) does nothing more, but the scale set's other policies
    go on (its autoscale) and what they did is logged: a restart replays the round, failing the same way,
    to the same state. The server counts its own rounds' failures, not the replay's."""
    from scaleset import AutoscaleCapacity, AutoscaleProfile, AutoscaleSetting
    from scaleset.policies import repairs

    step = repairs.step

    def fails_for_a(engine: Any, name: str, *args: Any) -> Any:
        if name == "a":
            raise RuntimeError("a repairs step failed")
        return step(engine, name, *args)

    monkeypatch.setattr(repairs, "step", fails_for_a)
    with ServerThread(str(tmp_path / "state.db"), REGION) as server, Client(server.target) as c:
        for name in ("a", "b"):
            c.create_scale_set(dataclasses.replace(zonal_spec(), name=name), 1)
            c.set_autoscale_setting(
                name, AutoscaleSetting([AutoscaleProfile("default", AutoscaleCapacity(2, 4, 2))])
            )
        actions = server.call(server.control.advance())
        assert sorted((a.scale_set, a.kind) for a in actions) == [
            ("a", "AutoscaleScaleOut"),
            ("b", "AutoscaleScaleOut"),
        ]
        assert (c.get_scale_set("a").capacity, c.get_scale_set("b").capacity) == (2, 2)
        assert server.control.policy_failures == 1
        held = server.call(server.control.inspect(_held))
    with ServerThread(str(tmp_path / "state.db"), REGION) as server:
        assert server.call(server.control.inspect(_held)) == held
        assert server.control.policy_failures == 0


def _held(controller: Any) -> str:
    """Everything a controller's engine and policies hold, but the time of the latest change."""
    state = {k: v for k, v in controller.export_state().items() if k != "now"}
    return json.dumps(state, sort_keys=True, default=str)


def test_a_watch_opened_while_a_change_is_being_committed_still_gets_it(tmp_path: Path) -> None:
    """On a fresh server (nothing published yet), a watch that starts between a change's apply and its
    commit must still deliver it: it is neither in the store yet nor in the shared buffer."""
    with ServerThread(str(tmp_path / "state.db"), REGION) as server:
        store = server.control._store
        append, gate = store.append, threading.Event()

        def slow_append(*args: object) -> list[int]:
            gate.wait(10)
            return append(*args)  # type: ignore[arg-type]

        store.append = slow_append  # type: ignore[method-assign]
        creating = threading.Thread(
            target=lambda: Client(server.target).create_scale_set(zonal_spec(), 1), daemon=True
        )
        creating.start()
        while server.control.sequence == 0:  # applied, not committed
            threading.Event().wait(0.01)

        async def first_event() -> str:
            stream = await server.control.watch("", 0)
            gate.set()
            batch = await asyncio.wait_for(anext(stream), 5)
            await stream.aclose()
            return batch[0].type

        assert server.call(first_event()) == "ScaleSetCreated"
        creating.join(10)


def test_a_change_that_arrives_while_the_control_plane_stops_is_refused_not_left_hanging(
    tmp_path: Path,
) -> None:
    """A cluster's front calls a partition's control plane in process, so a change can arrive after the
    partition began its hand-back: it must fail UNAVAILABLE at once (the client retries on the new
    owner), never be applied without a commit and wait forever."""
    from scaleset.commands import CreateScaleSet, SetCapacity
    from scaleset.control import ControlPlane
    from scaleset.store import SQLiteStore

    async def scenario() -> tuple[str, int]:
        control = ControlPlane(SQLiteStore(str(tmp_path / "state.db")), REGION)
        await control.start()
        await control.mutate(
            method="CreateScaleSet", command=CreateScaleSet(zonal_spec(), 1), encode=lambda o: o
        )
        await control.stop()
        try:
            await asyncio.wait_for(
                control.mutate(method="SetCapacity", command=SetCapacity("web", 3), encode=lambda o: o), 5
            )
        except UnavailableError as e:
            return type(e).__name__, control.controller.capacity("web")
        return "answered", control.controller.capacity("web")

    assert asyncio.run(scenario()) == ("UnavailableError", 1)  # refused before the engine changed


def test_watch_messages_take_turns_at_the_configured_rate(tmp_path: Path) -> None:
    """Every live watch message takes a turn, turns 1 / watch_messages_per_second apart across all
    watchers: the fan-out's message rate is bounded whatever their number (serve
    --watch-messages-per-second); 0 is refused."""
    from scaleset.control import ControlPlane
    from scaleset.store import SQLiteStore

    store = SQLiteStore(str(tmp_path / "state.db"))
    try:
        with pytest.raises(InvalidInputError) as zero:
            ControlPlane(store, REGION, watch_messages_per_second=0)
        assert zero.value.field == "watch_messages_per_second"

        async def scenario() -> float:
            control = ControlPlane(store, REGION, watch_messages_per_second=50)
            start = asyncio.get_running_loop().time()
            turns = [asyncio.create_task(control._send_turns.take()) for _ in range(10)]
            await asyncio.sleep(0)  # every watcher has asked for its turn
            for turn in turns:
                turn.cancel()
            return control._send_turns.next_turn - start

        next_free = asyncio.run(scenario())
    finally:
        store.close()

    # Ten watchers asking at once get turns 20 ms apart, the next free one 200 ms on (schedule
    # arithmetic on the loop's clock, nothing timed).
    assert next_free == pytest.approx(0.2, abs=0.01)


class _Context:
    """The servicer context WatchEvents needs when it is called directly (not through gRPC)."""

    async def send_initial_metadata(self, metadata: object) -> None:
        pass


def test_a_watcher_waiting_for_its_next_turn_holds_neither_its_events_nor_its_message(tmp_path: Path) -> None:
    """Between its messages a watcher holds nothing of the last one: not the batch of events (a list the
    garbage collector would walk at every collection while 1,000 watchers wait a second or two for their
    turns, each walk a pause of the event loop) and not the message's bytes."""
    import gc

    from scaleset.commands import CreateScaleSet, SetCapacity
    from scaleset.control import ControlPlane
    from scaleset.service import ScaleSetsServicer
    from scaleset.store import SQLiteStore
    from scaleset.v1 import scaleset_pb2 as pb

    store = SQLiteStore(str(tmp_path / "state.db"))

    async def scenario() -> tuple[int, int, int]:
        control = ControlPlane(store, REGION, watch_messages_per_second=1000)
        await control.start()
        servicer = ScaleSetsServicer(control)
        await control.mutate(
            method="CreateScaleSet", command=CreateScaleSet(zonal_spec(), 1), encode=lambda o: o
        )
        streams = [servicer.WatchEvents(pb.WatchEventsRequest(), _Context()) for _ in range(10)]
        for stream in streams:
            await anext(stream)  # the history: the scale set's creation
        waiting = [asyncio.create_task(anext(stream)) for stream in streams]
        await asyncio.sleep(0.01)
        await control.mutate(method="SetCapacity", command=SetCapacity("web", 2), encode=lambda o: o)
        messages = await asyncio.gather(*waiting)
        # Each watcher asks for its next message: it sends the last one on its way, then waits for a turn
        # and a change.
        waiting = [asyncio.create_task(anext(stream)) for stream in streams]
        await asyncio.sleep(0.3)
        assert not any(w.done() for w in waiting)
        event = control._recent_events[-1]
        assert event.type == "CapacitySet"
        batches = sum(
            isinstance(r, list) and r is not control._recent_events for r in gc.get_referrers(event)
        )
        held = sum(r is not messages for r in gc.get_referrers(messages[0]))
        for w in waiting:
            w.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        await control.stop()
        return len(messages), batches, held

    try:
        sent, batches, held = asyncio.run(scenario())
    finally:
        store.close()
    assert sent == 10
    assert batches == 0  # was one list per watcher (the batch it sent, kept while it waited)
    assert held == 0


def test_watchers_replaying_a_shared_batch_each_get_all_of_it(tmp_path: Path) -> None:
    """A large batch of history is encoded once and its messages shared by every watcher replaying it:
    each watcher still gets every event of it (sending must not use up the shared messages)."""
    from scaleset.commands import CreateScaleSet, SetCapacity
    from scaleset.control import ControlPlane
    from scaleset.service import SHARED_BATCH_EVENTS, ScaleSetsServicer
    from scaleset.store import SQLiteStore
    from scaleset.v1 import scaleset_pb2 as pb

    store = SQLiteStore(str(tmp_path / "state.db"))

    async def scenario() -> list[list[int]]:
        control = ControlPlane(store, REGION)
        await control.start()
        servicer = ScaleSetsServicer(control)
        await control.mutate(
            method="CreateScaleSet", command=CreateScaleSet(zonal_spec(), 1), encode=lambda o: o
        )
        for k in range(SHARED_BATCH_EVENTS + 50):
            await control.mutate(
                method="SetCapacity", command=SetCapacity("web", 1 + k % 2), encode=lambda o: o
            )
        seen = []
        for _ in range(3):  # one after another: each replays the same batch of one scale set's history
            stream = servicer.WatchEvents(pb.WatchEventsRequest(scale_set="web"), _Context())
            message = pb.WatchEventsResponse.FromString(await asyncio.wait_for(anext(stream), 10))
            seen.append([e.revision for e in message.events])
            await stream.aclose()
        await control.stop()
        return seen

    try:
        seen = asyncio.run(scenario())
    finally:
        store.close()
    assert seen == [list(range(1, SHARED_BATCH_EVENTS + 52))] * 3


def test_watchers_replaying_together_share_each_read_of_history(tmp_path: Path) -> None:
    """200 watchers replaying the same history at once read each chunk of it from the store once (a read
    under way is awaited by every watcher that wants that chunk), and each gets every event once, in order.
    Before, each of them read every chunk itself: 1,000 watchers replaying 5,000 events held a server at 42
    changes a second for two minutes."""
    from scaleset.commands import CreateScaleSet, SetCapacity
    from scaleset.control import REPLAY_CHUNK, ControlPlane
    from scaleset.store import SQLiteStore

    store = SQLiteStore(str(tmp_path / "state.db"))
    reads: list[tuple[object, ...]] = []
    read = store.events_after

    def counted(*args: object) -> object:
        reads.append(args)
        return read(*args)  # type: ignore[arg-type]

    store.events_after = counted  # type: ignore[method-assign]

    async def scenario() -> tuple[int, list[list[int]]]:
        control = ControlPlane(store, REGION)
        await control.start()
        await control.mutate(
            method="CreateScaleSet", command=CreateScaleSet(zonal_spec(), 1), encode=lambda o: o
        )
        for start in range(0, 2 * REPLAY_CHUNK + 100, 100):
            await asyncio.gather(
                *(
                    control.mutate(
                        method="SetCapacity", command=SetCapacity("web", 1 + k % 2), encode=lambda o: o
                    )
                    for k in range(start, start + 100)
                )
            )
        last = control.sequence
        reads.clear()

        async def watcher() -> list[int]:
            got: list[int] = []
            stream = await control.watch("", 0)
            async for batch in stream:
                got.extend(e.sequence for e in batch)
                if got[-1] >= last:
                    break
            await stream.aclose()  # type: ignore[attr-defined]
            return got

        seen = await asyncio.gather(*(watcher() for _ in range(200)))
        await control.stop()
        return last, seen

    last, seen = asyncio.run(scenario())
    assert last > 2 * REPLAY_CHUNK
    assert all(got == list(range(1, last + 1)) for got in seen)
    assert len(reads) <= 2 * (last // REPLAY_CHUNK + 1), reads  # one read per chunk, give or take the tail


def _slow_consumers(server: ServerThread) -> float:
    return (
        server.metrics.registry.get_sample_value("scaleset_slow_consumers_total", {"method": "WatchEvents"})
        or 0.0
    )


def test_a_stream_that_grpc_drops_in_the_middle_ends_quietly(tmp_path: Path) -> None:
    """gRPC closes a stream's handler in the middle of a call it drops (the server stopping while a watch
    or a lease stream waits for its next item): the handler ends without an error, and the stream's
    generator is still closed (its finally runs: a watch frees its slot). Before, closing the running
    generator raised RuntimeError and the handler then sent a status on the dropped call, which failed
    (an unraisable exception, which failed a benchmark run in fresh-ci)."""
    from scaleset.control import ControlPlane
    from scaleset.service import Metrics, _Interceptor
    from scaleset.store import SQLiteStore

    closed = []

    async def waits_for_ever(request: object, context: object) -> AsyncIterator[bytes]:
        try:
            await asyncio.Event().wait()
            yield b""
        finally:
            closed.append(True)

    async def scenario(store: SQLiteStore) -> None:
        control = ControlPlane(store, REGION)
        handler = _Interceptor(Metrics(control), control.lingering)._wrap(
            grpc.unary_stream_rpc_method_handler(waits_for_ever), "WatchEvents"
        )
        call = handler.unary_stream(object(), None)
        call.send(None)  # running: waiting for the generator's first item
        call.close()  # as gRPC does with a call it drops: must not raise

    store = SQLiteStore(str(tmp_path / "state.db"))
    try:
        asyncio.run(scenario(store))
    finally:
        store.close()
    assert closed == [True]


def test_a_watcher_that_stops_reading_is_let_go_and_its_slot_freed(tmp_path: Path) -> None:
    """A client that takes no message for --stream-send-timeout gets every message written before, then
    RESOURCE_EXHAUSTED SlowConsumer; its watch slot is free for another watcher."""
    from scaleset.errors import CapacityError
    from scaleset.v1 import scaleset_pb2 as pb
    from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

    with ServerThread(
        str(tmp_path / "state.db"), REGION, max_watchers=1, stream_send_timeout=0.5, instance_limit=10_000
    ) as server:
        with Client(server.target) as c, grpc.insecure_channel(server.target) as channel:
            c.create_scale_set(zonal_spec(), 0)
            stalled = pb_grpc.ScaleSetsStub(channel).WatchEvents(pb.WatchEventsRequest())
            received = [e.sequence for e in next(stalled).events]
            with pytest.raises(CapacityError) as refused:  # the only slot is taken
                next(iter(c.watch()))
            assert refused.value.code == "TooManyWatchers"
            # Changes until the stalled watcher is let go: then its slot is free and a new watch accepted.
            flood_until_a_watch_is_taken(c, c)
            with pytest.raises(grpc.RpcError) as ended:
                for message in stalled:
                    received.extend(e.sequence for e in message.events)
        assert _slow_consumers(server) == 1
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "took no message from this stream for 0.5 s" in ended.value.details()
    # What was written before the status arrives, in order and whole: the watch resumes after its last.
    assert received == list(range(1, len(received) + 1)) and len(received) > 1


def test_streams_let_go_that_their_client_never_reads_are_bounded_until_it_disconnects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that takes nothing at all, not even into its gRPC library's buffers (BDP probing off, so
    its windows stay at 64 KB), keeps the calls of its streams let go open: their status waits behind the
    message queued for each. Their watch slots are free, but they are counted
    (`scaleset_lingering_streams`), and while there are as many as allowed new watches are refused, until
    the client disconnects, and then end quietly (before, gRPC logged an ERROR with a traceback for each,
    failing to send a status to a client that had gone). Before, nothing bounded them: such a client could
    hold open calls up to the server's limit on concurrent RPCs, after which the server refused every
    call."""
    from scaleset.errors import CapacityError
    from scaleset.v1 import scaleset_pb2 as pb
    from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

    def lingering(server: ServerThread) -> float | None:
        return server.metrics.registry.get_sample_value("scaleset_lingering_streams")

    with ServerThread(
        str(tmp_path / "state.db"),
        REGION,
        max_watchers=3,
        max_lingering=2,
        stream_send_timeout=0.5,
        instance_limit=10_000,
    ) as server:
        with Client(server.target) as c:
            c.create_scale_set(zonal_spec(), 0)
            stalled = grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)])
            calls = [pb_grpc.ScaleSetsStub(stalled).WatchEvents(pb.WatchEventsRequest()) for _ in range(2)]
            for call in calls:
                next(call)
            for _ in range(30):
                if _slow_consumers(server) == 2:
                    break
                flood(c, 25)
                time.sleep(0.6)
            assert _slow_consumers(server) == 2 and server.control.watchers == 0
            assert lingering(server) == 2
            with pytest.raises(CapacityError) as refused:
                next(iter(c.watch()))
            assert refused.value.code == "TooManyWatchers" and "2 streams let go as too slow" in str(
                refused.value
            )
            stalled.close()
            wait_until(lambda: lingering(server) == 0, what="the stalled client's calls to end")
            assert next(iter(c.watch())).sequence == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("flavour", ["Client", "AsyncClient"])
def test_the_client_resumes_a_watch_it_read_too_slowly_after_its_last_event(
    tmp_path: Path, flavour: str
) -> None:
    """Client.watch (and AsyncClient.watch), read too slowly, is let go by the server and opens the watch
    again after the last event it received: the reader sees every event once, in order."""
    import time

    from scaleset.client import AsyncClient

    def flood_until_let_go(server: ServerThread, c: Client) -> int:
        changes = 0
        while not _slow_consumers(server):
            assert changes < 1500, "the slow reader was never let go"
            flood(c, 25)
            changes += 50
            time.sleep(0.6)
        return changes

    async def read_slowly(server: ServerThread, c: Client) -> list[int]:
        async with AsyncClient(server.target) as reader:
            watch = reader.watch()
            seen = [(await anext(watch)).sequence]
            last = 1 + await asyncio.to_thread(flood_until_let_go, server, c)
            while seen[-1] < last:
                seen.append((await anext(watch)).sequence)
            await watch.aclose()
        return seen

    with ServerThread(
        str(tmp_path / "state.db"), REGION, stream_send_timeout=0.5, instance_limit=10_000
    ) as server:
        with Client(server.target) as c:
            c.create_scale_set(zonal_spec(), 0)
            if flavour == "AsyncClient":
                seen = asyncio.run(read_slowly(server, c))
            else:
                watch = c.watch()
                seen = [next(watch).sequence]
                last = 1 + flood_until_let_go(server, c)
                while seen[-1] < last:
                    seen.append(next(watch).sequence)
                watch.close()
    assert seen == list(range(1, seen[-1] + 1)) and len(seen) > 100
