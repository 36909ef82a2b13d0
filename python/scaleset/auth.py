"""Who may call what: bearer tokens (static ones from a file, or JWTs verified with PyJWT) mapped to roles,
enforced in one interceptor, and TLS (optionally mutual) credentials that reload when their files change.

Roles, each including the ones before it:

* ``reader``: every read (get, list, watch, evaluate, history) and Echo.
* ``operator``: every change to scale sets, their instances, upgrades, repairs, autoscale and metrics.
* ``admin``: the region too (zones up or down, pool capacity).

Health checking and server reflection stay open, so probes and tooling work without a token. The caller's
name is recorded with every change it makes (the audit trail in the event log).
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from scaleset.control import current_actor
from scaleset.errors import invalid_input

log = logging.getLogger(__name__)

__all__ = ["ROLES", "AuthInterceptor", "Authenticator", "required_role", "server_credentials"]

ROLES = ("reader", "operator", "admin")
#: Methods whose name starts with one of these only read.
_READS = ("Get", "List", "Watch", "Evaluate", "Echo")
#: The region's mutations need admin.
_ADMIN = {"SetZoneAvailability", "SetPoolCapacity", "SetCoreQuota"}
#: Services that stay open (probes, tooling).
_OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def required_role(path: str) -> str | None:
    """The least role a method (``/package.Service/Method``) needs; None for open services."""
    if path.startswith(_OPEN):
        return None
    method = path.rsplit("/", 1)[-1]
    if method in _ADMIN:
        return "admin"
    if method.startswith(_READS):
        return "reader"
    return "operator"


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    role: str


class Authenticator:
    """Maps a bearer token to an identity: static tokens first, then a JWT if a key is configured.

    Args:
        tokens: token -> (name, role).
        jwt_key: the PEM public key (RS256/ES256) or shared secret (HS256) JWTs are verified with.
        jwt_audience, jwt_issuer: required claims when given.
        role_claim: the JWT claim holding the role (the name is ``sub``).
    """

    def __init__(
        self,
        tokens: Mapping[str, tuple[str, str]] | None = None,
        *,
        jwt_key: str | bytes | None = None,
        jwt_algorithms: tuple[str, ...] = ("RS256", "ES256"),
        jwt_audience: str | None = None,
        jwt_issuer: str | None = None,
        role_claim: str = "scaleset_role",
    ) -> None:
        self._tokens = dict(tokens or {})
        for name, role in self._tokens.values():
            if role not in ROLES:
                raise invalid_input(
                    f"token of {name!r} has role {role!r}; roles are {', '.join(ROLES)}.", field="role"
                )
        self._jwt_key = jwt_key
        self._algorithms = list(jwt_algorithms)
        self._audience, self._issuer, self._role_claim = jwt_audience, jwt_issuer, role_claim

    @classmethod
    def from_file(cls, path: str, **jwt: Any) -> Authenticator:
        """Static tokens from YAML/JSON: ``tokens: [{token, name, role}, ...]``."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        tokens = {}
        for entry in data.get("tokens", []):
            tokens[str(entry["token"])] = (str(entry["name"]), str(entry["role"]))
        return cls(tokens, **jwt)

    def identify(self, token: str) -> Identity | None:
        for known, (name, role) in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return Identity(name, role)
        if self._jwt_key is None:
            return None
        import jwt  # PyJWT: loaded only when JWTs are configured

        try:
            claims = jwt.decode(
                token,
                self._jwt_key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "sub"]},
            )
        except jwt.PyJWTError as e:
            log.info("rejected a JWT: %s", e)
            return None
        role = str(claims.get(self._role_claim, ""))
        return Identity(str(claims["sub"]), role) if role in ROLES else None


def _status(code: grpc.StatusCode, reason: str, message: str) -> Any:
    """A status with the stable reason in a google.rpc.ErrorInfo, as every other error carries."""
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="scaleset"))
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))


def _guarded(handler: grpc.RpcMethodHandler, check: Callable[[], Any]) -> grpc.RpcMethodHandler:
    """The same kind of handler, which first runs ``check`` (it names the caller, or aborts)."""
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check_or_abort(check, context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        # The stream inside writes its own messages (see service.send_within): awaited, not iterated.
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
            await check_or_abort(check, context)
            await inner_stream(request, context)

        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


async def check_or_abort(check: Callable[[], Any], context: grpc.aio.ServicerContext) -> None:
    denial = check()
    if denial is not None:
        await context.abort(denial.code, denial.details, denial.trailing_metadata)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Enforces the roles for every RPC, and names the caller for the audit trail."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        need = required_role(details.method)
        if handler is None or need is None:
            return handler
        header = str(dict(details.invocation_metadata or ()).get("authorization", ""))
        token = header[7:] if header[:7].lower() == "bearer " else ""
        who = self._auth.identify(token) if token else None
        method = details.method.rsplit("/", 1)[-1]

        def check() -> Any:
            if who is None:
                return _status(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "Unauthenticated",
                    "a valid bearer token is required: send 'authorization: Bearer <token>'.",
                )
            if ROLES.index(who.role) < ROLES.index(need):
                return _status(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "PermissionDenied",
                    f"{who.name} ({who.role}) may not call {method}; it needs the {need} role.",
                )
            current_actor.set(f"{who.name} ({who.role})")
            return None

        return _guarded(handler, check)


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS from PEM files, mutual when ``client_ca`` is given; new files are picked up without a restart
    (checked on each new connection, by modification time)."""

    paths = [cert, key, *([client_ca] if client_ca else [])]

    def load() -> tuple[grpc.ServerCertificateConfiguration, tuple[float, ...]]:
        stamps = tuple(os.stat(p).st_mtime for p in paths)
        root = Path(client_ca).read_bytes() if client_ca else None
        pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
        return grpc.ssl_server_certificate_configuration(pair, root_certificates=root), stamps

    initial, stamps = load()
    seen = [stamps]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            current = tuple(os.stat(p).st_mtime for p in paths)
            if current == seen[0]:
                return None
            config, seen[0] = load()
            log.info("TLS certificates reloaded")
            return config
        except OSError as e:
            log.warning("TLS certificates could not be reloaded (keeping the old ones): %s", e)
            return None

    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=bool(client_ca))
