"""The PostgreSQL store (``scaleset serve --store postgresql://...``): the same event log, snapshots,
request replies and metadata as the embedded SQLite store, in PostgreSQL, through psycopg 3.

This module owns psycopg. One connection writes (the group committer's batches, each one transaction)
and holds a session advisory lock, so a second server on the same database is refused as with SQLite;
reads go through a small connection pool. Events are unique by ``sequence`` and by ``(scale_set,
revision)``, so no two writers can ever both append the same position. The schema carries a version and
migrates forward on start; a database newer than the code is refused.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from scaleset.errors import ConflictError, ScaleSetError, UnavailableError, error
from scaleset.store import (
    EVENT_COLUMNS,
    REPLAY_COLUMNS,
    EventRecord,
    RequestRecord,
    Snapshot,
    event_from_row,
    event_row,
    replayed,
)

log = logging.getLogger(__name__)

__all__ = ["LEASE_S", "SCHEMA_VERSION", "ClusterDirectory", "PostgresStore"]

#: Each entry migrates the schema from its index to the next version; SCHEMA_VERSION is their count.
_MIGRATIONS = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE events (
        sequence BIGINT PRIMARY KEY,
        scale_set TEXT NOT NULL,
        revision BIGINT NOT NULL,
        type TEXT NOT NULL,
        command TEXT NOT NULL,
        summary TEXT NOT NULL,
        time_ms BIGINT NOT NULL,
        UNIQUE (scale_set, revision)
    );
    CREATE TABLE requests (
        request_id TEXT PRIMARY KEY,
        method TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        response BYTEA NOT NULL,
        sequence BIGINT NOT NULL
    );
    CREATE INDEX requests_by_sequence ON requests (sequence);
    CREATE TABLE snapshots (sequence BIGINT PRIMARY KEY, state TEXT NOT NULL);
    """,
    # 2: the servers of the database, for `scaleset cluster status`.
    """
    CREATE TABLE servers (address TEXT PRIMARY KEY, role TEXT NOT NULL, seen_ms BIGINT NOT NULL);
    """,
    # 3: snapshots in parts, one per scale set, each as of the snapshot that last wrote it.
    """
    CREATE TABLE snapshot_parts (name TEXT PRIMARY KEY, sequence BIGINT NOT NULL, data BYTEA NOT NULL);
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)
#: How often a standby asks for the lock, and about how long a dead server's session (and lock) lasts.
STANDBY_POLL_S = 0.5
LEASE_S = 5.0
#: The advisory lock key a serving store holds ("scaleset" in ASCII).
_LOCK_KEY = 0x7363616C65736574
#: In a cluster, partition N's owner holds the two-key advisory lock (_PARTITION_LOCK, N) instead.
_PARTITION_LOCK = 0x73636C73  # "scls"


def _unavailable(what: str, e: psycopg.Error, then: str = "") -> ScaleSetError:
    """``DatabaseUnavailable``: what failed, with the first line of the driver's reason."""
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return error(UnavailableError, f"{what}: {reason}{then}", "DatabaseUnavailable")


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the given PostgreSQL URL"
    return f"postgresql://{info.get('user', '')}@{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"


class PostgresStore:
    """The :class:`~scaleset.store.Store` on PostgreSQL."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 4,
        standby: bool = False,
        address: str = "",
        partition: int | None = None,
    ) -> None:
        #: In a cluster (``serve --cluster``) the store of one partition: its own schema ``p<N>`` with the
        #: same tables, its own lock; else the whole database's state in the public schema.
        self.partition = partition
        self.path = _redacted(url) + ("" if partition is None else f" (partition {partition})")
        self._url = url
        self._schema = "public" if partition is None else f"p{partition}"
        #: Where this partition's own gRPC server listens (the cluster's forwarding target), once bound.
        self.cell = ""
        # A server that lost its session never takes the database (or a partition) back on its own: a
        # standby, or another server of the cluster, may have taken over and written since.
        self._standby = standby or partition is not None
        #: The newest position this server has read or written (a reconnect checks nobody wrote since).
        self._last_sequence = 0
        #: Where clients reach this server, as listed by `scaleset cluster status` ("" lists nothing).
        self.address = address
        self._write_lock = threading.Lock()
        self._writer = self._wait_for_lock() if standby else self._connect_writer()
        try:
            self._migrate()
        except BaseException:
            self._writer.close()
            raise
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={
                "autocommit": True,
                "options": f"-c search_path={self._schema}",
                "application_name": self._application_name,
            },
            open=True,
        )
        self._announce(self._writer, "active")

    def _wait_for_lock(self) -> psycopg.Connection[Any]:
        """A standby: waits until no other server holds the database (it stopped, died, or lost its
        session), then takes over."""
        log.info("standby on %s: waiting for the active server to go", self.path)
        announcer: psycopg.Connection[Any] | None = None  # one session for the whole wait, not one a poll
        try:
            while True:
                try:
                    return self._connect_writer()
                except ScaleSetError as e:
                    if e.code not in ("DatabaseInUse", "DatabaseUnavailable"):
                        raise
                try:
                    if announcer is None or announcer.broken or announcer.closed:
                        announcer = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
                    self._announce(announcer, "standby")
                except psycopg.Error:
                    pass  # the database is away, or older than the servers table: nothing to announce
                time.sleep(STANDBY_POLL_S)
        finally:
            if announcer is not None:
                announcer.close()

    def _announce(self, conn: psycopg.Connection[Any], role: str) -> None:
        """Records this server (its address and role, now) for `scaleset cluster status`; a partition's
        owner records where its partition is served, which is where the cluster forwards requests."""
        if self.partition is not None:
            if self.cell:
                conn.execute(
                    "INSERT INTO public.partition_owners (partition, server, cell, seen_ms) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (partition) DO UPDATE SET server = EXCLUDED.server, cell = EXCLUDED.cell, "
                    "seen_ms = EXCLUDED.seen_ms",
                    (self.partition, self.address, self.cell, round(time.time() * 1000)),
                )
        elif self.address:
            conn.execute(
                "INSERT INTO servers (address, role, seen_ms) VALUES (%s, %s, %s) ON CONFLICT (address) "
                "DO UPDATE SET role = EXCLUDED.role, seen_ms = EXCLUDED.seen_ms",
                (self.address, role, round(time.time() * 1000)),
            )

    @staticmethod
    def list_servers(url: str) -> list[tuple[str, str, float]]:
        """Every server that announced itself on the database at ``url`` (read without taking it):
        address, role (active or standby) and seconds since it was last seen."""
        now = time.time()
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                rows = conn.execute("SELECT address, role, seen_ms FROM servers ORDER BY address").fetchall()
        except psycopg.errors.UndefinedTable:
            return []  # no server has served this database yet
        except psycopg.Error as e:
            raise _unavailable(f"cannot read the servers of {_redacted(url)}", e) from None
        return [(address, role, now - seen / 1000) for address, role, seen in rows]

    def _connect_writer(self) -> psycopg.Connection[Any]:
        """The writing session, holding the advisory lock that makes this server the database's only one.
        TCP keepalives both ways: if this server or its network dies, PostgreSQL ends the session (and
        the lock with it) within LEASE_S, and a standby takes over."""
        try:
            conn = psycopg.connect(
                self._url,
                autocommit=True,
                connect_timeout=10,
                application_name=self._application_name,
                keepalives=1,
                keepalives_idle=2,
                keepalives_interval=1,
                keepalives_count=3,
                options="-c tcp_keepalives_idle=2 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3 "
                f"-c search_path={self._schema}",
            )
        except psycopg.Error as e:
            raise _unavailable(f"cannot connect to {self.path}", e) from None
        locked = conn.execute(*self._lock_query("pg_try_advisory_lock")).fetchone()
        if not (locked and locked[0]):
            conn.close()
            raise error(
                ConflictError,
                f"{self.path} is in use by another scaleset server (it holds the scaleset advisory lock); "
                "stop it, or use another database.",
                "DatabaseInUse",
            )
        return conn

    @property
    def _application_name(self) -> str:
        """How this server's sessions show in pg_stat_activity (an operator can find, or end, them)."""
        return f"scaleset {self.address}"[:63]

    def _lock_query(self, function: str) -> tuple[str, tuple[int, ...]]:
        if self.partition is None:
            return f"SELECT {function}(%s)", (_LOCK_KEY,)
        return f"SELECT {function}(%s, %s)", (_PARTITION_LOCK, self.partition)

    def heartbeat(self) -> None:
        """Proves this server still holds the database; raises (DatabaseInUse, DatabaseUnavailable) when
        it does not, and the server must stop serving: a standby may have taken over."""
        with self._write_lock:
            try:
                self._announce(self._writing(), "active")
                self._writing().execute("SELECT 1")
            except psycopg.Error as e:
                self._writer.close()
                raise _unavailable(f"lost {self.path}", e) from None

    def _writing(self) -> psycopg.Connection[Any]:
        """The writer, reconnected (and relocked) if the last one broke; call holding the write lock.

        Once the session is gone another server may have taken the database and written to it, so this
        server's state may be stale: with standbys it never takes the database back (it stops, and a
        supervisor restarts it as a standby); alone, it takes it back only if the log has not moved."""
        if self._writer.broken or self._writer.closed:
            if self._standby:
                raise error(
                    UnavailableError,
                    f"lost the session on {self.path}; a standby takes over, and this server stops.",
                    "DatabaseUnavailable",
                )
            log.warning("the connection to %s broke; reconnecting", self.path)
            self._writer = self._connect_writer()
            row = self._writer.execute(
                "SELECT greatest((SELECT max(sequence) FROM events), (SELECT max(sequence) FROM snapshots))"
            ).fetchone()
            if row and row[0] is not None and row[0] > self._last_sequence:
                self._writer.close()
                raise error(
                    ConflictError,
                    f"{self.path} was written by another server while this one was away (sequence {row[0]}, "
                    f"this server is at {self._last_sequence}); restart this server to serve the current state.",
                    "DatabaseChanged",
                )
        return self._writer

    def _migrate(self) -> None:
        with self._writer.transaction():
            if self.partition is None:
                clustered = self._writer.execute("SELECT to_regclass('public.cluster_config')").fetchone()
                if clustered and clustered[0] is not None:
                    raise error(
                        ConflictError,
                        f"{self.path} holds a cluster's partitions; serve it with --cluster.",
                        "ClusterDatabase",
                    )
            else:
                self._writer.execute(f"CREATE SCHEMA IF NOT EXISTS {self._schema}")
            self._writer.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self._writer.execute("SELECT version FROM schema_version FOR UPDATE").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise error(
                    UnavailableError,
                    f"{self.path} has schema version {version}, newer than this scaleset's {SCHEMA_VERSION}; "
                    "upgrade scaleset before serving it.",
                    "SchemaTooNew",
                )
            for step in range(version, SCHEMA_VERSION):
                self._writer.execute(_MIGRATIONS[step])
                log.info("migrated %s to schema version %d", self.path, step + 1)
            if row is None:
                self._writer.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                self._writer.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))

    def _read(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._pool.connection() as conn:
                return conn.execute(query, params).fetchall()
        except psycopg.OperationalError as e:  # the pool drops the broken connection; a retry gets another
            raise _unavailable(f"lost a connection to {self.path}", e, then="; retry.") from None

    def load(self) -> tuple[Snapshot | None, list[EventRecord]]:
        rows = self._read("SELECT sequence, state FROM snapshots ORDER BY sequence DESC LIMIT 1")
        parts = self._read("SELECT name, data FROM snapshot_parts ORDER BY name")
        snapshot = (
            Snapshot(rows[0][0], json.loads(rows[0][1]), {n: bytes(d) for n, d in parts}) if rows else None
        )
        after = snapshot.sequence if snapshot else 0
        events = self._read(
            f"SELECT {REPLAY_COLUMNS} FROM events WHERE sequence > %s ORDER BY sequence", (after,)
        )
        loaded = replayed(events)
        self._last_sequence = loaded[-1].sequence if loaded else after
        return snapshot, loaded

    def append(self, events: Sequence[EventRecord], requests: Sequence[RequestRecord]) -> list[int]:
        rows = [event_row(e) for e in events]
        with self._write_lock, self._writing().transaction(), self._writer.cursor() as cur:
            cur.executemany(f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)", rows)
            cur.executemany(
                "INSERT INTO requests (request_id, method, fingerprint, response, sequence) VALUES (%s, %s, %s, %s, %s)",
                [(r.request_id, r.method, r.fingerprint, r.response, r.sequence) for r in requests],
            )
        if events:
            self._last_sequence = max(self._last_sequence, events[-1].sequence)
        return [len(r[4]) + len(r[5]) for r in rows]

    def events_after(self, scale_set: str | None, after: int, limit: int) -> list[EventRecord]:
        if scale_set is None:
            rows = self._read(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE sequence > %s ORDER BY sequence LIMIT %s",
                (after, limit),
            )
        else:
            rows = self._read(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE scale_set = %s AND revision > %s ORDER BY sequence LIMIT %s",
                (scale_set, after, limit),
            )
        return [event_from_row(r) for r in rows]

    def lookup_request(self, request_id: str) -> RequestRecord | None:
        rows = self._read(
            "SELECT request_id, method, fingerprint, response, sequence FROM requests WHERE request_id = %s",
            (request_id,),
        )
        return (
            RequestRecord(rows[0][0], rows[0][1], rows[0][2], bytes(rows[0][3]), rows[0][4]) if rows else None
        )

    def save_snapshot(self, snapshot: Snapshot) -> int:
        data = json.dumps(snapshot.state, separators=(",", ":"))
        with self._write_lock, self._writing().transaction():
            self._writer.execute(
                "INSERT INTO snapshots (sequence, state) VALUES (%s, %s) "
                "ON CONFLICT (sequence) DO UPDATE SET state = EXCLUDED.state",
                (snapshot.sequence, data),
            )
            self._writer.execute("DELETE FROM snapshots WHERE sequence < %s", (snapshot.sequence,))
            with self._writer.cursor() as cur:
                cur.executemany(
                    "INSERT INTO snapshot_parts (name, sequence, data) VALUES (%s, %s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET sequence = EXCLUDED.sequence, data = EXCLUDED.data",
                    [(n, snapshot.sequence, p) for n, p in snapshot.parts.items() if p is not None],
                )
                cur.executemany(
                    "DELETE FROM snapshot_parts WHERE name = %s",
                    [(n,) for n, p in snapshot.parts.items() if p is None],
                )
        return len(data)

    def compact(self, events_through: int, requests_through: int) -> None:
        with self._write_lock, self._writing().transaction():
            self._writer.execute("DELETE FROM events WHERE sequence <= %s", (events_through,))
            self._writer.execute("DELETE FROM requests WHERE sequence <= %s", (requests_through,))

    def first_retained(self, scale_set: str | None) -> int | None:
        if scale_set is None:
            rows = self._read("SELECT min(sequence) FROM events")
        else:
            rows = self._read("SELECT min(revision) FROM events WHERE scale_set = %s", (scale_set,))
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = %s", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._write_lock:
            self._writing().execute(
                "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (key, value),
            )

    def check(self) -> None:
        """The log must be gap-free after the newest snapshot (PostgreSQL guards the pages themselves)."""
        snapshot = self._read("SELECT coalesce(max(sequence), 0) FROM snapshots")[0][0]
        first, last, count = self._read(
            "SELECT min(sequence), max(sequence), count(*) FROM events WHERE sequence > %s", (snapshot,)
        )[0]
        if count and (first != snapshot + 1 or last - first + 1 != count):
            raise error(
                UnavailableError,
                f"{self.path} is damaged: the event log after snapshot {snapshot} has gaps "
                f"({count} events between {first} and {last}); restore it from a backup.",
                "DatabaseDamaged",
            )

    def close(self) -> None:
        with self._write_lock:
            self._pool.close()
            try:
                if self.partition is not None:
                    self._writer.execute(
                        "DELETE FROM public.partition_owners WHERE partition = %s AND cell = %s",
                        (self.partition, self.cell),
                    )
                elif self.address:
                    self._writer.execute("DELETE FROM servers WHERE address = %s", (self.address,))
                # Released now, not when the server notices the session ended: a restart may follow at once.
                self._writer.execute(*self._lock_query("pg_advisory_unlock"))
            except psycopg.Error:
                log.warning("could not release the lock on %s; it goes with the session", self.path)
            self._writer.close()


class ClusterDirectory:
    """Who is in a cluster (``serve --cluster``) and who owns which partition, in the public schema.

    The truth of ownership is the partition's advisory lock, held by its owner's writing session (so a
    dead server's partitions free themselves when its session ends); ``partition_owners`` says where each
    owner serves its partition, for forwarding, and ``cluster_servers`` which servers are alive, so each
    can take its fair share. The number of partitions is fixed when the cluster's database is created.
    """

    def __init__(self, url: str, *, address: str = "", partitions: int = 12) -> None:
        self.path = _redacted(url)
        self._url = url
        self.address = address
        self._lock = threading.Lock()
        self._conn = self._connect()
        with self._lock, self._conn.transaction():
            # One creator at a time: the first server fixes the number of partitions.
            self._conn.execute("SELECT pg_advisory_xact_lock(%s, -1)", (_PARTITION_LOCK,))
            single = self._conn.execute(
                "SELECT to_regclass('public.events') IS NOT NULL AND EXISTS (SELECT 1 FROM pg_locks "
                "WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND classid = %s AND objid = %s)",
                ((_LOCK_KEY >> 32) & 0xFFFFFFFF, _LOCK_KEY & 0xFFFFFFFF),
            ).fetchone()
            if single and single[0]:
                raise error(
                    ConflictError,
                    f"{self.path} is served by a single server (not --cluster); stop it first.",
                    "DatabaseInUse",
                )
            self._conn.execute(
                """
                CREATE TABLE IF NOT EXISTS public.cluster_config (partitions INTEGER NOT NULL);
                CREATE TABLE IF NOT EXISTS public.cluster_servers (address TEXT PRIMARY KEY, seen_ms BIGINT NOT NULL);
                CREATE TABLE IF NOT EXISTS public.partition_owners (
                    partition INTEGER PRIMARY KEY, server TEXT NOT NULL, cell TEXT NOT NULL, seen_ms BIGINT NOT NULL
                );
                """
            )
            row = self._conn.execute("SELECT partitions FROM public.cluster_config").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO public.cluster_config VALUES (%s)", (partitions,))
            self.partitions = int(row[0]) if row else partitions

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(
                self._url,
                autocommit=True,
                connect_timeout=10,
                application_name=f"scaleset {self.address}"[:63],
            )
        except psycopg.Error as e:
            raise _unavailable(f"cannot connect to {self.path}", e) from None

    def _query(self, sql: str, params: Sequence[Any] = (), *, rows: bool = True) -> list[tuple[Any, ...]]:
        with self._lock:
            if self._conn.broken or self._conn.closed:
                self._conn = self._connect()
            try:
                cursor = self._conn.execute(sql, params)
                return cursor.fetchall() if rows else []
            except psycopg.OperationalError as e:
                self._conn.close()
                raise _unavailable(f"lost {self.path}", e) from None

    def beat(self) -> None:
        """Says this server is alive (every second)."""
        self._query(
            "INSERT INTO public.cluster_servers (address, seen_ms) VALUES (%s, %s) ON CONFLICT (address) "
            "DO UPDATE SET seen_ms = EXCLUDED.seen_ms",
            (self.address, round(time.time() * 1000)),
            rows=False,
        )

    def live_servers(self, within: float) -> list[str]:
        """Servers seen within ``within`` seconds, by address."""
        cutoff = round((time.time() - within) * 1000)
        return [r[0] for r in self._query(
            "SELECT address FROM public.cluster_servers WHERE seen_ms >= %s ORDER BY address", (cutoff,)
        )]  # fmt: skip

    def held(self) -> set[int]:
        """Partitions whose lock some server holds (owned, or being taken over)."""
        rows = self._query(
            "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = %s",
            (_PARTITION_LOCK,),
        )
        return {int(r[0]) for r in rows}

    def owners(self) -> dict[int, tuple[str, str, float]]:
        """partition -> (owning server, where the partition is served, seconds since its owner said so)."""
        now = time.time()
        rows = self._query("SELECT partition, server, cell, seen_ms FROM public.partition_owners")
        return {int(p): (server, cell, now - seen / 1000) for p, server, cell, seen in rows}

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.execute("DELETE FROM public.cluster_servers WHERE address = %s", (self.address,))
            except psycopg.Error:
                pass  # it ages out of the list
            self._conn.close()

    @staticmethod
    def read(url: str) -> tuple[int, list[tuple[str, float]], dict[int, tuple[str, str, float]]] | None:
        """For `scaleset cluster status`, without joining: the number of partitions, the servers (and
        seconds since each was seen), and each partition's owner; None if the database is no cluster's."""
        now = time.time()
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                found = conn.execute("SELECT to_regclass('public.cluster_config')").fetchone()
                if not found or found[0] is None:
                    return None
                config = conn.execute("SELECT partitions FROM public.cluster_config").fetchone()
                servers = conn.execute("SELECT address, seen_ms FROM public.cluster_servers ORDER BY address")
                owners = conn.execute("SELECT partition, server, cell, seen_ms FROM public.partition_owners")
                return (
                    int(config[0]) if config else 0,
                    [(a, now - s / 1000) for a, s in servers.fetchall()],
                    {int(p): (srv, cell, now - s / 1000) for p, srv, cell, s in owners.fetchall()},
                )
        except psycopg.Error as e:
            raise _unavailable(f"cannot read {_redacted(url)}", e) from None
