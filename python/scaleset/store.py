"""Durable state: an append-only event log with snapshots, behind a small interface.

Every acknowledged mutation is one :class:`EventRecord` (the command that reproduces it, plus what
watchers see), written in the same transaction as the reply cached for its ``request_id``. A restart
loads the newest snapshot and re-applies the commands after it; the engine is deterministic, so the
state comes back exactly. :class:`SQLiteStore` is the embedded default (WAL, ``synchronous=FULL``: a
commit is on disk before it returns). A shared database for several replicas would implement the same
:class:`Store` protocol.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from scaleset.errors import ConflictError, UnavailableError, error

log = logging.getLogger(__name__)

__all__ = [
    "EventRecord",
    "RequestRecord",
    "SQLiteStore",
    "Snapshot",
    "Store",
    "backup",
    "decode_part",
    "encode_part",
]


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One committed change. ``sequence`` orders every change; ``revision`` is per scale set
    (``scale_set`` is empty for region changes).

    Its command and summary are kept as the JSON text the store holds and decoded when read: the
    thousands of records held in memory (the watchers' buffer, the replay cache) are a few strings each,
    not trees of dicts and lists for the garbage collector to walk again and again."""

    sequence: int
    scale_set: str
    revision: int
    type: str
    command_json: str
    summary_json: str
    time_ms: int
    #: The command already decoded, where a replay decoded a whole log's commands at once.
    decoded: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(
        cls,
        sequence: int,
        scale_set: str,
        revision: int,
        type: str,
        command: dict[str, Any],
        summary: dict[str, Any],
        time_ms: int,
    ) -> EventRecord:
        return cls(sequence, scale_set, revision, type, json.dumps(command), json.dumps(summary), time_ms)

    @property
    def command(self) -> dict[str, Any]:
        return self.decoded if self.decoded is not None else json.loads(self.command_json)

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_json)  # type: ignore[no-any-return]

    @property
    def size(self) -> int:
        """Bytes of its command and summary as stored: what holding it in memory costs."""
        return len(self.command_json) + len(self.summary_json)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """The reply sent for a ``request_id``, so a retry gets the same answer and nothing applies twice."""

    request_id: str
    method: str
    fingerprint: str
    response: bytes
    sequence: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state at ``sequence``: a document (JSON) and parts stored one per scale set, so that a
    snapshot writes again only the scale sets that changed since the last one.

    Saving, ``parts`` holds the parts to write (None deletes one); the parts not named stay as they are.
    Loading, it holds every stored part."""

    sequence: int
    state: dict[str, Any]
    parts: Mapping[str, bytes | None] = field(default_factory=dict)


def encode_part(saved: dict[str, Any]) -> bytes:
    """A scale set as :meth:`Controller.export_scale_set` gives it, as one compressed part: its spec, next
    instance id and policies' state as JSON, then its instances in the core's binary encoding."""
    header = json.dumps(
        {key: value for key, value in saved.items() if key != "instances"}, separators=(",", ":")
    ).encode()
    return zlib.compress(len(header).to_bytes(4, "little") + header + saved["instances"], 1)


def decode_part(data: bytes) -> dict[str, Any]:
    """The scale set :func:`encode_part` encoded (its instances still encoded, as the engine restores them)."""
    raw = zlib.decompress(data)
    size = int.from_bytes(raw[:4], "little")
    saved: dict[str, Any] = json.loads(raw[4 : 4 + size])
    saved["instances"] = raw[4 + size :]
    return saved


class Store(Protocol):
    #: Where the state is, for messages (a file, or a URL without its password).
    path: str

    def load(self) -> tuple[Snapshot | None, list[EventRecord]]:
        """The newest snapshot and every event after it, in order (:data:`REPLAY_COLUMNS`: without their
        summaries, which a replay does not read)."""
        ...

    def append(self, events: Sequence[EventRecord], requests: Sequence[RequestRecord]) -> list[int]:
        """Writes a batch atomically and durably (group commit); returns each event's size in bytes as
        stored (what keeping it in memory roughly costs)."""
        ...

    def events_after(self, scale_set: str | None, after: int, limit: int) -> list[EventRecord]:
        """Events after a revision of one scale set, or after a global sequence (``scale_set`` None)."""
        ...

    def lookup_request(self, request_id: str) -> RequestRecord | None: ...

    def save_snapshot(self, snapshot: Snapshot) -> int:
        """Stores ``snapshot`` (replacing older ones) with its parts, atomically; returns the size in bytes
        of its document."""
        ...

    def compact(self, events_through: int, requests_through: int) -> None:
        """Drops events and stored replies up to the given sequences (both already in a snapshot)."""
        ...

    def first_retained(self, scale_set: str | None) -> int | None:
        """The lowest revision of ``scale_set`` (or global sequence) still stored, None if none is."""
        ...

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def check(self) -> None:
        """Raises if the stored data is damaged."""
        ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    sequence INTEGER PRIMARY KEY,
    scale_set TEXT NOT NULL,
    revision INTEGER NOT NULL,
    type TEXT NOT NULL,
    command TEXT NOT NULL,
    summary TEXT NOT NULL,
    time_ms INTEGER NOT NULL
);
-- A position is appended once: unique per scale set (and by sequence, the key).
DROP INDEX IF EXISTS events_by_scale_set;
CREATE UNIQUE INDEX IF NOT EXISTS events_by_scale_set_revision ON events (scale_set, revision);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    response BLOB NOT NULL,
    sequence INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (sequence INTEGER PRIMARY KEY, state TEXT NOT NULL);
-- The newest snapshot's parts, one per scale set, each as of the snapshot that last wrote it.
CREATE TABLE IF NOT EXISTS snapshot_parts (name TEXT PRIMARY KEY, sequence INTEGER NOT NULL, data BLOB NOT NULL);
"""

#: An event's columns, in the order of :func:`event_row` and :func:`event_from_row` (every store's).
EVENT_COLUMNS = "sequence, scale_set, revision, type, command, summary, time_ms"


def event_row(e: EventRecord) -> tuple[Any, ...]:
    """An event as a row of :data:`EVENT_COLUMNS` (command and summary as JSON text)."""
    return (e.sequence, e.scale_set, e.revision, e.type, e.command_json, e.summary_json, e.time_ms)


def event_from_row(row: tuple[Any, ...]) -> EventRecord:
    return EventRecord(*row)


#: What a replay reads of an event: not its summary (what watchers are told), left empty.
REPLAY_COLUMNS = "sequence, scale_set, revision, type, command, time_ms"


def replayed(rows: Sequence[tuple[Any, ...]]) -> list[EventRecord]:
    """Events as a replay reads them (rows of :data:`REPLAY_COLUMNS`); their commands are decoded as one
    JSON array, which costs a third of decoding them one by one."""
    commands = json.loads("[" + ",".join(row[4] for row in rows) + "]")
    return [
        EventRecord(seq, scale_set, revision, type_, text, "{}", time_ms, command)
        for (seq, scale_set, revision, type_, text, time_ms), command in zip(rows, commands, strict=True)
    ]


def _lock_exclusively(path: str) -> IO[bytes]:
    """Holds an exclusive lock on ``<path>.lock`` for as long as the store is open: a second server on the
    same database is refused instead of serving stale reads. The kernel releases it if the process dies."""
    handle = open(f"{path}.lock", "ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise error(
            ConflictError,
            f"{path} is in use by another scaleset server (it holds {path}.lock); stop it, or use another --db.",
            "DatabaseInUse",
        ) from None
    return handle


def backup(path: str, to: str) -> int:
    """Copies the SQLite database at ``path`` to ``to`` while a server may be writing to it (``scaleset db
    backup``): SQLite's online backup, which copies the committed state of one moment, what is still in the
    write-ahead log included, and takes no lock a server holds. The copy is marked closed, so it opens on its
    own. It is written beside ``to`` and renamed onto it: ``to`` holds either what it held before or the
    whole copy. Returns the sequence of the copy's last event."""
    if not os.path.isfile(path):
        raise error(UnavailableError, f"{path} does not exist.", "DatabaseNotFound")
    if os.path.exists(to) and os.path.samefile(path, to):
        raise error(
            UnavailableError, f"{to} is the database itself; back it up to another file.", "BackupOntoSource"
        )
    folder = os.path.dirname(os.path.abspath(to))
    if os.path.isdir(to) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise error(
            UnavailableError,
            f"cannot write a backup to {to}: name a file in a directory that exists and can be written.",
            "BackupDestinationInvalid",
        )
    if os.path.exists(f"{to}-wal"):
        raise error(
            UnavailableError,
            f"{to}-wal exists: {to} is a database in use or not closed cleanly, which a copy must not replace "
            "(its log would be applied to the copy); back up to another file.",
            "BackupOntoDatabaseInUse",
        )
    partial = f"{to}.partial"
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial)  # left by a backup that was stopped
    try:
        # Not read-only: SQLite then removes the write-ahead log it opens when it closes the last connection
        # (a stopped server's database is left as it was). The backup only reads.
        with contextlib.closing(sqlite3.connect(path)) as source:
            source.execute("PRAGMA busy_timeout=5000")
            with contextlib.closing(sqlite3.connect(partial, isolation_level=None)) as copy:
                source.backup(copy)
                copy.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('open', '0')")
                copy.execute("PRAGMA journal_mode=DELETE")  # one file: nothing in a log of its own
                (last,) = copy.execute("SELECT coalesce(max(sequence), 0) FROM events").fetchone()
    except sqlite3.DatabaseError as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise error(
            UnavailableError, f"{path} is not a readable scaleset database ({e}).", "DatabaseDamaged"
        ) from None
    os.replace(partial, to)
    return int(last)


class SQLiteStore:
    """The embedded store. One writer connection (used by the group committer), one reader."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._lock_file = _lock_exclusively(path)
        # Only a clean close removes the write-ahead log; a database left open (a crash) keeps it.
        wal_present = os.path.exists(f"{path}-wal")
        try:
            self._writer = self._connect()
            self._writer.executescript(_SCHEMA)
            self._reader = self._connect()
            self._reader.execute("SELECT count(*) FROM events").fetchone()
            left_open = self._writer.execute("SELECT value FROM meta WHERE key = 'open'").fetchone()
            if left_open == ("1",) and not wal_present:
                self._writer.close()
                self._reader.close()
                self._lock_file.close()
                raise error(
                    UnavailableError,
                    f"{path} was not closed cleanly and its write-ahead log {path}-wal is missing, so its latest "
                    "changes are not in it (a copy of a running server's database without its -wal file?). "
                    "Put the -wal file back, or copy the database with `scaleset db backup` (while the server "
                    "runs) or after stopping the server.",
                    "WriteAheadLogMissing",
                )
            # Marked open in the database file itself (checkpointed), so a copy of the file alone says so.
            self._writer.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('open', '1')")
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.DatabaseError as e:
            self._lock_file.close()
            raise error(
                UnavailableError,
                f"{path} is not a readable scaleset database ({e}); restore it from a backup, or move it away "
                "to start empty.",
                "DatabaseDamaged",
            ) from None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def load(self) -> tuple[Snapshot | None, list[EventRecord]]:
        with self._read_lock:
            row = self._reader.execute(
                "SELECT sequence, state FROM snapshots ORDER BY sequence DESC LIMIT 1"
            ).fetchone()
            parts = self._reader.execute("SELECT name, data FROM snapshot_parts ORDER BY name").fetchall()
            snapshot = Snapshot(row[0], json.loads(row[1]), dict(parts)) if row else None
            after = snapshot.sequence if snapshot else 0
            rows = self._reader.execute(
                f"SELECT {REPLAY_COLUMNS} FROM events WHERE sequence > ? ORDER BY sequence", (after,)
            ).fetchall()
        return snapshot, replayed(rows)

    def append(self, events: Sequence[EventRecord], requests: Sequence[RequestRecord]) -> list[int]:
        rows = [event_row(e) for e in events]
        with self._write_lock:
            cur = self._writer.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.executemany(f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                cur.executemany(
                    "INSERT INTO requests (request_id, method, fingerprint, response, sequence) VALUES (?, ?, ?, ?, ?)",
                    [(r.request_id, r.method, r.fingerprint, r.response, r.sequence) for r in requests],
                )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return [len(r[4]) + len(r[5]) for r in rows]

    def events_after(self, scale_set: str | None, after: int, limit: int) -> list[EventRecord]:
        with self._read_lock:
            if scale_set is None:
                rows = self._reader.execute(
                    f"SELECT {EVENT_COLUMNS} FROM events WHERE sequence > ? ORDER BY sequence LIMIT ?",
                    (after, limit),
                ).fetchall()
            else:
                rows = self._reader.execute(
                    f"SELECT {EVENT_COLUMNS} FROM events WHERE scale_set = ? AND revision > ? ORDER BY sequence LIMIT ?",
                    (scale_set, after, limit),
                ).fetchall()
        return [event_from_row(r) for r in rows]

    def lookup_request(self, request_id: str) -> RequestRecord | None:
        with self._read_lock:
            row = self._reader.execute(
                "SELECT request_id, method, fingerprint, response, sequence FROM requests WHERE request_id = ?",
                (request_id,),
            ).fetchone()
        return RequestRecord(*row) if row else None

    def save_snapshot(self, snapshot: Snapshot) -> int:
        data = json.dumps(snapshot.state, separators=(",", ":"))
        with self._write_lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                self._writer.execute(
                    "INSERT OR REPLACE INTO snapshots (sequence, state) VALUES (?, ?)",
                    (snapshot.sequence, data),
                )
                # Older snapshots are no longer needed to rebuild; events stay for WatchEvents.
                self._writer.execute("DELETE FROM snapshots WHERE sequence < ?", (snapshot.sequence,))
                self._writer.executemany(
                    "INSERT OR REPLACE INTO snapshot_parts (name, sequence, data) VALUES (?, ?, ?)",
                    [(n, snapshot.sequence, p) for n, p in snapshot.parts.items() if p is not None],
                )
                self._writer.executemany(
                    "DELETE FROM snapshot_parts WHERE name = ?",
                    [(n,) for n, p in snapshot.parts.items() if p is None],
                )
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
        return len(data)

    def check(self) -> None:
        with self._read_lock:
            problems = [row[0] for row in self._reader.execute("PRAGMA integrity_check").fetchall()]
        if problems != ["ok"]:
            raise error(
                UnavailableError,
                f"{self.path} is damaged: {'; '.join(problems[:3])}; restore it from a backup.",
                "DatabaseDamaged",
            )

    def compact(self, events_through: int, requests_through: int) -> None:
        with self._write_lock:
            self._writer.execute("BEGIN IMMEDIATE")
            self._writer.execute("DELETE FROM events WHERE sequence <= ?", (events_through,))
            self._writer.execute("DELETE FROM requests WHERE sequence <= ?", (requests_through,))
            self._writer.execute("COMMIT")

    def first_retained(self, scale_set: str | None) -> int | None:
        with self._read_lock:
            if scale_set is None:
                row = self._reader.execute("SELECT min(sequence) FROM events").fetchone()
            else:
                row = self._reader.execute(
                    "SELECT min(revision) FROM events WHERE scale_set = ?", (scale_set,)
                ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def get_meta(self, key: str) -> str | None:
        with self._read_lock:
            row = self._reader.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._write_lock:
            self._writer.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            try:
                self._writer.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('open', '0')")
            except sqlite3.Error:
                log.warning("could not mark %s closed (it will need its -wal file to open)", self.path)
            self._writer.close()
            self._reader.close()
            self._lock_file.close()  # releases the exclusive lock

    def iter_all_events(self) -> Iterator[EventRecord]:
        """Every event in order (diagnostics and tests)."""
        after = 0
        while batch := self.events_after(None, after, 1000):
            yield from batch
            after = batch[-1].sequence
