"""The domain model: frozen dataclasses named after Azure's properties, snake_cased.

Every field but the essential ones is defaulted as Azure defaults it, so
``ScaleSetSpec(name="web", zones=["1", "2", "3"], sku=Sku(name="Standard_D2s_v5"))`` is a complete
zone-spanning Flexible scale set. Fields that Azure fills in at creation (``platform_fault_domain_count``,
``eviction_policy``, ``single_placement_group``) may be left ``None``; the stored spec returned by the
engine has them filled in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, NamedTuple, TypeVar, overload

from scaleset.errors import invalid_input

__all__ = [
    "AutomaticRepairsPolicy",
    "AutomaticZoneRebalancingPolicy",
    "AutoscaleCapacity",
    "AutoscaleDecision",
    "AutoscaleProfile",
    "AutoscaleSetting",
    "CoreQuota",
    "Eviction",
    "Instance",
    "LifecycleHook",
    "MaxInstancePercentPerZonePolicy",
    "MetricTrigger",
    "Placement",
    "Plan",
    "PlannedCreate",
    "PlannedDelete",
    "Pool",
    "PredictiveAutoscalePolicy",
    "PriorityMixPolicy",
    "Recurrence",
    "RecurrentSchedule",
    "Region",
    "RollingUpgradePolicy",
    "ScaleAction",
    "ScaleInPolicy",
    "ScaleRule",
    "ScaleSet",
    "ScaleSetSpec",
    "Sku",
    "SkuProfile",
    "SpotRestorePolicy",
    "TimeWindow",
    "UpgradePolicy",
    "VmSize",
    "ZoneAllocationPolicy",
]


def _freeze(obj: Any, name: str) -> None:
    """Stores a user-given list as a tuple, so specs stay immutable and hashable."""
    value = getattr(obj, name)
    if isinstance(value, str):
        raise invalid_input(f"{type(obj).__name__}.{name} must be a list, not the string {value!r}.")
    if not isinstance(value, tuple):
        object.__setattr__(obj, name, tuple(value))


def _check_int(obj: Any, name: str, minimum: int = 0) -> None:
    value = getattr(obj, name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid_input(f"{type(obj).__name__}.{name} must be an integer >= {minimum}, got {value!r}.")


@dataclass(frozen=True, slots=True)
class Sku:
    """``sku``: one VM size (``name``), or ``"Mix"`` with a :class:`SkuProfile`."""

    name: str
    tier: str | None = None


@dataclass(frozen=True, slots=True)
class VmSize:
    """One size of an instance mix; ``rank`` is used only by the ``Prioritized`` strategy (lower first)."""

    name: str
    rank: int | None = None

    def __post_init__(self) -> None:
        _check_int(self, "rank")


@dataclass(frozen=True, slots=True)
class SkuProfile:
    """``sku_profile`` (instance mix, Flexible only): up to five sizes and an allocation strategy."""

    vm_sizes: Sequence[VmSize]
    allocation_strategy: str = "LowestPrice"

    def __post_init__(self) -> None:
        _freeze(self, "vm_sizes")
        object.__setattr__(
            self, "vm_sizes", tuple(VmSize(name=v) if isinstance(v, str) else v for v in self.vm_sizes)
        )


@dataclass(frozen=True, slots=True)
class PriorityMixPolicy:
    """``priority_mix_policy`` (Flexible + Spot): a Regular base, then a Regular percentage above it."""

    base_regular_priority_count: int = 0
    regular_priority_percentage_above_base: int = 0

    def __post_init__(self) -> None:
        _check_int(self, "base_regular_priority_count")
        _check_int(self, "regular_priority_percentage_above_base")


@dataclass(frozen=True, slots=True)
class ScaleInPolicy:
    """``scale_in_policy``: one of the rules ``Default``, ``NewestVM``, ``OldestVM``."""

    rules: Sequence[str] = ("Default",)
    force_deletion: bool = False
    prioritize_unhealthy_vms: bool = False

    def __post_init__(self) -> None:
        _freeze(self, "rules")


@dataclass(frozen=True, slots=True)
class AutomaticZoneRebalancingPolicy:
    """Azure's automatic zone balance (``resiliencyPolicy.automaticZoneRebalancingPolicy``): one VM at a
    time is recreated in the most under-provisioned zone, driven by :meth:`Engine.advance`."""

    enabled: bool = False
    rebalance_strategy: str = "Recreate"
    rebalance_behavior: str = "CreateBeforeDelete"


@dataclass(frozen=True, slots=True)
class RollingUpgradePolicy:
    """``upgrade_policy.rolling_upgrade_policy``, with Azure's defaults and ranges (reference §7.2)."""

    max_batch_instance_percent: int = 20
    max_unhealthy_instance_percent: int = 20
    max_unhealthy_upgraded_instance_percent: int = 20
    pause_time_between_batches: str = "PT0S"
    prioritize_unhealthy_instances: bool = False
    enable_cross_zone_upgrade: bool = False
    max_surge: bool = False
    rollback_failed_instances_on_policy_breach: bool = False


@dataclass(frozen=True, slots=True)
class UpgradePolicy:
    """``upgrade_policy``: ``Manual`` (default), ``Automatic`` or ``Rolling``."""

    mode: str = "Manual"
    rolling_upgrade_policy: RollingUpgradePolicy = field(default_factory=RollingUpgradePolicy)


@dataclass(frozen=True, slots=True)
class AutomaticRepairsPolicy:
    """``automatic_repairs_policy``: repair instances unhealthy past their grace period (10 to 90 minutes)."""

    enabled: bool = False
    grace_period: str = "PT10M"
    repair_action: str = "Replace"


@dataclass(frozen=True, slots=True)
class LifecycleHook:
    """A lifecycle hook (ours, after AWS Auto Scaling's; Azure has terminate notifications): with
    executors, holds each instance at ``transition`` (``Launching``: created, not yet counted as
    Succeeded; ``Terminating``: removed, not yet deleted) until the action is completed or
    ``heartbeat_timeout`` passes without a heartbeat, which decides ``default_result``."""

    name: str
    transition: str = "Launching"
    heartbeat_timeout: str = "PT1H"
    default_result: str = "Abandon"


@dataclass(frozen=True, slots=True)
class SpotRestorePolicy:
    """``spot_restore_policy`` (Try & restore): keep trying to restore Spot instances evicted for capacity,
    for at most ``restore_timeout`` after the eviction (Spot scale sets without autoscale)."""

    enabled: bool = False
    restore_timeout: str = "PT1H"


@dataclass(frozen=True, slots=True)
class Placement:
    """``placement`` (automatic zone placement, preview): the engine chooses the zones. Set
    ``include_zones`` or ``exclude_zones`` (not both) to narrow the eligible zones."""

    zone_placement_policy: str = "Auto"
    include_zones: Sequence[str] = ()
    exclude_zones: Sequence[str] = ()

    def __post_init__(self) -> None:
        _freeze(self, "include_zones")
        _freeze(self, "exclude_zones")


@dataclass(frozen=True, slots=True)
class MaxInstancePercentPerZonePolicy:
    """No zone holds more than ``value`` percent of the target capacity (with automatic placement)."""

    enabled: bool = True
    value: int = 50


@dataclass(frozen=True, slots=True)
class ZoneAllocationPolicy:
    """Azure's ``resiliencyPolicy.zoneAllocationPolicy`` for automatic zone placement."""

    max_zone_count: int | None = None
    max_instance_percent_per_zone_policy: MaxInstancePercentPerZonePolicy | None = None

    def __post_init__(self) -> None:
        _check_int(self, "max_zone_count")


@dataclass(frozen=True, slots=True)
class ScaleSetSpec:
    """A scale set's model (Azure's ``virtualMachineScaleSets`` properties, snake_cased)."""

    name: str
    orchestration_mode: str = "Flexible"
    zones: Sequence[str] = ()
    zone_balance: bool = False
    platform_fault_domain_count: int | None = None
    sku: Sku | None = None
    sku_profile: SkuProfile | None = None
    priority: str = "Regular"
    eviction_policy: str | None = None
    max_price: float | None = None
    priority_mix_policy: PriorityMixPolicy | None = None
    scale_in_policy: ScaleInPolicy = field(default_factory=ScaleInPolicy)
    single_placement_group: bool | None = None
    image_kind: str = "Marketplace"
    automatic_zone_rebalancing_policy: AutomaticZoneRebalancingPolicy | None = None
    upgrade_policy: UpgradePolicy = field(default_factory=UpgradePolicy)
    automatic_repairs_policy: AutomaticRepairsPolicy | None = None
    spot_restore_policy: SpotRestorePolicy | None = None
    lifecycle_hooks: Sequence[LifecycleHook] = ()
    #: Uniform only (Azure's default there: true): a scale-out creates extra VMs and deletes them once the
    #: requested ones succeeded. Refused on Flexible.
    overprovision: bool | None = None
    do_not_run_extensions_on_overprovisioned_vms: bool = False
    #: Ours (Azure does not document the number): extra VMs as a percentage of a scale-out, rounded up;
    #: None means 20 (Azure's advice: "allow for an address space 20% greater").
    overprovision_percent: int | None = None
    #: Automatic zone placement (preview): leave ``zones`` empty; the engine chooses and records them.
    placement: Placement | None = None
    zone_allocation_policy: ZoneAllocationPolicy | None = None
    #: Engine-managed: starts at 1 and grows by one each time the VM model (size, sizes, image) changes.
    model_version: int = 0

    def __post_init__(self) -> None:
        _freeze(self, "zones")
        _freeze(self, "lifecycle_hooks")
        _check_int(self, "platform_fault_domain_count")
        if isinstance(self.max_price, int) and not isinstance(self.max_price, bool):
            object.__setattr__(self, "max_price", float(self.max_price))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts, lists and scalars, keyed by the snake_cased property names."""
        return _to_plain(self)  # type: ignore[no-any-return]

    def vm_size_names(self) -> list[str]:
        """The model's VM sizes: the sku_profile's, or the sku's one size."""
        if self.sku_profile is not None:
            return [v.name for v in self.sku_profile.vm_sizes]
        return [self.sku.name] if self.sku is not None else []

    def replacement_size(self, current: str) -> str:
        """The size a replacement of an instance of ``current`` size gets: the same if the model still
        has it (instance mix keeps sizes on replacement), else the model's first size."""
        sizes = self.vm_size_names()
        return current if current in sizes or not sizes else sizes[0]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScaleSetSpec:
        """Builds a spec from :meth:`to_dict`'s shape; unknown keys are an error, missing ones default."""
        return _from_plain(cls, data, "spec")


@dataclass(frozen=True, slots=True)
class Pool:
    """Capacity for one (zone, vm_size, priority): ``available`` more instances (None: unlimited)."""

    zone: str | None
    vm_size: str
    priority: str = "Regular"
    available: int | None = None
    price: float = 0.0
    #: The size is not offered here: placement refuses it (SkuNotAvailable) before any try.
    restricted: bool = False

    def __post_init__(self) -> None:
        _check_int(self, "available")


@dataclass(frozen=True, slots=True)
class CoreQuota:
    """A vCPU quota: the running instances of quota family ``family`` (``standardDSv5Family`` for
    Standard_D2s_v5 Regular; ``lowPriorityCores`` for every Spot size) hold at most ``cores`` vCPUs."""

    family: str
    cores: int

    def __post_init__(self) -> None:
        _check_int(self, "cores")


@dataclass(frozen=True, slots=True)
class Region:
    """Zones, fault domains per zone, zones currently down, and capacity pools."""

    zones: Sequence[str] = ()
    fault_domains_per_zone: int = 3
    unavailable_zones: Sequence[str] = ()
    pools: Sequence[Pool] = ()
    core_quotas: Sequence[CoreQuota] = ()

    def __post_init__(self) -> None:
        _freeze(self, "zones")
        _freeze(self, "unavailable_zones")
        _freeze(self, "pools")
        _freeze(self, "core_quotas")
        _check_int(self, "fault_domains_per_zone", 1)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Region:
        return _from_plain(cls, data, "region")


@dataclass(frozen=True, slots=True)
class Instance:
    """One VM of a scale set. A higher ``instance_id`` is a newer instance."""

    instance_id: int
    zone: str | None = None
    fault_domain: int = 0
    vm_size: str = ""
    priority: str = "Regular"
    power_state: str = "running"
    health: str = "Unknown"
    model_version: int | None = None
    protect_from_scale_in: bool = False
    protect_from_scale_set_actions: bool = False
    name: str | None = None
    #: Azure's provisioning state: Creating, Succeeded, Failed, Updating or Deleting.
    provisioning_state: str = "Succeeded"

    def __post_init__(self) -> None:
        _check_int(self, "instance_id")
        _check_int(self, "fault_domain")
        _check_int(self, "model_version")


#: The columns of a scale set's instances (``Controller.instance_columns``, ``Client.instance_columns``):
#: one list per :class:`Instance` field.
INSTANCE_COLUMNS = (
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
    "provisioning_state",
)


@dataclass(frozen=True, slots=True)
class ScaleSet:
    """A stored scale set: its model and its instances (sorted by instance id)."""

    spec: ScaleSetSpec
    instances: tuple[Instance, ...]

    @property
    def capacity(self) -> int:
        return len(self.instances)


class PlannedCreate(NamedTuple):
    """One instance a plan creates, and the rule that chose its zone, fault domain, priority and size."""

    instance_id: int
    zone: str | None
    fault_domain: int
    vm_size: str
    priority: str
    reason: str


class PlannedDelete(NamedTuple):
    """One instance a plan deletes, and the rule that chose it."""

    instance_id: int
    zone: str | None
    fault_domain: int
    vm_size: str
    priority: str
    reason: str


T = TypeVar("T")


class LazyItems(Sequence[T], Generic[T]):
    """A read-only sequence whose items are built on access, so a 100,000-instance plan costs nothing
    until somebody looks at its items."""

    __slots__ = ("_get", "_len")

    def __init__(self, length: int, get: Callable[[int], T]) -> None:
        self._len = length
        self._get = get

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: int | slice) -> T | list[T]:
        if type(index) is int:
            if 0 <= index < self._len:
                return self._get(index)
            if -self._len <= index < 0:
                return self._get(index + self._len)
            raise IndexError(index)
        if isinstance(index, slice):
            return [self._get(i) for i in range(*index.indices(self._len))]
        return self[index.__index__()]

    def __iter__(self) -> Iterator[T]:
        return (self._get(i) for i in range(self._len))

    def __repr__(self) -> str:
        return f"<{self._len} items>"


_COLUMNS = ("instance_id", "zone", "fault_domain", "vm_size", "priority")


class Plan:
    """What a change does: ``creates`` and ``deletes``, each with the rule that chose it (``reason``).

    Read-only. The engine's plans (:class:`scaleset.engine.CorePlan`) build their items on access, so a
    100,000-instance plan costs nothing until it is read; :meth:`create_columns` and
    :meth:`delete_columns` return plain columns.
    """

    __slots__ = (
        "_counts",
        "_creates",
        "_deletes",
        "capacity_after",
        "capacity_before",
        "dry_run",
        "items_omitted",
        "scale_set",
        "unallocated",
        "unallocated_reason",
    )

    scale_set: str
    capacity_before: int
    capacity_after: int
    dry_run: bool
    #: Instances a partial allocation could not place (automatic zone placement), and why.
    unallocated: int
    unallocated_reason: str
    #: A plan read over the API with its items left out (a summary view, or more than one reply
    #: carries): ``creates``/``deletes`` are empty, ``create_count``/``delete_count`` still count them.
    items_omitted: bool
    #: The items; ``None`` in a plan that reads them when first asked (``CorePlan``).
    _creates: Sequence[PlannedCreate] | None
    _deletes: Sequence[PlannedDelete] | None

    def __init__(
        self,
        scale_set: str,
        capacity_before: int,
        capacity_after: int,
        dry_run: bool,
        creates: Sequence[PlannedCreate] = (),
        deletes: Sequence[PlannedDelete] = (),
        *,
        unallocated: int = 0,
        unallocated_reason: str = "",
        counts: tuple[int, int] | None = None,
        items_omitted: bool = False,
    ) -> None:
        self.scale_set, self.capacity_before, self.capacity_after, self.dry_run = (
            scale_set,
            capacity_before,
            capacity_after,
            dry_run,
        )
        self._creates, self._deletes = creates, deletes
        self.unallocated, self.unallocated_reason = unallocated, unallocated_reason
        self._counts, self.items_omitted = counts, items_omitted

    @property
    def create_count(self) -> int:
        """How many instances the plan creates (also when its items were left out)."""
        return self._counts[0] if self._counts is not None else len(self.creates)

    @property
    def delete_count(self) -> int:
        """How many instances the plan deletes (also when its items were left out)."""
        return self._counts[1] if self._counts is not None else len(self.deletes)

    @property
    def creates(self) -> Sequence[PlannedCreate]:
        return self._creates or ()

    @property
    def deletes(self) -> Sequence[PlannedDelete]:
        return self._deletes or ()

    def create_columns(self) -> dict[str, list[Any]]:
        """The creates as columns: instance_id, zone, fault_domain, vm_size, priority."""
        return {c: [getattr(item, c) for item in self.creates] for c in _COLUMNS}

    def delete_columns(self) -> dict[str, list[Any]]:
        """The deletes as columns: instance_id, zone, fault_domain, vm_size, priority."""
        return {c: [getattr(item, c) for item in self.deletes] for c in _COLUMNS}

    def __repr__(self) -> str:
        return (
            f"Plan(scale_set={self.scale_set!r}, capacity_before={self.capacity_before}, "
            f"capacity_after={self.capacity_after}, dry_run={self.dry_run}, "
            f"creates=<{len(self.creates)}>, deletes=<{len(self.deletes)}>)"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return (
            (self.scale_set, self.capacity_before, self.capacity_after, self.dry_run)
            == (
                other.scale_set,
                other.capacity_before,
                other.capacity_after,
                other.dry_run,
            )
            and list(self.creates) == list(other.creates)
            and list(self.deletes) == list(other.deletes)
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Eviction:
    """Result of a Spot eviction: ids deleted (eviction_policy Delete) or deallocated (Deallocate)."""

    deleted: tuple[int, ...]
    deallocated: tuple[int, ...]


# ----- autoscale (Azure Monitor autoscale settings, snake_cased; reference section 9) ------------------


@dataclass(frozen=True, slots=True)
class AutoscaleCapacity:
    """A profile's bounds: autoscale keeps the count within ``minimum``-``maximum``; ``default`` is where it
    scales out to when a metric cannot be read."""

    minimum: int
    maximum: int
    default: int

    def __post_init__(self) -> None:
        for name in ("minimum", "maximum", "default"):
            _check_int(self, name)


@dataclass(frozen=True, slots=True)
class MetricTrigger:
    """What a rule watches. Samples in ``time_window`` are grouped into ``time_grain``s; each grain's
    ``statistic`` is taken over its samples, then ``time_aggregation`` combines the grains; the result
    (divided by the instance count with ``divide_per_instance``) is compared with ``threshold``.

    ``query`` (ours, not Azure's): a PromQL expression read from the server's Prometheus at each evaluation
    instead of pushed samples; its result is recorded as samples of ``metric_name``.
    """

    metric_name: str
    operator: str
    threshold: float
    time_grain: str = "PT1M"
    statistic: str = "Average"
    time_window: str = "PT5M"
    time_aggregation: str = "Average"
    divide_per_instance: bool = False
    query: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.threshold, int) and not isinstance(self.threshold, bool):
            object.__setattr__(self, "threshold", float(self.threshold))


@dataclass(frozen=True, slots=True)
class ScaleAction:
    """What a rule does: ``direction`` Increase or Decrease, by ``type`` ChangeCount, PercentChangeCount,
    ExactCount or ServiceAllowedNextValue with ``value``; then no action for ``cooldown``."""

    direction: str
    type: str = "ChangeCount"
    value: int = 1
    cooldown: str = "PT5M"

    def __post_init__(self) -> None:
        _check_int(self, "value", 1)


@dataclass(frozen=True, slots=True)
class ScaleRule:
    metric_trigger: MetricTrigger
    scale_action: ScaleAction


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """A fixed-date profile's period: local date-times (ISO 8601) in ``time_zone`` (Windows or IANA name)."""

    start: str
    end: str
    time_zone: str = "UTC"


@dataclass(frozen=True, slots=True)
class RecurrentSchedule:
    """When a weekly profile starts: on ``days`` (Monday ... Sunday) at each ``hours``:``minutes`` in
    ``time_zone``; it lasts until the next recurring profile starts."""

    time_zone: str
    days: Sequence[str]
    hours: Sequence[int]
    minutes: Sequence[int]

    def __post_init__(self) -> None:
        for name in ("days", "hours", "minutes"):
            _freeze(self, name)


@dataclass(frozen=True, slots=True)
class Recurrence:
    schedule: RecurrentSchedule
    frequency: str = "Week"


@dataclass(frozen=True, slots=True)
class AutoscaleProfile:
    """Bounds and rules that apply at a time: a fixed date, a weekly recurrence, or neither (the default)."""

    name: str
    capacity: AutoscaleCapacity
    rules: Sequence[ScaleRule] = ()
    fixed_date: TimeWindow | None = None
    recurrence: Recurrence | None = None

    def __post_init__(self) -> None:
        _freeze(self, "rules")


@dataclass(frozen=True, slots=True)
class PredictiveAutoscalePolicy:
    """``scale_mode`` Disabled, ForecastOnly (record what it would do) or Enabled (scale out ahead of
    forecast demand by ``scale_look_ahead_time``, 5 to 60 minutes)."""

    scale_mode: str = "Disabled"
    scale_look_ahead_time: str | None = None


@dataclass(frozen=True, slots=True)
class AutoscaleSetting:
    """A scale set's autoscale setting: up to 20 profiles, of which one applies at a time."""

    profiles: Sequence[AutoscaleProfile]
    enabled: bool = True
    predictive_autoscale_policy: PredictiveAutoscalePolicy | None = None

    def __post_init__(self) -> None:
        _freeze(self, "profiles")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AutoscaleSetting:
        return _from_plain(cls, data, "autoscale_setting")


@dataclass(frozen=True, slots=True)
class AutoscaleDecision:
    """One evaluation of a scale set's autoscale setting, in words.

    ``kind``: Scale (to ``capacity``), NoAction, Skipped (a scale held back by the cooldown, the flapping
    check, a rolling upgrade or a failed scale), PredictiveScaleOut (ahead of forecast demand), Disabled or
    NoProfile. ``forecast`` is the forecast metric when predictive autoscale wanted more instances (with
    ForecastOnly it is recorded, not acted on).
    """

    scale_set: str
    time: float
    kind: str
    capacity_before: int
    capacity: int
    profile: str = ""
    rule: int | None = None
    metric_values: Mapping[str, float | None] = field(default_factory=dict)
    forecast: float | None = None
    explanation: Sequence[str] = ()

    def __post_init__(self) -> None:
        _freeze(self, "explanation")

    @property
    def reason(self) -> str:
        head = f"autoscale ({self.profile or 'no profile'}): {self.kind}"
        if self.rule is not None:
            head += f" by rule {self.rule + 1}"
        return f"{head}, {self.capacity_before} -> {self.capacity}; " + "; ".join(self.explanation)


# ----- plain-data conversion (dicts for the native core, the CLI's YAML/JSON and the gRPC layer) -----


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


_NESTED: dict[str, Callable[[Any, str], Any]] = {}


def _from_plain(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    if not isinstance(data, Mapping):
        raise invalid_input(
            f"{where} must be a mapping of property names to values, got {type(data).__name__}."
        )
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise invalid_input(f"{where}: unknown properties {unknown}; known: {sorted(names)}.")
    kwargs = {}
    for key, value in data.items():
        conv = _NESTED.get(f"{cls.__name__}.{key}")
        kwargs[key] = conv(value, f"{where}.{key}") if conv is not None and value is not None else value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise invalid_input(f"{where}: {e}") from None


def _many(cls: type[T]) -> Callable[[Any, str], tuple[T, ...]]:
    def conv(values: Iterable[Any], where: str) -> tuple[T, ...]:
        # Strings pass through: SkuProfile accepts bare VM size names.
        return tuple(v if isinstance(v, (cls, str)) else _from_plain(cls, v, where) for v in values)  # type: ignore[misc]

    return conv


def _one(cls: type[T]) -> Callable[[Any, str], T]:
    def conv(value: Any, where: str) -> T:
        return value if isinstance(value, cls) else _from_plain(cls, value, where)

    return conv


_NESTED.update(
    {
        "ScaleSetSpec.sku": _one(Sku),
        "ScaleSetSpec.sku_profile": _one(SkuProfile),
        "ScaleSetSpec.priority_mix_policy": _one(PriorityMixPolicy),
        "ScaleSetSpec.scale_in_policy": _one(ScaleInPolicy),
        "ScaleSetSpec.automatic_zone_rebalancing_policy": _one(AutomaticZoneRebalancingPolicy),
        "ScaleSetSpec.upgrade_policy": _one(UpgradePolicy),
        "UpgradePolicy.rolling_upgrade_policy": _one(RollingUpgradePolicy),
        "ScaleSetSpec.automatic_repairs_policy": _one(AutomaticRepairsPolicy),
        "ScaleSetSpec.spot_restore_policy": _one(SpotRestorePolicy),
        "ScaleSetSpec.lifecycle_hooks": _many(LifecycleHook),
        "ScaleSetSpec.placement": _one(Placement),
        "ScaleSetSpec.zone_allocation_policy": _one(ZoneAllocationPolicy),
        "ZoneAllocationPolicy.max_instance_percent_per_zone_policy": _one(MaxInstancePercentPerZonePolicy),
        "SkuProfile.vm_sizes": _many(VmSize),
        "Region.pools": _many(Pool),
        "Region.core_quotas": _many(CoreQuota),
        "AutoscaleSetting.profiles": _many(AutoscaleProfile),
        "AutoscaleSetting.predictive_autoscale_policy": _one(PredictiveAutoscalePolicy),
        "AutoscaleProfile.capacity": _one(AutoscaleCapacity),
        "AutoscaleProfile.rules": _many(ScaleRule),
        "AutoscaleProfile.fixed_date": _one(TimeWindow),
        "AutoscaleProfile.recurrence": _one(Recurrence),
        "Recurrence.schedule": _one(RecurrentSchedule),
        "ScaleRule.metric_trigger": _one(MetricTrigger),
        "ScaleRule.scale_action": _one(ScaleAction),
    }
)


# ----- rebalance plans (the solver is in scaleset.rebalance) -------------------------------------------

#: How much each unit of violation weighs. Zone balance and the priority mix come first (as Azure balances
#: zones before fault domains); a fault-domain fix never costs zone balance, the mix or a size.
WEIGHTS = {"zones": 4, "priority_mix": 4, "vm_sizes": 2, "fault_domains": 1}


def score(violation: dict[str, int]) -> int:
    """The weighted violation the solver minimises."""
    return sum(WEIGHTS[k] * v for k, v in violation.items())


@dataclass(frozen=True, slots=True)
class Wave:
    """Create these, then (once they run) delete those: the running count stays between capacity and
    capacity + max_surge."""

    index: int
    creates: tuple[PlannedCreate, ...]
    deletes: tuple[PlannedDelete, ...]


@dataclass(frozen=True, slots=True)
class RebalanceStage:
    """One stage of a rebalance's solve: an objective minimised with the stages before held at their
    optimum. ``objective``: violation (weighted, :func:`score`), replacements, replacement_order (0 per
    unhealthy instance replaced, 1 per out-of-date one, 2 per other), price (the result's hourly price in
    millionths, at most 2^63 - 1). ``value`` is the best found (-1 if none), ``bound`` the proven lower
    bound."""

    objective: str
    status: str
    value: int
    bound: int
    seconds: float


@dataclass(frozen=True, slots=True)
class RebalancePlan:
    """A rebalance: the replacements, in waves, and the target shape's violation before and after.

    ``creates`` and ``deletes`` are the same planned-change items as a capacity :class:`~scaleset.model.Plan`
    has; a dry run's creates carry the ids they would receive if applied now.
    """

    scale_set: str
    status: str  # OPTIMAL | FEASIBLE (time limit reached before the proof)
    dry_run: bool
    capacity: int
    max_surge: int
    replacements: int
    #: Remaining violation of the target shape, by component (instances out of place), before and after.
    violation_before: dict[str, int]
    violation_after: dict[str, int]
    #: The proven lower bound on the weighted violation (:func:`score`); equal to it when OPTIMAL.
    violation_bound: int
    solve_seconds: float
    zone_counts_before: dict[str | None, int]
    zone_counts_after: dict[str | None, int]
    fault_domain_counts_before: dict[tuple[str | None, int], int] = field(repr=False)
    fault_domain_counts_after: dict[tuple[str | None, int], int] = field(repr=False)
    waves: LazyItems[Wave] = field(repr=False)
    _creates: list[tuple[str | None, int, str, str, str]] = field(repr=False, compare=False)
    _deletes: list[tuple[int, str | None, int, str, str, str]] = field(repr=False, compare=False)
    #: The id the first create receives (the scale set's next instance id when the plan was made).
    first_instance_id: int = 0
    #: Instance ids given to the creates when the plan was applied (wave order); empty for a dry run.
    created_ids: tuple[int, ...] = ()
    #: The solve, stage by stage (see :class:`RebalanceStage`).
    stages: tuple[RebalanceStage, ...] = field(default=(), repr=False)
    #: The time limit the solve had: the one asked for, or the default for the scale set's size
    #: (:func:`scaleset.rebalance.default_time_limit_s`). 0 when unknown (a plan from an older server).
    time_limit_s: float = 0.0

    @property
    def optimal(self) -> bool:
        return self.status == "OPTIMAL"

    @property
    def score_before(self) -> int:
        return score(self.violation_before)

    @property
    def score_after(self) -> int:
        return score(self.violation_after)

    def applied(self, created_ids: list[int]) -> RebalancePlan:
        """This plan as executed: not a dry run, and each create with the id it received."""
        return replace(
            self,
            dry_run=False,
            created_ids=tuple(created_ids),
            waves=rebalance_waves(
                self._creates, self._deletes, self.max_surge, self.first_instance_id, created_ids
            ),
        )

    @property
    def creates(self) -> tuple[PlannedCreate, ...]:
        """Every create, in wave order."""
        ids = self.created_ids or range(self.first_instance_id, self.first_instance_id + len(self._creates))
        return tuple(PlannedCreate(i, *c) for i, c in zip(ids, self._creates, strict=True))

    @property
    def deletes(self) -> tuple[PlannedDelete, ...]:
        """Every delete, in wave order."""
        return tuple(PlannedDelete(*d) for d in self._deletes)

    def moves(self) -> tuple[list[list[Any]], list[int]]:
        """The plan as explicit moves: creates as [zone, fault_domain, vm_size, priority], delete ids.
        (What a rebalance is logged as, so a replay never runs the solver.)"""
        return [list(c[:4]) for c in self._creates], [d[0] for d in self._deletes]


def rebalance_waves(
    creates: list[Any], deletes: list[Any], surge: int, first_id: int, created_ids: list[int] | None = None
) -> LazyItems[Wave]:
    count = math.ceil(max(len(creates), len(deletes)) / surge) if creates or deletes else 0

    def wave(i: int) -> Wave:
        lo, hi = i * surge, (i + 1) * surge
        ids = (
            created_ids[lo:hi]
            if created_ids is not None
            else range(first_id + lo, first_id + lo + len(creates[lo:hi]))
        )
        return Wave(
            index=i,
            creates=tuple(PlannedCreate(id_, *c) for id_, c in zip(ids, creates[lo:hi], strict=True)),
            deletes=tuple(PlannedDelete(*d) for d in deletes[lo:hi]),
        )

    return LazyItems(count, wave)
