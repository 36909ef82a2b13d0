"""The engine facade: the only module that imports the native core (``scaleset._core``).

It turns the dataclasses of :mod:`scaleset.model` into plain data for the core and the core's answers
back into dataclasses. The core releases the GIL for every call and serialises calls on one engine, so an
:class:`Engine` may be shared between threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from scaleset import _core, repairs, upgrade, zone_balance
from scaleset.errors import conflict, invalid_input
from scaleset.repairs import RepairState
from scaleset.upgrade import RollingUpgrade
from scaleset.zone_balance import Action, ZoneBalanceOperation
from scaleset.model import (
    Eviction,
    Instance,
    Plan,
    Region,
    ScaleSet,
    ScaleSetSpec,
)

if TYPE_CHECKING:
    from scaleset.rebalance import RebalancePlan

log = logging.getLogger(__name__)

__all__ = ["Engine"]

_INSTANCE_COLUMNS = (
    "instance_id",
    "name",
    "zone",
    "fault_domain",
    "vm_size",
    "priority",
    "power_state",
    "health",
    "model_version",
    "protect_from_scale_in",
    "protect_from_scale_set_actions",
)


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise invalid_input(f"{what} must be a non-negative integer below 2**64, got {value!r}.")
    return value


def _ids(instance_ids: Iterable[int]) -> list[int]:
    ids = list(instance_ids)
    for i in ids:
        _count(i, "instance id")
    return ids


def _plan(handle: Any, dry_run: bool) -> Plan:
    return Plan(handle.scale_set, handle.capacity_before, handle.capacity_after, dry_run, handle=handle)


class Engine:
    """Places, scales, evicts and protects the instances of scale sets in one region.

    Args:
        region: zones, fault domains per zone, zones down, and capacity pools.
        instance_limit: replaces Azure's per-scale-set instance limits (1,000 / 600 / 200 / 100) with this
            ceiling, for private fleets. ``None`` enforces Azure's limits.
    """

    def __init__(
        self, region: Region, *, instance_limit: int | None = None, clock: Callable[[], float] | None = None
    ) -> None:
        if instance_limit is not None:
            _count(instance_limit, "instance_limit")
        self._core = _core.Engine(region.to_dict(), instance_limit)
        self._instance_limit = instance_limit
        #: Stamps user changes (for policies that wait for a quiet period); None leaves them unstamped.
        self.clock = clock
        self._modified: dict[str, float] = {}
        self._zone_balance: dict[str, ZoneBalanceOperation] = {}
        self._zone_balance_started: dict[str, float] = {}
        self._upgrades: dict[str, RollingUpgrade] = {}
        self._upgrade_pending: set[str] = set()
        self._repairs: dict[str, RepairState] = {}

    def _touch(self, name: str) -> None:
        """Records a user change (PUT/PATCH/POST in Azure's terms); a capacity change also cancels an
        automatic zone balance in progress (its new VM stays)."""
        if self.clock is not None:
            self._modified[name] = self.clock()

    # ----- scale sets ---------------------------------------------------------------------------------

    def create_scale_set(self, spec: ScaleSetSpec, capacity: int = 0) -> Plan:
        """Validates and stores a scale set, then scales it to ``capacity``.

        Returns the plan that placed the initial instances. Nothing is stored if validation or placement
        fails. Raises :class:`~scaleset.errors.ScaleSetError` subclasses with Azure's codes.
        """
        _, handle = self._core.create_scale_set(spec.to_dict(), _count(capacity, "capacity"))
        log.debug("created scale set %s with %d instances", spec.name, capacity)
        self._touch(spec.name)
        return _plan(handle, dry_run=False)

    def get_scale_set(self, name: str) -> ScaleSet:
        """The stored spec (with Azure's defaults filled in) and every instance."""
        spec = ScaleSetSpec.from_dict(self._core.get_spec(name))
        return ScaleSet(spec=spec, instances=self._instances(name))

    def get_spec(self, name: str) -> ScaleSetSpec:
        """The stored spec alone (cheap for large scale sets)."""
        return ScaleSetSpec.from_dict(self._core.get_spec(name))

    def scale_set_names(self) -> list[str]:
        """Every scale set's name, sorted."""
        return list(self._core.list_scale_sets())

    def list_scale_sets(self) -> list[ScaleSetSpec]:
        """Every scale set's stored spec, sorted by name."""
        return [self.get_spec(name) for name in self._core.list_scale_sets()]

    def update_scale_set(self, spec: ScaleSetSpec) -> ScaleSetSpec:
        """Replaces a scale set's model; returns the stored spec.

        Unset optional fields keep their stored values. Changing an immutable property raises
        ``ConflictError`` with code ``PropertyChangeNotAllowed``; a changed VM model (size, sizes, image)
        bumps ``model_version``. Existing instances are not touched.
        """
        before = self._core.get_spec(spec.name)["model_version"]
        stored = ScaleSetSpec.from_dict(self._core.update_scale_set(spec.to_dict()))
        self._touch(spec.name)
        if stored.model_version != before:
            self._model_changed(stored)
        return stored

    def _model_changed(self, spec: ScaleSetSpec) -> None:
        """Automatic mode upgrades every out-of-date instance now; Rolling starts a rolling upgrade at the
        next :meth:`advance` (superseding one in progress); Manual does nothing."""
        name, mode = spec.name, spec.upgrade_policy.mode
        if mode == "Automatic":
            cols = self._core.instances(name)
            stale = [i for i, v, p in zip(cols["instance_id"], cols["model_version"], cols["protect_from_scale_set_actions"])
                     if (v or 0) < spec.model_version and not p]
            if stale:
                self._core.upgrade_instances(name, stale)
        elif mode == "Rolling":
            current = self._upgrades.get(name)
            if current is not None and current.active:
                current.status, current.error_message = "Cancelled", "superseded by a newer model"
                current.in_batch, current.surge_old = [], []
            self._upgrade_pending.add(name)

    def delete_scale_set(self, name: str) -> None:
        """Deletes a scale set and its instances (protection does not block deleting the whole set)."""
        self._core.delete_scale_set(name)
        for state in (self._modified, self._zone_balance, self._zone_balance_started, self._upgrades, self._repairs):
            state.pop(name, None)
        self._upgrade_pending.discard(name)

    def capacity(self, name: str) -> int:
        return int(self._core.capacity(name))

    def export_state(self) -> dict[str, Any]:
        """The whole engine as plain data (region, every scale set with instances and next id, and the
        time-driven policies' state), for snapshots. :meth:`from_state` rebuilds an identical engine."""
        return {
            "policies": {
                "modified": dict(self._modified),
                "zone_balance": {n: op.to_dict() for n, op in self._zone_balance.items()},
                "zone_balance_started": dict(self._zone_balance_started),
                "upgrades": {n: u.to_dict() for n, u in self._upgrades.items()},
                "upgrade_pending": sorted(self._upgrade_pending),
                "repairs": {n: r.to_dict() for n, r in self._repairs.items()},
            },
            "region": self._core.region(),
            "scale_sets": [
                {
                    "spec": self._core.get_spec(name),
                    "instances": dict(self._core.instances(name)),
                    "next_instance_id": self._core.next_instance_id(name),
                }
                for name in self._core.list_scale_sets()
            ],
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], *, instance_limit: int | None = None, clock: Callable[[], float] | None = None
    ) -> Engine:
        """Rebuilds an engine saved by :meth:`export_state`."""
        engine = cls(Region.from_dict(state["region"]), instance_limit=instance_limit, clock=clock)
        for saved in state["scale_sets"]:
            engine._core.restore_scale_set(saved["spec"], saved["instances"], saved["next_instance_id"])
        policies = state.get("policies", {})
        engine._modified = dict(policies.get("modified", {}))
        engine._zone_balance = {n: ZoneBalanceOperation(**op) for n, op in policies.get("zone_balance", {}).items()}
        engine._zone_balance_started = dict(policies.get("zone_balance_started", {}))
        engine._upgrades = {n: RollingUpgrade.from_dict(u) for n, u in policies.get("upgrades", {}).items()}
        engine._upgrade_pending = set(policies.get("upgrade_pending", []))
        engine._repairs = {n: RepairState.from_dict(r) for n, r in policies.get("repairs", {}).items()}
        return engine

    def instance_limit(self, name: str) -> int:
        """The most instances this scale set may hold under the engine's limits."""
        return int(self._core.instance_limit(name))

    # ----- scaling ------------------------------------------------------------------------------------

    def set_capacity(self, name: str, capacity: int, dry_run: bool = False) -> Plan:
        """Scales out or in to ``capacity`` instances. With ``dry_run`` nothing changes."""
        handle = self._core.set_capacity(name, _count(capacity, "capacity"), dry_run)
        if not dry_run:
            self._touch(name)
            self._zone_balance.pop(name, None)
        return _plan(handle, dry_run=dry_run)

    # ----- instances ----------------------------------------------------------------------------------

    def instance_columns(self, name: str) -> dict[str, list[Any]]:
        """The instances as columns (one list per :class:`~scaleset.model.Instance` field)."""
        return dict(self._core.instances(name))

    def _instances(self, name: str) -> tuple[Instance, ...]:
        cols = self._core.instances(name)
        names = [n if n is not None else f"{name}_{i}" for n, i in zip(cols["name"], cols["instance_id"])]
        cols["name"] = names
        return tuple(
            Instance(**dict(zip(_INSTANCE_COLUMNS, row)))
            for row in zip(*(cols[c] for c in _INSTANCE_COLUMNS))
        )

    def import_instances(self, name: str, instances: Iterable[Instance]) -> None:
        """Adopts existing instances with their ids, zones, fault domains, sizes, priorities and states.

        Imported instances keep the capacity they already hold: pools are not charged for them.
        """
        items: Sequence[Instance] = list(instances)
        columns = {c: [getattr(i, c) for i in items] for c in _INSTANCE_COLUMNS}
        self._core.import_instances(name, columns)
        self._touch(name)

    def delete_instances(self, name: str, instance_ids: Iterable[int]) -> Plan:
        """Deletes chosen instances, protected ones included (as Azure allows for user deletes)."""
        plan = _plan(self._core.delete_instances(name, _ids(instance_ids)), dry_run=False)
        self._touch(name)
        return plan

    def evict(self, name: str, instance_ids: Iterable[int]) -> Eviction:
        """Spot eviction per the scale set's ``eviction_policy`` (Delete removes, Deallocate keeps)."""
        deleted, deallocated = self._core.evict(name, _ids(instance_ids))
        return Eviction(deleted=tuple(deleted), deallocated=tuple(deallocated))

    def set_protection(
        self,
        name: str,
        instance_ids: Iterable[int],
        protect_from_scale_in: bool,
        protect_from_scale_set_actions: bool = False,
    ) -> None:
        """Sets both protection flags on the given instances (Azure's instance protection policy)."""
        self._core.set_protection(
            name, _ids(instance_ids), bool(protect_from_scale_in), bool(protect_from_scale_set_actions)
        )

    def report_health(self, name: str, instance_ids: Iterable[int], health: str) -> None:
        """Records Application Health: ``Healthy``, ``Unhealthy``, ``Unknown`` or ``Initializing``."""
        ids = _ids(instance_ids)
        self._core.report_health(name, ids, [health] * len(ids))

    def report_health_batch(self, name: str, reports: Iterable[tuple[Iterable[int], str]]) -> None:
        """Records several health reports at once; nothing changes unless every instance id exists."""
        ids: list[int] = []
        states: list[str] = []
        for report_ids, health in reports:
            batch = _ids(report_ids)
            ids.extend(batch)
            states.extend([health] * len(batch))
        self._core.report_health(name, ids, states)

    # ----- rebalancing --------------------------------------------------------------------------------

    def rebalance(
        self,
        name: str,
        max_replacements: int | None = None,
        max_surge: int = 1,
        time_limit_s: float = 1.0,
        dry_run: bool = True,
        *,
        max_replacements_percent: float | None = None,
        num_workers: int = 1,
        random_seed: int = 0,
    ) -> RebalancePlan:
        """Plans (and with ``dry_run=False`` applies) the fewest replacements that bring ``name`` back to
        its target shape: zones and fault domains balanced, the Spot mix exact, sizes per the model,
        every pool within capacity. Protected and deallocated instances never move.

        Args:
            max_replacements: the most instances this plan may replace (``None``: no limit).
            max_replacements_percent: the same as a percentage of the capacity (the smaller limit wins).
            max_surge: the most extra instances running at once; each wave creates that many, then
                deletes as many.
            time_limit_s: the solver's time limit; when it ends the proof early, the best plan found is
                returned with ``status == "FEASIBLE"`` and its bound.
            num_workers: CP-SAT workers. One (the default) is deterministic: the same state and budget
                give the same plan. More workers race, and may return another plan that is just as good.
        """
        from scaleset.rebalance import solve_rebalance

        limit = max_replacements
        if limit is not None:
            _count(limit, "max_replacements")
        if max_replacements_percent is not None:
            if not 0 <= max_replacements_percent <= 100:
                raise invalid_input(f"max_replacements_percent must be between 0 and 100, got {max_replacements_percent}.")
            by_percent = int(self.capacity(name) * max_replacements_percent // 100)
            limit = by_percent if limit is None else min(limit, by_percent)
        _count(max_surge, "max_surge")
        plan, _ = solve_rebalance(
            self, name, max_replacements=limit, max_surge=max_surge, time_limit_s=time_limit_s,
            num_workers=num_workers, random_seed=random_seed,
        )
        if dry_run or plan.replacements == 0:
            return plan
        return self.apply_rebalance(plan)

    def rebalance_input(self, name: str) -> dict[str, Any]:
        """``name`` grouped into capacity pools, as plain columns: what the rebalancer's model is built from."""
        return self._core.rebalance_input(name)

    def select_rebalance_deletes(self, name: str, removals: list[int]) -> list[int]:
        """Which instances leave: ``removals[r]`` of pool row ``r`` of :meth:`rebalance_input`, row by row."""
        return self._core.select_rebalance_deletes(name, removals)

    def apply_rebalance(self, plan: RebalancePlan) -> RebalancePlan:
        """Executes a rebalance plan's waves in order (creates get the next instance ids). Fails, changing
        nothing, if the scale set changed so that a move is no longer possible."""
        applied = self.apply_rebalance_moves(plan.scale_set, plan.creates(), plan.deletes())
        return plan.applied([c.instance_id for c in applied.creates])

    def apply_rebalance_moves(
        self, name: str, creates: Sequence[Sequence[Any]], deletes: Sequence[int], *, user: bool = True
    ) -> Plan:
        """Applies explicit moves: creates as (zone, fault_domain, vm_size, priority), then deletes.
        (What the service logs for a rebalance, so a replay never needs the solver.) ``user`` moves
        count as a change to the scale set; the platform's own (automatic zone balance) do not."""
        handle = self._core.apply_rebalance(
            name,
            [c[0] for c in creates],
            [c[1] for c in creates],
            [c[2] for c in creates],
            [c[3] for c in creates],
            _ids(deletes),
        )
        if user:
            self._touch(name)
        return _plan(handle, dry_run=False)

    # ----- time-driven policies ------------------------------------------------------------------------

    def advance(self, now: float, name: str | None = None) -> list[Action]:
        """Advances the time-driven policies (rolling upgrades, automatic repairs, automatic zone
        balance) of every scale set, or of ``name``, to ``now`` (seconds since the epoch; the engine never
        reads a clock itself). Returns what was done. The same state and ``now`` give the same actions."""
        actions: list[Action] = []
        for n in [name] if name is not None else self.scale_set_names():
            if n in self._upgrade_pending:
                self._upgrade_pending.discard(n)
                self._upgrades[n], started_actions = upgrade.start(self, n, now)
                actions += started_actions
            current = self._upgrades.get(n)
            if current is not None:
                actions += upgrade.step(self, n, now, current)
            busy = set(current.in_batch) if current is not None and current.active else set()
            actions += repairs.step(self, n, now, self._repairs.setdefault(n, RepairState()), self._modified.get(n), busy)
            op, started, done = zone_balance.step(
                self, n, now, self._zone_balance.get(n), self._zone_balance_started.get(n), self._modified.get(n)
            )
            if op is None:
                self._zone_balance.pop(n, None)
            else:
                self._zone_balance[n] = op
            if started is not None:
                self._zone_balance_started[n] = started
            actions += done
        return actions

    def _now(self, now: float | None) -> float:
        if now is not None:
            return now
        return self.clock() if self.clock is not None else 0.0

    # ----- upgrades and repairs -----------------------------------------------------------------------

    def start_rolling_upgrade(self, name: str, now: float | None = None) -> RollingUpgrade:
        """Starts a rolling upgrade of ``name``'s out-of-date instances (any upgrade mode); the batches run
        as :meth:`advance` moves time on. Fails with ``RollingUpgradeInProgress`` if one is running."""
        current = self._upgrades.get(name)
        if current is not None and current.active:
            raise conflict(f"a rolling upgrade of '{name}' is already in progress; cancel it first.", "RollingUpgradeInProgress")
        self._upgrade_pending.discard(name)
        self._upgrades[name], _ = upgrade.start(self, name, self._now(now))
        return self.get_rolling_upgrade(name)  # type: ignore[return-value]

    def get_rolling_upgrade(self, name: str) -> RollingUpgrade | None:
        """The latest rolling upgrade of ``name`` (a copy), or None if there has been none."""
        self._core.capacity(name)  # NotFound for an unknown scale set
        current = self._upgrades.get(name)
        return None if current is None else RollingUpgrade.from_dict(current.to_dict())

    def cancel_rolling_upgrade(self, name: str, now: float | None = None) -> RollingUpgrade:
        """Stops the rolling upgrade in progress; instances already upgraded keep the new model."""
        upgrade.cancel(self._upgrades.get(name), name, self._now(now))
        self._upgrade_pending.discard(name)
        return self.get_rolling_upgrade(name)  # type: ignore[return-value]

    def upgrade_instances(self, name: str, instance_ids: Iterable[int], *, user: bool = True) -> None:
        """Manual upgrade: moves the given instances to the latest model in place (health Initializing).
        ``user`` upgrades count as a change to the scale set; the platform's own (rolling upgrades,
        repairs) do not."""
        self._core.upgrade_instances(name, _ids(instance_ids))
        if user:
            self._touch(name)

    def roll_back_instances(self, name: str, instance_ids: Iterable[int], model_version: int) -> None:
        """Puts instances back on an earlier model version (health Initializing)."""
        self._core.roll_back_instances(name, _ids(instance_ids), _count(model_version, "model_version"))

    def plan_upgrade_batches(
        self, name: str, batch_size: int, prioritize_unhealthy: bool = False, cross_zone: bool = False
    ) -> list[list[int]]:
        """The out-of-date instances of ``name`` in rolling-upgrade batches of at most ``batch_size``
        (zone by zone unless ``cross_zone``, spread over fault domains, unhealthy first if asked)."""
        return self._core.plan_upgrade_batches(name, _count(batch_size, "batch_size"), prioritize_unhealthy, cross_zone)

    def repairs_service_state(self, name: str) -> str:
        """``Running`` or ``Suspended`` (after repeated failed repairs)."""
        self._core.capacity(name)
        return self._repairs.get(name, RepairState()).service_state

    def set_repairs_service_state(self, name: str, state: str) -> None:
        """Resumes (``Running``) or suspends (``Suspended``) automatic repairs of ``name``."""
        if state not in ("Running", "Suspended"):
            raise invalid_input(f"the automatic repairs service state must be Running or Suspended, not {state!r}.")
        repair = self._repairs.setdefault(name, RepairState())
        repair.service_state = state
        repair.consecutive_failures = 0

    def zone_balance_operation(self, name: str) -> ZoneBalanceOperation | None:
        """The automatic zone balance operation in progress on ``name``, if any."""
        return self._zone_balance.get(name)

    # ----- region -------------------------------------------------------------------------------------

    def set_zone_available(self, zone: str, available: bool) -> None:
        """Marks a zone down (outage) or up again."""
        self._core.set_zone_available(zone, bool(available))

    def set_pool_capacity(
        self,
        zone: str | None,
        vm_size: str,
        priority: str,
        available: int | None,
        price: float | None = None,
    ) -> None:
        """Sets how many more instances a pool can take (``None``: unlimited) and optionally its price."""
        if available is not None:
            _count(available, "available")
        self._core.set_pool_capacity(zone, vm_size, priority, available, price)

    def describe_region(self) -> Region:
        """The region as it stands now: zones, zones down, and every configured pool."""
        return Region.from_dict(self._core.region())
