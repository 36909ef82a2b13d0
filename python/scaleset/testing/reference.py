"""A straightforward pure-Python implementation of the core placement rules.

It is the differential oracle for the Rust core in the tests and the baseline of the benchmarks: one
instance at a time, scanning every instance for every decision, exactly as the rules read. It covers zone
balance (best effort and strict), fault-domain spreading, the Spot priority mix, and the Default /
NewestVM / OldestVM scale-in rules with protection, ``prioritize_unhealthy_vms`` and regional-first. It
models a single VM size with unlimited pools (the Rust core also handles instance mix and pool capacity).
"""

from __future__ import annotations

from dataclasses import dataclass

from scaleset.model import Instance, Region, ScaleSetSpec

__all__ = ["Placed", "ReferenceError", "plan_scale_in", "plan_scale_out", "regular_target"]


class ReferenceError(Exception):
    """The rules forbid the request; ``code`` matches the core's error code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True, slots=True)
class Placed:
    instance_id: int
    zone: str | None
    fault_domain: int
    priority: str


def regular_target(spec: ScaleSetSpec, total: int) -> int:
    mix = spec.priority_mix_policy
    assert mix is not None
    base = mix.base_regular_priority_count
    return min(total, base) + max(0, total - base) * mix.regular_priority_percentage_above_base // 100


def _span(spec: ScaleSetSpec, region: Region) -> int:
    fixed = spec.platform_fault_domain_count or 1
    return region.fault_domains_per_zone if fixed <= 1 else fixed


def plan_scale_out(
    spec: ScaleSetSpec, region: Region, instances: list[Instance], count: int, next_id: int
) -> list[Placed]:
    """New instances, one at a time: the zone with the fewest, then the fault domain with the fewest."""
    if count == 0:
        return []
    slots: list[str | None] = list(spec.zones) if spec.zones else [None]
    down = {z for z in slots if z is not None and z in region.unavailable_zones}
    zonal = bool(spec.zones)
    if zonal and not spec.zone_balance and len(down) >= 2:
        raise ReferenceError("TooManyZonesUnavailable")
    span = _span(spec, region)
    placed: list[Placed] = []
    world: list[tuple[str | None, int, str]] = [(i.zone, i.fault_domain, i.priority) for i in instances]
    for k in range(count):
        if spec.priority_mix_policy is not None:
            regular = sum(1 for _, _, p in world if p == "Regular")
            priority = "Regular" if regular < regular_target(spec, len(world) + 1) else "Spot"
        else:
            priority = spec.priority

        def zone_count(z: str | None) -> int:
            return sum(1 for zz, _, _ in world if zz == z)

        def zone_priority_count(z: str | None, prio: str = priority) -> int:
            return sum(1 for zz, _, p in world if zz == z and p == prio)

        order = sorted(range(len(slots)), key=lambda s: (zone_count(slots[s]), zone_priority_count(slots[s]), s))
        min_count = zone_count(slots[order[0]])
        chosen = None
        unable = 0
        for s in order:
            if spec.zone_balance and zone_count(slots[s]) != min_count:
                break
            if slots[s] in down:
                unable += 1
                continue
            chosen = s
            break
        if chosen is None:
            raise ReferenceError("ZoneBalanceBlocked" if spec.zone_balance else "ZonalAllocationFailed")
        zone = slots[chosen]
        if zonal and zone_count(zone) > min_count and unable >= 2:
            raise ReferenceError("ZonalAllocationFailed")
        fd = min(range(span), key=lambda f: (sum(1 for zz, ff, _ in world if zz == zone and ff == f), f))
        placed.append(Placed(next_id + k, zone, fd, priority))
        world.append((zone, fd, priority))
    return placed


def plan_scale_in(spec: ScaleSetSpec, region: Region, instances: list[Instance], count: int) -> list[int]:
    """Instance ids to delete, one decision at a time, per the scale-in policy."""
    zonal = bool(spec.zones)
    if zonal and not spec.zone_balance and len(set(spec.zones) & set(region.unavailable_zones)) >= 2:
        raise ReferenceError("TooManyZonesUnavailable")
    rule = spec.scale_in_policy.rules[0] if spec.scale_in_policy.rules else "Default"
    live = list(instances)
    eligible = [i for i in live if not (i.protect_from_scale_in or i.protect_from_scale_set_actions)]
    if len(eligible) < count:
        raise ReferenceError("ScaleInBlockedByProtection")
    chosen: list[int] = []
    for _ in range(count):
        cands = [i for i in live if not (i.protect_from_scale_in or i.protect_from_scale_set_actions)]
        if spec.scale_in_policy.prioritize_unhealthy_vms:
            bad = [i for i in cands if i.health == "Unhealthy" or i.power_state == "deallocated"]
            if bad:
                cands = bad
        if spec.priority_mix_policy is not None:
            regular = sum(1 for i in live if i.priority == "Regular")
            want = "Regular" if regular > regular_target(spec, len(live) - 1) else "Spot"
            if any(i.priority == want for i in cands):
                cands = [i for i in cands if i.priority == want]
        if zonal and any(i.zone is None for i in cands):
            cands = [i for i in cands if i.zone is None]

        def zone_count(z: str | None) -> int:
            return sum(1 for i in live if i.zone == z)

        most = max(zone_count(i.zone) for i in cands)
        cands = [i for i in cands if zone_count(i.zone) == most]
        if rule == "Default":

            def fd_count(z: str | None, f: int) -> int:
                return sum(1 for i in live if i.zone == z and i.fault_domain == f)

            fd_most = {z: max(fd_count(z, i.fault_domain) for i in cands if i.zone == z) for z in {c.zone for c in cands}}
            cands = [i for i in cands if fd_count(i.zone, i.fault_domain) == fd_most[i.zone]]
        victim = min(cands, key=lambda i: i.instance_id) if rule == "OldestVM" else max(cands, key=lambda i: i.instance_id)
        if spec.zone_balance and victim.zone is not None:
            counts = {z: zone_count(z) for z in spec.zones}
            before = max(counts.values()) - min(counts.values()) <= 1
            counts[victim.zone] -= 1
            if before and max(counts.values()) - min(counts.values()) > 1:
                raise ReferenceError("ZoneBalanceBlocked")
        chosen.append(victim.instance_id)
        live.remove(victim)
    return chosen
