"""Run a real scaleset server on a background thread (its own asyncio loop), for tests and benchmarks."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from scaleset.control import ControlPlane
from scaleset.model import Region
from scaleset.service import build_server
from scaleset.store import SQLiteStore

__all__ = ["ServerThread"]


class ServerThread:
    """``with ServerThread(db_path, region) as server: Client(server.target)``; stops gracefully on exit."""

    def __init__(self, db_path: str, region: Region, **control_options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="scaleset-test-server", daemon=True)
        self._thread.start()
        self.control = ControlPlane(SQLiteStore(db_path), region, **control_options)
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self) -> int:
        await self.control.start()
        self._server, port, self.metrics = await build_server(self.control, "127.0.0.1:0")
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
