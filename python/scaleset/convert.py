"""Protobuf <-> domain conversions, in one place, for the service and the client (the gRPC edge).

Nothing else outside ``service``, ``client`` and this module imports the generated code.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.descriptor import EnumDescriptor

from scaleset.errors import invalid_input
from scaleset.model import (
    AutoscaleDecision,
    AutoscaleSetting,
    CoreQuota,
    Instance,
    Plan,
    PlannedCreate,
    PlannedDelete,
    Pool,
    RebalancePlan,
    RebalanceStage,
    Region,
    ScaleSetSpec,
    rebalance_waves,
)
from scaleset.policies.upgrade import RollingUpgrade
from scaleset.v1 import scaleset_pb2 as pb

T = TypeVar("T")

if TYPE_CHECKING:
    # Types only: the solver and the store load when they are used, not with every client.
    from scaleset.policies.lifecycle import FleetReport, LifecycleAction, Operation, ScheduledEvent
    from scaleset.store import EventRecord

PRIORITY_TO_PB = {"Regular": pb.PRIORITY_REGULAR, "Spot": pb.PRIORITY_SPOT}
PRIORITY_FROM_PB = {v: k for k, v in PRIORITY_TO_PB.items()}
POWER_TO_PB = {"running": pb.POWER_STATE_RUNNING, "deallocated": pb.POWER_STATE_DEALLOCATED}
POWER_FROM_PB = {v: k for k, v in POWER_TO_PB.items()}
HEALTH_TO_PB = {
    "Unknown": pb.HEALTH_UNKNOWN,
    "Initializing": pb.HEALTH_INITIALIZING,
    "Healthy": pb.HEALTH_HEALTHY,
    "Unhealthy": pb.HEALTH_UNHEALTHY,
}
HEALTH_FROM_PB = {v: k for k, v in HEALTH_TO_PB.items()}
PROVISIONING_TO_PB = {
    "Creating": pb.PROVISIONING_STATE_CREATING,
    "Succeeded": pb.PROVISIONING_STATE_SUCCEEDED,
    "Failed": pb.PROVISIONING_STATE_FAILED,
    "Updating": pb.PROVISIONING_STATE_UPDATING,
    "Deleting": pb.PROVISIONING_STATE_DELETING,
}
PROVISIONING_FROM_PB = {v: k for k, v in PROVISIONING_TO_PB.items()} | {
    pb.PROVISIONING_STATE_UNSPECIFIED: "Succeeded"
}


def priority_word(value: int, field: str) -> str:
    """Regular or Spot for a wire Priority (unspecified means Regular)."""
    return _enum(PRIORITY_FROM_PB, value, field, "Regular")


def _enum(table: dict[Any, str], value: int, field: str, default: str | None = None) -> str:
    if value == 0 and default is not None:
        return default
    try:
        return table[value]
    except KeyError:
        raise invalid_input(f"{field} must be set to one of {sorted(table.values())}.") from None


# ----- closed sets of values: Azure's words in Python and Rust, enums on the wire ----------------------

#: Words kept in capitals when an enum value name becomes Azure's spelling (SCALE_IN_RULE_NEWEST_VM -> NewestVM).
_ACRONYMS = frozenset({"VM"})


def _squash(text: str) -> str:
    return text.replace("_", "").lower()


@functools.cache
def _enum_words(enum: EnumDescriptor) -> tuple[dict[str, int], dict[int, str]]:
    """An enum's values by Azure's word (squashed: any case, no underscores) and its words by value."""
    prefix = "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(enum.name)).upper() + "_"
    by_word: dict[str, int] = {}
    words: dict[int, str] = {}
    for value in enum.values:
        if value.number == 0:
            continue
        parts = value.name.removeprefix(prefix).split("_")
        word = "".join(p if p in _ACRONYMS else p.capitalize() for p in parts)
        by_word[_squash(word)] = value.number
        words[value.number] = word
    return by_word, words


def enum_number(enum: EnumDescriptor, word: str, field: str) -> int:
    """The wire value of one of Azure's words ("NewestVM" -> SCALE_IN_RULE_NEWEST_VM), in any case."""
    by_word, words = _enum_words(enum)
    number = by_word.get(_squash(word)) if isinstance(word, str) else None
    if number is None:
        raise invalid_input(
            f"{field} '{str(word)[:64]}' is not valid; use one of: {', '.join(words.values())}.", field=field
        )
    return number


def enum_word(enum: EnumDescriptor, number: int, field: str) -> str:
    """Azure's word for a wire value; an unknown value is INVALID_ARGUMENT naming the field."""
    word = _enum_words(enum)[1].get(number)
    if word is None:
        raise invalid_input(
            f"{field} {number} is not a {enum.name} value; use one of: {', '.join(_enum_words(enum)[1].values())}.",
            field=field,
        )
    return word


# ----- spec -------------------------------------------------------------------------------------------


def spec_to_proto(spec: ScaleSetSpec) -> pb.ScaleSetSpec:
    """The spec as its message; derived field by field from the dataclasses (same names), so a new field
    needs no code here."""
    msg = pb.ScaleSetSpec()
    _to_message(spec, msg)
    return msg


def spec_from_proto(msg: pb.ScaleSetSpec) -> ScaleSetSpec:
    """The spec a message describes; unset fields take the dataclasses' defaults (Azure's)."""
    return _from_message(ScaleSetSpec, msg)


def _to_message(obj: Any, msg: Any) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        fd = msg.DESCRIPTOR.fields_by_name[f.name]
        target = getattr(msg, f.name)
        if fd.message_type is not None and fd.is_repeated:
            for item in value:
                _to_message(item, target.add())
        elif fd.message_type is not None:
            target.SetInParent()
            _to_message(value, target)
        elif fd.enum_type is not None and fd.is_repeated:
            target.extend(enum_number(fd.enum_type, v, f.name) for v in value)
        elif fd.enum_type is not None:
            setattr(msg, f.name, enum_number(fd.enum_type, value, f.name))
        elif fd.is_repeated:
            target.extend(value)
        else:
            setattr(msg, f.name, value)


def _from_message(cls: type[T], msg: Any, path: str = "") -> T:
    """The dataclass ``cls`` a message describes; ``path`` is where the message is in the request (for the
    field of an error)."""
    hints = _hints(cls)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        fd = msg.DESCRIPTOR.fields_by_name[f.name]
        value = getattr(msg, f.name)
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if fd.message_type is not None and fd.is_repeated:
            kwargs[f.name] = [
                _from_message(hints[f.name], v, f"{path}{f.name}[{i}].") for i, v in enumerate(value)
            ]
        elif fd.message_type is not None and msg.HasField(f.name):
            kwargs[f.name] = _from_message(hints[f.name], value, f"{path}{f.name}.")
        elif fd.message_type is not None:
            if default is dataclasses.MISSING:
                raise invalid_input(f"{path}{f.name} is required.", field=f"{path}{f.name}")
            kwargs[f.name] = default
        elif fd.enum_type is not None and fd.is_repeated:
            words = [enum_word(fd.enum_type, v, f.name) for v in value]
            kwargs[f.name] = words if words or default is dataclasses.MISSING else default
        elif fd.enum_type is not None:
            unset = not msg.HasField(f.name) if fd.has_presence else value == 0
            if unset and default is not dataclasses.MISSING:
                kwargs[f.name] = default  # unspecified: the dataclass's (Azure's) default
            else:
                kwargs[f.name] = enum_word(fd.enum_type, value, f.name)
        elif fd.is_repeated:
            kwargs[f.name] = list(value) if value or default is dataclasses.MISSING else default
        elif fd.has_presence:
            kwargs[f.name] = value if msg.HasField(f.name) else default
        elif isinstance(value, str) and default is not dataclasses.MISSING:
            kwargs[f.name] = value or default  # proto3: an empty string is an unset one
        else:
            kwargs[f.name] = value
    return cls(**kwargs)


@functools.cache
def _hints(cls: type) -> dict[str, type]:
    """The dataclass each message-typed field holds (``X | None`` and ``Sequence[X]`` unwrapped)."""
    out: dict[str, type] = {}
    for name, hint in typing.get_type_hints(cls).items():
        for arg in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(arg):
                out[name] = arg  # type: ignore[assignment]
    return out


# ----- autoscale -------------------------------------------------------------------------------------


def autoscale_setting_to_proto(setting: AutoscaleSetting) -> pb.AutoscaleSetting:
    msg = pb.AutoscaleSetting()
    _to_message(setting, msg)
    return msg


def autoscale_setting_from_proto(msg: pb.AutoscaleSetting) -> AutoscaleSetting:
    return _from_message(AutoscaleSetting, msg)


def decision_to_proto(d: AutoscaleDecision) -> pb.AutoscaleDecision:
    msg = pb.AutoscaleDecision(
        scale_set=d.scale_set,
        time_unix_ms=round(d.time * 1000),
        kind=typing.cast(
            "pb.AutoscaleDecisionKind", enum_number(pb.AutoscaleDecisionKind.DESCRIPTOR, d.kind, "kind")
        ),
        capacity_before=d.capacity_before,
        capacity=d.capacity,
        profile=d.profile,
        explanation=list(d.explanation),
    )
    if d.rule is not None:
        msg.rule = d.rule
    if d.forecast is not None:
        msg.forecast = d.forecast
    for rule, value in d.metric_values.items():
        entry = msg.metric_values.add(rule=rule)
        if value is not None:
            entry.value = value
    return msg


def decision_from_proto(msg: pb.AutoscaleDecision) -> AutoscaleDecision:
    return AutoscaleDecision(
        scale_set=msg.scale_set,
        time=msg.time_unix_ms / 1000,
        kind=enum_word(pb.AutoscaleDecisionKind.DESCRIPTOR, msg.kind, "kind"),
        capacity_before=msg.capacity_before,
        capacity=msg.capacity,
        profile=msg.profile,
        rule=msg.rule if msg.HasField("rule") else None,
        metric_values={m.rule: m.value if m.HasField("value") else None for m in msg.metric_values},
        forecast=msg.forecast if msg.HasField("forecast") else None,
        explanation=tuple(msg.explanation),
    )


# ----- plans ------------------------------------------------------------------------------------------


#: The most creates and deletes one reply carries (about 200 bytes each with their reasons, so well under the
#: 64 MB reply limit); a bigger plan is sent as its counts, with ``items_omitted``, rather than failing
#: after it was applied.
MAX_PLAN_ITEMS = 200_000


def plan_to_proto(plan: Plan, summary_only: bool = False) -> pb.Plan:
    msg = pb.Plan(
        scale_set=plan.scale_set,
        capacity_before=plan.capacity_before,
        capacity_after=plan.capacity_after,
        dry_run=plan.dry_run,
        create_count=len(plan.creates),
        delete_count=len(plan.deletes),
        unallocated=plan.unallocated,
        unallocated_reason=plan.unallocated_reason,
    )
    if summary_only or msg.create_count + msg.delete_count > MAX_PLAN_ITEMS:
        msg.items_omitted = msg.create_count + msg.delete_count > 0
        return msg
    msg.creates.extend(map(_planned_change, plan.creates))
    msg.deletes.extend(map(_planned_change, plan.deletes))
    return msg


def _planned_change(item: PlannedCreate | PlannedDelete) -> pb.PlannedChange:
    """One planned create or delete (of a capacity plan or a rebalance wave) as its message."""
    return pb.PlannedChange(
        instance_id=item.instance_id,
        zone=item.zone or "",
        fault_domain=item.fault_domain,
        vm_size=item.vm_size,
        priority=PRIORITY_TO_PB[item.priority],
        reason=item.reason,
    )


def plan_from_proto(msg: pb.Plan) -> Plan:
    def item(cls: Any, c: pb.PlannedChange) -> Any:
        priority = PRIORITY_FROM_PB[c.priority]
        return cls(c.instance_id, c.zone or None, c.fault_domain, c.vm_size, priority, c.reason)

    return Plan(
        msg.scale_set,
        msg.capacity_before,
        msg.capacity_after,
        msg.dry_run,
        creates=[item(PlannedCreate, c) for c in msg.creates],
        deletes=[item(PlannedDelete, d) for d in msg.deletes],
        unallocated=msg.unallocated,
        unallocated_reason=msg.unallocated_reason,
        counts=(msg.create_count, msg.delete_count),
        items_omitted=msg.items_omitted,
    )


def event_plan_to_proto(scale_set: str, summary: dict[str, Any]) -> pb.Plan:
    """The compact plan stored with a watch event (items without reasons, or counts only)."""
    msg = pb.Plan(
        scale_set=scale_set,
        capacity_before=summary["capacity_before"],
        capacity_after=summary["capacity_after"],
        create_count=summary["create_count"],
        delete_count=summary["delete_count"],
    )
    for target, rows in (
        (msg.creates, summary.get("creates", [])),
        (msg.deletes, summary.get("deletes", [])),
    ):
        for instance_id, zone, fault_domain, vm_size, priority in rows:
            target.add(
                instance_id=instance_id,
                zone=zone or "",
                fault_domain=fault_domain,
                vm_size=vm_size,
                priority=PRIORITY_TO_PB[priority],
            )
    return msg


def event_to_proto(event: EventRecord) -> pb.Event:
    summary = event.summary  # decoded from its JSON: once
    msg = pb.Event(
        sequence=event.sequence,
        scale_set=event.scale_set,
        revision=event.revision,
        type=event.type,
        summary=summary.get("text", ""),
        time_unix_ms=event.time_ms,
    )
    if "plan" in summary:
        msg.plan.CopyFrom(event_plan_to_proto(event.scale_set, summary["plan"]))
    return msg


def rebalance_plan_to_proto(plan: RebalancePlan) -> pb.RebalancePlan:
    msg = pb.RebalancePlan(
        scale_set=plan.scale_set,
        status=plan.status,
        dry_run=plan.dry_run,
        capacity=plan.capacity,
        max_surge=plan.max_surge,
        replacements=plan.replacements,
        score_after=plan.score_after,
        score_bound=plan.violation_bound,
        solve_seconds=plan.solve_seconds,
        time_limit_s=plan.time_limit_s,
    )
    msg.violation_before.update(plan.violation_before)
    msg.violation_after.update(plan.violation_after)
    for zone, before in plan.zone_counts_before.items():
        msg.counts.add(
            zone=zone or "", fault_domain=-1, before=before, after=plan.zone_counts_after.get(zone, 0)
        )
    keys = sorted(
        set(plan.fault_domain_counts_before) | set(plan.fault_domain_counts_after),
        key=lambda k: (str(k[0]), k[1]),
    )
    for zone, fd in keys:
        msg.counts.add(
            zone=zone or "",
            fault_domain=fd,
            before=plan.fault_domain_counts_before.get((zone, fd), 0),
            after=plan.fault_domain_counts_after.get((zone, fd), 0),
        )
    for wave in plan.waves:
        w = msg.waves.add(index=wave.index)
        w.creates.extend(map(_planned_change, wave.creates))
        w.deletes.extend(map(_planned_change, wave.deletes))
    for stage in plan.stages:
        msg.stages.add(
            objective=stage.objective,
            status=stage.status,
            value=stage.value,
            bound=stage.bound,
            seconds=stage.seconds,
        )
    return msg


def rebalance_plan_from_proto(msg: pb.RebalancePlan) -> RebalancePlan:
    """The plan as ``Controller.rebalance`` returns it: waves, creates, deletes, counts and violations."""

    def change(c: pb.PlannedChange) -> tuple[Any, ...]:
        return (c.zone or None, c.fault_domain, c.vm_size, PRIORITY_FROM_PB[c.priority], c.reason)

    creates = [w_c for w in msg.waves for w_c in w.creates]
    deletes = [w_d for w in msg.waves for w_d in w.deletes]
    raw_creates = [change(c) for c in creates]
    raw_deletes = [(d.instance_id, *change(d)) for d in deletes]
    first_id = creates[0].instance_id if creates else 0
    created_ids = [] if msg.dry_run else [c.instance_id for c in creates]
    zones = {c.zone or None: c for c in msg.counts if c.fault_domain < 0}
    fds = {(c.zone or None, c.fault_domain): c for c in msg.counts if c.fault_domain >= 0}
    return RebalancePlan(
        scale_set=msg.scale_set,
        status=msg.status,
        dry_run=msg.dry_run,
        capacity=msg.capacity,
        max_surge=msg.max_surge,
        replacements=msg.replacements,
        violation_before=dict(msg.violation_before),
        violation_after=dict(msg.violation_after),
        violation_bound=msg.score_bound,
        solve_seconds=msg.solve_seconds,
        zone_counts_before={z: c.before for z, c in zones.items()},
        zone_counts_after={z: c.after for z, c in zones.items()},
        # The wire lists every (zone, fault domain) of either side; the plan counts only occupied ones.
        fault_domain_counts_before={k: c.before for k, c in fds.items() if c.before},
        fault_domain_counts_after={k: c.after for k, c in fds.items() if c.after},
        waves=rebalance_waves(raw_creates, raw_deletes, msg.max_surge, first_id, created_ids or None),
        _creates=raw_creates,
        _deletes=raw_deletes,
        first_instance_id=first_id,
        created_ids=tuple(created_ids),
        stages=tuple(RebalanceStage(s.objective, s.status, s.value, s.bound, s.seconds) for s in msg.stages),
        time_limit_s=msg.time_limit_s,
    )


def rolling_upgrade_to_proto(
    name: str, upgrade: RollingUpgrade | None, revision: int
) -> pb.RollingUpgradeStatus:
    if upgrade is None:
        return pb.RollingUpgradeStatus(
            scale_set=name, status=pb.ROLLING_UPGRADE_STATE_NOT_STARTED, revision=revision
        )
    progress = upgrade.progress()
    return pb.RollingUpgradeStatus(
        scale_set=name,
        status=typing.cast(
            "pb.RollingUpgradeState", enum_number(pb.RollingUpgradeState.DESCRIPTOR, upgrade.status, "status")
        ),
        model_version=upgrade.model_version,
        batches_total=len(upgrade.batches),
        batches_done=min(upgrade.next_batch, len(upgrade.batches)),
        error_code=upgrade.error_code,
        error_message=upgrade.error_message,
        started_unix_ms=round(upgrade.started_at * 1000),
        finished_unix_ms=round((upgrade.finished_at or 0) * 1000),
        current_batch=upgrade.in_batch,
        next_batch_unix_ms=round((upgrade.pause_until or 0) * 1000)
        if upgrade.active and not upgrade.in_batch
        else 0,
        revision=revision,
        batches=[pb.RollingUpgradeBatch(instance_ids=b) for b in upgrade.batches],
        next_batch=upgrade.next_batch,
        upgraded=upgrade.upgraded,
        failed=upgrade.failed,
        surge_old=upgrade.surge_old,
        previous_versions=upgrade.previous_versions,
        batch_started_unix_ms=round((upgrade.batch_started_at or 0) * 1000),
        **progress,
    )


def rolling_upgrade_from_proto(msg: pb.RollingUpgradeStatus) -> RollingUpgrade | None:
    """The upgrade as ``Controller.get_rolling_upgrade`` returns it; None when none has run."""
    status = enum_word(pb.RollingUpgradeState.DESCRIPTOR, msg.status, "status")
    if status == "NotStarted":
        return None
    return RollingUpgrade(
        scale_set=msg.scale_set,
        model_version=msg.model_version,
        status=status,
        started_at=msg.started_unix_ms / 1000,
        batches=[list(b.instance_ids) for b in msg.batches],
        next_batch=msg.next_batch,
        in_batch=list(msg.current_batch),
        surge_old=list(msg.surge_old),
        batch_started_at=msg.batch_started_unix_ms / 1000 if msg.batch_started_unix_ms else None,
        pause_until=msg.next_batch_unix_ms / 1000 if msg.next_batch_unix_ms else None,
        upgraded=list(msg.upgraded),
        previous_versions=dict(msg.previous_versions),
        failed=list(msg.failed),
        error_code=msg.error_code,
        error_message=msg.error_message,
        finished_at=msg.finished_unix_ms / 1000 if msg.finished_unix_ms else None,
    )


# ----- instances --------------------------------------------------------------------------------------


def instance_from_proto(msg: pb.Instance) -> Instance:
    return Instance(
        instance_id=msg.instance_id,
        zone=msg.zone or None,
        fault_domain=msg.fault_domain,
        vm_size=msg.vm_size,
        priority=_enum(PRIORITY_FROM_PB, msg.priority, "priority", "Regular"),
        power_state=_enum(POWER_FROM_PB, msg.power_state, "power_state", "running"),
        health=_enum(HEALTH_FROM_PB, msg.health, "health", "Unknown"),
        model_version=msg.model_version or None,
        protect_from_scale_in=msg.protect_from_scale_in,
        protect_from_scale_set_actions=msg.protect_from_scale_set_actions,
        name=msg.name or None,
        provisioning_state=_enum(
            PROVISIONING_FROM_PB, msg.provisioning_state, "provisioning_state", "Succeeded"
        ),
    )


def columns_to_proto(cols: dict[str, list[Any]], start: int, stop: int) -> pb.InstanceColumns:
    """Rows ``start:stop`` of the engine's instance columns, dictionary-encoded."""
    msg = pb.InstanceColumns()
    zone_names = [""]
    zone_index: dict[str | None, int] = {None: 0}
    size_names: list[str] = []
    size_index: dict[str, int] = {}

    def zone_id(z: str | None) -> int:
        if z not in zone_index:
            zone_index[z] = len(zone_names)
            zone_names.append(z or "")
        return zone_index[z]

    def size_id(s: str) -> int:
        if s not in size_index:
            size_index[s] = len(size_names)
            size_names.append(s)
        return size_index[s]

    window = slice(start, stop)
    msg.instance_id.extend(cols["instance_id"][window])
    msg.zone.extend(zone_id(z) for z in cols["zone"][window])
    msg.fault_domain.extend(cols["fault_domain"][window])
    msg.vm_size.extend(size_id(s) for s in cols["vm_size"][window])
    msg.priority.extend(PRIORITY_TO_PB[p] for p in cols["priority"][window])
    msg.power_state.extend(POWER_TO_PB[p] for p in cols["power_state"][window])
    msg.health.extend(HEALTH_TO_PB[h] for h in cols["health"][window])
    msg.model_version.extend(cols["model_version"][window])
    msg.protect_from_scale_in.extend(cols["protect_from_scale_in"][window])
    msg.protect_from_scale_set_actions.extend(cols["protect_from_scale_set_actions"][window])
    msg.provisioning_state.extend(PROVISIONING_TO_PB[p] for p in cols["provisioning_state"][window])
    msg.zone_names.extend(zone_names)
    msg.vm_size_names.extend(size_names)
    for instance_id, name in zip(cols["instance_id"][window], cols["name"][window], strict=False):
        if name is not None:
            msg.custom_names[instance_id] = name
    return msg


class Column(Sequence[Any]):
    """One column of a listing, read-only, decoded on access from the reply's packed column (through a
    dictionary for zones, sizes and enums): no Python object per row until the row is read. Compares
    equal to a list with the same items."""

    __slots__ = ("_codes", "_table")

    def __init__(self, codes: Sequence[Any], table: Sequence[Any] | Mapping[Any, Any] | None = None) -> None:
        self._codes = codes
        self._table = table

    def __len__(self) -> int:
        return len(self._codes)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(self)[index]
        code = self._codes[index]
        return code if self._table is None else self._table[code]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._codes) if self._table is None else map(self._table.__getitem__, self._codes)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Sequence)
            and len(other) == len(self)
            and all(a == b for a, b in zip(self, other, strict=True))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))


def _provisioning_states(msg: pb.InstanceColumns) -> Sequence[int]:
    """The provisioning-state column; a server older than the column sends none (every one Succeeded)."""
    return msg.provisioning_state or [pb.PROVISIONING_STATE_SUCCEEDED] * len(msg.instance_id)


def listing_columns(msg: pb.InstanceColumns, scale_set: str) -> dict[str, Sequence[Any]]:
    """A listing page as the engine's columns (``name`` None for default names), each a :class:`Column`
    over the reply's packed column: no object per row."""
    ids = msg.instance_id
    custom = dict(msg.custom_names)
    return {
        "instance_id": Column(ids),
        "name": Column([custom.get(i) for i in ids]) if custom else Column([None] * len(ids)),
        "zone": Column(msg.zone, [z or None for z in msg.zone_names]),
        "fault_domain": Column(msg.fault_domain),
        "vm_size": Column(msg.vm_size, list(msg.vm_size_names)),
        "priority": Column(msg.priority, PRIORITY_FROM_PB),
        "power_state": Column(msg.power_state, POWER_FROM_PB),
        "health": Column(msg.health, HEALTH_FROM_PB),
        "model_version": Column(msg.model_version),
        "protect_from_scale_in": Column(msg.protect_from_scale_in),
        "protect_from_scale_set_actions": Column(msg.protect_from_scale_set_actions),
        "provisioning_state": Column(_provisioning_states(msg), PROVISIONING_FROM_PB),
    }


def instance_to_proto(i: Instance) -> pb.Instance:
    return pb.Instance(
        instance_id=i.instance_id,
        name=i.name or "",
        zone=i.zone or "",
        fault_domain=i.fault_domain,
        vm_size=i.vm_size,
        priority=PRIORITY_TO_PB[i.priority],
        power_state=POWER_TO_PB[i.power_state],
        health=HEALTH_TO_PB[i.health],
        model_version=i.model_version or 0,
        protect_from_scale_in=i.protect_from_scale_in,
        protect_from_scale_set_actions=i.protect_from_scale_set_actions,
        provisioning_state=PROVISIONING_TO_PB[i.provisioning_state],
    )


def columns_from_proto(msg: pb.InstanceColumns, scale_set: str) -> list[Instance]:
    return [
        Instance(
            instance_id=instance_id,
            zone=msg.zone_names[zone] or None,
            fault_domain=fd,
            vm_size=msg.vm_size_names[size],
            priority=PRIORITY_FROM_PB[priority],
            power_state=POWER_FROM_PB[power],
            health=HEALTH_FROM_PB[health],
            model_version=version,
            protect_from_scale_in=p_in,
            protect_from_scale_set_actions=p_actions,
            name=msg.custom_names.get(instance_id, f"{scale_set}_{instance_id}"),
            provisioning_state=PROVISIONING_FROM_PB[state],
        )
        for instance_id, zone, fd, size, priority, power, health, version, p_in, p_actions, state in zip(
            msg.instance_id,
            msg.zone,
            msg.fault_domain,
            msg.vm_size,
            msg.priority,
            msg.power_state,
            msg.health,
            msg.model_version,
            msg.protect_from_scale_in,
            msg.protect_from_scale_set_actions,
            _provisioning_states(msg),
            strict=False,
        )
    ]


# ----- region -----------------------------------------------------------------------------------------


def region_to_proto(region: Region, revision: int) -> pb.Region:
    msg = pb.Region(fault_domains_per_zone=region.fault_domains_per_zone, revision=revision)
    for zone in region.zones:
        msg.zones.add(name=zone, available=zone not in region.unavailable_zones)
    for pool in region.pools:
        entry = msg.pools.add(
            zone=pool.zone or "",
            vm_size=pool.vm_size,
            priority=PRIORITY_TO_PB[pool.priority],
            price=pool.price,
        )
        if pool.available is not None:
            entry.available = pool.available
        if pool.restricted:
            entry.restricted = True
    for quota in region.core_quotas:
        msg.core_quotas.add(family=quota.family, cores=quota.cores)
    return msg


def region_from_proto(msg: pb.Region) -> Region:
    return Region(
        zones=[z.name for z in msg.zones],
        fault_domains_per_zone=msg.fault_domains_per_zone,
        unavailable_zones=[z.name for z in msg.zones if not z.available],
        pools=[pool_from_proto(p) for p in msg.pools],
        core_quotas=[CoreQuota(q.family, q.cores) for q in msg.core_quotas],
    )


def pool_from_proto(msg: pb.Pool) -> Pool:
    return Pool(
        zone=msg.zone or None,
        vm_size=msg.vm_size,
        priority=priority_word(msg.priority, "pool.priority"),
        available=msg.available if msg.HasField("available") else None,
        price=msg.price if msg.HasField("price") else 0.0,
        restricted=msg.restricted,
    )


# ----- executors --------------------------------------------------------------------------------------


def operation_to_proto(op: Operation) -> pb.Operation:
    return pb.Operation(
        operation_id=op.operation_id,
        kind=typing.cast("pb.OperationKind", enum_number(pb.OperationKind.DESCRIPTOR, op.kind, "kind")),
        scale_set=op.scale_set,
        instance_id=op.instance_id,
        instance_name=f"{op.scale_set}_{op.instance_id}",
        zone=op.zone or "",
        fault_domain=op.fault_domain,
        vm_size=op.vm_size,
        priority=PRIORITY_TO_PB[op.priority],
        model_version=op.model_version,
        attempt=op.attempt,
        held=op.held,
    )


def operation_from_proto(msg: pb.Operation) -> Operation:
    from scaleset.policies.lifecycle import Operation

    return Operation(
        operation_id=msg.operation_id,
        kind=enum_word(pb.OperationKind.DESCRIPTOR, msg.kind, "kind"),
        scale_set=msg.scale_set,
        instance_id=msg.instance_id,
        zone=msg.zone or None,
        fault_domain=msg.fault_domain,
        vm_size=msg.vm_size,
        priority=priority_word(msg.priority, "priority"),
        model_version=msg.model_version,
        created_at=0.0,
        attempt=msg.attempt,
        held=msg.held,
    )


def scheduled_event_to_proto(e: ScheduledEvent) -> pb.ScheduledEvent:
    return pb.ScheduledEvent(
        event_id=e.event_id,
        event_type=e.event_type,
        scale_set=e.scale_set,
        instance_ids=e.instance_ids,
        not_before_unix_ms=round(e.not_before * 1000),
        description=e.description,
    )


def scheduled_event_from_proto(msg: pb.ScheduledEvent) -> ScheduledEvent:
    from scaleset.policies.lifecycle import ScheduledEvent

    return ScheduledEvent(
        event_id=msg.event_id,
        scale_set=msg.scale_set,
        instance_ids=tuple(msg.instance_ids),
        not_before=msg.not_before_unix_ms / 1000,
        description=msg.description,
        event_type=msg.event_type,
    )


def fleet_report_to_proto(report: FleetReport) -> pb.FleetStatus:
    msg = pb.FleetStatus(
        scale_set=report.scale_set,
        execution_mode=report.execution_mode,
        desired_capacity=report.desired_capacity,
        provisioning_states=report.provisioning_states,
        shortfall=report.shortfall,
        consecutive_failures=report.consecutive_failures,
        retry_at_unix_ms=round(report.retry_at * 1000) if report.retry_at is not None else 0,
        last_error_code=report.last_error_code,
        last_error_message=report.last_error_message,
        pending_operation_count=report.pending_operation_count,
        pending_operations=[operation_to_proto(o) for o in report.pending_operations],
        revision=report.revision,
        addresses={i: a for i, (a, _) in report.addresses.items()},
        provider_ids={i: p for i, (_, p) in report.addresses.items()},
        scheduled_events=[scheduled_event_to_proto(e) for e in report.scheduled_events],
    )
    for w in report.lifecycle_actions:
        msg.lifecycle_actions.add(
            instance_id=w.instance_id,
            hook=w.hook,
            transition=typing.cast(
                "pb.LifecycleTransition",
                enum_number(pb.LifecycleTransition.DESCRIPTOR, w.transition, "transition"),
            ),
            deadline_unix_ms=round(w.deadline * 1000),
            default_result=typing.cast(
                "pb.LifecycleHookDefaultResult",
                enum_number(pb.LifecycleHookDefaultResult.DESCRIPTOR, w.default_result, "default_result"),
            ),
        )
    if report.restoring is not None:
        msg.restoring_count, msg.restore_deadline_unix_ms = (
            report.restoring[0],
            round(report.restoring[1] * 1000),
        )
    for zone, size, priority, until in report.unavailable_pools:
        msg.unavailable_pools.add(
            zone=zone or "",
            vm_size=size,
            priority=PRIORITY_TO_PB[priority],
            until_unix_ms=round(until * 1000),
        )
    return msg


def _lifecycle_action_from_proto(scale_set: str, msg: pb.LifecycleAction) -> LifecycleAction:
    from scaleset.policies.lifecycle import LifecycleAction

    return LifecycleAction(
        scale_set=scale_set,
        instance_id=msg.instance_id,
        hook=msg.hook,
        transition=enum_word(pb.LifecycleTransition.DESCRIPTOR, msg.transition, "transition"),
        deadline=msg.deadline_unix_ms / 1000,
        heartbeat_s=0.0,
        default_result=enum_word(
            pb.LifecycleHookDefaultResult.DESCRIPTOR, msg.default_result, "default_result"
        ),
    )


def fleet_report_from_proto(msg: pb.FleetStatus) -> FleetReport:
    from scaleset.policies.lifecycle import FleetReport

    return FleetReport(
        scale_set=msg.scale_set,
        execution_mode=msg.execution_mode,
        desired_capacity=msg.desired_capacity,
        provisioning_states=dict(sorted(msg.provisioning_states.items())),
        shortfall=msg.shortfall,
        consecutive_failures=msg.consecutive_failures,
        retry_at=msg.retry_at_unix_ms / 1000 if msg.retry_at_unix_ms else None,
        last_error_code=msg.last_error_code,
        last_error_message=msg.last_error_message,
        pending_operation_count=msg.pending_operation_count,
        pending_operations=tuple(operation_from_proto(o) for o in msg.pending_operations),
        unavailable_pools=tuple(
            (p.zone or None, p.vm_size, priority_word(p.priority, "priority"), p.until_unix_ms / 1000)
            for p in msg.unavailable_pools
        ),
        addresses={i: (a, msg.provider_ids.get(i, "")) for i, a in sorted(msg.addresses.items())},
        scheduled_events=tuple(scheduled_event_from_proto(e) for e in msg.scheduled_events),
        restoring=(msg.restoring_count, msg.restore_deadline_unix_ms / 1000) if msg.restoring_count else None,
        lifecycle_actions=tuple(
            _lifecycle_action_from_proto(msg.scale_set, w) for w in msg.lifecycle_actions
        ),
        revision=msg.revision,
    )
