"""Baselines for the pool-based rebalancer: a per-VM boolean CP-SAT model of the same problem, and a
greedy heuristic. Benchmarks run them beside the real rebalancer; tests use the per-VM model on small
cases to check that the pool model's plans are optimal.

The target shape is the same as :mod:`scaleset.rebalance`'s, written independently: zone counts outside
the best reachable spread around pinned (protected, deallocated) instances, fault-domain counts outside
their zone's (the same rule inside a zone), distance from the priority-mix target, and movable instances
on sizes outside the model.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from ortools.sat.python import cp_model

from scaleset.engine import Engine
from scaleset.model import Instance
from scaleset.rebalance import WEIGHTS

__all__ = ["BaselineResult", "greedy_rebalance", "per_vm_rebalance"]


@dataclass(frozen=True, slots=True)
class BaselineResult:
    status: str
    #: Weighted violation, as :func:`scaleset.rebalance.score`.
    violation: int
    replacements: int
    seconds: float


def _setup(engine: Engine, name: str) -> tuple[dict, list, list[tuple[int, int, str, str]]]:  # type: ignore[type-arg]
    data = engine.rebalance_input(name)
    slots = data["slots"]
    available = {slots[i] for i, up in enumerate(data["slot_available"]) if up}
    instances = [i for i in engine.get_scale_set(name).instances if i.zone in available]
    pools = data["new_pools"]
    targets = [
        (pools["slot"][q], f, pools["vm_size"][q], pools["priority"][q])
        for q in range(len(pools["slot"]))
        for f in range(data["fault_domains"])
    ]
    return data, instances, targets


def _pool_limits(data: dict) -> dict[tuple[int, str, str], int]:  # type: ignore[type-arg]
    pools = data["new_pools"]
    return {
        (pools["slot"][q], pools["vm_size"][q], pools["priority"][q]): pools["available"][q]
        for q in range(len(pools["slot"]))
        if pools["available"][q] is not None
    }


def _fixed(inst: Instance) -> bool:
    return (
        inst.protect_from_scale_in or inst.protect_from_scale_set_actions or inst.power_state == "deallocated"
    )


def _level(pinned: list[int], total: int) -> int:
    """The highest common level the movable instances can fill every vessel to, one step at a time."""
    level = 0
    while sum(max(p, level + 1) for p in pinned) <= total:
        level += 1
    return level


def per_vm_rebalance(
    engine: Engine, name: str, max_replacements: int | None = None, time_limit_s: float = 10.0
) -> BaselineResult:
    """One boolean per (VM, pool it could end in): the model an engineer writes first."""
    started = time.perf_counter()
    data, instances, targets = _setup(engine, name)
    slots, fds = data["slots"], data["fault_domains"]
    slot_of = {z: i for i, z in enumerate(slots)}
    available = [i for i, up in enumerate(data["slot_available"]) if up]
    model = cp_model.CpModel()
    counts: dict[tuple[int, int, str, str], list] = {t: [] for t in targets}  # type: ignore[type-arg]
    moved_in: dict[tuple[int, str, str], list] = {}  # type: ignore[type-arg]
    replaced = []
    regular = []
    off_model = []
    for inst in instances:
        home = (slot_of[inst.zone], inst.fault_domain, inst.vm_size, inst.priority)
        fixed = _fixed(inst)
        stay = model.new_bool_var(f"stay{inst.instance_id}")
        if fixed:
            model.add(stay == 1)
        options = [stay]
        counts.setdefault(home, []).append(stay)
        if inst.priority == "Regular":
            regular.append(stay)
        if inst.vm_size not in data["model_sizes"] and not fixed:
            off_model.append(stay)
        for t in targets:
            if t == home:
                continue
            x = model.new_bool_var(f"x{inst.instance_id}_{t}")
            options.append(x)
            counts[t].append(x)
            moved_in.setdefault((t[0], t[2], t[3]), []).append(x)
            if t[3] == "Regular":
                regular.append(x)
        model.add_exactly_one(options)
        replaced.append(1 - stay)
    total = len(instances)
    if max_replacements is not None:
        model.add(sum(replaced) <= max_replacements)
    for pool, limit in _pool_limits(data).items():
        model.add(sum(moved_in.get(pool, [])) <= limit)
    pinned_zone = Counter(slot_of[i.zone] for i in instances if _fixed(i))
    pinned_fd = Counter((slot_of[i.zone], min(i.fault_domain, fds - 1)) for i in instances if _fixed(i))
    level = _level([pinned_zone[s] for s in available], total)
    spare = total - sum(max(pinned_zone[s], level) for s in available)
    violation = []
    for s in available:
        z = sum(v for t, vs in counts.items() if t[0] == s for v in vs)
        lo = max(pinned_zone[s], level)
        hi = lo + (1 if spare > 0 and pinned_zone[s] <= level else 0)
        over, under = model.new_int_var(0, total, ""), model.new_int_var(0, total, "")
        model.add(over >= z - hi)
        model.add(under >= lo - z)
        violation += [WEIGHTS["zones"] * over, WEIGHTS["zones"] * under]
        if fds > 1 and any(pinned_fd[s, f] for f in range(fds)):
            w = model.new_int_var(0, total, "")
            tops, next_tops, extras = [], [], []
            for f in range(fds):
                top, next_top, extra = (
                    model.new_int_var(0, total, ""),
                    model.new_int_var(0, total + 1, ""),
                    model.new_bool_var(""),
                )
                model.add_max_equality(top, [w, pinned_fd[s, f]])
                model.add_max_equality(next_top, [w + 1, pinned_fd[s, f]])
                tops.append(top)
                next_tops.append(next_top)
                extras.append(extra)
                c = sum(v for t, vs in counts.items() if t[0] == s and t[1] == f for v in vs)
                fo, fu = model.new_int_var(0, total, ""), model.new_int_var(0, total, "")
                model.add(fo >= c - top - extra)
                model.add(fu >= w - c)
                violation += [WEIGHTS["fault_domains"] * fo, WEIGHTS["fault_domains"] * fu]
            model.add(sum(tops) <= z)
            model.add(sum(next_tops) >= z + 1)
            model.add(sum(extras) <= z - sum(tops))
        elif fds > 1:
            hi_fd, lo_fd = model.new_int_var(0, total, ""), model.new_int_var(0, total, "")
            model.add(fds * hi_fd >= z)
            model.add(fds * hi_fd <= z + fds - 1)
            model.add(fds * lo_fd <= z)
            model.add(fds * lo_fd >= z - fds + 1)
            for f in range(fds):
                c = sum(v for t, vs in counts.items() if t[0] == s and t[1] == f for v in vs)
                fo, fu = model.new_int_var(0, total, ""), model.new_int_var(0, total, "")
                model.add(fo >= c - hi_fd)
                model.add(fu >= lo_fd - c)
                violation += [WEIGHTS["fault_domains"] * fo, WEIGHTS["fault_domains"] * fu]
    if data["regular_target"] is not None:
        r = data["outside_regular"] + sum(regular)
        mix = model.new_int_var(0, data["capacity"], "")
        model.add(mix >= r - data["regular_target"])
        model.add(mix >= data["regular_target"] - r)
        violation.append(WEIGHTS["priority_mix"] * mix)
    violation += [WEIGHTS["vm_sizes"] * v for v in off_model]
    model.minimize(sum(violation) * (data["capacity"] + 1) + sum(replaced))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    status = solver.solve(model)
    seconds = time.perf_counter() - started
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return BaselineResult(solver.status_name(status), -1, -1, seconds)
    return BaselineResult(
        solver.status_name(status),
        int(solver.value(sum(violation))),
        int(solver.value(sum(replaced))),
        seconds,
    )


def greedy_rebalance(engine: Engine, name: str, max_replacements: int | None = None) -> BaselineResult:
    """Moves one instance at a time from the fullest zone (its fullest fault domain) to the emptiest
    zone (its emptiest fault domain) until zones are balanced or the budget is spent. Moved instances keep
    their priority and size: like a quick operator script, it does not fix the priority mix or sizes
    (the violation it leaves there is counted)."""
    started = time.perf_counter()
    data, instances, _ = _setup(engine, name)
    slots, fds = data["slots"], data["fault_domains"]
    available = [slots[i] for i, up in enumerate(data["slot_available"]) if up]
    zone = Counter({z: 0 for z in available})
    fd: Counter[tuple[str | None, int]] = Counter()
    movable: Counter[tuple[str | None, int]] = Counter()
    for i in instances:
        zone[i.zone] += 1
        fd[i.zone, i.fault_domain] += 1
        if not (
            i.protect_from_scale_in or i.protect_from_scale_set_actions or i.power_state == "deallocated"
        ):
            movable[i.zone, i.fault_domain] += 1
    budget = len(instances) if max_replacements is None else max_replacements
    moves = 0
    while moves < budget:
        src = max(available, key=lambda z: (zone[z], str(z)))
        dst = min(available, key=lambda z: (zone[z], str(z)))
        if zone[src] - zone[dst] <= 1:
            break
        src_fds = [f for f in range(fds) if movable[src, f] > 0]
        if not src_fds:
            break
        f_src = max(src_fds, key=lambda f: (fd[src, f], -f))
        f_dst = min(range(fds), key=lambda f: (fd[dst, f], f))
        for key, delta in (((src, f_src), -1), ((dst, f_dst), 1)):
            fd[key] += delta
        movable[src, f_src] -= 1
        zone[src] -= 1
        zone[dst] += 1
        moves += 1
    total = len(instances)
    k = max(1, len(available))
    floor, ceil = total // k, -(-total // k)
    violation = WEIGHTS["zones"] * sum(max(0, zone[z] - ceil) + max(0, floor - zone[z]) for z in available)
    for z in available:
        lo, hi = zone[z] // fds, -(-zone[z] // fds)
        violation += WEIGHTS["fault_domains"] * sum(
            max(0, fd[z, f] - hi) + max(0, lo - fd[z, f]) for f in range(fds)
        )
    if data["regular_target"] is not None:
        regular = data["outside_regular"] + sum(1 for i in instances if i.priority == "Regular")
        violation += WEIGHTS["priority_mix"] * abs(regular - data["regular_target"])
    violation += WEIGHTS["vm_sizes"] * sum(
        1
        for i in instances
        if i.vm_size not in data["model_sizes"]
        and not (
            i.protect_from_scale_in or i.protect_from_scale_set_actions or i.power_state == "deallocated"
        )
    )
    return BaselineResult("HEURISTIC", violation, moves, time.perf_counter() - started)
