"""One instance of the local executor's fleet: a small HTTP server on a free port of 127.0.0.1.

``python -m scaleset.instance --name web_3 --model 2`` prints ``PORT <n>`` once it listens, then
answers ``GET /health`` (200 while it runs: what the Application Health probe reads) and ``GET /``
(its name, model and pid, as JSON). It stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scaleset.instance")
    parser.add_argument("--name", required=True)
    parser.add_argument("--model", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    about = json.dumps({"name": args.name, "model_version": args.model, "pid": os.getpid()}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"status": "Healthy"}' if self.path == "/health" else about
            self.send_response(200 if self.path in ("/", "/health") else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
