"""The HTTP/JSON face: every method as POST /<service>/<method> with JSON, answered by the same gRPC
services (so the same validation, errors, auth and limits), against `scaleset serve --http-port`."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from scaleset.testing.server import free_port, start_server_process


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("gateway")
    tokens = tmp / "tokens.yaml"
    tokens.write_text(
        "tokens:\n  - {token: op-secret, name: ops, role: operator}\n  - {token: read-secret, name: dash, role: reader}\n"
    )
    port, http_port = free_port(), free_port()
    proc = start_server_process(
        tmp / "state.db", port, tmp / "server.log", "--http-port", str(http_port), "--tokens", str(tokens)
    )
    yield f"http://127.0.0.1:{http_port}"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def post(base: str, path: str, body: Any, token: str | None = "op-secret") -> tuple[int, Any]:
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            text = reply.read().decode()
            status = reply.status
    except urllib.error.HTTPError as err:
        text, status = err.read().decode(), err.code
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    return status, lines[0] if len(lines) == 1 else lines


def test_json_in_and_out_through_the_same_services(http: str) -> None:
    spec = {"name": "web", "zones": ["1", "2", "3"], "sku": {"name": "Standard_D2s_v5"}}
    status, created = post(http, "/scaleset.v1.ScaleSets/CreateScaleSet", {"scale_set": spec, "capacity": 3})
    assert status == 200 and created["scale_set"]["capacity"] == "3"  # uint64 as a string (proto JSON)
    assert created["scale_set"]["spec"]["orchestration_mode"] == "ORCHESTRATION_MODE_FLEXIBLE"
    assert len(created["plan"]["creates"]) == 3
    status, scaled = post(http, "/scaleset.v1.ScaleSets/SetCapacity", {"name": "web", "capacity": 5})
    assert status == 200 and scaled["plan"]["capacity_after"] == "5"
    status, listed = post(http, "/scaleset.v1.ScaleSets/ListInstances", {"name": "web"}, token="read-secret")
    assert status == 200 and listed["instances"]["instance_id"] == ["0", "1", "2", "3", "4"]


def test_errors_keep_their_code_field_and_details(http: str) -> None:
    status, error = post(http, "/scaleset.v1.ScaleSets/SetCapacity", {"name": "web"})
    assert status == 400 and error["code"] == "invalid_argument"
    debug = {d["type"]: d["debug"] for d in error["details"]}
    assert debug["google.rpc.ErrorInfo"]["reason"] == "InvalidParameter"
    assert debug["google.rpc.BadRequest"]["field_violations"][0]["field"] == "capacity"
    status, missing = post(
        http, "/scaleset.v1.ScaleSets/GetScaleSet", {"name": "nowhere"}, token="read-secret"
    )
    assert (status, missing["code"]) == (404, "not_found")
    status, garbage = post(http, "/scaleset.v1.ScaleSets/SetCapacity", {"name": "web", "capacity": "many"})
    assert (status, garbage["code"]) == (400, "invalid_argument")
    status, unknown = post(http, "/scaleset.v1.ScaleSets/Explode", {})
    assert (status, unknown["code"]) == (501, "unimplemented")


def test_tokens_and_roles_apply_as_on_grpc(http: str) -> None:
    status, anonymous = post(http, "/scaleset.v1.ScaleSets/ListScaleSets", {}, token=None)
    assert (status, anonymous["code"]) == (401, "unauthenticated")
    status, reader = post(
        http, "/scaleset.v1.ScaleSets/SetCapacity", {"name": "web", "capacity": 1}, token="read-secret"
    )
    assert (status, reader["code"]) == (403, "permission_denied")


def test_watch_streams_newline_delimited_json(http: str) -> None:
    spec = {"name": "watched", "zones": ["1"], "sku": {"name": "Standard_D2s_v5"}}
    status, _ = post(http, "/scaleset.v1.ScaleSets/CreateScaleSet", {"scale_set": spec, "capacity": 1})
    assert status == 200
    request = urllib.request.Request(
        http + "/scaleset.v1.ScaleSets/WatchEvents",
        data=json.dumps({"scale_set": "watched"}).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer read-secret"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as stream:
        first = json.loads(stream.readline())
    assert first["events"][0]["type"] == "ScaleSetCreated"
