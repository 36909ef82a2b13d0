"""What every time-driven policy shares: the action it reports, what counts as unhealthy, and where a
replacement goes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scaleset.model import ScaleSetSpec

__all__ = ["UNHEALTHY", "Action", "replacements"]

#: Health states a policy treats as unhealthy (Azure counts Unknown as unhealthy in rolling upgrades).
UNHEALTHY = ("Unhealthy", "Unknown")


@dataclass(frozen=True, slots=True)
class Action:
    """Something a time-driven policy did (or, for autoscale, decided not to do) to a scale set."""

    scale_set: str
    kind: str
    instance_ids: tuple[int, ...]
    reason: str


def replacements(spec: ScaleSetSpec, cols: dict[str, list[Any]], ids: list[int]) -> list[tuple[Any, ...]]:
    """Where new-model replacements of ``ids`` go: each in its instance's zone and fault domain, with its
    priority and the model's size for it."""
    row = {i: k for k, i in enumerate(cols["instance_id"])}
    return [
        (
            cols["zone"][row[i]],
            cols["fault_domain"][row[i]],
            spec.replacement_size(cols["vm_size"][row[i]]),
            cols["priority"][row[i]],
        )
        for i in ids
    ]
