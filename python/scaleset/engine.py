"""The engine facade: the only module that imports the native core (``scaleset._core``).

It turns the dataclasses of :mod:`scaleset.model` into plain data for the core and the core's answers
back into dataclasses. It knows nothing of policies, commands or clocks: it places, scales and records,
and answers questions about the state. The core releases the GIL for every call and serialises calls on
one engine, so an :class:`Engine` may be shared between threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from scaleset import _core
from scaleset.errors import invalid_input
from scaleset.model import (
    INSTANCE_COLUMNS,
    AutoscaleCapacity,
    Eviction,
    Instance,
    LazyItems,
    Plan,
    PlannedCreate,
    PlannedDelete,
    Region,
    ScaleRule,
    ScaleSet,
    ScaleSetSpec,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["Change", "Engine", "MetricBuffer", "check_count", "compile_rules", "duration_seconds"]


#: The highest per-scale-set instance limit an engine accepts (ours: it bounds one plan's memory).
MAX_INSTANCE_LIMIT = 10_000_000


def check_count(value: Any, what: str) -> int:
    """``value`` if it is a non-negative integer below 2**64; InvalidParameter naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise invalid_input(f"{what} must be a non-negative integer below 2**64, got {value!r}.", field=what)
    return value


def check_capacity(value: Any, what: str = "capacity") -> int:
    """A capacity no scale set could ever hold (above MAX_INSTANCE_LIMIT) is invalid input, not a
    capacity error: retrying it can never succeed."""
    if check_count(value, what) > MAX_INSTANCE_LIMIT:
        raise invalid_input(
            f"{what} {value:,} is above the most any scale set can hold ({MAX_INSTANCE_LIMIT:,}).", field=what
        )
    return value  # type: ignore[no-any-return]


_count = check_count


def _ids(instance_ids: Iterable[int]) -> list[int]:
    ids = list(instance_ids)
    for i in ids:
        _count(i, "instance_ids")
    return ids


def duration_seconds(text: str, what: str = "duration") -> float:
    """Seconds in an ISO 8601 duration as Azure writes them ("PT5M", "P1DT2H"), parsed by the core."""
    seconds = _core.parse_duration(text) if isinstance(text, str) else None
    if seconds is None:
        raise invalid_input(f"{what} must be an ISO 8601 duration such as PT5M, got {text!r}.", field=what)
    return seconds


class Change(NamedTuple):
    """One thing the engine did to an instance that infrastructure must carry out: ``Create``, ``Delete``,
    ``Reimage`` (a new or earlier model in place) or ``Restart``; with where the instance is."""

    kind: str
    scale_set: str
    instance_id: int
    zone: str | None
    fault_domain: int
    vm_size: str
    priority: str


#: The plan fields a CorePlan reads from its handle's header, together, when first asked.
_HEADER = frozenset(
    ("scale_set", "capacity_before", "capacity_after", "unallocated", "unallocated_reason", "_counts")
)

#: Plans of up to this many items are read from the core in one call when first read; larger ones
#: build each item when it is read.
EAGER_ITEMS = 64


class CorePlan(Plan):
    """A plan the core made, read from its handle when first asked: the header (scale set, capacities,
    counts) in one call, the items all at once for small plans and one by one for large ones. Making a
    plan costs one call into the core, so one decision at a time stays cheap."""

    __slots__ = ("_handle",)

    def __init__(self, handle: _core.PlanHandle, dry_run: bool) -> None:
        self._handle, self.dry_run, self._creates, self._deletes = handle, dry_run, None, None
        self.items_omitted = False

    if not TYPE_CHECKING:  # to type checkers, the header's fields are the plain attributes of a Plan

        def __getattr__(self, name: str) -> Any:
            """Reads the header from the core the first time one of its fields is asked for (an unset
            slot lands here)."""
            if name not in _HEADER:
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            (
                self.scale_set,
                self.capacity_before,
                self.capacity_after,
                self.unallocated,
                self.unallocated_reason,
                self._counts,
            ) = self._handle.header()
            return getattr(self, name)

    # A small plan's items in one call, inline: one decision at a time is a hot path, where a Python
    # call more costs 4% of the whole.
    @property
    def creates(self) -> Sequence[PlannedCreate]:
        if (items := self._creates) is None:
            handle = self._handle
            if (items := handle.all_creates(PlannedCreate, EAGER_ITEMS)) is None:
                items = _lazy(handle.creates_len(), handle.create_items, PlannedCreate)
            self._creates = items
        return items

    @property
    def deletes(self) -> Sequence[PlannedDelete]:
        if (items := self._deletes) is None:
            handle = self._handle
            if (items := handle.all_deletes(PlannedDelete, EAGER_ITEMS)) is None:
                items = _lazy(handle.deletes_len(), handle.delete_items, PlannedDelete)
            self._deletes = items
        return items

    def create_columns(self) -> dict[str, list[Any]]:
        return self._handle.create_columns()

    def delete_columns(self) -> dict[str, list[Any]]:
        return self._handle.delete_columns()


def _lazy(n: int, read: Callable[[type[T], int, int], tuple[T, ...]], kind: type[T]) -> LazyItems[T]:
    """A large plan's ``n`` items, each made as ``kind`` by the core when it is read."""
    return LazyItems(n, lambda i: read(kind, i, i + 1)[0])


class Engine:
    """Places, scales, evicts and protects the instances of scale sets in one region.

    Args:
        region: zones, fault domains per zone, zones down, and capacity pools.
        instance_limit: replaces Azure's per-scale-set instance limits (1,000 / 600 / 200 / 100) with this
            ceiling, for private fleets. ``None`` enforces Azure's limits.
    """

    def __init__(self, region: Region, *, instance_limit: int | None = None) -> None:
        if instance_limit is not None and _count(instance_limit, "instance_limit") > MAX_INSTANCE_LIMIT:
            raise invalid_input(
                f"instance_limit may be at most {MAX_INSTANCE_LIMIT:,} instances per scale set, got {instance_limit:,}.",
                field="instance_limit",
            )
        self._core = _core.Engine(region.to_dict(), instance_limit)
        self._instance_limit = instance_limit
        #: Every :class:`Change` made since the last drain, while somebody carries changes out (executors);
        #: ``None`` records nothing (plans take effect as they are made).
        self.journal: list[Change] | None = None

    def _record(self, plan: Plan) -> Plan:
        """Journals a plan's creates and deletes (an overprovisioned VM, created and deleted within the
        plan, is neither)."""
        if self.journal is None or plan.dry_run:
            return plan
        creates, deletes = plan.creates, plan.deletes
        both = (
            {c.instance_id for c in creates} & {d.instance_id for d in deletes} if deletes and creates else ()
        )
        for kind, items in (("Delete", deletes), ("Create", creates)):
            self.journal.extend(
                Change(kind, plan.scale_set, i.instance_id, i.zone, i.fault_domain, i.vm_size, i.priority)
                for i in items
                if i.instance_id not in both
            )
        return plan

    def _record_ids(self, kind: str, name: str, ids: Sequence[int]) -> None:
        if self.journal is None or not ids:
            return
        cols = self._core.instances(name)
        where = {i: k for k, i in enumerate(cols["instance_id"])}
        for i in ids:
            k = where[i]
            self.journal.append(
                Change(
                    kind,
                    name,
                    i,
                    cols["zone"][k],
                    cols["fault_domain"][k],
                    cols["vm_size"][k],
                    cols["priority"][k],
                )
            )

    # ----- scale sets ---------------------------------------------------------------------------------

    def create_scale_set(self, spec: ScaleSetSpec, capacity: int = 0) -> Plan:
        """Validates and stores a scale set, then scales it to ``capacity``.

        Returns the plan that placed the initial instances. Nothing is stored if validation or placement
        fails. Raises :class:`~scaleset.errors.ScaleSetError` subclasses with Azure's codes.
        """
        _, handle = self._core.create_scale_set(spec.to_dict(), _count(capacity, "capacity"))
        log.debug("created scale set %s with %d instances", spec.name, capacity)
        return self._record(CorePlan(handle, dry_run=False))

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
        return ScaleSetSpec.from_dict(self._core.update_scale_set(spec.to_dict()))

    def delete_scale_set(self, name: str) -> None:
        """Deletes a scale set and its instances (protection does not block deleting the whole set)."""
        if self.journal is not None:
            self._record_ids("Delete", name, self._core.instances(name)["instance_id"])
        self._core.delete_scale_set(name)

    def capacity(self, name: str) -> int:
        return int(self._core.capacity(name))

    def export_state(self, *, scale_sets: bool = True) -> dict[str, Any]:
        """The whole engine as plain data (region, every scale set with instances and next id), for
        snapshots; :meth:`from_state` rebuilds an identical engine. Without ``scale_sets`` the list is
        empty (they are saved one by one with :meth:`export_scale_set`)."""
        names = self._core.list_scale_sets() if scale_sets else []
        return {
            "region": self._core.region(),
            "scale_sets": [
                {
                    "spec": self._core.get_spec(name),
                    "instances": dict(self._core.instances(name)),
                    "next_instance_id": self._core.next_instance_id(name),
                }
                for name in names
            ],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], *, instance_limit: int | None = None) -> Engine:
        """Rebuilds an engine saved by :meth:`export_state`."""
        engine = cls(Region.from_dict(state["region"]), instance_limit=instance_limit)
        for saved in state["scale_sets"]:
            engine.restore_scale_set(saved)
        return engine

    def restore_scale_set(self, saved: dict[str, Any]) -> None:
        """Puts back one scale set as :meth:`export_state` or :meth:`export_scale_set` saved it."""
        if isinstance(saved["instances"], bytes):
            self._core.restore_encoded(saved["spec"], saved["instances"], saved["next_instance_id"])
        else:
            self._core.restore_scale_set(saved["spec"], saved["instances"], saved["next_instance_id"])

    def export_scale_set(self, name: str) -> dict[str, Any]:
        """One scale set as :meth:`export_state` lists it, but with its instances in the core's compact
        binary columnar encoding (bytes, a few per instance; :meth:`from_state` takes either)."""
        return {
            "spec": self._core.get_spec(name),
            "instances": self._core.encode_instances(name),
            "next_instance_id": self._core.next_instance_id(name),
        }

    def take_changed(self) -> list[str]:
        """The scale sets created, changed or deleted since the last call (what an incremental snapshot
        writes again), by name; the engine forgets them."""
        return self._core.take_changed()

    def next_instance_id(self, name: str) -> int:
        """The id the next instance created in ``name`` receives."""
        return int(self._core.next_instance_id(name))

    def instance_limit(self, name: str) -> int:
        """The most instances this scale set may hold under the engine's limits."""
        return int(self._core.instance_limit(name))

    # ----- scaling ------------------------------------------------------------------------------------

    def set_capacity(self, name: str, capacity: int, dry_run: bool = False) -> Plan:
        """Scales out or in to ``capacity`` instances. With ``dry_run`` nothing changes."""
        if type(capacity) is not int or not 0 <= capacity < 1 << 64:  # cheap: one decision is a hot path
            capacity = _count(capacity, "capacity")
        plan = CorePlan(self._core.set_capacity(name, capacity, dry_run), dry_run)
        return plan if self.journal is None else self._record(plan)

    # ----- instances ----------------------------------------------------------------------------------

    def instance_columns(self, name: str) -> dict[str, list[Any]]:
        """The instances as columns (one list per :class:`~scaleset.model.Instance` field)."""
        return dict(self._core.instances(name))

    def _instances(self, name: str) -> tuple[Instance, ...]:
        cols = self._core.instances(name)
        names = [
            n if n is not None else f"{name}_{i}"
            for n, i in zip(cols["name"], cols["instance_id"], strict=False)
        ]
        cols["name"] = names
        return tuple(
            Instance(**dict(zip(INSTANCE_COLUMNS, row, strict=False)))
            for row in zip(*(cols[c] for c in INSTANCE_COLUMNS), strict=False)
        )

    def import_instances(self, name: str, instances: Iterable[Instance]) -> None:
        """Adopts existing instances with their ids, zones, fault domains, sizes, priorities and states.

        Imported instances keep the capacity they already hold: pools are not charged for them.
        """
        items: Sequence[Instance] = list(instances)
        columns = {c: [getattr(i, c) for i in items] for c in INSTANCE_COLUMNS}
        self._core.import_instances(name, columns)

    def delete_instances(self, name: str, instance_ids: Iterable[int]) -> Plan:
        """Deletes chosen instances, protected ones included (as Azure allows for user deletes)."""
        return self._record(CorePlan(self._core.delete_instances(name, _ids(instance_ids)), dry_run=False))

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

    def rebalance_input(self, name: str) -> dict[str, Any]:
        """``name`` grouped into capacity pools, as plain columns: what the rebalancer's model is built from."""
        return self._core.rebalance_input(name)

    def select_rebalance_deletes(self, name: str, removals: list[int]) -> list[int]:
        """Which instances leave: ``removals[r]`` of pool row ``r`` of :meth:`rebalance_input`, row by row."""
        return self._core.select_rebalance_deletes(name, removals)

    def apply_rebalance_moves(
        self, name: str, creates: Sequence[Sequence[Any]], deletes: Sequence[int]
    ) -> Plan:
        """Applies explicit moves: creates as (zone, fault_domain, vm_size, priority), then deletes.
        (What a rebalance is logged as, so a replay never needs the solver.) Fails, changing nothing, if
        a move is not possible."""
        handle = self._core.apply_rebalance(
            name,
            [c[0] for c in creates],
            [c[1] for c in creates],
            [c[2] for c in creates],
            [c[3] for c in creates],
            _ids(deletes),
        )
        return self._record(CorePlan(handle, dry_run=False))

    # ----- upgrades ----------------------------------------------------------------------------------------

    def upgrade_instances(self, name: str, instance_ids: Iterable[int]) -> None:
        """Moves the given instances to the latest model in place (health Initializing); an id listed twice
        is upgraded once (logs hold such calls: they were always accepted)."""
        ids = list(dict.fromkeys(_ids(instance_ids)))
        self._core.upgrade_instances(name, ids)
        self._record_ids("Reimage", name, ids)

    def roll_back_instances(self, name: str, instance_ids: Iterable[int], model_version: int) -> None:
        """Puts instances back on an earlier model version (health Initializing); an id listed twice is
        rolled back once."""
        ids = list(dict.fromkeys(_ids(instance_ids)))
        self._core.roll_back_instances(name, ids, _count(model_version, "model_version"))
        self._record_ids("Reimage", name, ids)

    def restart_instances(self, name: str, instance_ids: Iterable[int]) -> None:
        """Restarts instances (health Initializing until they report)."""
        ids = _ids(instance_ids)
        self._core.report_health(name, ids, ["Initializing"] * len(ids))
        self._record_ids("Restart", name, ids)

    def set_provisioning_state(self, name: str, instance_ids: Iterable[int], state: str) -> None:
        """Records what the infrastructure did: ``Creating``, ``Succeeded``, ``Failed``, ``Updating`` or
        ``Deleting``. Nothing changes unless every id exists."""
        self._core.set_provisioning_state(name, _ids(instance_ids), state)

    def plan_upgrade_batches(
        self, name: str, batch_size: int, prioritize_unhealthy: bool = False, cross_zone: bool = False
    ) -> list[list[int]]:
        """The out-of-date instances of ``name`` in rolling-upgrade batches of at most ``batch_size``
        (zone by zone unless ``cross_zone``, spread over fault domains, unhealthy first if asked)."""
        return self._core.plan_upgrade_batches(
            name, _count(batch_size, "batch_size"), prioritize_unhealthy, cross_zone
        )

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
        restricted: bool | None = None,
    ) -> None:
        """Sets how many more instances a pool can take (``None``: unlimited), and optionally its price and
        whether the size is offered there at all (``restricted``: refused with SkuNotAvailable)."""
        if available is not None:
            _count(available, "available")
        self._core.set_pool_capacity(zone, vm_size, priority, available, price)
        if restricted is not None:
            self._core.set_pool_restricted(zone, vm_size, priority, bool(restricted))

    def set_core_quota(self, family: str, cores: int | None) -> None:
        """Sets a quota family's vCPU quota (``None``: none). A plan that would take the family's running
        vCPUs above it fails whole with OperationNotAllowed."""
        if cores is not None:
            _count(cores, "cores")
        self._core.set_core_quota(family, cores)

    def set_pool_blocked(self, zone: str | None, vm_size: str, priority: str, blocked: bool) -> None:
        """Makes placement skip a pool whatever its capacity (an allocation just failed there), or use it
        again. Not part of the region's state: whoever blocks a pool owns when it is unblocked."""
        self._core.set_pool_blocked(zone, vm_size, priority, bool(blocked))

    def describe_region(self) -> Region:
        """The region as it stands now: zones, zones down, and every configured pool."""
        return Region.from_dict(self._core.region())


# ----- autoscale: the metric buffer and the decision rules live in the core ------------------------------


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def compile_rules(rules: Sequence[ScaleRule]) -> Any:
    """A profile's rules, parsed by the core once (enum values are checked here, with their field)."""
    return _core.AutoscaleRules(
        [
            {
                "metric_name": r.metric_trigger.metric_name,
                "time_grain_ms": _ms(
                    duration_seconds(r.metric_trigger.time_grain, "metric_trigger.time_grain")
                ),
                "time_window_ms": _ms(
                    duration_seconds(r.metric_trigger.time_window, "metric_trigger.time_window")
                ),
                "statistic": r.metric_trigger.statistic,
                "time_aggregation": r.metric_trigger.time_aggregation,
                "operator": r.metric_trigger.operator,
                "threshold": float(r.metric_trigger.threshold),
                "divide_per_instance": bool(r.metric_trigger.divide_per_instance),
                "direction": r.scale_action.direction,
                "scale_type": r.scale_action.type,
                "value": r.scale_action.value,
                "cooldown_ms": _ms(duration_seconds(r.scale_action.cooldown, "scale_action.cooldown")),
            }
            for r in rules
        ]
    )


class MetricBuffer:
    """Pushed metrics of every scale set, held by the core: bounded by each scale set's retention (its
    setting's largest window) and by ``max_samples`` per series, however long the server runs.

    Times are seconds since the epoch.
    """

    #: Bytes one buffered sample costs in the core.
    SAMPLE_BYTES: int = _core.MetricBuffer.SAMPLE_BYTES

    def __init__(self, default_retention_s: float = 3600.0, max_samples: int = 100_000) -> None:
        self._core = _core.MetricBuffer(_ms(default_retention_s), max_samples)

    def set_retention(self, scale_set: str, seconds: float) -> None:
        self._core.set_retention(scale_set, _ms(seconds))

    def clear_retention(self, scale_set: str) -> None:
        """``scale_set`` keeps the default history again (its autoscale setting was deleted)."""
        self._core.clear_retention(scale_set)

    def add(self, scale_set: str, metric: str, times: Sequence[float], values: Sequence[float]) -> None:
        self._core.add(scale_set, metric, [_ms(t) for t in times], [float(v) for v in values])

    def remove(self, scale_set: str) -> None:
        self._core.remove_scale_set(scale_set)

    def sample_count(self) -> int:
        return int(self._core.sample_count())

    def export(self) -> list[list[Any]]:
        """Every series as [scale set, metric, times in ms, values], for snapshots."""
        return [[s, m, t, v] for s, m, t, v in self._core.export()]

    def restore(self, series: Sequence[Sequence[Any]]) -> None:
        """Puts back what :meth:`export` saved, every sample (none dropped for a retention not set yet)."""
        for scale_set, metric, times_ms, values in series:
            self._core.restore(scale_set, metric, list(times_ms), list(values))

    def evaluate(
        self,
        scale_set: str,
        rules: Any,
        capacity: int,
        bounds: AutoscaleCapacity,
        now: float,
        cooldown_until: float | None,
    ) -> dict[str, Any]:
        """The core's decision for the active profile (compiled by :func:`compile_rules`) at ``now``."""
        return self._core.evaluate(
            scale_set,
            rules,
            capacity,
            bounds.minimum,
            bounds.maximum,
            bounds.default,
            _ms(now),
            None if cooldown_until is None else _ms(cooldown_until),
        )
