"""Azure's automatic zone balance (preview), as a policy the engine advances with explicit time.

One VM at a time: when the total counts (running + deallocated) across zones are imbalanced and moving a
VM would also improve the running distribution, a VM is created in the most under-provisioned zone;
once it reports Healthy, a VM of the most over-provisioned zone is deleted. If the new VM is not
healthy within 90 minutes, the source VM's health decides: a healthy source stays and the new VM is
deleted; an unhealthy source is deleted and the new VM kept. An operation starts only if nobody changed
the scale set in the last 60 minutes, at most once every 12 hours, never with regional VMs, and never
moves protected or deallocated VMs. A capacity change during an operation cancels it (the new VM stays).

Where Azure is silent (reference §13.15): "most under-provisioned" is measured on total counts, ties
going to the zone with fewer running VMs, then the zones' order; the source VM is the one the Default
scale-in rule would pick in that zone (fullest fault domain, highest id).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scaleset.errors import CapacityError, ScaleSetError
from scaleset.policies.common import Action

if TYPE_CHECKING:
    from scaleset.engine import Engine

__all__ = ["HEALTH_WAIT_S", "QUIET_PERIOD_S", "RATE_LIMIT_S", "ZoneBalanceOperation", "step"]

HEALTH_WAIT_S = 90 * 60
QUIET_PERIOD_S = 60 * 60
RATE_LIMIT_S = 12 * 3600


@dataclass(frozen=True, slots=True)
class ZoneBalanceOperation:
    source_id: int
    new_id: int
    from_zone: str
    to_zone: str
    started_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_id": self.source_id,
            "new_id": self.new_id,
            "from_zone": self.from_zone,
            "to_zone": self.to_zone,
            "started_at": self.started_at,
        }


def step(
    engine: Engine,
    name: str,
    now: float,
    operation: ZoneBalanceOperation | None,
    last_started: float | None,
    last_modified: float | None,
) -> tuple[ZoneBalanceOperation | None, float | None, list[Action]]:
    """Advances automatic zone balance of one scale set to ``now``; returns the operation in progress,
    when the last one started, and what was done."""
    if operation is not None:
        return _finish(engine, name, now, operation, last_started)
    spec = engine.get_spec(name)
    policy = spec.automatic_zone_rebalancing_policy
    if policy is None or not policy.enabled:
        return None, last_started, []
    if last_started is not None and now - last_started < RATE_LIMIT_S:
        return None, last_started, []
    if last_modified is not None and now - last_modified < QUIET_PERIOD_S:
        return None, last_started, []
    cols = engine.instance_columns(name)
    if any(z is None for z in cols["zone"]):
        return None, last_started, []
    down = set(engine.describe_region().unavailable_zones)
    zones = [z for z in spec.zones if z not in down]
    total = Counter({z: 0 for z in zones})
    running = Counter({z: 0 for z in zones})
    for z, power in zip(cols["zone"], cols["power_state"], strict=False):
        if z in total:
            total[z] += 1
            running[z] += power == "running"
    if len(zones) < 2:
        return None, last_started, []
    order = {z: k for k, z in enumerate(zones)}
    under = min(zones, key=lambda z: (total[z], running[z], order[z]))
    over = max(zones, key=lambda z: (total[z], running[z], -order[z]))
    if total[over] - total[under] <= 1 or not running[under] < running[over]:
        return None, last_started, []
    source = _source(cols, over)
    if source is None or engine.capacity(name) + 1 > engine.instance_limit(name):
        return None, last_started, []
    k = cols["instance_id"].index(source)
    size, priority = spec.replacement_size(cols["vm_size"][k]), cols["priority"][k]
    fds = engine.describe_region().fault_domains_per_zone
    fixed = spec.platform_fault_domain_count or 1
    span = fds if fixed <= 1 else fixed
    per_fd = Counter(f for z, f in zip(cols["zone"], cols["fault_domain"], strict=False) if z == under)
    fd = min(range(span), key=lambda f: (per_fd[f], f))
    try:
        plan = engine.apply_rebalance_moves(name, [(under, fd, size, priority)], [])
    except CapacityError:
        # No capacity or quota in the under-provisioned zone: the rebalance does not start.
        return None, last_started, []
    new_id = plan.creates[0].instance_id
    op = ZoneBalanceOperation(source, new_id, over, under, now)
    reason = (
        f"automatic zone balance: zone {under} holds {total[under]} and zone {over} holds {total[over]}; "
        f"created {new_id} in zone {under} to replace {source} once it is healthy"
    )
    return op, now, [Action(name, "ZoneBalanceStarted", (new_id,), reason)]


def _source(cols: dict[str, list[Any]], zone: str) -> int | None:
    """The VM the Default scale-in rule would pick in ``zone``: fullest fault domain, highest id."""
    per_fd = Counter(f for z, f in zip(cols["zone"], cols["fault_domain"], strict=False) if z == zone)
    best: tuple[int, int] | None = None
    for i, z, f, power, p_in, p_act in zip(
        cols["instance_id"],
        cols["zone"],
        cols["fault_domain"],
        cols["power_state"],
        cols["protect_from_scale_in"],
        cols["protect_from_scale_set_actions"],
        strict=False,
    ):
        if z != zone or power != "running" or p_in or p_act:
            continue
        key = (per_fd[f], i)
        if best is None or key > best:
            best = key
    return None if best is None else best[1]


def _finish(
    engine: Engine, name: str, now: float, op: ZoneBalanceOperation, last_started: float | None
) -> tuple[ZoneBalanceOperation | None, float | None, list[Action]]:
    cols = engine.instance_columns(name)
    health = dict(zip(cols["instance_id"], cols["health"], strict=False))
    if op.new_id not in health or op.source_id not in health:
        gone = op.new_id if op.new_id not in health else op.source_id
        return (
            None,
            last_started,
            [
                Action(
                    name,
                    "ZoneBalanceCancelled",
                    (),
                    f"automatic zone balance cancelled: instance {gone} was deleted",
                )
            ],
        )
    try:
        return _conclude(engine, name, now, op, last_started, health)
    except ScaleSetError as e:
        # The source became protected or deallocated meanwhile: it must not move.
        return (
            None,
            last_started,
            [Action(name, "ZoneBalanceCancelled", (), f"automatic zone balance cancelled: {e}")],
        )


def _conclude(
    engine: Engine,
    name: str,
    now: float,
    op: ZoneBalanceOperation,
    last_started: float | None,
    health: dict[int, str],
) -> tuple[ZoneBalanceOperation | None, float | None, list[Action]]:
    if health[op.new_id] == "Healthy":
        engine.apply_rebalance_moves(name, [], [op.source_id])
        return (
            None,
            last_started,
            [
                Action(
                    name,
                    "ZoneBalanceCompleted",
                    (op.source_id,),
                    f"automatic zone balance: {op.new_id} in zone {op.to_zone} is healthy; deleted {op.source_id} from zone {op.from_zone}",
                )
            ],
        )
    if now - op.started_at < HEALTH_WAIT_S:
        return op, last_started, []
    if health[op.source_id] == "Healthy":
        engine.apply_rebalance_moves(name, [], [op.new_id])
        return (
            None,
            last_started,
            [
                Action(
                    name,
                    "ZoneBalanceRolledBack",
                    (op.new_id,),
                    f"automatic zone balance: {op.new_id} was not healthy within 90 minutes and source {op.source_id} is; deleted {op.new_id}",
                )
            ],
        )
    engine.apply_rebalance_moves(name, [], [op.source_id])
    return (
        None,
        last_started,
        [
            Action(
                name,
                "ZoneBalanceReplacedUnhealthySource",
                (op.source_id,),
                f"automatic zone balance: neither {op.new_id} nor source {op.source_id} is healthy after 90 minutes; deleted the source, kept {op.new_id}",
            )
        ],
    )
