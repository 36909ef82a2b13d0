"""One contract, two stores: the embedded SQLite store and the PostgreSQL store (a real server, started
for the session) pass the same tests unchanged, and a server runs on either."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scaleset import Region
from scaleset.client import Client
from scaleset.errors import ConflictError, ScaleSetError, UnavailableError
from scaleset.store import EventRecord, RequestRecord, Snapshot, SQLiteStore, Store
from scaleset.testing.server import ServerThread

from tests.conftest import zonal_spec

REGION = Region(zones=["1", "2", "3"], fault_domains_per_zone=3)


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    return request.getfixturevalue("postgres").create_database()  # type: ignore[no-any-return]


def open_store(location: str) -> Store:
    from scaleset.cli import open_store as opened

    return opened(location)


@pytest.fixture
def store(location: str) -> Iterator[Store]:
    s = open_store(location)
    yield s
    s.close()


def event(sequence: int, scale_set: str = "web", revision: int | None = None) -> EventRecord:
    return EventRecord.of(
        sequence,
        scale_set,
        revision or sequence,
        "CapacitySet",
        {"op": "set_capacity"},
        {"text": f"#{sequence}"},
        1000 * sequence,
    )


def test_appended_events_and_replies_come_back_in_order(store: Store) -> None:
    sizes = store.append(
        [event(1), event(2, "api", 1)], [RequestRecord("r1", "SetCapacity", "f", b"\x00reply", 1)]
    )
    assert len(sizes) == 2 and all(s > 0 for s in sizes)
    store.append([event(3, "web", 2)], [])
    assert [e.sequence for e in store.events_after(None, 0, 10)] == [1, 2, 3]
    assert [e.revision for e in store.events_after("web", 0, 10)] == [1, 2]
    assert [e.sequence for e in store.events_after(None, 1, 1)] == [2]
    got = store.events_after("api", 0, 10)[0]
    assert (got.command, got.summary, got.time_ms) == ({"op": "set_capacity"}, {"text": "#2"}, 2000)
    assert store.lookup_request("r1") == RequestRecord("r1", "SetCapacity", "f", b"\x00reply", 1)
    assert store.lookup_request("nope") is None


def test_a_batch_is_all_or_nothing_and_no_position_is_appended_twice(store: Store) -> None:
    store.append([event(1)], [])
    with pytest.raises(Exception):  # noqa: B017 - each store raises its driver's integrity error
        store.append([event(2), event(1, "other")], [RequestRecord("r2", "m", "f", b"", 2)])
    assert [e.sequence for e in store.events_after(None, 0, 10)] == [1]
    assert store.lookup_request("r2") is None
    with pytest.raises(Exception):  # noqa: B017 - the same (scale set, revision) twice
        store.append([event(2, "web", 1)], [])
    store.append([event(2)], [])  # the store is still usable


def test_snapshots_load_with_the_events_after_them_and_compaction_keeps_the_rest(store: Store) -> None:
    store.append(
        [event(n) for n in range(1, 6)], [RequestRecord(f"r{n}", "m", "f", b"", n) for n in range(1, 6)]
    )
    store.save_snapshot(Snapshot(3, {"engine": {"x": 1}}))
    snapshot, events = store.load()
    assert snapshot == Snapshot(3, {"engine": {"x": 1}}) and [e.sequence for e in events] == [4, 5]
    store.compact(2, 3)
    assert store.first_retained(None) == 3 and store.first_retained("web") == 3
    assert store.lookup_request("r3") is None and store.lookup_request("r4") is not None
    store.check()


def test_a_snapshot_writes_only_the_parts_it_names_and_all_of_them_or_none(store: Store) -> None:
    store.save_snapshot(Snapshot(1, {"controller": {}}, {"a": b"A1", "b": b"B1"}))
    store.save_snapshot(Snapshot(2, {"controller": {"n": 2}}, {"b": b"B2", "c": b"\x00C2"}))
    snapshot, _ = store.load()
    assert snapshot == Snapshot(2, {"controller": {"n": 2}}, {"a": b"A1", "b": b"B2", "c": b"\x00C2"})
    store.save_snapshot(Snapshot(3, {"controller": {}}, {"a": None}))
    snapshot, _ = store.load()
    assert snapshot is not None and dict(snapshot.parts) == {"b": b"B2", "c": b"\x00C2"}
    with pytest.raises(Exception):  # noqa: B017 - each store raises its driver's error for a non-bytes part
        store.save_snapshot(Snapshot(4, {"controller": {}}, {"d": b"D4", "e": object()}))  # type: ignore[dict-item]
    snapshot, _ = store.load()
    assert snapshot is not None and snapshot.sequence == 3 and "d" not in snapshot.parts
    store.save_snapshot(Snapshot(5, {"controller": {}}, {"d": b"D5"}))  # the store is still usable
    assert store.load()[0] == Snapshot(5, {"controller": {}}, {"b": b"B2", "c": b"\x00C2", "d": b"D5"})


def test_metadata_is_kept(store: Store) -> None:
    assert store.get_meta("initial_region") is None
    store.set_meta("initial_region", "{}")
    store.set_meta("initial_region", '{"zones": []}')
    assert store.get_meta("initial_region") == '{"zones": []}'


def test_a_second_server_on_the_same_store_is_refused(location: str) -> None:
    first = open_store(location)
    try:
        with pytest.raises(ConflictError) as refused:
            open_store(location)
        assert refused.value.code == "DatabaseInUse"
    finally:
        first.close()
    open_store(location).close()  # free again once the first has closed


def test_a_server_runs_on_either_store_and_its_state_survives_a_restart(location: str) -> None:
    with ServerThread(location, REGION, snapshot_every=3) as s, Client(s.target) as c:
        c.create_scale_set(zonal_spec(), 4)
        for capacity in (6, 2, 5):
            c.set_capacity("web", capacity, request_id=f"cap-{capacity}")
        before = c.instance_columns("web")
    with ServerThread(location, REGION) as s, Client(s.target) as c:
        assert c.instance_columns("web") == before
        assert c.set_capacity("web", 5, request_id="cap-5").capacity_after == 5  # the stored reply
        assert c.get_scale_set("web").revision == 4


def test_postgresql_refuses_a_schema_newer_than_the_code(postgres: Any) -> None:
    import psycopg
    from scaleset.postgres import SCHEMA_VERSION, PostgresStore

    url = postgres.create_database()
    PostgresStore(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(UnavailableError) as refused:
        PostgresStore(url)
    assert refused.value.code == "SchemaTooNew"


def test_an_unreachable_postgresql_is_one_clear_error() -> None:
    from scaleset.postgres import PostgresStore

    with pytest.raises(ScaleSetError) as caught:
        PostgresStore("postgresql://nobody:secret@127.0.0.1:1/none")
    assert caught.value.code == "DatabaseUnavailable" and "secret" not in str(caught.value)


def test_sqlite_is_the_default(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "x.db"))
    assert isinstance(store, SQLiteStore)
    store.close()


def test_scaleset_serve_and_db_check_on_postgresql(postgres: Any, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from scaleset.testing.server import free_port, start_server_process

    url, port = postgres.create_database(), free_port()
    proc = start_server_process(tmp_path / "unused.db", port, tmp_path / "server.log", "--store", url)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.create_scale_set(zonal_spec(), 7)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not (tmp_path / "unused.db").exists()  # the state went to PostgreSQL
    check = subprocess.run(
        [sys.executable, "-m", "scaleset", "db", "check", "--store", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0 and "1 scale sets, 7 instances" in check.stdout, check.stdout + check.stderr


def test_postgresql_takes_its_database_back_only_if_nobody_wrote_meanwhile(postgres: Any) -> None:
    import psycopg
    from scaleset.postgres import PostgresStore

    def drop_sessions() -> None:  # as a network blip or a PostgreSQL restart would
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            )

    url = postgres.create_database()
    first = PostgresStore(url)
    first.load()
    first.append([event(1)], [])
    drop_sessions()
    with pytest.raises(psycopg.OperationalError):  # the batch in flight fails (UNAVAILABLE to its callers)
        first.append([event(2)], [])
    first.append([event(2)], [])  # the retry reconnects: nobody else wrote, so it goes on
    drop_sessions()
    with pytest.raises(psycopg.OperationalError):
        first.append([event(3)], [])
    other = PostgresStore(url)  # meanwhile another server takes the database and writes
    other.load()
    other.append([event(3)], [])
    other.close()
    with pytest.raises(ConflictError) as changed:
        first.append([event(4)], [])
    assert changed.value.code == "DatabaseChanged"
    reader = PostgresStore(url)
    assert [e.sequence for e in reader.events_after(None, 0, 10)] == [1, 2, 3]
    reader.close()
