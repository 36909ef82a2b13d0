"""A straightforward pure-Python implementation of the core placement rules.

It is the differential oracle for the Rust core in the tests and the baseline of the benchmarks: one
instance at a time, exactly as the rules read; every scale-in decision rescans the live instances. It covers zone
balance (best effort and strict), fault-domain spreading, the Spot priority mix, and the Default /
NewestVM / OldestVM scale-in rules with protection, ``prioritize_unhealthy_vms`` and regional-first, with
plain ``Counter``s for the zone and fault-domain tallies (no indexing tricks). It models a single VM size with unlimited pools (the Rust core also handles instance mix and pool capacity).
"""

from __future__ import annotations

from collections import Counter
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
    zone_count: Counter[str | None] = Counter(i.zone for i in instances)
    zone_priority: Counter[tuple[str | None, str]] = Counter((i.zone, i.priority) for i in instances)
    fd_count: Counter[tuple[str | None, int]] = Counter((i.zone, i.fault_domain) for i in instances)
    total = len(instances)
    regular = sum(1 for i in instances if i.priority == "Regular")
    placed: list[Placed] = []
    for k in range(count):
        if spec.priority_mix_policy is not None:
            priority = "Regular" if regular < regular_target(spec, total + 1) else "Spot"
        else:
            priority = spec.priority
        order = sorted(
            range(len(slots)), key=lambda s: (zone_count[slots[s]], zone_priority[slots[s], priority], s)
        )
        min_count = zone_count[slots[order[0]]]
        chosen = None
        unable = 0
        for s in order:
            if spec.zone_balance and zone_count[slots[s]] != min_count:
                break
            if slots[s] in down:
                unable += 1
                continue
            chosen = s
            break
        if chosen is None:
            raise ReferenceError("ZoneBalanceBlocked" if spec.zone_balance else "ZonalAllocationFailed")
        zone = slots[chosen]
        if zonal and zone_count[zone] > min_count and unable >= 2:
            raise ReferenceError("ZonalAllocationFailed")
        fd = min(range(span), key=lambda f: (fd_count[zone, f], f))
        placed.append(Placed(next_id + k, zone, fd, priority))
        zone_count[zone] += 1
        zone_priority[zone, priority] += 1
        fd_count[zone, fd] += 1
        total += 1
        regular += priority == "Regular"
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
        zone_count = Counter(i.zone for i in live)
        most = max(zone_count[i.zone] for i in cands)
        cands = [i for i in cands if zone_count[i.zone] == most]
        if rule == "Default":
            fd_count = Counter((i.zone, i.fault_domain) for i in live)
            fd_most: dict[str | None, int] = {}
            for c in cands:
                fd_most[c.zone] = max(fd_most.get(c.zone, 0), fd_count[c.zone, c.fault_domain])
            cands = [i for i in cands if fd_count[i.zone, i.fault_domain] == fd_most[i.zone]]
        victim = (
            min(cands, key=lambda i: i.instance_id)
            if rule == "OldestVM"
            else max(cands, key=lambda i: i.instance_id)
        )
        if spec.zone_balance and victim.zone is not None:
            counts = {z: zone_count[z] for z in spec.zones}
            before = max(counts.values()) - min(counts.values()) <= 1
            counts[victim.zone] -= 1
            if before and max(counts.values()) - min(counts.values()) > 1:
                raise ReferenceError("ZoneBalanceBlocked")
        chosen.append(victim.instance_id)
        live.remove(victim)
    return chosen


def plan_upgrade_batches(
    spec: ScaleSetSpec,
    instances: list[Instance],
    batch_size: int,
    prioritize_unhealthy: bool,
    cross_zone: bool,
) -> list[list[int]]:
    """Rolling-upgrade batches by the same rules as the core's planner, in plain Python."""
    batch_size = max(1, batch_size)
    big = 1 << 62

    def rank(zone: str | None) -> int:
        if zone is None:
            return big + 1
        return list(spec.zones).index(zone) if zone in spec.zones else big

    groups: dict[int, dict[tuple[bool, tuple[int, int]], list[int]]] = {}
    totals: dict[int, Counter[tuple[int, int]]] = {}
    for i in sorted(instances, key=lambda i: i.instance_id):
        r = rank(i.zone)
        group = 0 if cross_zone else r
        fd = (r, i.fault_domain)
        totals.setdefault(group, Counter())[fd] += 1
        if (i.model_version or 0) >= spec.model_version or i.protect_from_scale_set_actions:
            continue
        first = prioritize_unhealthy and i.health in ("Unhealthy", "Unknown")
        groups.setdefault(group, {}).setdefault((not first, fd), []).append(i.instance_id)
    order = sorted(
        groups,
        key=lambda g: (
            (-sum(len(v) for (later, _), v in groups[g].items() if not later), g)
            if prioritize_unhealthy
            else (0, g)
        ),
    )
    out: list[list[int]] = []
    for g in order:
        first_q = {fd: list(v) for (later, fd), v in sorted(groups[g].items()) if not later}
        rest_q = {fd: list(v) for (later, fd), v in sorted(groups[g].items()) if later}
        mine = _fd_batches(first_q, totals[g], batch_size)
        rest = _fd_batches(rest_q, totals[g], batch_size)
        if mine and len(mine[-1]) < batch_size:
            flat = [i for b in rest for i in b]
            room = batch_size - len(mine[-1])
            mine[-1] += flat[:room]
            rest = [flat[k : k + batch_size] for k in range(room, len(flat), batch_size)]
        out += mine + rest
    return out


def _fd_batches(
    by_fd: dict[tuple[int, int], list[int]], totals: Counter[tuple[int, int]], size: int
) -> list[list[int]]:
    out: list[list[int]] = []
    batch: list[int] = []
    in_batch: Counter[tuple[int, int]] = Counter()
    while any(by_fd.values()):
        order = sorted(((len(q), fd) for fd, q in by_fd.items() if q), key=lambda t: (-t[0], t[1]))
        whole = [totals[fd] > 1 and in_batch[fd] + 1 >= totals[fd] for _, fd in order]
        fd = next((fd for (_, fd), w in zip(order, whole, strict=False) if not w), order[0][1])
        batch.append(by_fd[fd].pop(0))
        in_batch[fd] += 1
        if len(batch) == size:
            out.append(batch)
            batch, in_batch = [], Counter()
    if batch:
        out.append(batch)
    return out
