"""Errors raised by scaleset.

Every error is a :class:`ScaleSetError` with a stable, machine-readable ``code`` (Azure's own code where
Azure documents one, e.g. ``PropertyChangeNotAllowed`` or ``ZonalAllocationFailed``) and a message that
says what to do. The subclass tells the kind of failure, which the gRPC service maps to a status code:

* :class:`InvalidInputError` - the request is malformed or out of range (``INVALID_ARGUMENT``).
* :class:`ConflictError` - the request conflicts with current state (``FAILED_PRECONDITION``).
* :class:`NotFoundError` - a scale set, instance or zone does not exist (``NOT_FOUND``).
* :class:`CapacityError` - the region cannot supply what was asked (``RESOURCE_EXHAUSTED``).
"""

from __future__ import annotations

from scaleset._core import (
    CapacityError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    ScaleSetError,
)

__all__ = [
    "CapacityError",
    "ConflictError",
    "InvalidInputError",
    "NotFoundError",
    "ScaleSetError",
    "conflict",
    "invalid_input",
]


def conflict(message: str, code: str) -> ConflictError:
    """Builds a :class:`ConflictError` raised by the Python layers (upgrades, etags)."""
    err = ConflictError(message)
    err.code = code
    return err


def invalid_input(message: str, code: str = "InvalidParameter") -> InvalidInputError:
    """Builds an :class:`InvalidInputError` for arguments rejected before they reach the core."""
    err = InvalidInputError(message)
    err.code = code
    return err
