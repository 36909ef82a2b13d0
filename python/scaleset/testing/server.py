"""Run a real scaleset server on a background thread (its own asyncio loop), for tests and benchmarks."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scaleset.cli import open_store
from scaleset.control import ControlPlane
from scaleset.model import Region
from scaleset.service import build_server

__all__ = [
    "ServerThread",
    "WatchProxyThread",
    "free_port",
    "start_proxy_process",
    "start_server_process",
    "wait_serving",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server_process(db: Path, port: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``scaleset serve`` in a child process (the way operators run it); returns once it is SERVING."""
    return _start(
        "server", ["serve", "--db", str(db), "--port", str(port), "--metrics-port", "0", *extra], port, log
    )


def start_proxy_process(upstream: str, port: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``scaleset watch-proxy`` of the server at ``upstream`` in a child process; returns once it is SERVING
    (following the server)."""
    return _start(
        "watch proxy", ["--server", upstream, "watch-proxy", "--port", str(port), *extra], port, log
    )


def _start(what: str, args: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """``scaleset *args`` in a child process, its stderr appended to ``log``; returns once ``port`` answers
    SERVING."""
    with log.open("ab") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scaleset", *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=60, alive=lambda: proc.poll() is None)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"{what} did not start: {log.read_text()}") from None
    return proc


def wait_serving(target: str, timeout: float = 30, alive: Callable[[], bool] = lambda: True) -> None:
    """Returns once the gRPC health check of ``target`` answers SERVING; TimeoutError after ``timeout``
    seconds, or as soon as ``alive()`` is false."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    # Reconnect at once (gRPC's default backoff starts at 1 s), so SERVING is seen when it is reached.
    fast = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.max_reconnect_backoff_ms", 50)]
    with grpc.insecure_channel(target, options=fast) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            if not alive() or time.monotonic() > deadline:
                raise TimeoutError(f"{target} did not become SERVING within {timeout:g} s")
            time.sleep(0.02)


class ServerThread:
    """``with ServerThread(db_path, region) as server: Client(server.target)``; stops gracefully on exit.
    ``db_path`` is a SQLite file or a ``postgresql://`` URL."""

    def __init__(
        self,
        db_path: str,
        region: Region,
        *,
        authenticator: Any = None,
        credentials: Any = None,
        rate_limit: float | None = None,
        stream_send_timeout: float | None = None,
        executors: bool = False,
        **control_options: Any,
    ) -> None:
        self._mode = "Executors" if executors else "Immediate"
        self._server_options = {"authenticator": authenticator, "credentials": credentials}
        if rate_limit is not None:
            self._server_options["rate_limit"] = rate_limit
        if stream_send_timeout is not None:
            self._server_options["stream_send_timeout"] = stream_send_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="scaleset-test-server", daemon=True
        )
        self._thread.start()
        self.control = ControlPlane(open_store(db_path), region, **control_options)
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self) -> int:
        await self.control.start()
        await self.control.set_execution_mode(self._mode)
        self._server, port, self.metrics = await build_server(
            self.control, "127.0.0.1:0", **self._server_options
        )
        await self._server.start()
        return port

    async def _stop(self) -> None:
        await self._server.stop(1)
        await self.control.stop()

    def call(self, coro: Any) -> Any:
        """Runs a coroutine on the server's loop (e.g. to inspect the control plane)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WatchProxyThread:
    """``with WatchProxyThread(server.target) as proxy: Client(proxy.target).watch()``: a watch proxy
    (`scaleset.watchproxy`) on a background thread of its own, SERVING (following the server) once
    started; options as :func:`~scaleset.watchproxy.serve_watch_proxy` takes them."""

    def __init__(self, upstream: str, **options: Any) -> None:
        from scaleset.watchproxy import serve_watch_proxy

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="scaleset-test-proxy", daemon=True
        )
        self._thread.start()
        started: asyncio.Future[tuple[Any, int]] = self._loop.create_future()
        self._stop = asyncio.Event()

        async def run() -> int:
            return await serve_watch_proxy(
                upstream,
                "127.0.0.1:0",
                stop=self._stop,
                started=lambda proxy, port: started.set_result((proxy, port)),
                grace=1,
                **options,
            )

        self._run = asyncio.run_coroutine_threadsafe(run(), self._loop)
        #: The proxy (its log, its metrics registry) and the port it listens on.
        self.proxy, self.port = asyncio.run_coroutine_threadsafe(_wait(started), self._loop).result(
            timeout=30
        )
        self.target = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while not self.proxy.following:  # SERVING: its watch of the server is open
            if time.monotonic() > deadline:
                raise TimeoutError(f"the watch proxy did not reach {upstream}")
            time.sleep(0.01)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._run.result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> WatchProxyThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _wait(future: asyncio.Future[tuple[Any, int]]) -> tuple[Any, int]:
    return await future
