"""Protobuf <-> domain conversions, in one place, for the service and the client (the gRPC edge).

Nothing else outside ``service``, ``client`` and this module imports the generated code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scaleset.model import (
    AutomaticRepairsPolicy,
    AutomaticZoneRebalancingPolicy,
    Instance,
    Plan,
    PlannedCreate,
    PlannedDelete,
    Pool,
    PriorityMixPolicy,
    Region,
    RollingUpgradePolicy,
    ScaleInPolicy,
    ScaleSetSpec,
    Sku,
    SkuProfile,
    UpgradePolicy,
    VmSize,
)
from scaleset.policies.upgrade import RollingUpgrade
from scaleset.v1 import scaleset_pb2 as pb

if TYPE_CHECKING:
    # Types only: the solver and the store load when they are used, not with every client.
    from scaleset.rebalance import RebalancePlan
    from scaleset.store import EventRecord

PRIORITY_TO_PB = {"Regular": pb.REGULAR, "Spot": pb.SPOT}
PRIORITY_FROM_PB = {v: k for k, v in PRIORITY_TO_PB.items()}
POWER_TO_PB = {"running": pb.RUNNING, "deallocated": pb.DEALLOCATED}
POWER_FROM_PB = {v: k for k, v in POWER_TO_PB.items()}
HEALTH_TO_PB = {"Unknown": pb.UNKNOWN, "Initializing": pb.INITIALIZING, "Healthy": pb.HEALTHY, "Unhealthy": pb.UNHEALTHY}
HEALTH_FROM_PB = {v: k for k, v in HEALTH_TO_PB.items()}


def _enum(table: dict[Any, str], value: int, field: str, default: str | None = None) -> str:
    if value == 0 and default is not None:
        return default
    try:
        return table[value]
    except KeyError:
        from scaleset.errors import invalid_input

        raise invalid_input(f"{field} must be set to one of {sorted(table.values())}.") from None


# ----- spec -------------------------------------------------------------------------------------------


def spec_to_proto(spec: ScaleSetSpec) -> pb.ScaleSetSpec:
    msg = pb.ScaleSetSpec(
        name=spec.name,
        orchestration_mode=spec.orchestration_mode,
        zones=list(spec.zones),
        zone_balance=spec.zone_balance,
        priority=spec.priority,
        image_kind=spec.image_kind,
        model_version=spec.model_version,
        scale_in_policy=pb.ScaleInPolicy(
            rules=list(spec.scale_in_policy.rules),
            force_deletion=spec.scale_in_policy.force_deletion,
            prioritize_unhealthy_vms=spec.scale_in_policy.prioritize_unhealthy_vms,
        ),
    )
    if spec.platform_fault_domain_count is not None:
        msg.platform_fault_domain_count = spec.platform_fault_domain_count
    if spec.sku is not None:
        msg.sku.name = spec.sku.name
        if spec.sku.tier is not None:
            msg.sku.tier = spec.sku.tier
    if spec.sku_profile is not None:
        msg.sku_profile.allocation_strategy = spec.sku_profile.allocation_strategy
        for size in spec.sku_profile.vm_sizes:
            entry = msg.sku_profile.vm_sizes.add(name=size.name)
            if size.rank is not None:
                entry.rank = size.rank
    if spec.eviction_policy is not None:
        msg.eviction_policy = spec.eviction_policy
    if spec.max_price is not None:
        msg.max_price = spec.max_price
    if spec.priority_mix_policy is not None:
        msg.priority_mix_policy.base_regular_priority_count = spec.priority_mix_policy.base_regular_priority_count
        msg.priority_mix_policy.regular_priority_percentage_above_base = (
            spec.priority_mix_policy.regular_priority_percentage_above_base
        )
    if spec.single_placement_group is not None:
        msg.single_placement_group = spec.single_placement_group
    up, rolling = spec.upgrade_policy, spec.upgrade_policy.rolling_upgrade_policy
    msg.upgrade_policy.mode = up.mode
    r = msg.upgrade_policy.rolling_upgrade_policy
    r.max_batch_instance_percent = rolling.max_batch_instance_percent
    r.max_unhealthy_instance_percent = rolling.max_unhealthy_instance_percent
    r.max_unhealthy_upgraded_instance_percent = rolling.max_unhealthy_upgraded_instance_percent
    r.pause_time_between_batches = rolling.pause_time_between_batches
    r.prioritize_unhealthy_instances = rolling.prioritize_unhealthy_instances
    r.enable_cross_zone_upgrade = rolling.enable_cross_zone_upgrade
    r.max_surge = rolling.max_surge
    r.rollback_failed_instances_on_policy_breach = rolling.rollback_failed_instances_on_policy_breach
    if (repairs := spec.automatic_repairs_policy) is not None:
        msg.automatic_repairs_policy.enabled = repairs.enabled
        msg.automatic_repairs_policy.grace_period = repairs.grace_period
        msg.automatic_repairs_policy.repair_action = repairs.repair_action
    if (azb := spec.automatic_zone_rebalancing_policy) is not None:
        msg.automatic_zone_rebalancing_policy.enabled = azb.enabled
        msg.automatic_zone_rebalancing_policy.rebalance_strategy = azb.rebalance_strategy
        msg.automatic_zone_rebalancing_policy.rebalance_behavior = azb.rebalance_behavior
    return msg


def spec_from_proto(msg: pb.ScaleSetSpec) -> ScaleSetSpec:
    sku = Sku(name=msg.sku.name, tier=msg.sku.tier if msg.sku.HasField("tier") else None) if msg.HasField("sku") else None
    profile = None
    if msg.HasField("sku_profile"):
        profile = SkuProfile(
            vm_sizes=[VmSize(name=v.name, rank=v.rank if v.HasField("rank") else None) for v in msg.sku_profile.vm_sizes],
            allocation_strategy=msg.sku_profile.allocation_strategy or "LowestPrice",
        )
    mix = None
    if msg.HasField("priority_mix_policy"):
        mix = PriorityMixPolicy(
            base_regular_priority_count=msg.priority_mix_policy.base_regular_priority_count,
            regular_priority_percentage_above_base=msg.priority_mix_policy.regular_priority_percentage_above_base,
        )
    policy = msg.scale_in_policy
    azb = None
    if msg.HasField("automatic_zone_rebalancing_policy"):
        p = msg.automatic_zone_rebalancing_policy
        azb = AutomaticZoneRebalancingPolicy(
            enabled=p.enabled,
            rebalance_strategy=p.rebalance_strategy or "Recreate",
            rebalance_behavior=p.rebalance_behavior or "CreateBeforeDelete",
        )
    r = msg.upgrade_policy.rolling_upgrade_policy
    default = RollingUpgradePolicy()
    upgrade = UpgradePolicy(
        mode=msg.upgrade_policy.mode or "Manual",
        rolling_upgrade_policy=RollingUpgradePolicy(
            max_batch_instance_percent=r.max_batch_instance_percent if r.HasField("max_batch_instance_percent") else default.max_batch_instance_percent,
            max_unhealthy_instance_percent=r.max_unhealthy_instance_percent if r.HasField("max_unhealthy_instance_percent") else default.max_unhealthy_instance_percent,
            max_unhealthy_upgraded_instance_percent=(
                r.max_unhealthy_upgraded_instance_percent if r.HasField("max_unhealthy_upgraded_instance_percent")
                else default.max_unhealthy_upgraded_instance_percent
            ),
            pause_time_between_batches=r.pause_time_between_batches or "PT0S",
            prioritize_unhealthy_instances=r.prioritize_unhealthy_instances,
            enable_cross_zone_upgrade=r.enable_cross_zone_upgrade,
            max_surge=r.max_surge,
            rollback_failed_instances_on_policy_breach=r.rollback_failed_instances_on_policy_breach,
        ),
    )
    repairs = None
    if msg.HasField("automatic_repairs_policy"):
        a = msg.automatic_repairs_policy
        repairs = AutomaticRepairsPolicy(enabled=a.enabled, grace_period=a.grace_period or "PT10M", repair_action=a.repair_action or "Replace")
    return ScaleSetSpec(
        name=msg.name,
        orchestration_mode=msg.orchestration_mode or "Flexible",
        zones=list(msg.zones),
        zone_balance=msg.zone_balance,
        platform_fault_domain_count=msg.platform_fault_domain_count if msg.HasField("platform_fault_domain_count") else None,
        sku=sku,
        sku_profile=profile,
        priority=msg.priority or "Regular",
        eviction_policy=msg.eviction_policy if msg.HasField("eviction_policy") else None,
        max_price=msg.max_price if msg.HasField("max_price") else None,
        priority_mix_policy=mix,
        scale_in_policy=ScaleInPolicy(
            rules=list(policy.rules) or ["Default"],
            force_deletion=policy.force_deletion,
            prioritize_unhealthy_vms=policy.prioritize_unhealthy_vms,
        ),
        single_placement_group=msg.single_placement_group if msg.HasField("single_placement_group") else None,
        image_kind=msg.image_kind or "Marketplace",
        automatic_zone_rebalancing_policy=azb,
        upgrade_policy=upgrade,
        automatic_repairs_policy=repairs,
        model_version=msg.model_version,
    )


# ----- plans ------------------------------------------------------------------------------------------


def plan_to_proto(plan: Plan, summary_only: bool = False) -> pb.Plan:
    msg = pb.Plan(
        scale_set=plan.scale_set,
        capacity_before=plan.capacity_before,
        capacity_after=plan.capacity_after,
        dry_run=plan.dry_run,
        create_count=len(plan.creates),
        delete_count=len(plan.deletes),
    )
    if not summary_only:
        msg.creates.extend(
            pb.PlannedChange(
                instance_id=c.instance_id, zone=c.zone or "", fault_domain=c.fault_domain,
                vm_size=c.vm_size, priority=c.priority, reason=c.reason,
            )
            for c in plan.creates
        )
        msg.deletes.extend(
            pb.PlannedChange(
                instance_id=d.instance_id, zone=d.zone or "", fault_domain=d.fault_domain,
                vm_size=d.vm_size, priority=d.priority, reason=d.reason,
            )
            for d in plan.deletes
        )
    return msg


def plan_from_proto(msg: pb.Plan) -> Plan:
    def item(cls: Any, c: pb.PlannedChange) -> Any:
        return cls(c.instance_id, c.zone or None, c.fault_domain, c.vm_size, c.priority, c.reason)

    return Plan(
        msg.scale_set, msg.capacity_before, msg.capacity_after, msg.dry_run,
        creates=[item(PlannedCreate, c) for c in msg.creates],
        deletes=[item(PlannedDelete, d) for d in msg.deletes],
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
    for target, rows in ((msg.creates, summary.get("creates", [])), (msg.deletes, summary.get("deletes", []))):
        for instance_id, zone, fault_domain, vm_size, priority in rows:
            target.add(instance_id=instance_id, zone=zone or "", fault_domain=fault_domain, vm_size=vm_size, priority=priority)
    return msg


def event_to_proto(event: EventRecord) -> pb.Event:
    msg = pb.Event(
        sequence=event.sequence,
        scale_set=event.scale_set,
        revision=event.revision,
        type=event.type,
        summary=event.summary.get("text", ""),
        time_unix_ms=event.time_ms,
    )
    if "plan" in event.summary:
        msg.plan.CopyFrom(event_plan_to_proto(event.scale_set, event.summary["plan"]))
    return msg


def rebalance_plan_to_proto(plan: RebalancePlan) -> pb.RebalancePlan:
    msg = pb.RebalancePlan(
        scale_set=plan.scale_set, status=plan.status, dry_run=plan.dry_run, capacity=plan.capacity,
        max_surge=plan.max_surge, replacements=plan.replacements, score_after=plan.score_after,
        score_bound=plan.violation_bound, solve_seconds=plan.solve_seconds,
    )
    msg.violation_before.update(plan.violation_before)
    msg.violation_after.update(plan.violation_after)
    for zone, before in plan.zone_counts_before.items():
        msg.counts.add(zone=zone or "", fault_domain=-1, before=before, after=plan.zone_counts_after.get(zone, 0))
    keys = sorted(set(plan.fault_domain_counts_before) | set(plan.fault_domain_counts_after), key=lambda k: (str(k[0]), k[1]))
    for zone, fd in keys:
        msg.counts.add(
            zone=zone or "", fault_domain=fd,
            before=plan.fault_domain_counts_before.get((zone, fd), 0), after=plan.fault_domain_counts_after.get((zone, fd), 0),
        )
    for wave in plan.waves:
        w = msg.waves.add(index=wave.index)
        for target, moves in ((w.creates, wave.creates), (w.deletes, wave.deletes)):
            for m in moves:
                target.add(
                    instance_id=m.instance_id or 0, zone=m.zone or "", fault_domain=m.fault_domain,
                    vm_size=m.vm_size, priority=m.priority, reason=m.reason,
                )
    return msg


def rolling_upgrade_to_proto(name: str, upgrade: RollingUpgrade | None, revision: int) -> pb.RollingUpgradeStatus:
    if upgrade is None:
        return pb.RollingUpgradeStatus(scale_set=name, status="NotStarted", revision=revision)
    progress = upgrade.progress()
    return pb.RollingUpgradeStatus(
        scale_set=name, status=upgrade.status, model_version=upgrade.model_version,
        batches_total=len(upgrade.batches), batches_done=min(upgrade.next_batch, len(upgrade.batches)), error_code=upgrade.error_code,
        error_message=upgrade.error_message, started_unix_ms=int(upgrade.started_at * 1000),
        finished_unix_ms=int((upgrade.finished_at or 0) * 1000), current_batch=upgrade.in_batch,
        next_batch_unix_ms=int((upgrade.pause_until or 0) * 1000) if upgrade.active and not upgrade.in_batch else 0,
        revision=revision, **progress,
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
    msg.zone_names.extend(zone_names)
    msg.vm_size_names.extend(size_names)
    for instance_id, name in zip(cols["instance_id"][window], cols["name"][window]):
        if name is not None:
            msg.custom_names[instance_id] = name
    return msg


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
        )
        for instance_id, zone, fd, size, priority, power, health, version, p_in, p_actions in zip(
            msg.instance_id, msg.zone, msg.fault_domain, msg.vm_size, msg.priority, msg.power_state,
            msg.health, msg.model_version, msg.protect_from_scale_in, msg.protect_from_scale_set_actions,
        )
    ]


# ----- region -----------------------------------------------------------------------------------------


def region_to_proto(region: Region, revision: int) -> pb.Region:
    msg = pb.Region(fault_domains_per_zone=region.fault_domains_per_zone, revision=revision)
    for zone in region.zones:
        msg.zones.add(name=zone, available=zone not in region.unavailable_zones)
    for pool in region.pools:
        entry = msg.pools.add(zone=pool.zone or "", vm_size=pool.vm_size, priority=pool.priority, price=pool.price)
        if pool.available is not None:
            entry.available = pool.available
    return msg


def region_from_proto(msg: pb.Region) -> Region:
    return Region(
        zones=[z.name for z in msg.zones],
        fault_domains_per_zone=msg.fault_domains_per_zone,
        unavailable_zones=[z.name for z in msg.zones if not z.available],
        pools=[pool_from_proto(p) for p in msg.pools],
    )


def pool_from_proto(msg: pb.Pool) -> Pool:
    return Pool(
        zone=msg.zone or None,
        vm_size=msg.vm_size,
        priority=msg.priority or "Regular",
        available=msg.available if msg.HasField("available") else None,
        price=msg.price if msg.HasField("price") else 0.0,
    )

