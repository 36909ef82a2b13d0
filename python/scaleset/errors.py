"""Errors raised by scaleset: one family with structured details.

Every error is a :class:`ScaleSetError` with a stable, machine-readable ``code`` (Azure's own code where
Azure documents one, e.g. ``PropertyChangeNotAllowed`` or ``ZonalAllocationFailed``), a message that says
what to do, the request ``field`` at fault where there is one, and ``metadata`` (string pairs, such as a
stale etag's current value). The subclass tells the kind of failure, which the gRPC service maps to a
status code:

* :class:`InvalidInputError` - the request is malformed or out of range (``INVALID_ARGUMENT``).
* :class:`ConflictError` - the request conflicts with current state (``FAILED_PRECONDITION``).
* :class:`NotFoundError` - a scale set, instance or zone does not exist (``NOT_FOUND``).
* :class:`CapacityError` - the region cannot supply what was asked (``RESOURCE_EXHAUSTED``).
* :class:`UnavailableError` - the store failed; the change was not acknowledged (``UNAVAILABLE``).

Two more reach only a client: :class:`AccessDeniedError` (``UNAUTHENTICATED``, ``PERMISSION_DENIED``) and
:class:`InternalError` (``INTERNAL`` and anything else unexpected: a server bug, never a retry).
"""

from __future__ import annotations

from collections.abc import Mapping

from scaleset._core import (
    CapacityError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    ScaleSetError,
)

__all__ = [
    "AccessDeniedError",
    "CapacityError",
    "ConflictError",
    "InternalError",
    "InvalidInputError",
    "NotFoundError",
    "ScaleSetError",
    "UnavailableError",
    "conflict",
    "error",
    "invalid_input",
    "not_found",
    "unavailable",
]


class UnavailableError(ScaleSetError):
    """The store failed to commit; the change was not acknowledged and has been rolled back. Retrying the
    same request (with its request_id) is safe."""


class AccessDeniedError(ScaleSetError):
    """The server refused the caller: no valid token (UNAUTHENTICATED), or a role too small for the call
    (PERMISSION_DENIED, naming the role needed)."""


class InternalError(ScaleSetError):
    """The server failed in a way it did not expect (INTERNAL, UNKNOWN): a bug to report, with its
    request_id; retrying the same call will not help."""


def error(
    kind: type[ScaleSetError],
    message: str,
    code: str,
    *,
    field: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ScaleSetError:
    """Builds an error of ``kind`` with every detail set (the one constructor of Python-raised errors)."""
    err = kind(message)
    err.code = code
    err.field = field
    err.metadata = dict(metadata or {})
    return err


def conflict(message: str, code: str, *, metadata: Mapping[str, str] | None = None) -> ConflictError:
    """A :class:`ConflictError` raised by the Python layers (upgrades, etags)."""
    return error(ConflictError, message, code, metadata=metadata)  # type: ignore[return-value]


def invalid_input(
    message: str, code: str = "InvalidParameter", *, field: str | None = None
) -> InvalidInputError:
    """An :class:`InvalidInputError` for arguments rejected before they reach the core."""
    return error(InvalidInputError, message, code, field=field)  # type: ignore[return-value]


def not_found(message: str, code: str) -> NotFoundError:
    """A :class:`NotFoundError` raised by the Python layers."""
    return error(NotFoundError, message, code)  # type: ignore[return-value]


def unavailable(message: str) -> UnavailableError:
    """An :class:`UnavailableError`: the store did not commit."""
    return error(UnavailableError, message, "StoreUnavailable")  # type: ignore[return-value]
