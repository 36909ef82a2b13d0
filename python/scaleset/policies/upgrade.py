"""Rolling upgrades: a state machine the engine advances as time passes and health reports arrive.

A rolling upgrade takes the out-of-date instances (those protected from scale-set actions are skipped)
in batches planned by the Rust core: at most ``max_batch_instance_percent`` of the scale set each (at least
one), zone by zone unless ``enable_cross_zone_upgrade``, spread over fault domains, unhealthy first with
``prioritize_unhealthy_instances``. Before every batch, more than ``max_unhealthy_instance_percent`` of
the scale set unhealthy stops the upgrade; after every batch, more than
``max_unhealthy_upgraded_instance_percent`` of it unhealthy among the upgraded instances stops it with
``MaxUnhealthyUpgradedInstancePercentExceededInRollingUpgrade`` (and rolls the failed instances back with
``rollback_failed_instances_on_policy_breach``). A batch waits while its upgraded instances are
``Initializing`` or report ``Unknown`` (up to :data:`HEALTH_WAIT_S`, after which they count as unhealthy);
before a batch, ``Unknown`` counts as unhealthy. Between batches it pauses for
``pause_time_between_batches``. With ``max_surge`` each batch first creates new-model instances beside
the old ones and deletes the old ones once the batch passes, so the running count never drops below
capacity; if the new ones do not fit (capacity or quota), the batch is upgraded in place, as Azure does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from scaleset.engine import duration_seconds
from scaleset.errors import CapacityError, conflict
from scaleset.policies.common import UNHEALTHY, Action, replacements

if TYPE_CHECKING:
    from scaleset.engine import Engine

__all__ = ["HEALTH_WAIT_S", "RollingUpgrade", "cancel", "start", "step"]

#: How long a batch waits for instances that are still Initializing (Azure's OS upgrades wait 5 minutes).
HEALTH_WAIT_S = 5 * 60


@dataclass
class RollingUpgrade:
    """The state of one rolling upgrade (plain data, so snapshots can save it)."""

    scale_set: str
    model_version: int
    status: str  # RollingForward | Completed | Cancelled | Faulted | RolledBack
    started_at: float
    batches: list[list[int]]
    next_batch: int = 0
    in_batch: list[int] = field(default_factory=list)
    surge_old: list[int] = field(default_factory=list)
    batch_started_at: float | None = None
    pause_until: float | None = None
    upgraded: list[int] = field(default_factory=list)
    previous_versions: dict[int, int] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)
    error_code: str = ""
    error_message: str = ""
    finished_at: float | None = None

    @property
    def active(self) -> bool:
        return self.status == "RollingForward"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["previous_versions"] = {str(k): v for k, v in self.previous_versions.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RollingUpgrade:
        data = dict(data)
        data["previous_versions"] = {int(k): v for k, v in data["previous_versions"].items()}
        return cls(**data)

    def progress(self) -> dict[str, int]:
        """Azure's progress counts: successful, failed, in progress, pending instances."""
        pending = sum(len(b) for b in self.batches[self.next_batch + (1 if self.in_batch else 0) :])
        return {
            "successful_instance_count": len(self.upgraded) - len(self.failed),
            "failed_instance_count": len(self.failed),
            "in_progress_instance_count": len(self.in_batch),
            "pending_instance_count": pending if self.active else 0,
        }


def start(engine: Engine, name: str, now: float) -> tuple[RollingUpgrade, list[Action]]:
    """Plans the batches of a new rolling upgrade of ``name`` to its current model."""
    spec = engine.get_spec(name)
    policy = spec.upgrade_policy.rolling_upgrade_policy
    capacity = engine.capacity(name)
    batch_size = max(1, capacity * policy.max_batch_instance_percent // 100)
    batches = engine.plan_upgrade_batches(
        name, batch_size, policy.prioritize_unhealthy_instances, policy.enable_cross_zone_upgrade
    )
    upgrade = RollingUpgrade(name, spec.model_version, "RollingForward", now, batches)
    count = sum(len(b) for b in batches)
    actions = [
        Action(
            name,
            "RollingUpgradeStarted",
            (),
            f"rolling upgrade to model {spec.model_version}: {count} instances in {len(batches)} batches of at most {batch_size}",
        )
    ]
    return upgrade, actions


def _finish(upgrade: RollingUpgrade, now: float, status: str, code: str = "", message: str = "") -> None:
    upgrade.status, upgrade.error_code, upgrade.error_message, upgrade.finished_at = (
        status,
        code,
        message,
        now,
    )
    upgrade.in_batch, upgrade.surge_old = [], []


def step(engine: Engine, name: str, now: float, upgrade: RollingUpgrade) -> list[Action]:
    """Advances a rolling upgrade to ``now``; returns what it did (nothing while it waits)."""
    if not upgrade.active:
        return []
    spec = engine.get_spec(name)
    policy = spec.upgrade_policy.rolling_upgrade_policy
    cols = engine.instance_columns(name)
    health = dict(zip(cols["instance_id"], cols["health"], strict=False))
    total = len(health)
    if upgrade.in_batch:
        present = [i for i in upgrade.in_batch if i in health]
        # Initializing waits; so does Unknown reported after the upgrade (Application Health: "rolling
        # upgrades will be paused until the instance falls back into a Healthy state"), up to the timeout.
        if (
            any(health[i] in ("Initializing", "Unknown") for i in present)
            and now - (upgrade.batch_started_at or now) < HEALTH_WAIT_S
        ):
            return []
        batch_no = upgrade.next_batch + 1
        upgrade.upgraded += present
        failed_now = [i for i in present if health[i] != "Healthy"]
        upgrade.failed += failed_now
        unhealthy_upgraded = sum(1 for i in upgrade.upgraded if i in health and health[i] != "Healthy")
        allowed = total * policy.max_unhealthy_upgraded_instance_percent // 100
        if unhealthy_upgraded > allowed:
            return _breach(
                engine,
                name,
                now,
                upgrade,
                policy.rollback_failed_instances_on_policy_breach,
                unhealthy_upgraded,
                total,
                failed_now,
            )
        if upgrade.surge_old:
            engine.apply_rebalance_moves(name, [], [i for i in upgrade.surge_old if i in health])
        upgrade.in_batch, upgrade.surge_old = [], []
        upgrade.next_batch += 1
        upgrade.pause_until = now + duration_seconds(policy.pause_time_between_batches)
        return [
            Action(
                name,
                "RollingUpgradeBatchCompleted",
                tuple(present),
                f"batch {batch_no} of {len(upgrade.batches)} done: {len(present) - len(failed_now)} healthy, {len(failed_now)} not",
            )
        ]
    if upgrade.pause_until is not None and now < upgrade.pause_until:
        return []
    unhealthy = sum(1 for h in health.values() if h in UNHEALTHY)
    if unhealthy > total * policy.max_unhealthy_instance_percent // 100:
        message = (
            f"{unhealthy} of {total} instances are unhealthy before batch {upgrade.next_batch + 1}, more than "
            f"max_unhealthy_instance_percent {policy.max_unhealthy_instance_percent}% allows; the rolling upgrade stopped."
        )
        _finish(upgrade, now, "Faulted", "MaxUnhealthyInstancePercentExceededInRollingUpgrade", message)
        return [Action(name, "RollingUpgradeFailed", (), message)]
    protected = {
        i for i, p in zip(cols["instance_id"], cols["protect_from_scale_set_actions"], strict=False) if p
    }
    version = dict(zip(cols["instance_id"], cols["model_version"], strict=False))
    while upgrade.next_batch < len(upgrade.batches):
        batch = [
            i
            for i in upgrade.batches[upgrade.next_batch]
            if i in health and i not in protected and (version[i] or 0) < upgrade.model_version
        ]
        if batch:
            break
        upgrade.next_batch += 1
    else:
        _finish(upgrade, now, "Completed")
        return [
            Action(
                name,
                "RollingUpgradeCompleted",
                (),
                f"rolling upgrade to model {upgrade.model_version} completed: {len(upgrade.upgraded)} instances upgraded",
            )
        ]
    upgrade.batch_started_at = now
    if policy.max_surge and _surge(engine, name, cols, batch, upgrade):
        how = f"created {len(upgrade.in_batch)} new-model instances beside them (max_surge)"
    else:
        upgrade.previous_versions.update({i: version[i] or 0 for i in batch})
        engine.upgrade_instances(name, batch)
        upgrade.in_batch = batch
        how = "upgrading in place"
    return [
        Action(
            name,
            "RollingUpgradeBatchStarted",
            tuple(upgrade.in_batch),
            f"batch {upgrade.next_batch + 1} of {len(upgrade.batches)}: {len(batch)} instances, {how}",
        )
    ]


def _surge(
    engine: Engine, name: str, cols: dict[str, list[Any]], batch: list[int], upgrade: RollingUpgrade
) -> bool:
    """Creates the batch's replacements first; False if they do not fit (the batch goes in place)."""
    creates = replacements(engine.get_spec(name), cols, batch)
    try:
        plan = engine.apply_rebalance_moves(name, creates, [])
    except CapacityError:
        return False
    new_ids = [c.instance_id for c in plan.creates]
    engine.report_health(name, new_ids, "Initializing")
    upgrade.in_batch, upgrade.surge_old = new_ids, batch
    return True


def _breach(
    engine: Engine,
    name: str,
    now: float,
    upgrade: RollingUpgrade,
    rollback: bool,
    unhealthy: int,
    total: int,
    failed_now: list[int],
) -> list[Action]:
    spec = engine.get_spec(name)
    pct = spec.upgrade_policy.rolling_upgrade_policy.max_unhealthy_upgraded_instance_percent
    message = (
        f"Rolling Upgrade failed after exceeding the MaxUnhealthyUpgradedInstancePercent value defined in the "
        f"RollingUpgradePolicy. {unhealthy * 100 // max(1, total)}% of instances are in an unhealthy state after "
        f"being upgraded - more than the threshold of {pct}%."
    )
    status = "Faulted"
    if rollback:
        if upgrade.surge_old:
            # The old instances are still there: drop the failed new ones.
            engine.apply_rebalance_moves(name, [], failed_now)
        else:
            by_version: dict[int, list[int]] = {}
            for i in upgrade.failed:
                if i in upgrade.previous_versions:
                    by_version.setdefault(upgrade.previous_versions[i], []).append(i)
            present = set(engine.instance_columns(name)["instance_id"])
            for v, ids in by_version.items():
                engine.roll_back_instances(name, [i for i in ids if i in present], v)
        status = "RolledBack"
    _finish(upgrade, now, status, "MaxUnhealthyUpgradedInstancePercentExceededInRollingUpgrade", message)
    return [
        Action(
            name,
            "RollingUpgradeFailed",
            tuple(upgrade.failed),
            message + (" Failed instances were rolled back." if rollback else ""),
        )
    ]


def cancel(upgrade: RollingUpgrade | None, name: str, now: float) -> list[Action]:
    if upgrade is None or not upgrade.active:
        raise conflict(
            f"scale set '{name}' has no rolling upgrade in progress.", "NoRollingUpgradeInProgress"
        )
    _finish(upgrade, now, "Cancelled")
    return [
        Action(
            name,
            "RollingUpgradeCancelled",
            (),
            "rolling upgrade cancelled; instances already upgraded keep the new model",
        )
    ]
