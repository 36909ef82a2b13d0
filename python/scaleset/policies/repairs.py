"""Automatic instance repairs (reference §8.1), advanced with explicit time.

An instance that is Unhealthy or Unknown past its grace period (which starts after the last change to
the scale set, or after its own repair) is repaired by the policy's action: Replace (delete it, create a
new one on the latest model), Reimage (latest model, health Initializing) or Restart (health
Initializing). At most 5% of the scale set is in repair at once, one at a time under 20 instances;
protected (either flag) and deallocated instances are never repaired. A repair ends when the instance
reports Healthy; one still unhealthy after its grace period is a failed repair, and after
:data:`SUSPEND_AFTER` failed repairs in a row the service suspends itself until resumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scaleset.engine import duration_seconds
from scaleset.errors import CapacityError
from scaleset.policies.common import UNHEALTHY, Action, replacements

if TYPE_CHECKING:
    from scaleset.engine import Engine

__all__ = ["SUSPEND_AFTER", "RepairState", "step"]

SUSPEND_AFTER = 3


@dataclass
class RepairState:
    service_state: str = "Running"  # Running | Suspended
    in_repair: dict[int, float] = field(default_factory=dict)
    repaired_at: dict[int, float] = field(default_factory=dict)
    consecutive_failures: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "service_state": self.service_state,
            "in_repair": {str(k): v for k, v in self.in_repair.items()},
            "repaired_at": {str(k): v for k, v in self.repaired_at.items()},
            "consecutive_failures": self.consecutive_failures,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RepairState:
        return cls(
            data["service_state"],
            {int(k): v for k, v in data["in_repair"].items()},
            {int(k): v for k, v in data["repaired_at"].items()},
            data["consecutive_failures"],
        )


def step(
    engine: Engine, name: str, now: float, state: RepairState, last_modified: float | None, busy: set[int]
) -> list[Action]:
    """Repairs what is due at ``now``; ``busy`` instances (a rolling upgrade's batch) are left alone."""
    spec = engine.get_spec(name)
    policy = spec.automatic_repairs_policy
    if policy is None or not policy.enabled or state.service_state != "Running":
        return []
    grace = duration_seconds(policy.grace_period)
    cols = engine.instance_columns(name)
    health = dict(zip(cols["instance_id"], cols["health"], strict=False))
    actions = _ended(name, now, grace, policy.grace_period, state, health)
    if state.consecutive_failures >= SUSPEND_AFTER:
        state.service_state = "Suspended"
        return [
            *actions,
            Action(
                name,
                "AutomaticRepairsSuspended",
                (),
                f"automatic repairs suspended: {state.consecutive_failures} repairs in a row left instances unhealthy; resume the service once the cause is fixed",
            ),
        ]
    total = len(health)
    limit = 1 if total < 20 else max(1, total * 5 // 100)
    room = limit - len(state.in_repair)
    if room <= 0:
        return actions
    since = last_modified if last_modified is not None else float("-inf")
    due = [
        i
        for i, h, power, p_in, p_act in zip(
            cols["instance_id"],
            cols["health"],
            cols["power_state"],
            cols["protect_from_scale_in"],
            cols["protect_from_scale_set_actions"],
            strict=False,
        )
        if h in UNHEALTHY
        and power == "running"
        and not p_in
        and not p_act
        and i not in state.in_repair
        and i not in busy
        and now - max(since, state.repaired_at.get(i, float("-inf"))) >= grace
    ][:room]
    if not due:
        return actions
    action = policy.repair_action
    if action == "Replace":
        creates = replacements(spec, cols, due)
        try:
            plan = engine.apply_rebalance_moves(name, creates, due)
        except CapacityError:
            # No capacity for replacements right now (zone down, pool full): try again later.
            return actions
        repaired = [c.instance_id for c in plan.creates]
        engine.report_health(name, repaired, "Initializing")
        text = f"replaced unhealthy {due} with {repaired} (latest model)"
    elif action == "Reimage":
        engine.upgrade_instances(name, due)
        repaired, text = due, f"reimaged unhealthy {due} (latest model)"
    else:
        engine.restart_instances(name, due)
        repaired, text = due, f"restarted unhealthy {due}"
    for i in [i for i in state.repaired_at if i not in health]:
        del state.repaired_at[i]  # deleted since its repair: forgotten in a step that is logged (this one)
    for i in repaired:
        state.in_repair[i] = now
        state.repaired_at[i] = now
    return [
        *actions,
        Action(name, "InstancesRepaired", tuple(repaired), f"automatic repairs ({action}): {text}"),
    ]


def _ended(
    name: str, now: float, grace: float, grace_period: str, state: RepairState, health: dict[int, str]
) -> list[Action]:
    """Ends the repairs that are over at ``now``: the instance is Healthy again (a success), still
    unhealthy after its grace period (a failure), or deleted. Each ending is an action, so that the step
    that ends a repair is logged even when it repairs nothing new (a restart replays it at its time)."""
    succeeded, failed, deleted = [], [], []
    for i, started in sorted(state.in_repair.items()):
        if i not in health:
            deleted.append(i)
        elif health[i] == "Healthy":
            succeeded.append(i)
            state.consecutive_failures = 0
        elif now - started >= grace:
            failed.append(i)
            state.consecutive_failures += 1
        else:
            continue
        del state.in_repair[i]
    actions = []
    if succeeded:
        actions.append(
            Action(name, "RepairSucceeded", tuple(succeeded), f"automatic repairs: {succeeded} healthy again")
        )
    if failed:
        actions.append(
            Action(
                name,
                "RepairFailed",
                tuple(failed),
                f"automatic repairs: {failed} still unhealthy {grace_period} after repair "
                f"({state.consecutive_failures} failed in a row)",
            )
        )
    if deleted:
        actions.append(
            Action(
                name, "RepairEnded", tuple(deleted), f"automatic repairs: {deleted} deleted while in repair"
            )
        )
    return actions
