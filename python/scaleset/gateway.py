"""The HTTP/JSON face of the API (``scaleset serve --http-port 8080``), for people without gRPC tooling.

Every method of the proto is ``POST /<service>/<method>`` (``/scaleset.v1.ScaleSets/SetCapacity``) with the
request message as JSON (protobuf's JSON mapping, field names as in the proto: ``{"name": "web",
"capacity": 10}``) and the response message as JSON, as in the Connect protocol's unary JSON shape; the
server-streaming ``WatchEvents`` answers newline-delimited JSON, one message a line. Errors carry the HTTP
status of their gRPC code and ``{"code": "invalid_argument", "message": ..., "details": [...]}`` with the
same ErrorInfo / BadRequest / RetryInfo details, decoded.

The gateway owns aiohttp and holds no logic of its own: each call is forwarded to the same server's gRPC
services over a private Unix socket (in a directory only this process can open), with the caller's
``Authorization`` header and address, so authentication, roles, the rate limit, validation, limits and
errors are exactly the gRPC ones.
"""

from __future__ import annotations

import base64
import logging
import shutil
import ssl
import tempfile
from collections.abc import Mapping
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import error_details_pb2, status_pb2

from scaleset.service import FORWARDED_FOR, MAX_REQUEST_BYTES
from scaleset.v1 import scaleset_pb2 as pb

log = logging.getLogger(__name__)

__all__ = ["Gateway"]

#: The largest request body accepted (as the gRPC server's request limit).
MAX_BODY_BYTES = MAX_REQUEST_BYTES
_DEFAULT_TIMEOUT_S = 30.0
#: The Connect protocol's HTTP status for each gRPC code.
_HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
_DETAIL_TYPES = {
    m.DESCRIPTOR.full_name: m
    for m in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo)
}


def _methods() -> dict[str, MethodDescriptor]:
    return {
        f"/{service.full_name}/{method.name}": method
        for service in pb.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


def _error(code: grpc.StatusCode, message: str, details: list[Any] | None = None) -> web.Response:
    body = {"code": code.name.lower(), "message": message, "details": details or []}
    return web.json_response(body, status=_HTTP_STATUS.get(code, 500))


def _status_error(err: grpc.RpcError) -> web.Response:
    """A failed gRPC call as Connect's JSON error: the details with their type, bytes and decoded form."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details: list[Any] = []
    for key, value in err.trailing_metadata() or () if hasattr(err, "trailing_metadata") else ():
        if key != "grpc-status-details-bin":
            continue
        for detail in status_pb2.Status.FromString(value).details:
            kind = detail.TypeName()
            entry: dict[str, Any] = {"type": kind, "value": base64.b64encode(detail.value).decode()}
            if kind in _DETAIL_TYPES:
                message = _DETAIL_TYPES[kind]()
                detail.Unpack(message)
                entry["debug"] = json_format.MessageToDict(message, preserving_proto_field_name=True)
            details.append(entry)
    return _error(code, err.details() or "", details)


class Gateway:
    """Serves the HTTP/JSON face on ``host:port``, forwarding to the gRPC server at ``grpc_target``
    (``unix:/path``)."""

    @classmethod
    def attach(cls, server: grpc.aio.Server, *, tls: ssl.SSLContext | None = None) -> Gateway:
        """A gateway in front of ``server`` (call before the server starts): it reaches the gRPC services
        over a Unix socket in a directory only this process can open (0700), removed by :meth:`stop`."""
        private = tempfile.mkdtemp(prefix="scaleset-gateway-")
        server.add_insecure_port(f"unix:{private}/grpc.sock")
        gateway = cls(f"unix:{private}/grpc.sock", tls=tls)
        gateway._private = private
        return gateway

    def __init__(self, grpc_target: str, *, tls: ssl.SSLContext | None = None) -> None:
        self._private: str | None = None
        self._channel = grpc.aio.insecure_channel(
            grpc_target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self._methods = _methods()
        self._tls = tls
        self._runner: web.AppRunner | None = None
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/{service}/{method}", self._handle)
        self._app = app

    async def start(self, host: str, port: int) -> None:
        """Listens on ``host:port``."""
        # A handler is cancelled when its client goes away, so an abandoned watch ends its gRPC stream.
        self._runner = web.AppRunner(self._app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=self._tls).start()

    async def stop(self) -> None:
        """Cancels the calls in flight (watches never end by themselves), then stops listening."""
        await self._channel.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)

    def _metadata(self, request: web.Request) -> list[tuple[str, str]]:
        metadata = [(FORWARDED_FOR, request.remote or "")]
        if auth := request.headers.get("Authorization"):
            metadata.append(("authorization", auth))
        return metadata

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = f"/{request.match_info['service']}/{request.match_info['method']}"
        method = self._methods.get(path)
        if method is None:
            return _error(
                grpc.StatusCode.UNIMPLEMENTED, f"no method {path}; see proto/scaleset/v1/scaleset.proto."
            )
        input_class = message_factory.GetMessageClass(method.input_type)
        output_class = message_factory.GetMessageClass(method.output_type)
        try:
            body = await request.text()
            message = json_format.Parse(body or "{}", input_class())
        except (json_format.ParseError, UnicodeDecodeError) as e:
            return _error(
                grpc.StatusCode.INVALID_ARGUMENT, f"the body is not a JSON {method.input_type.name}: {e}"
            )
        except web.HTTPRequestEntityTooLarge:
            return _error(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"the body is larger than {MAX_BODY_BYTES} bytes."
            )
        timeout = _timeout(request.headers)
        if method.server_streaming:
            return await self._stream(request, path, message, output_class)
        call = self._channel.unary_unary(
            path,
            request_serializer=input_class.SerializeToString,
            response_deserializer=output_class.FromString,
        )
        try:
            reply = await call(message, timeout=timeout, metadata=self._metadata(request))
        except grpc.RpcError as err:
            return _status_error(err)
        return web.json_response(json_format.MessageToDict(reply, preserving_proto_field_name=True))

    async def _stream(
        self, request: web.Request, path: str, message: Any, output_class: Any
    ) -> web.StreamResponse:
        """A server stream as newline-delimited JSON; an error after the first message ends the stream with
        a last line ``{"error": {...}}``."""
        call = self._channel.unary_stream(
            path,
            request_serializer=type(message).SerializeToString,
            response_deserializer=output_class.FromString,
        )
        stream = call(message, metadata=self._metadata(request))
        try:
            try:
                first = await stream.read()
            except grpc.RpcError as err:
                return _status_error(err)
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            try:
                while first is not grpc.aio.EOF:
                    line = json_format.MessageToJson(first, preserving_proto_field_name=True, indent=None)
                    await response.write(line.encode() + b"\n")
                    first = await stream.read()
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.CANCELLED:
                    await response.write(b'{"error": ' + _status_error(err).body + b"}\n")  # type: ignore[operator]
            return response
        finally:
            stream.cancel()  # the client went away, or the stream ended: nothing left to read


def _timeout(headers: Mapping[str, str]) -> float:
    """Connect's ``Connect-Timeout-Ms`` header, or 30 s."""
    try:
        return max(0.001, int(headers.get("Connect-Timeout-Ms", "")) / 1000)
    except ValueError:
        return _DEFAULT_TIMEOUT_S
