"""The ``scaleset`` command: ``scaleset serve`` runs the service; the other subcommands talk to it.

Logs go to stderr, data to stdout. ``--server`` (or ``SCALESET_SERVER``) names the server to talk to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from scaleset.control import WATCH_MESSAGES_PER_SECOND
from scaleset.errors import ScaleSetError, invalid_input
from scaleset.limits import MAX_CONNECTIONS, STREAM_SEND_TIMEOUT_S, FreedMemory
from scaleset.model import Instance, Plan, PlannedCreate, PlannedDelete, Region

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from scaleset.store import Store

log = logging.getLogger("scaleset")

DEFAULT_REGION = Region(zones=["1", "2", "3"], fault_domains_per_zone=5)


# ----- serve --------------------------------------------------------------------------------------------


def open_store(location: str, *, standby: bool = False, address: str = "") -> Store:
    """The store at ``location``: a ``postgresql://`` URL, or a SQLite file (the default). A standby
    waits until no other server holds the PostgreSQL database."""
    if location.startswith(("postgresql://", "postgres://")):
        from scaleset.postgres import PostgresStore

        return PostgresStore(location, standby=standby, address=address)
    if standby:
        raise invalid_input(
            "--standby needs --store postgresql://... (a SQLite file has one server).", field="standby"
        )
    from scaleset.store import SQLiteStore

    return SQLiteStore(location)


#: How often a thread that holds the GIL offers it to the others while serving (Python's default: 5 ms).
SWITCH_INTERVAL_S = 0.0005

#: While serving (see collect_garbage): an object that survives a young collection moves to the oldest
#: generation at the next, and the oldest is collected by collect_garbage, checked every
#: GC_CHECK_INTERVAL_S, once the interpreter holds FULL_COLLECTION_GROWTH more memory blocks (objects,
#: and the arrays of lists, dicts and sets) than after the last full collection, and at least
#: FULL_COLLECTION_MIN_GROWTH more.
YOUNG_GC_THRESHOLDS = (700, 1)
GC_CHECK_INTERVAL_S = 5.0
FULL_COLLECTION_GROWTH = 0.25
FULL_COLLECTION_MIN_GROWTH = 50_000
#: The largest threshold gc.set_threshold takes (a C int): the oldest generation is never collected by
#: CPython's own rule.
_NEVER = 2**31 - 1


async def collect_garbage(
    stop: asyncio.Event,
    pauses: Histogram | None = None,
    interval: float = GC_CHECK_INTERVAL_S,
    freed: FreedMemory | None = None,
) -> None:
    """Keeps the garbage collector's pauses of the event loop short until ``stop`` is set (``pauses``: a
    histogram by generation to observe each collection's length in), and at each check gives memory
    freed since back to the system once enough of it piled up (``freed``, see `limits.FreedMemory`).

    CPython collects its oldest generation whenever a quarter as many objects as it holds have moved into
    it since the last time, alive or not. With 1,000 watchers that generation holds about 100,000 objects
    (each stream's gRPC call state and coroutines), most of what moves into it is freed by its reference
    count moments later, and under a steady load a full collection came every ~10 s and stopped every call
    for 30-70 ms (`bench/soak.py`, timed with gc.callbacks). So here the oldest generation is collected when
    what the interpreter *holds* has grown by a quarter: what it gains between checks is what is still
    alive, or garbage in reference cycles (which only a collection frees). It is counted in memory blocks
    (`sys.getallocatedblocks`, ~0.1 ms), not by listing the oldest generation's objects, which took over
    10 ms in the loaded soak: a pause of its own every check. And an object that survives one young
    collection moves on at the next, so the middle generation stays small and its collections short (in the
    loaded soak, up to 7-11 ms with CPython's ten young collections before that, at most 5-10 ms with one)."""
    started: list[float] = []
    freed = freed or FreedMemory()

    def observe(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started and pauses is not None:
            pauses.labels(str(info["generation"])).observe(time.perf_counter() - started[0])

    # What start-up made (modules, the server, the loaded state's Python side) lives as long as the
    # server: keep it out of every later collection, so the full ones walk only what serving makes.
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(*YOUNG_GC_THRESHOLDS, _NEVER)
    if pauses is not None:
        gc.callbacks.append(observe)
    try:
        baseline = sys.getallocatedblocks()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            growth = max(FULL_COLLECTION_MIN_GROWTH, baseline * FULL_COLLECTION_GROWTH)
            if sys.getallocatedblocks() > baseline + growth:
                gc.collect()
                baseline = sys.getallocatedblocks()
            if freed.due():
                await asyncio.to_thread(freed.trim)
    finally:
        if pauses is not None:
            gc.callbacks.remove(observe)
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _stop_on_signals(pauses: Histogram | None = None) -> tuple[asyncio.Event, asyncio.Task[None]]:
    """An event that SIGTERM and SIGINT set, and the task that keeps garbage collection short until it is
    set (see `collect_garbage`; ``pauses`` observes each collection). Called on the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop, asyncio.create_task(collect_garbage(stop, pauses), name="scaleset-gc")


async def run_server(
    store: str,
    address: str,
    region: Region,
    *,
    metrics_port: int = 0,
    instance_limit: int | None = None,
    grace: float = 5.0,
    advance_interval: float = 30.0,
    prometheus_url: str | None = None,
    event_retention: int = 100_000,
    request_retention: int = 100_000,
    authenticator: Any = None,
    credentials: Any = None,
    rate_limit: float = 10_000.0,
    max_watchers: int = 1000,
    watch_messages_per_second: float = WATCH_MESSAGES_PER_SECOND,
    stream_send_timeout: float = STREAM_SEND_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    http_port: int | None = None,
    http_tls: Any = None,
    standby: bool = False,
    executors: bool = False,
    cluster: bool = False,
    partitions: int | None = None,
    cluster_tls: tuple[Any, Any] | None = None,
) -> int:
    """Runs the service until SIGTERM or SIGINT, then drains in-flight calls and commits. Every
    ``advance_interval`` seconds the time-driven policies (rolling upgrades, repairs, autoscale, automatic
    zone balance) advance to the clock, after the autoscale queries are read from ``prometheus_url``."""
    from prometheus_client import start_http_server

    from scaleset.control import ControlPlane
    from scaleset.service import build_server

    if not stream_send_timeout > 0:
        raise invalid_input(
            f"--stream-send-timeout must be above 0 seconds, got {stream_send_timeout:g}.",
            field="stream_send_timeout",
        )
    if max_connections < 1:
        raise invalid_input(
            f"--max-connections must be at least 1, got {max_connections}.", field="max_connections"
        )
    _raise_file_limit()
    if cluster:
        return await _run_cluster_member(
            store,
            address,
            region,
            partitions=partitions,
            instance_limit=instance_limit,
            grace=grace,
            advance_interval=advance_interval,
            prometheus_url=prometheus_url,
            event_retention=event_retention,
            request_retention=request_retention,
            authenticator=authenticator,
            rate_limit=rate_limit,
            max_watchers=max_watchers,
            watch_messages_per_second=watch_messages_per_second,
            stream_send_timeout=stream_send_timeout,
            max_connections=max_connections,
            metrics_port=metrics_port,
            credentials=None if cluster_tls is None else cluster_tls[0],
            peer_credentials=None if cluster_tls is None else cluster_tls[1],
            executors=executors,
            http_port=http_port,
            http_tls=http_tls,
            standby=standby,
        )
    opened = open_store(store, standby=standby, address=address)
    control = ControlPlane(
        opened,
        region,
        instance_limit=instance_limit,
        event_retention=event_retention,
        request_retention=request_retention,
        max_watchers=max_watchers,
        watch_messages_per_second=watch_messages_per_second,
    )
    await control.start()
    await control.set_execution_mode("Executors" if executors else "Immediate")
    server, port, metrics = await build_server(
        control,
        address,
        authenticator=authenticator,
        credentials=credentials,
        rate_limit=rate_limit,
        stream_send_timeout=stream_send_timeout,
        max_connections=max_connections,
    )
    if metrics_port:
        start_http_server(
            metrics_port, addr=address.rsplit(":", 1)[0].strip("[]") or "127.0.0.1", registry=metrics.registry
        )
        log.info("metrics on port %d", metrics_port)
    gateway = None
    if http_port is not None:
        from scaleset.gateway import Gateway

        gateway = Gateway.attach(server, tls=http_tls)
    await server.start()
    # The commit thread (and the store's other threads) wait for the GIL while the event loop serves
    # watchers: hand it over every 0.5 ms rather than every 5 ms, or each of a commit's few returns to
    # Python can wait 5 ms.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    log.info("scaleset listening on %s (port %d), state in %s", address, port, opened.path)
    if gateway is not None and http_port is not None:
        host = address.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
        await gateway.start(host, http_port)
        log.info("HTTP/JSON gateway on %s port %d", host, http_port)
    stop, collector = _stop_on_signals(metrics.gc_pauses)

    pull = None
    if prometheus_url:
        from scaleset.prometheus import PrometheusSource, pull_metrics

        pull = functools.partial(pull_metrics, control, PrometheusSource(prometheus_url))
    driver = asyncio.create_task(control.run_policies(advance_interval, stop, pull), name="scaleset-policies")
    lost: list[str] = []

    async def hold_the_database() -> None:
        """With PostgreSQL: prove every second that this server still holds the database; if it does not
        (the session died, a standby took over), stop serving at once so clients move to the new one."""
        heartbeat = getattr(opened, "heartbeat", None)
        while heartbeat is not None and not stop.is_set():
            try:
                await asyncio.to_thread(heartbeat)
            except ScaleSetError as e:
                lost.append(str(e))
                log.error("%s; stopping so that clients fail over to the server that holds it now", e)
                stop.set()
                return
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass

    holder = asyncio.create_task(hold_the_database(), name="scaleset-database-lease")
    await stop.wait()
    await holder
    log.info("shutting down: draining calls for up to %.0f s", grace)
    await driver
    await collector
    if gateway is not None:
        await gateway.stop()
    if lost:
        control.abandon()  # nothing more may be written: what is queued is answered UNAVAILABLE
        await server.stop(0.5)
    else:
        await server.stop(grace)
        await control.stop()
    log.info("stopped")
    return 1 if lost else 0


async def _run_cluster_member(
    store: str,
    address: str,
    region: Region,
    *,
    partitions: int | None,
    standby: bool,
    grace: float,
    advance_interval: float,
    prometheus_url: str | None,
    rate_limit: float,
    metrics_port: int,
    http_port: int | None,
    http_tls: Any,
    **cell: Any,
) -> int:
    """``serve --cluster``: this server as one of several active ones on a PostgreSQL database."""
    from scaleset.cluster import PARTITIONS, CellSettings, serve_cluster

    if not store.startswith(("postgresql://", "postgres://")):
        raise invalid_input(
            "--cluster needs --store postgresql://... (the servers share it).", field="cluster"
        )
    if standby:
        raise invalid_input(
            "--standby has no use with --cluster: every server of a cluster serves, and the others take "
            "over a lost server's partitions.",
            field="standby",
        )
    if partitions is not None and not 1 <= partitions <= 256:
        raise invalid_input("--partitions must be between 1 and 256.", field="partitions")
    pull = None
    if prometheus_url:
        from scaleset.prometheus import PrometheusSource, pull_metrics

        pull = functools.partial(pull_metrics, source=PrometheusSource(prometheus_url))
    settings = CellSettings(
        region, address.rsplit(":", 1)[0], advance_interval=advance_interval, pull=pull, **cell
    )
    stop, collector = _stop_on_signals()
    try:
        return await serve_cluster(
            store,
            address,
            settings,
            stop=stop,
            partitions=partitions or PARTITIONS,
            rate_limit=rate_limit,
            metrics_port=metrics_port,
            http_port=http_port,
            http_tls=http_tls,
            grace=grace,
        )
    finally:
        stop.set()
        await collector


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _raise_file_limit() -> None:
    """Every connection is a file descriptor: lift the soft limit (often 1,024) to the hard one, so idle
    connections cannot starve new clients and health checks."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65_536, hard)
            )
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d: %s", soft, e)


def _security(args: argparse.Namespace) -> tuple[Any, Any]:
    """The server's authenticator and TLS credentials from the serve flags; refuses to listen beyond
    localhost without TLS unless told to."""
    authenticator = credentials = None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise invalid_input("--tls-cert and --tls-key go together.", field="tls")
    if args.tls_cert:
        from scaleset.auth import server_credentials

        credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    elif args.host not in LOCAL_HOSTS and not args.allow_insecure:
        raise invalid_input(
            f"refusing to listen on {args.host} without TLS: pass --tls-cert and --tls-key "
            "(and --tokens or --jwt-public-key), or --allow-insecure on a trusted network.",
            "InsecureListenRefused",
            field="host",
        )
    if args.tokens or args.jwt_public_key:
        from pathlib import Path

        from scaleset.auth import Authenticator

        jwt = {
            "jwt_key": Path(args.jwt_public_key).read_text() if args.jwt_public_key else None,
            "jwt_audience": args.jwt_audience,
            "jwt_issuer": args.jwt_issuer,
        }
        authenticator = Authenticator.from_file(args.tokens, **jwt) if args.tokens else Authenticator(**jwt)
    elif args.host not in LOCAL_HOSTS:
        log.warning(
            "listening on %s with no authentication: anyone who reaches it can change the fleet", args.host
        )
    return authenticator, credentials


def _cluster_tls(args: argparse.Namespace) -> tuple[Any, Any] | None:
    """With --cluster and TLS: what the front and each partition's server listen with (a fresh
    credentials object per server: gRPC binds one to one server), and how this server reaches the others
    (their certificates chain to --tls-ca, or to the system's roots; it presents its own, for mutual TLS)."""
    if not (args.cluster and args.tls_cert):
        return None
    from pathlib import Path

    import grpc

    from scaleset.auth import server_credentials

    peer = grpc.ssl_channel_credentials(
        root_certificates=Path(args.tls_ca).read_bytes() if args.tls_ca else None,
        private_key=Path(args.tls_key).read_bytes(),
        certificate_chain=Path(args.tls_cert).read_bytes(),
    )
    return functools.partial(server_credentials, args.tls_cert, args.tls_key, args.tls_client_ca), peer


def _http_tls(args: argparse.Namespace) -> Any:
    """The HTTP/JSON gateway's TLS context: the gRPC server's certificate and, with --tls-client-ca,
    client certificates required as on gRPC."""
    if args.http_port is None or not args.tls_cert:
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_client_ca:
        context.load_verify_locations(args.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def cmd_serve(args: argparse.Namespace) -> int:
    from scaleset.documents import load_document

    region = Region.from_dict(load_document(args.region)) if args.region else DEFAULT_REGION
    authenticator, credentials = _security(args)
    return asyncio.run(
        run_server(
            args.store or args.db,
            f"{args.host}:{args.port}",
            region,
            metrics_port=args.metrics_port,
            instance_limit=args.instance_limit,
            grace=args.grace,
            advance_interval=args.advance_interval,
            prometheus_url=args.prometheus_url,
            event_retention=args.event_retention,
            request_retention=args.request_retention,
            authenticator=authenticator,
            credentials=credentials,
            rate_limit=args.rate_limit,
            max_watchers=args.max_watchers,
            watch_messages_per_second=args.watch_messages_per_second,
            stream_send_timeout=args.stream_send_timeout,
            max_connections=args.max_connections,
            http_port=args.http_port,
            http_tls=_http_tls(args),
            standby=args.standby,
            executors=args.executors,
            cluster=args.cluster,
            partitions=args.partitions,
            cluster_tls=_cluster_tls(args),
        )
    )


def cmd_watch_proxy(args: argparse.Namespace) -> int:
    from pathlib import Path

    authenticator, credentials = _security(args)
    upstream_credentials = None
    if args.tls_ca or args.upstream_tls:
        import grpc

        upstream_credentials = grpc.ssl_channel_credentials(
            Path(args.tls_ca).read_bytes() if args.tls_ca else None
        )

    async def run() -> int:
        from scaleset.watchproxy import serve_watch_proxy

        _raise_file_limit()
        stop, collector = _stop_on_signals()
        try:
            return await serve_watch_proxy(
                args.server,
                f"{args.host}:{args.port}",
                stop=stop,
                upstream_credentials=upstream_credentials,
                token=args.token,
                credentials=credentials,
                authenticator=authenticator,
                max_watchers=args.max_watchers,
                messages_per_second=args.watch_messages_per_second,
                stream_send_timeout=args.stream_send_timeout,
                max_connections=args.max_connections,
                buffer_events=args.buffer_events,
                buffer_bytes=int(args.buffer_mb * 1024 * 1024),
                metrics_port=args.metrics_port,
                grace=args.grace,
            )
        finally:
            stop.set()
            await collector

    return asyncio.run(run())


# ----- client commands ----------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from scaleset.client import Client

    root = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return Client(args.server, token=args.token or None, root_certificates=root)


def _print_plan(plan: Plan, limit: int = 20) -> None:
    what = "dry run" if plan.dry_run else "applied"
    print(
        f"{plan.scale_set}: {plan.capacity_before} -> {plan.capacity_after} instances ({what}): "
        f"{plan.create_count} to create, {plan.delete_count} to delete"
    )
    if plan.items_omitted:
        print("  (too many to list here: scaleset show or scaleset watch shows the instances)")
    items: Sequence[PlannedCreate | PlannedDelete]
    for label, items in (("create", plan.creates), ("delete", plan.deletes)):
        for item in items[:limit]:
            zone = item.zone or "regional"
            print(
                f"  {label} {item.instance_id:>6}  zone {zone:<8} fd {item.fault_domain}  {item.priority:<7} {item.vm_size}"
            )
            print(f"         {item.reason}")
        if len(items) > limit:
            print(f"  ... and {len(items) - limit} more")


def render_table(name: str, info: Any, instances: Sequence[Instance], fault_domains: int) -> str:
    """A zone x fault-domain table of instance counts, then priority, size and state counts."""
    spec = info.spec
    lines = [
        f"{name}  {spec.orchestration_mode}  capacity {info.capacity}  revision {info.revision}  model {spec.model_version}",
    ]
    zones: list[str | None] = list(spec.zones) or [None]
    zones += sorted({i.zone for i in instances} - set(zones), key=lambda z: (z is None, z or ""))
    fds = sorted(set(range(fault_domains)) | {i.fault_domain for i in instances})
    cells = Counter((i.zone, i.fault_domain) for i in instances)
    header = "            " + "".join(f"{'FD' + str(f):>6}" for f in fds) + f"{'total':>8}"
    lines.append(header)
    for z in zones:
        label = f"zone {z}" if z is not None else "regional"
        row = "".join(f"{cells.get((z, f), 0):>6}" for f in fds)
        lines.append(f"{label:<12}{row}{sum(cells.get((z, f), 0) for f in fds):>8}")
    priorities = Counter(i.priority for i in instances)
    sizes = Counter(i.vm_size for i in instances)
    lines.append(
        "priority: " + ", ".join(f"{p} {n}" for p, n in sorted(priorities.items()))
        if priorities
        else "priority: -"
    )
    lines.append(
        "sizes:    " + ", ".join(f"{s} {n}" for s, n in sorted(sizes.items())) if sizes else "sizes:    -"
    )
    deallocated = sum(i.power_state == "deallocated" for i in instances)
    unhealthy = sum(i.health == "Unhealthy" for i in instances)
    protected = sum(i.protect_from_scale_in or i.protect_from_scale_set_actions for i in instances)
    lines.append(f"deallocated {deallocated}, unhealthy {unhealthy}, protected {protected}")
    return "\n".join(lines)


def cmd_create(args: argparse.Namespace) -> int:
    from scaleset.documents import load_document, spec_from_document

    spec, capacity, ignored = spec_from_document(load_document(args.file))
    for prop in ignored:
        print(f"warning: ignored ARM property {prop} (scaleset does not model it)", file=sys.stderr)
    if args.name:
        import dataclasses

        spec = dataclasses.replace(spec, name=args.name)
    if args.capacity is not None:
        capacity = args.capacity
    with _client(args) as client:
        plan = client.create_scale_set(spec, capacity or 0)
        info = client.get_scale_set(spec.name)
    print(f"created {info.spec.name} (revision {info.revision})")
    _print_plan(plan)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.get_scale_set(args.name)
        instances = client.list_instances(args.name)
        region = client.describe_region()
    fixed = info.spec.platform_fault_domain_count or 1
    span = region.fault_domains_per_zone if fixed <= 1 else fixed
    if args.output == "json":
        print(
            json.dumps(
                {
                    "spec": info.spec.to_dict(),
                    "capacity": info.capacity,
                    "revision": info.revision,
                    "etag": info.etag,
                    "instances": [_instance_dict(i) for i in instances],
                },
                indent=2,
            )
        )
    else:
        print(render_table(args.name, info, instances, span))
    return 0


def _instance_dict(i: Instance) -> dict[str, Any]:
    return {f: getattr(i, f) for f in i.__slots__}


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        infos = client.list_scale_sets()
    if args.output == "json":
        print(
            json.dumps(
                [{"spec": i.spec.to_dict(), "capacity": i.capacity, "revision": i.revision} for i in infos],
                indent=2,
            )
        )
        return 0
    print(f"{'NAME':<24}{'MODE':<10}{'ZONES':<10}{'CAPACITY':>9}{'REVISION':>10}")
    for i in infos:
        print(
            f"{i.spec.name:<24}{i.spec.orchestration_mode:<10}{','.join(i.spec.zones) or '-':<10}{i.capacity:>9}{i.revision:>10}"
        )
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    with _client(args) as client:
        plan = client.set_capacity(args.name, args.capacity, dry_run=args.dry_run, etag=args.etag or "")
    _print_plan(plan, limit=args.limit)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.instances:
            _print_plan(client.delete_instances(args.name, args.instances))
        else:
            client.delete_scale_set(args.name)
            print(f"deleted {args.name}")
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    with _client(args) as client:
        eviction = client.evict(args.name, args.instances)
    print(f"deleted: {list(eviction.deleted)}\ndeallocated: {list(eviction.deallocated)}")
    return 0


def cmd_protect(args: argparse.Namespace) -> int:
    scale_in = not args.off
    actions = scale_in and args.scale_set_actions
    with _client(args) as client:
        client.set_protection(args.name, args.instances, scale_in, actions)
    state = "off" if args.off else ("from scale-in and scale-set actions" if actions else "from scale-in")
    print(f"protection {state} for {len(args.instances)} instances of {args.name}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for e in client.watch(args.name or "", args.after):
            where = e.scale_set or "region"
            print(f"#{e.sequence} {where} r{e.revision} {e.type}: {e.summary}", flush=True)
            if args.count and e.sequence >= args.count:
                break
    return 0


def render_rebalance(plan: Any, limit: int = 20) -> str:
    """The before/after zone x fault-domain table and the waves of a rebalance plan."""
    what = "dry run" if plan.dry_run else "applied"
    lines = [
        f"{plan.scale_set}: {plan.status}, {plan.replacements} replacements in {len(plan.waves)} waves "
        f"(max surge {plan.max_surge}), solved in {plan.solve_seconds * 1000:.0f} ms"
        + (f" of {plan.time_limit_s:g} s" if plan.time_limit_s else "")
        + f" ({what})",
        "violation: "
        + ", ".join(
            f"{k} {plan.violation_before[k]} -> {plan.violation_after[k]}"
            for k in sorted(plan.violation_before)
        )
        + f" (weighted {plan.score_after}, proven bound {plan.violation_bound})",
    ]
    if plan.stages:
        lines.append(
            "stages: "
            + ", ".join(
                f"{s.objective} {s.value} {s.status} in {s.seconds * 1000:.0f} ms" for s in plan.stages
            )
        )
    zones = list(plan.zone_counts_before)
    keys = set(plan.fault_domain_counts_before) | set(plan.fault_domain_counts_after)
    fds = sorted({f for _, f in keys})
    cell = {
        k: f"{plan.fault_domain_counts_before.get(k, 0)}->{plan.fault_domain_counts_after.get(k, 0)}"
        for k in keys
    }
    lines.append("            " + "".join(f"{'FD' + str(f):>10}" for f in fds) + f"{'total':>12}")
    for z in zones:
        row = "".join(f"{cell.get((z, f), '0->0'):>10}" for f in fds)
        total = f"{plan.zone_counts_before[z]}->{plan.zone_counts_after.get(z, 0)}"
        lines.append(f"{('zone ' + z) if z else 'regional':<12}{row}{total:>12}")
    for wave in list(plan.waves)[:limit]:
        lines.append(f"wave {wave.index + 1}:")
        for c in wave.creates:
            ident = f" (id {c.instance_id})" if not plan.dry_run else ""
            lines.append(
                f"  create zone {c.zone or 'regional'} fd {c.fault_domain} {c.priority} {c.vm_size}{ident}"
            )
            lines.append(f"         {c.reason}")
        for d in wave.deletes:
            lines.append(
                f"  delete {d.instance_id} (zone {d.zone or 'regional'} fd {d.fault_domain} {d.priority} {d.vm_size})"
            )
            lines.append(f"         {d.reason}")
    if len(plan.waves) > limit:
        lines.append(f"... and {len(plan.waves) - limit} more waves")
    return "\n".join(lines)


def cmd_rebalance(args: argparse.Namespace) -> int:
    with _client(args) as client:
        plan = client.rebalance(
            args.name,
            max_replacements=args.max_replacements,
            max_surge=args.max_surge,
            time_limit_s=args.time_limit,
            dry_run=not args.apply,
            max_replacements_percent=args.max_replacements_percent,
        )
    print(render_rebalance(plan, args.limit))
    return 0


def render_upgrade(name: str, u: Any) -> str:
    """A readable rolling-upgrade progress view of a :class:`~scaleset.policies.upgrade.RollingUpgrade`."""
    if u is None:
        return f"{name}: no rolling upgrade has run"
    progress = u.progress()
    done = min(u.next_batch, len(u.batches))
    lines = [
        f"{name}: rolling upgrade to model {u.model_version}: {u.status}",
        f"batches: {done} of {len(u.batches)} done, {len(u.batches) - done} left",
        f"instances: {progress['successful_instance_count']} upgraded, {progress['failed_instance_count']} failed, "
        f"{progress['in_progress_instance_count']} in progress, {progress['pending_instance_count']} pending",
    ]
    if u.in_batch:
        lines.append(f"current batch: {list(u.in_batch)}")
    if u.error_code:
        lines.append(f"error [{u.error_code}]: {u.error_message}")
    return "\n".join(lines)


def cmd_upgrade(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "start":
            status = client.start_rolling_upgrade(args.name)
        elif args.action == "cancel":
            status = client.cancel_rolling_upgrade(args.name)
        else:
            status = client.get_rolling_upgrade(args.name)
    print(render_upgrade(args.name, status))
    return 0


def render_decision(d: Any) -> str:
    """One autoscale decision: when, what, and every reason."""
    import datetime as dt

    when = dt.datetime.fromtimestamp(d.time, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    head = f"{when}  {d.kind:<18} {d.capacity_before} -> {d.capacity}  profile {d.profile or '-'}"
    if d.rule is not None:
        head += f"  rule {d.rule + 1}"
    values = ", ".join(f"{k}={'-' if v is None else f'{v:.4g}'}" for k, v in d.metric_values.items())
    lines = [head] + ([f"    metrics: {values}"] if values else [])
    if d.forecast is not None:
        lines.append(f"    forecast: {d.forecast:.4g}")
    lines += [f"    {e}" for e in d.explanation]
    return "\n".join(lines)


def cmd_autoscale(args: argparse.Namespace) -> int:
    from scaleset.documents import autoscale_from_document, load_document

    with _client(args) as client:
        if args.action == "set":
            setting, ignored = autoscale_from_document(load_document(args.file))
            stored = client.set_autoscale_setting(args.name, setting)
            print(f"{args.name}: autoscale setting with {len(stored.profiles)} profiles stored")
            if ignored:
                print(f"ignored (not modelled): {', '.join(ignored)}", file=sys.stderr)
        elif args.action == "show":
            print(json.dumps(client.get_autoscale_setting(args.name).to_dict(), indent=2))
        elif args.action == "delete":
            client.delete_autoscale_setting(args.name)
            print(f"{args.name}: autoscale setting deleted")
        elif args.action == "evaluate":
            print(render_decision(client.evaluate_autoscale(args.name)))
        elif args.action == "history":
            for decision in client.autoscale_history(args.name, args.limit):
                print(render_decision(decision))
        elif args.action == "report":
            import time

            accepted = client.report_metrics(args.name, args.metric, [(time.time(), v) for v in args.values])
            print(f"{args.name}: {accepted} samples of {args.metric} accepted")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    """``scaleset cluster status``: the servers of a PostgreSQL database and when each was last seen; for
    a cluster (``serve --cluster``), which partitions each owns; else which server is active."""
    from scaleset.postgres import LEASE_S, ClusterDirectory, PostgresStore

    if not (args.store or "").startswith(("postgresql://", "postgres://")):
        print("error: cluster status needs --store postgresql://... (or $SCALESET_STORE)", file=sys.stderr)
        return 2

    def seen(age: float, lease: float = 3 * LEASE_S) -> str:
        return f"{age:.1f} s ago" if age < lease else f"{age:.0f} s ago (gone)"

    cluster = ClusterDirectory.read(args.store)
    if cluster is not None:
        from scaleset.cluster import ROUTE_TTL_S  # a cluster's servers beat every second

        partitions, members, owners = cluster
        owned = {address: sorted(p for p, (server, _, age) in owners.items() if server == address and age < ROUTE_TTL_S)
                 for address, _ in members}  # fmt: skip
        print(f"{'address':<28} {'partitions':<40} last seen")
        for address, age in members:
            print(f"{address:<28} {','.join(map(str, owned[address])) or '-':<40} {seen(age, ROUTE_TTL_S)}")
        orphans = sorted(set(range(partitions)) - {p for ps in owned.values() for p in ps})
        print(
            f"{partitions} partitions; "
            + (f"without an owner: {','.join(map(str, orphans))}" if orphans else "all owned")
        )
        return 0
    servers = PostgresStore.list_servers(args.store)
    print(f"{'address':<28} {'role':<8} last seen")
    for address, role, age in servers:
        print(f"{address:<28} {role:<8} {seen(age)}")
    if not any(role == "active" and age < 3 * LEASE_S for _, role, age in servers):
        print("no active server")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """``scaleset db check``: the database's integrity, and a full rebuild of the state from it. ``scaleset
    db backup --to COPY``: a copy of a SQLite database, made while its server runs."""
    from scaleset.control import ControlPlane
    from scaleset.store import backup

    if args.action == "backup":
        if args.store:
            print(
                "error: db backup copies a SQLite database; back up PostgreSQL with its own tools "
                "(pg_dump, pg_basebackup).",
                file=sys.stderr,
            )
            return 2
        if not args.to:
            print("error: db backup needs --to, the file to copy the database to.", file=sys.stderr)
            return 2
        sequence = backup(args.db, args.to)
        print(f"{args.db}: backed up to {args.to} at sequence {sequence}")
        return 0
    location = args.store or args.db
    if not args.store and not os.path.exists(args.db):
        print(f"error: {args.db} does not exist", file=sys.stderr)
        return 2
    store = open_store(location)
    try:
        try:
            summary = ControlPlane(store, DEFAULT_REGION).check()
        except ScaleSetError:
            raise
        except Exception as e:
            print(f"error [DatabaseDamaged]: {store.path}: {e}", file=sys.stderr)
            return 2
    finally:
        store.close()
    print(
        f"{store.path}: ok: {summary['scale_sets']} scale sets, {summary['instances']} instances, "
        f"state rebuilt at sequence {summary['sequence']}"
    )
    return 0


def cmd_region(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "zone":
            region = client.set_zone_available(args.zone, args.state == "up")
        elif args.action == "quota":
            cores = None if args.cores == "none" else int(args.cores)
            region = client.set_core_quota(args.family, cores)
        elif args.action == "pool":
            available = None if args.available == "unlimited" else int(args.available)
            region = client.set_pool_capacity(
                args.zone if args.zone != "regional" else None,
                args.vm_size,
                args.priority,
                available,
                args.price,
                restricted=args.restricted,
            )
        else:
            region = client.describe_region()
    print(
        "zones: "
        + ", ".join(f"{z} ({'down' if z in region.unavailable_zones else 'up'})" for z in region.zones)
    )
    print(f"fault domains per zone: {region.fault_domains_per_zone}")
    for p in region.pools:
        avail = "unlimited" if p.available is None else p.available
        restricted = ", not offered (restricted)" if p.restricted else ""
        print(
            f"pool {p.zone or 'regional'}/{p.vm_size}/{p.priority}: available {avail}, price {p.price}{restricted}"
        )
    for q in region.core_quotas:
        print(f"core quota {q.family}: {q.cores} vCPUs")
    return 0


def cmd_executor(args: argparse.Namespace) -> int:
    """Runs an executor until SIGTERM or SIGINT."""
    from scaleset.executor import ApplicationHealth, Executor, FakeCloud, LocalProcesses, Provider

    provider: Provider
    if args.kind == "fake":
        capacity = {}
        for item in args.pool or []:
            where, _, count = item.rpartition("=")
            zone, size, priority = ([*where.split("/"), "Regular"])[:3]
            capacity[(zone or None, size, priority)] = int(count)
        provider = FakeCloud(
            seed=args.seed,
            latency_s=(args.latency / 2, args.latency * 1.5),
            capacity=capacity,
            quota=args.quota,
            failure_rate=args.failure_rate,
        )
    else:
        provider = LocalProcesses(
            ApplicationHealth(
                protocol=args.probe_protocol, interval_s=args.probe_interval, probes=args.probes
            )
        )
    with _client(args) as client:
        executor = Executor(
            client,
            provider,
            executor_id=args.id,
            zones=args.zone or (),
            max_in_flight=args.max_in_flight,
            lease_seconds=args.lease_seconds,
            probe_interval=args.probe_interval if args.kind == "local" else None,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: executor.stop())
        log.info("executor %s (%s) leasing from %s", executor.executor_id, args.kind, args.server)
        try:
            executor.run()
        finally:
            if isinstance(provider, LocalProcesses):
                provider.close()
    log.info("executor %s stopped after %d operations", executor.executor_id, executor.carried_out)
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    with _client(args) as client:
        report = client.fleet_report(args.name)
    if args.output == "json":
        print(json.dumps(dataclasses.asdict(report), indent=2, default=str))
        return 0
    states = ", ".join(f"{n} {s}" for s, n in report.provisioning_states.items()) or "no instances"
    print(f"{report.scale_set}: desired {report.desired_capacity} ({states}); mode {report.execution_mode}")
    if report.shortfall:
        print(
            f"  shortfall {report.shortfall}, {report.consecutive_failures} failures in a row, next try at {report.retry_at}"
        )
    if report.last_error_code:
        print(f"  last error: {report.last_error_code}: {report.last_error_message}")
    for zone, size, priority, until in report.unavailable_pools:
        print(f"  pool {zone or 'regional'}/{size}/{priority} skipped until {until:.0f}")
    for w in report.lifecycle_actions:
        print(
            f"  instance {w.instance_id} waits on {w.transition.lower()} hook '{w.hook}' until {w.deadline:.0f}"
        )
    for e in report.scheduled_events:
        print(
            f"  {e.event_type} (event {e.event_id}) of {list(e.instance_ids)} not before {e.not_before:.0f}"
        )
    print(f"  {report.pending_operation_count} pending operations")
    for op in report.pending_operations[: args.limit]:
        print(
            f"    #{op.operation_id} {op.kind} {op.scale_set}_{op.instance_id} in {op.zone or 'regional'} (try {op.attempt})"
        )
    return 0


def cmd_hook(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "complete":
            result = "Abandon" if args.abandon else "Continue"
            applied = client.complete_lifecycle_action(args.name, args.instance, args.hook, result)
        else:
            applied = client.record_lifecycle_action_heartbeat(args.name, args.instance, args.hook)
    if not applied:
        print(f"no lifecycle action of hook '{args.hook}' waits on instance {args.instance}", file=sys.stderr)
        return 1
    done = "completed" if args.action == "complete" else "extended by a heartbeat"
    print(f"{args.name}_{args.instance}: hook '{args.hook}' {done}")
    return 0


def _listener_flags(p: argparse.ArgumentParser, port: int, metrics_port: int) -> None:
    """What ``serve`` and ``watch-proxy`` share: where they listen, TLS and who may call (see `_security`),
    and the bounds on watchers, connections and streams."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=port, help="port to listen on (default: %(default)s)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=metrics_port,
        help="Prometheus metrics port; 0 turns it off (default: %(default)s)",
    )
    p.add_argument("--grace", type=float, default=5.0, help="seconds to drain calls on shutdown")
    p.add_argument(
        "--tls-cert",
        help="server certificate (PEM); with --tls-key, serve TLS (reloaded when the files change)",
    )
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA (PEM) that client certificates must chain to: mutual TLS")
    p.add_argument("--tokens", help="YAML/JSON file of static bearer tokens: tokens: [{token, name, role}]")
    p.add_argument("--jwt-public-key", help="PEM public key that verifies JWT bearer tokens (RS256/ES256)")
    p.add_argument("--jwt-audience", help="required JWT audience")
    p.add_argument("--jwt-issuer", help="required JWT issuer")
    p.add_argument(
        "--max-watchers", type=int, default=1000, help="WatchEvents streams at once (default: %(default)s)"
    )
    p.add_argument(
        "--watch-messages-per-second",
        type=float,
        default=WATCH_MESSAGES_PER_SECOND,
        help="WatchEvents messages a second across all watchers, each with every event since the "
        "watcher's last: fewer leave more of the server to changes, more deliver sooner with many "
        "watchers (default: %(default)s)",
    )
    p.add_argument(
        "--stream-send-timeout",
        type=float,
        default=STREAM_SEND_TIMEOUT_S,
        help="seconds a WatchEvents or LeaseOperations client may take no message before the server ends "
        "its stream with RESOURCE_EXHAUSTED SlowConsumer (a watch resumes after its last event) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help="client connections at once; more are closed as they arrive, until one ends "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--allow-insecure",
        action="store_true",
        help="listen beyond localhost without TLS (refused otherwise)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaleset", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("SCALESET_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--server",
        default=os.environ.get("SCALESET_SERVER", "localhost:50051"),
        help="server address (default: %(default)s)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("SCALESET_TOKEN", ""), help="bearer token ($SCALESET_TOKEN)"
    )
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("SCALESET_TLS_CA"),
        help="CA certificate (PEM) of a TLS server ($SCALESET_TLS_CA)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gRPC service")
    _listener_flags(p, port=50051, metrics_port=9464)
    p.add_argument("--db", default="scaleset.db", help="SQLite file (default: %(default)s)")
    p.add_argument(
        "--store",
        default=os.environ.get("SCALESET_STORE"),
        help="a postgresql:// URL to keep the state in PostgreSQL instead of --db ($SCALESET_STORE)",
    )
    p.add_argument(
        "--standby",
        action="store_true",
        help="with --store postgresql://: wait while another server holds the database, take over when it goes",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="with --store postgresql://: one of several active servers; scale sets are shared out among them "
        "by partition, and any server answers for any scale set",
    )
    p.add_argument(
        "--partitions",
        type=int,
        help="with --cluster, on a new database: how many partitions the scale sets are hashed onto (default 12)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        help="also serve the API as HTTP/JSON on this port (POST /scaleset.v1.ScaleSets/SetCapacity ...); "
        "off by default",
    )
    p.add_argument(
        "--region", help="YAML/JSON region: zones, fault_domains_per_zone, pools (first start only)"
    )
    p.add_argument(
        "--instance-limit", type=int, help="raise the per-scale-set instance ceiling (private fleets)"
    )
    p.add_argument(
        "--advance-interval",
        type=float,
        default=30.0,
        help="seconds between runs of the time-driven policies: rolling upgrades, repairs, autoscale "
        "(Azure evaluates every 30 to 60 s), automatic zone balance (default: %(default)s)",
    )
    p.add_argument(
        "--rate-limit",
        type=float,
        default=10_000.0,
        help="calls a second per client address, in bursts as large; 0 turns it off (default: %(default)s)",
    )
    p.add_argument(
        "--event-retention",
        type=int,
        default=100_000,
        help="events kept before the newest snapshot for resuming watchers (default: %(default)s)",
    )
    p.add_argument(
        "--request-retention",
        type=int,
        default=100_000,
        help="request_id replies kept for retries, newest first (default: %(default)s)",
    )
    p.add_argument(
        "--prometheus-url",
        help="Prometheus server (http://host:9090) that autoscale triggers with a PromQL query read from",
    )
    p.add_argument(
        "--executors",
        action="store_true",
        help="hand every create, delete, reimage and restart to executors (scaleset executor ...) and wait "
        "for their reports, instead of applying plans at once",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "watch-proxy",
        help="serve WatchEvents to many watchers from one watch of the server (--server, with --token "
        "and --tls-ca to reach it)",
    )
    _listener_flags(p, port=50061, metrics_port=0)
    p.add_argument(
        "--upstream-tls",
        action="store_true",
        help="reach the server with TLS, trusting the system's CAs (--tls-ca: that CA instead)",
    )
    p.add_argument(
        "--buffer-events",
        type=int,
        default=100_000,
        help="the most recent events held for watchers; one resuming from before them reads the "
        "server's history (default: %(default)s)",
    )
    p.add_argument(
        "--buffer-mb",
        type=float,
        default=128.0,
        help="... and their most bytes, in MB (default: %(default)s)",
    )
    p.set_defaults(func=cmd_watch_proxy)

    p = sub.add_parser("executor", help="carry a server's operations out (serve --executors)")
    p.add_argument(
        "kind", choices=["fake", "local"], help="fake: a simulated cloud; local: one process per instance"
    )
    p.add_argument("--id", help="executor id (default: host and pid)")
    p.add_argument("--zone", action="append", help="only operations in this zone (repeatable)")
    p.add_argument("--max-in-flight", type=int, default=16)
    p.add_argument("--lease-seconds", type=int, default=60)
    p.add_argument("--seed", type=int, default=0, help="fake: the seed every simulated outcome follows")
    p.add_argument("--latency", type=float, default=0.0, help="fake: mean seconds per operation")
    p.add_argument("--failure-rate", type=float, default=0.0, help="fake: share of operations that fail once")
    p.add_argument("--quota", type=int, help="fake: most instances in all (OperationNotAllowed beyond)")
    p.add_argument(
        "--pool", action="append", help="fake: ZONE/SIZE[/PRIORITY]=COUNT capacity of one pool (repeatable)"
    )
    p.add_argument("--probe-interval", type=float, default=5.0, help="local: seconds between health probes")
    p.add_argument(
        "--probe-protocol",
        choices=["http", "tcp"],
        default="http",
        help="local: GET /health, or a TCP connect",
    )
    p.add_argument(
        "--probes", type=int, default=1, help="local: probes in a row that change the health state"
    )
    p.set_defaults(func=cmd_executor)

    p = sub.add_parser("hook", help="complete a lifecycle action, or extend it with a heartbeat")
    p.add_argument("action", choices=["complete", "heartbeat"])
    p.add_argument("name")
    p.add_argument("instance", type=int)
    p.add_argument("hook")
    p.add_argument("--abandon", action="store_true", help="complete with Abandon (default: Continue)")
    p.set_defaults(func=cmd_hook)

    p = sub.add_parser("fleet", help="a scale set's infrastructure against its desired state")
    p.add_argument("name")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.add_argument("--limit", type=int, default=20, help="pending operations to print")
    p.set_defaults(func=cmd_fleet)

    p = sub.add_parser("create", help="create a scale set from a YAML/JSON spec")
    p.add_argument("-f", "--file", required=True, help="spec file (Azure property names; '-' for stdin)")
    p.add_argument("--name")
    p.add_argument("--capacity", type=int)
    p.set_defaults(func=cmd_create)

    for name in ("show", "get"):
        p = sub.add_parser(name, help="a scale set: zone x fault-domain table, priority and size counts")
        p.add_argument("name")
        p.add_argument("-o", "--output", choices=["table", "json"], default="table")
        p.set_defaults(func=cmd_show)

    p = sub.add_parser("list", help="all scale sets")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("scale", help="set a scale set's capacity")
    p.add_argument("name")
    p.add_argument("capacity", type=int)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--etag")
    p.add_argument("--limit", type=int, default=20, help="plan items to print")
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("delete", help="delete a scale set, or chosen instances of it")
    p.add_argument("name")
    p.add_argument("instances", nargs="*", type=int)
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("evict", help="evict Spot instances")
    p.add_argument("name")
    p.add_argument("instances", nargs="+", type=int)
    p.set_defaults(func=cmd_evict)

    p = sub.add_parser("protect", help="protect instances from scale-in (and scale-set actions)")
    p.add_argument("name")
    p.add_argument("instances", nargs="+", type=int)
    p.add_argument("--scale-set-actions", action="store_true", help="also protect from scale-set actions")
    p.add_argument("--off", action="store_true", help="remove protection")
    p.set_defaults(func=cmd_protect)

    p = sub.add_parser("watch", help="stream changes (resumable)")
    p.add_argument("name", nargs="?")
    p.add_argument(
        "--after", type=int, default=0, help="revision (with a name) or global sequence to resume after"
    )
    p.add_argument("--count", type=int, default=0, help="stop after this sequence number")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser(
        "rebalance", help="plan (or --apply) the fewest replacements that restore the target shape"
    )
    p.add_argument("name")
    p.add_argument("--apply", action="store_true", help="execute the plan (default: dry run)")
    p.add_argument("--max-replacements", type=int)
    p.add_argument("--max-replacements-percent", type=float)
    p.add_argument("--max-surge", type=int, default=1)
    p.add_argument(
        "--time-limit",
        type=float,
        help="solver time limit in seconds (default: 1, and 1 more per 250,000 instances)",
    )
    p.add_argument("--limit", type=int, default=20, help="waves to print")
    p.set_defaults(func=cmd_rebalance)

    p = sub.add_parser("upgrade", help="start, watch or cancel a rolling upgrade")
    p.add_argument("action", choices=["start", "status", "cancel"])
    p.add_argument("name")
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser("autoscale", help="autoscale settings, pushed metrics, decisions and their history")
    asub = p.add_subparsers(dest="action", required=True)
    a = asub.add_parser(
        "set", help="store a setting (Azure's JSON/YAML, or a whole ARM autoscaleSettings resource)"
    )
    a.add_argument("name")
    a.add_argument("-f", "--file", required=True, help="the setting document ('-' reads stdin)")
    for action, text in (
        ("show", "print the stored setting"),
        ("delete", "remove the setting"),
        ("evaluate", "what autoscale would decide now, and why"),
    ):
        asub.add_parser(action, help=text).add_argument("name")
    a = asub.add_parser("history", help="recorded decisions, newest first")
    a.add_argument("name")
    a.add_argument("--limit", type=int, default=20)
    a = asub.add_parser("report", help="push samples of a metric now (one per value)")
    a.add_argument("name")
    a.add_argument("metric")
    a.add_argument("values", type=float, nargs="+")
    p.set_defaults(func=cmd_autoscale)

    p = sub.add_parser(
        "cluster", help="the servers of a PostgreSQL database: which is active, or which partitions each owns"
    )
    p.add_argument("action", choices=["status"])
    p.add_argument("--store", default=os.environ.get("SCALESET_STORE"), help="the postgresql:// URL")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser(
        "db", help="check a database (stop the server first), or back a SQLite one up (while it runs)"
    )
    p.add_argument("action", choices=["check", "backup"])
    p.add_argument("--db", default="scaleset.db", help="SQLite file (default: %(default)s)")
    p.add_argument("--to", help="backup: the file to copy the database to (replaced whole, or not at all)")
    p.add_argument(
        "--store", default=os.environ.get("SCALESET_STORE"), help="a postgresql:// URL instead of --db"
    )
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("region", help="show the region, mark a zone up/down, set pool capacity")
    rsub = p.add_subparsers(dest="action")
    rsub.add_parser("show")
    z = rsub.add_parser("zone")
    z.add_argument("zone")
    z.add_argument("state", choices=["up", "down"])
    pool = rsub.add_parser("pool")
    pool.add_argument("zone", help="zone name, or 'regional'")
    pool.add_argument("vm_size")
    pool.add_argument("priority", choices=["Regular", "Spot"])
    pool.add_argument("available", help="count, or 'unlimited'")
    pool.add_argument("--price", type=float)
    quota = rsub.add_parser(
        "quota", help="a quota family's vCPU quota (standardDSv5Family, lowPriorityCores)"
    )
    quota.add_argument("family")
    quota.add_argument("cores", help="vCPUs, or 'none'")
    offered = pool.add_mutually_exclusive_group()
    offered.add_argument(
        "--restricted",
        action="store_const",
        const=True,
        help="the size is not offered here (SkuNotAvailable)",
    )
    offered.add_argument(
        "--offered", dest="restricted", action="store_const", const=False, help="offered again"
    )
    p.set_defaults(func=cmd_region)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except ScaleSetError as e:
        print(f"error [{e.code}]: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
