"""Typed commands: one frozen dataclass per mutation (and per dry run of one).

A command knows how to check its arguments (:meth:`Command.validate`), carry itself out on the engine
and the policy runner at an explicit time (:meth:`Command.apply`), say what it did for watchers
(:meth:`Command.describe`) and write itself into the log (:meth:`Command.encode`, :func:`decode`). The
service only builds commands and maps replies; the control plane only orders, commits and streams them;
the in-process :class:`~scaleset.controller.Controller` runs the same commands. Nobody else reads the
log's encoding.

To add a mutation: a dataclass here with ``op`` and ``event_type``, registered by :func:`command`; a
method on :class:`~scaleset.controller.Controller`; an RPC that builds it in ``service``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from scaleset.engine import Engine, check_capacity, check_count
from scaleset.errors import invalid_input
from scaleset.model import AutoscaleSetting, Eviction, Instance, Plan, ScaleSetSpec
from scaleset.policies.common import Action
from scaleset.policies.lifecycle import MODES
from scaleset.policies.runner import PolicyRunner

__all__ = [
    "Advance",
    "CancelRollingUpgrade",
    "Command",
    "CreateScaleSet",
    "DeleteAutoscaleSetting",
    "DeleteInstances",
    "DeleteScaleSet",
    "EvictInstances",
    "ImportInstances",
    "Rebalance",
    "RebalanceMoves",
    "ReportHealth",
    "ReportMetrics",
    "SetAutoscaleSetting",
    "SetCapacity",
    "SetPoolCapacity",
    "SetProtection",
    "SetRepairsServiceState",
    "SetZoneAvailability",
    "StartRollingUpgrade",
    "UpdateScaleSet",
    "UpgradeInstances",
    "decode",
]

#: Plans with more changes than this are summarised (counts only) in watch events.
EVENT_PLAN_ITEMS = 1000

_REGISTRY: dict[str, type[Command]] = {}
C = TypeVar("C", bound="type[Command]")


def command(cls: C) -> C:
    """Registers a command class under its ``op`` (the log's name for it)."""
    assert cls.op not in _REGISTRY, cls.op
    _REGISTRY[cls.op] = cls
    return cls


def decode(data: Mapping[str, Any]) -> Command:
    """The command a log entry holds (:meth:`Command.encode`'s shape). Unknown keys are ignored, so
    entries written by older versions (which carried their time in the entry) still replay."""
    cls = _REGISTRY.get(data.get("op", ""))
    if cls is None:
        raise invalid_input(f"unknown command {data.get('op')!r} in the log.", "UnknownCommand")
    return cls.from_fields(data)


def _require_name(name: str, field: str = "name") -> None:
    if not isinstance(name, str) or not name:
        raise invalid_input(f"{field} is required.", field=field)


def _check_ids(ids: tuple[int, ...]) -> None:
    for i in ids:
        check_count(i, "instance_ids")


def _plan_summary(plan: Plan) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "capacity_before": plan.capacity_before,
        "capacity_after": plan.capacity_after,
        "create_count": len(plan.creates),
        "delete_count": len(plan.deletes),
    }
    if len(plan.creates) <= EVENT_PLAN_ITEMS and len(plan.deletes) <= EVENT_PLAN_ITEMS:
        creates, deletes = plan.create_columns(), plan.delete_columns()
        summary["creates"] = (
            [list(row) for row in zip(*creates.values(), strict=True)] if creates["instance_id"] else []
        )
        summary["deletes"] = (
            [list(row) for row in zip(*deletes.values(), strict=True)] if deletes["instance_id"] else []
        )
    return summary


def _plan_description(plan: Plan) -> dict[str, Any]:
    text = f"{plan.capacity_before} -> {plan.capacity_after} instances"
    if plan.unallocated:
        text += f"; {plan.unallocated} not placed (partial allocation)"
    return {"plan": _plan_summary(plan), "text": text}


@dataclass(frozen=True, slots=True)
class Command:
    """A mutation of a scale set (or, with an empty :attr:`scale_set`, of the region)."""

    op: ClassVar[str]
    event_type: ClassVar[str]

    @property
    def scale_set(self) -> str:
        """The scale set this command changes ("" for the region)."""
        return str(getattr(self, "name", ""))

    @property
    def mutates(self) -> bool:
        """False for dry runs: they are answered but never logged."""
        return not getattr(self, "dry_run", False)

    def validate(self) -> None:
        """Checks the arguments before anything runs (InvalidParameter with the field at fault)."""
        if "name" in self._field_names():
            _require_name(self.scale_set)

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> Any:
        """Carries the command out at ``now`` (seconds since the epoch) and returns its result."""
        raise NotImplementedError

    def logged(self, result: Any) -> Command:
        """The command to write to the log for this result (itself, unless it had to be resolved: a
        rebalance is logged as its explicit moves, so a replay never runs the solver)."""
        return self

    def event(self, result: Any) -> str:
        """The watch event's type."""
        return self.event_type

    def describe(self, result: Any) -> dict[str, Any]:
        """What watchers are told: a sentence (``text``) and, for plans, the instances involved."""
        return {"text": self.op}

    def encode(self) -> dict[str, Any]:
        """The log's plain-data form (:func:`decode` reads it back)."""
        return {"op": self.op, **{name: self._encode_field(name) for name in self._field_names()}}

    def _encode_field(self, name: str) -> Any:
        value = getattr(self, name)
        return [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, tuple) else value

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> Command:
        names = cls._field_names()
        return cls(**{k: _tuples(v) if type(v) is list else v for k, v in data.items() if k in names})

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        names = _FIELD_NAMES.get(cls)
        if names is None:
            names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
        return names


def _tuples(value: list[Any]) -> tuple[Any, ...]:
    """A logged list as the command's field holds it: a tuple (of tuples, for a list of lists)."""
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)


#: Each command class's fields, by name (looked up once per class: a replay decodes every entry).
_FIELD_NAMES: dict[type[Command], tuple[str, ...]] = {}


# ----- scale sets -----------------------------------------------------------------------------------


@command
@dataclass(frozen=True, slots=True)
class CreateScaleSet(Command):
    op: ClassVar[str] = "create"
    event_type: ClassVar[str] = "ScaleSetCreated"
    spec: ScaleSetSpec
    capacity: int = 0

    @property
    def scale_set(self) -> str:
        return self.spec.name

    def validate(self) -> None:
        _require_name(self.spec.name, "scale_set.name")
        check_capacity(self.capacity)

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> Plan:
        plan = engine.create_scale_set(self.spec, self.capacity)
        policies.changed(self.spec.name, now)
        return plan

    def describe(self, result: Plan) -> dict[str, Any]:
        return _plan_description(result)

    def encode(self) -> dict[str, Any]:
        return {"op": self.op, "spec": self.spec.to_dict(), "capacity": self.capacity}

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> Command:
        return cls(ScaleSetSpec.from_dict(data["spec"]), data.get("capacity", 0))


@command
@dataclass(frozen=True, slots=True)
class UpdateScaleSet(Command):
    """Replaces a scale set's model; unset optional fields keep their stored values."""

    op: ClassVar[str] = "update"
    event_type: ClassVar[str] = "ScaleSetUpdated"
    spec: ScaleSetSpec

    @property
    def scale_set(self) -> str:
        return self.spec.name

    def validate(self) -> None:
        _require_name(self.spec.name, "scale_set.name")

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> ScaleSetSpec:
        before = engine.get_spec(self.spec.name).model_version
        stored = engine.update_scale_set(self.spec)
        policies.changed(self.spec.name, now)
        if stored.model_version != before:
            policies.model_changed(engine, stored)
        else:
            policies.updated(engine, stored)
        return stored

    def encode(self) -> dict[str, Any]:
        return {"op": self.op, "spec": self.spec.to_dict()}

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> Command:
        return cls(ScaleSetSpec.from_dict(data["spec"]))


@command
@dataclass(frozen=True, slots=True)
class DeleteScaleSet(Command):
    op: ClassVar[str] = "delete"
    event_type: ClassVar[str] = "ScaleSetDeleted"
    name: str

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> None:
        engine.delete_scale_set(self.name)
        policies.deleted(self.name)


@command
@dataclass(frozen=True, slots=True)
class SetCapacity(Command):
    """Scales out or in; a dry run returns the plan and changes nothing."""

    op: ClassVar[str] = "set_capacity"
    event_type: ClassVar[str] = "CapacitySet"
    name: str
    capacity: int
    dry_run: bool = False

    def validate(self) -> None:
        _require_name(self.name)
        check_capacity(self.capacity)

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> Plan:
        plan = engine.set_capacity(self.name, self.capacity, dry_run=self.dry_run)
        if not self.dry_run:
            policies.changed(self.name, now, capacity=True)
        return plan

    def describe(self, result: Plan) -> dict[str, Any]:
        return _plan_description(result)

    def encode(self) -> dict[str, Any]:
        return {"op": self.op, "name": self.name, "capacity": self.capacity}


# ----- instances --------------------------------------------------------------------------------------


@command
@dataclass(frozen=True, slots=True)
class ImportInstances(Command):
    op: ClassVar[str] = "import"
    event_type: ClassVar[str] = "InstancesImported"
    name: str
    instances: tuple[Instance, ...]

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> None:
        engine.import_instances(self.name, self.instances)
        policies.changed(self.name, now)

    def describe(self, result: None) -> dict[str, Any]:
        return {"text": f"{len(self.instances)} instances imported"}

    def encode(self) -> dict[str, Any]:
        rows = [{f.name: getattr(i, f.name) for f in dataclasses.fields(Instance)} for i in self.instances]
        return {"op": self.op, "name": self.name, "instances": rows}

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> Command:
        return cls(data["name"], tuple(Instance(**row) for row in data["instances"]))


@dataclass(frozen=True, slots=True)
class _InstancesCommand(Command):
    name: str
    instance_ids: tuple[int, ...]

    def validate(self) -> None:
        _require_name(self.name)
        _check_ids(self.instance_ids)

    def describe(self, result: Any) -> dict[str, Any]:
        return {"text": f"{len(self.instance_ids)} instances"}


@command
@dataclass(frozen=True, slots=True)
class DeleteInstances(_InstancesCommand):
    """Deletes chosen instances, protected ones included (as Azure allows for user deletes)."""

    op: ClassVar[str] = "delete_instances"
    event_type: ClassVar[str] = "InstancesDeleted"

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> Plan:
        plan = engine.delete_instances(self.name, self.instance_ids)
        policies.changed(self.name, now)
        return plan

    def describe(self, result: Plan) -> dict[str, Any]:
        return _plan_description(result)


@command
@dataclass(frozen=True, slots=True)
class EvictInstances(_InstancesCommand):
    op: ClassVar[str] = "evict"
    event_type: ClassVar[str] = "InstancesEvicted"

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> Eviction:
        eviction = engine.evict(self.name, self.instance_ids)
        # Reported evictions are the infrastructure's (capacity): Try & restore may bring them back.
        policies.lifecycle.evicted(
            engine, self.name, len(eviction.deleted), now, autoscaled=policies.autoscaled(self.name)
        )
        return eviction

    def describe(self, result: Eviction) -> dict[str, Any]:
        return {"text": f"evicted: {len(result.deleted)} deleted, {len(result.deallocated)} deallocated"}


@command
@dataclass(frozen=True, slots=True)
class SetProtection(_InstancesCommand):
    op: ClassVar[str] = "protect"
    event_type: ClassVar[str] = "InstanceProtectionSet"
    protect_from_scale_in: bool = False
    protect_from_scale_set_actions: bool = False

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> None:
        engine.set_protection(
            self.name, self.instance_ids, self.protect_from_scale_in, self.protect_from_scale_set_actions
        )


@command
@dataclass(frozen=True, slots=True)
class UpgradeInstances(_InstancesCommand):
    """Manual upgrade: the given instances move to the latest model in place."""

    op: ClassVar[str] = "upgrade_instances"
    event_type: ClassVar[str] = "InstancesUpgraded"

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> None:
        engine.upgrade_instances(self.name, self.instance_ids)
        policies.changed(self.name, now)

    def describe(self, result: None) -> dict[str, Any]:
        return {"text": f"{len(self.instance_ids)} instances upgraded to the latest model"}


@command
@dataclass(frozen=True, slots=True)
class ReportHealth(Command):
    """Application Health reports: (instance ids, Healthy | Unhealthy | Unknown | Initializing) pairs;
    nothing changes unless every instance exists."""

    op: ClassVar[str] = "health"
    event_type: ClassVar[str] = "InstanceHealthReported"
    name: str
    reports: tuple[tuple[tuple[int, ...], str], ...]

    def validate(self) -> None:
        _require_name(self.name)
        for ids, _ in self.reports:
            _check_ids(ids)

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> None:
        engine.report_health_batch(self.name, self.reports)

    def describe(self, result: None) -> dict[str, Any]:
        return {"text": f"{sum(len(ids) for ids, _ in self.reports)} instances"}

    def encode(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "name": self.name,
            "reports": [[list(ids), health] for ids, health in self.reports],
        }

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> Command:
        return cls(data["name"], tuple((tuple(ids), health) for ids, health in data["reports"]))


# ----- rebalancing ------------------------------------------------------------------------------------


@command
@dataclass(frozen=True, slots=True)
class RebalanceMoves(Command):
    """Explicit moves (creates as (zone, fault_domain, vm_size, priority), then deletes): what an applied
    rebalance is logged as."""

    op: ClassVar[str] = "rebalance"
    event_type: ClassVar[str] = "ScaleSetRebalanced"
    name: str
    creates: tuple[tuple[Any, ...], ...]
    deletes: tuple[int, ...]

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> Plan:
        plan = engine.apply_rebalance_moves(self.name, self.creates, self.deletes)
        if self.creates or self.deletes:  # a rebalance that moved nothing is no change (as it was live)
            policies.changed(self.name, now)
        return plan

    def describe(self, result: Any) -> dict[str, Any]:
        plan = result if isinstance(result, Plan) else None
        if plan is None:
            return {"text": f"{len(self.deletes)} instances replaced"}
        return _plan_description(plan)


@dataclass(frozen=True, slots=True)
class Rebalance(Command):
    """Plans (and unless ``dry_run``, applies) the fewest replacements back to the target shape. Not
    logged itself: an applied rebalance is logged as its :class:`RebalanceMoves`."""

    op: ClassVar[str] = "plan_rebalance"
    event_type: ClassVar[str] = "ScaleSetRebalanced"
    name: str
    max_replacements: int | None = None
    max_replacements_percent: float | None = None
    max_surge: int = 1
    #: ``None``: scaled with the scale set (:func:`scaleset.rebalance.default_time_limit_s`).
    time_limit_s: float | None = None
    dry_run: bool = True
    num_workers: int = 1
    random_seed: int = 0

    def validate(self) -> None:
        _require_name(self.name)
        if self.max_replacements is not None:
            check_count(self.max_replacements, "max_replacements")
        percent = self.max_replacements_percent
        if percent is not None and not 0 <= percent <= 100:
            raise invalid_input(
                f"max_replacements_percent must be between 0 and 100, got {percent}.",
                field="max_replacements_percent",
            )
        check_count(self.max_surge, "max_surge")
        if self.max_surge < 1:
            raise invalid_input(f"max_surge must be at least 1, got {self.max_surge}.", field="max_surge")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise invalid_input(
                f"time_limit_s must be positive, got {self.time_limit_s}.", field="time_limit_s"
            )

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> Any:
        from scaleset.rebalance import solve_rebalance  # OR-Tools loads only when somebody rebalances

        limit = self.max_replacements
        if self.max_replacements_percent is not None:
            by_percent = int(engine.capacity(self.name) * self.max_replacements_percent // 100)
            limit = by_percent if limit is None else min(limit, by_percent)
        plan, _ = solve_rebalance(
            engine,
            self.name,
            max_replacements=limit,
            max_surge=self.max_surge,
            time_limit_s=self.time_limit_s,
            num_workers=self.num_workers,
            random_seed=self.random_seed,
        )
        if self.dry_run or plan.replacements == 0:
            return plan
        creates, deletes = plan.moves()
        applied = RebalanceMoves(self.name, tuple(map(tuple, creates)), tuple(deletes)).apply(
            engine, policies, now
        )
        return plan.applied([c.instance_id for c in applied.creates])

    def logged(self, result: Any) -> Command:
        creates, deletes = result.moves()
        return RebalanceMoves(self.name, tuple(map(tuple, creates)), tuple(deletes))

    def describe(self, result: Any) -> dict[str, Any]:
        # Watchers see the applied moves as a plan, like every other change of instances.
        plan = Plan(
            self.name, result.capacity, result.capacity, result.dry_run, result.creates, result.deletes
        )
        return {
            **_plan_description(plan),
            "text": f"{result.replacements} instances replaced ({result.status})",
        }


# ----- upgrades, repairs and time ----------------------------------------------------------------------


@command
@dataclass(frozen=True, slots=True)
class Advance(Command):
    """Advances the time-driven policies of one scale set (or, with an empty name, of all) to ``now``."""

    op: ClassVar[str] = "advance"
    event_type: ClassVar[str] = "PolicyActions"
    name: str = ""

    def validate(self) -> None:
        pass

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> list[Action]:
        return policies.advance(engine, now, self.name or None)

    def event(self, result: list[Action]) -> str:
        return result[0].kind if result else self.event_type

    def describe(self, result: list[Action]) -> dict[str, Any]:
        return {"text": "; ".join(a.reason for a in result)}


@dataclass(frozen=True, slots=True)
class _UpgradeCommand(Command):
    name: str

    def describe(self, result: Any) -> dict[str, Any]:
        return {
            "text": f"rolling upgrade to model {result.model_version}: {result.status}, {len(result.batches)} batches"
        }


@command
@dataclass(frozen=True, slots=True)
class StartRollingUpgrade(_UpgradeCommand):
    op: ClassVar[str] = "start_upgrade"
    event_type: ClassVar[str] = "RollingUpgradeStarted"

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> Any:
        engine.capacity(self.name)  # NotFound for an unknown scale set
        return policies.start_rolling_upgrade(engine, self.name, now)


@command
@dataclass(frozen=True, slots=True)
class CancelRollingUpgrade(_UpgradeCommand):
    op: ClassVar[str] = "cancel_upgrade"
    event_type: ClassVar[str] = "RollingUpgradeCancelled"

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> Any:
        engine.capacity(self.name)
        return policies.cancel_rolling_upgrade(self.name, now)


@command
@dataclass(frozen=True, slots=True)
class SetRepairsServiceState(Command):
    op: ClassVar[str] = "repairs_state"
    event_type: ClassVar[str] = "RepairsServiceStateChanged"
    name: str
    state: str

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> None:
        engine.capacity(self.name)  # NotFound for an unknown scale set
        policies.set_repairs_service_state(self.name, self.state)

    def describe(self, result: None) -> dict[str, Any]:
        return {"text": f"automatic repairs {self.state}"}


# ----- autoscale ---------------------------------------------------------------------------------------


@command
@dataclass(frozen=True, slots=True)
class SetAutoscaleSetting(Command):
    """Creates or replaces a scale set's autoscale setting (its cooldown and history carry over)."""

    op: ClassVar[str] = "set_autoscale"
    event_type: ClassVar[str] = "AutoscaleSettingSet"
    name: str
    setting: AutoscaleSetting

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> AutoscaleSetting:
        return policies.set_autoscale_setting(engine, self.name, self.setting)

    def describe(self, result: AutoscaleSetting) -> dict[str, Any]:
        state = "enabled" if result.enabled else "disabled"
        return {"text": f"autoscale setting {state}: {len(result.profiles)} profiles"}

    def encode(self) -> dict[str, Any]:
        return {"op": self.op, "name": self.name, "setting": self.setting.to_dict()}

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> Command:
        return cls(data["name"], AutoscaleSetting.from_dict(data["setting"]))


@command
@dataclass(frozen=True, slots=True)
class DeleteAutoscaleSetting(Command):
    op: ClassVar[str] = "delete_autoscale"
    event_type: ClassVar[str] = "AutoscaleSettingDeleted"
    name: str

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> None:
        engine.capacity(self.name)
        policies.delete_autoscale_setting(self.name)


@command
@dataclass(frozen=True, slots=True)
class ReportMetrics(Command):
    """Samples pushed for a scale set: (metric name, times in seconds, values) series."""

    op: ClassVar[str] = "metrics"
    event_type: ClassVar[str] = "MetricsReported"
    name: str
    series: tuple[tuple[str, tuple[float, ...], tuple[float, ...]], ...]

    def validate(self) -> None:
        _require_name(self.name)
        for metric, times, values in self.series:
            if len(times) != len(values):
                raise invalid_input(
                    f"metric {metric!r} has {len(times)} times and {len(values)} values; send one value per time.",
                    field="metrics.samples",
                )
            # Checked here for every series before any is stored (the core checks each as it adds it).
            if (bad := next((v for v in values if not math.isfinite(v)), None)) is not None:
                raise invalid_input(
                    f"metric values must be finite numbers, got {bad}.", field="samples.value"
                )

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> None:
        policies.report_metrics(engine, self.name, self.series)

    def describe(self, result: None) -> dict[str, Any]:
        return {"text": f"{sum(len(t) for _, t, _ in self.series)} samples of {len(self.series)} metrics"}

    def encode(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "name": self.name,
            "series": [[m, list(t), list(v)] for m, t, v in self.series],
        }

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> Command:
        return cls(data["name"], tuple((m, tuple(t), tuple(v)) for m, t, v in data["series"]))


# ----- region -------------------------------------------------------------------------------------------


@command
@dataclass(frozen=True, slots=True)
class SetZoneAvailability(Command):
    op: ClassVar[str] = "zone"
    event_type: ClassVar[str] = "ZoneAvailabilityChanged"
    zone: str
    available: bool

    def validate(self) -> None:
        _require_name(self.zone, "zone")

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> None:
        engine.set_zone_available(self.zone, self.available)

    def describe(self, result: None) -> dict[str, Any]:
        return {"text": f"zone {self.zone} {'available' if self.available else 'unavailable'}"}


@command
@dataclass(frozen=True, slots=True)
class SetCoreQuota(Command):
    """A quota family's vCPU quota (``cores`` None: no quota)."""

    op: ClassVar[str] = "core_quota"
    event_type: ClassVar[str] = "CoreQuotaChanged"
    family: str
    cores: int | None = None

    def validate(self) -> None:
        _require_name(self.family, "family")
        if self.cores is not None:
            check_count(self.cores, "cores")

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> None:
        engine.set_core_quota(self.family, self.cores)

    def describe(self, result: None) -> dict[str, Any]:
        return {"text": f"core quota {self.family} = {'none' if self.cores is None else self.cores}"}


@command
@dataclass(frozen=True, slots=True)
class SetPoolCapacity(Command):
    op: ClassVar[str] = "pool"
    event_type: ClassVar[str] = "PoolCapacityChanged"
    zone: str | None
    vm_size: str
    priority: str = "Regular"
    available: int | None = None
    price: float | None = None
    restricted: bool | None = None

    def validate(self) -> None:
        _require_name(self.vm_size, "pool.vm_size")
        if self.available is not None:
            check_count(self.available, "pool.available")

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> list[Action]:
        engine.set_pool_capacity(
            self.zone, self.vm_size, self.priority, self.available, self.price, self.restricted
        )
        # A Spot price above a scale set's max price schedules its instances' eviction.
        return policies.lifecycle.price_changed(
            engine, self.zone, self.vm_size, self.priority, self.price, now
        )

    def describe(self, result: list[Action] | None) -> dict[str, Any]:
        text = f"pool {self.zone or 'regional'}/{self.vm_size}/{self.priority} available={self.available}"
        if self.price is not None:
            text += f" price={self.price:g}"
        if self.restricted is not None:
            text += " restricted" if self.restricted else " offered"
        return {"text": "; ".join([text, *(a.reason for a in result or ())])}


# ----- executors ----------------------------------------------------------------------------------------


@command
@dataclass(frozen=True, slots=True)
class SetExecutionMode(Command):
    """``Immediate`` (plans take effect as made) or ``Executors`` (executors carry them out and report)."""

    op: ClassVar[str] = "execution_mode"
    event_type: ClassVar[str] = "ExecutionModeChanged"
    mode: str

    def validate(self) -> None:
        if self.mode not in MODES:
            raise invalid_input(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}.", field="mode")

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> list[Action]:
        return policies.lifecycle.set_mode(engine, self.mode, now)

    def describe(self, result: list[Action]) -> dict[str, Any]:
        return {"text": f"execution mode {self.mode}"}


@command
@dataclass(frozen=True, slots=True)
class ReportOperation(Command):
    """An executor's outcome of one operation; one already applied (or cancelled) changes nothing."""

    op: ClassVar[str] = "operation"
    event_type: ClassVar[str] = "OperationReported"
    name: str
    operation_id: int
    succeeded: bool
    error_code: str = ""
    error_message: str = ""
    address: str = ""
    provider_id: str = ""

    def validate(self) -> None:
        _require_name(self.name)
        check_count(self.operation_id, "operation_id")
        for field, value, limit in (
            ("error_code", self.error_code, 128),
            ("error_message", self.error_message, 2048),
            ("address", self.address, 512),
            ("provider_id", self.provider_id, 512),
        ):
            if not isinstance(value, str) or len(value) > limit:
                raise invalid_input(f"{field} must be text of at most {limit} characters.", field=field)
        if not self.succeeded and not self.error_code:
            raise invalid_input(
                "a failed operation needs its error_code (Azure's, such as AllocationFailed).",
                field="error_code",
            )

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> list[Action] | None:
        return policies.lifecycle.complete(
            engine,
            self.operation_id,
            self.succeeded,
            self.error_code,
            self.error_message,
            self.address,
            self.provider_id,
            now=now,
        )

    def event(self, result: list[Action] | None) -> str:
        return result[-1].kind if result else self.event_type

    def describe(self, result: list[Action] | None) -> dict[str, Any]:
        if result is None:
            return {"text": f"operation {self.operation_id} was already applied"}
        return {"text": "; ".join(a.reason for a in result) or f"operation {self.operation_id} applied"}


@command
@dataclass(frozen=True, slots=True)
class AcknowledgeScheduledEvent(Command):
    """An executor is ready for a scheduled eviction (Azure's Scheduled Events ``StartRequests``): it
    happens now instead of at its not-before time."""

    op: ClassVar[str] = "ack_event"
    event_type: ClassVar[str] = "InstancesEvicted"
    name: str
    event_id: int

    def validate(self) -> None:
        _require_name(self.name)
        check_count(self.event_id, "event_id")

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> list[Action] | None:
        return policies.lifecycle.acknowledge(engine, self.name, self.event_id, now)

    def describe(self, result: list[Action] | None) -> dict[str, Any]:
        if result is None:
            return {"text": f"scheduled event {self.event_id} is not pending"}
        return {
            "text": "; ".join(a.reason for a in result)
            or f"scheduled event {self.event_id}: nothing left to evict"
        }


@command
@dataclass(frozen=True, slots=True)
class CompleteLifecycleAction(Command):
    """Ends an instance's wait on one lifecycle hook: ``Continue`` or ``Abandon``."""

    op: ClassVar[str] = "lifecycle_action"
    event_type: ClassVar[str] = "LifecycleActionCompleted"
    name: str
    instance_id: int
    hook: str
    result: str = "Continue"

    def validate(self) -> None:
        _require_name(self.name)
        check_count(self.instance_id, "instance_id")
        _require_name(self.hook, "hook")
        if self.result not in ("Continue", "Abandon"):
            raise invalid_input(f"result must be Continue or Abandon, not {self.result!r}.", field="result")

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> list[Action] | None:
        engine.capacity(self.name)  # NotFound for an unknown scale set
        return policies.lifecycle.complete_action(
            engine, self.name, self.instance_id, self.hook, self.result, now
        )

    def event(self, result: list[Action] | None) -> str:
        return result[-1].kind if result else self.event_type

    def describe(self, result: list[Action] | None) -> dict[str, Any]:
        if result is None:
            return {"text": f"no lifecycle action of hook '{self.hook}' waits on instance {self.instance_id}"}
        return {"text": "; ".join(a.reason for a in result)}


@command
@dataclass(frozen=True, slots=True)
class RecordLifecycleActionHeartbeat(Command):
    """Restarts the timeout of an instance's wait on one lifecycle hook (the work takes longer)."""

    op: ClassVar[str] = "lifecycle_heartbeat"
    event_type: ClassVar[str] = "LifecycleActionHeartbeat"
    name: str
    instance_id: int
    hook: str

    def validate(self) -> None:
        _require_name(self.name)
        check_count(self.instance_id, "instance_id")
        _require_name(self.hook, "hook")

    def apply(self, engine: Engine, policies: PolicyRunner, now: float) -> bool:
        engine.capacity(self.name)
        return policies.lifecycle.heartbeat(self.name, self.instance_id, self.hook, now)

    def describe(self, result: bool) -> dict[str, Any]:
        return {
            "text": f"instance {self.instance_id}: hook '{self.hook}' heartbeat"
            + ("" if result else " (no action waits)")
        }


#: Every logged command's class by its log name.
COMMANDS: Mapping[str, type[Command]] = _REGISTRY
