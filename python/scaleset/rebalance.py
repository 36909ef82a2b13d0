"""Constrained rebalancing with OR-Tools CP-SAT, modelled over capacity pools.

A pool is (zone, fault domain, VM size, priority); instances in one pool are interchangeable, so the
model has one integer per pool (how many stay, how many are created) instead of one boolean per VM, and
proves optimal plans for 100,000 instances in milliseconds. Which instances leave is a cheap second
stage in the Rust core (oldest first within a pool; pools are split by replacement preference).

The objective, in strict priority:

1. the remaining violation of the target shape: zone counts outside the balanced floor/ceil, fault
   domains outside their zone's floor/ceil, distance from the Spot priority mix target, and instances on
   VM sizes no longer in the model;
2. the number of replaced instances;
3. replacing unhealthy, then out-of-date-model instances before others, then the hourly price of the
   result.

Each is its own solve (a stage) with the ones before held at their proven optimum and hinted with the
plan the stage before found, so every objective keeps small coefficients however large the scale set
(one weighted sum would need coefficients beyond 10^15 at 1,000,000 instances). The stages share the
time limit (``max_time_in_seconds``: what is left of it), are seeded, and are reported in the plan; a
stage stopped by the time limit ends the solve with its best plan (FEASIBLE) and the proven bound. The
time limit, unless given, grows with the scale set (:func:`default_time_limit_s`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from ortools.sat.python import cp_model

from scaleset.errors import invalid_input
from scaleset.model import WEIGHTS, RebalancePlan, RebalanceStage, Wave, rebalance_waves, score

if TYPE_CHECKING:
    from scaleset.engine import Engine

log = logging.getLogger(__name__)

__all__ = ["WEIGHTS", "RebalancePlan", "Wave", "score", "solve_rebalance"]

_CLASS_NAMES = {0: "unhealthy", 1: "running an out-of-date model", 2: "healthy and current"}
#: Prices are per hour; the model works in integer micro-units.
_PRICE_SCALE = 1_000_000
#: The most the price objective's terms may add up to, each at its variable's bound: CP-SAT refuses a model
#: whose objective could overflow its 64-bit integers, so coarser units are used beyond it.
_MAX_PRICE_OBJECTIVE = 2**56
#: The default time limit: this much, and a second more for every ``_INSTANCES_PER_SECOND`` instances.
_BASE_TIME_LIMIT_S = 1.0
_INSTANCES_PER_SECOND = 250_000


def default_time_limit_s(capacity: int) -> float:
    """The solver's time limit when a rebalance gives none: 1 s, and 1 s more per 250,000 instances.

    The model has one integer per pool whatever the size, but its counts, and with them the work of a
    proof, grow with the scale set: a five-size plan proves in about 0.1 s at 100,000 instances and 0.4 s
    at 1,000,000 on a 2-core machine, so the default leaves about ten times that (5 s at 1,000,000)
    instead of ending large proofs at a fixed second.
    """
    return _BASE_TIME_LIMIT_S + capacity / _INSTANCES_PER_SECOND


class _Shape:
    """The target-shape violation of given pool counts, as numbers (for reporting) or model terms.

    The target is the best shape reachable around the instances that cannot move (protected, deallocated):
    the movable ones fill the zones (and, in each zone, the fault domains) up to a common level, as water
    fills vessels, and a zone or fault domain whose pinned instances already exceed the level keeps them
    (reference §13, issue 14: 0 / 40 pinned / 20 balances to 10 / 40 / 10, not towards 20 / 20 / 20).
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.slots: list[str | None] = data["slots"]
        self.available = [i for i, up in enumerate(data["slot_available"]) if up]
        self.fds: int = data["fault_domains"]
        self.regular_target: int | None = data["regular_target"]
        self.outside_regular: int = data["outside_regular"]
        self.model_sizes = set(data["model_sizes"])
        inside = data["capacity"] - data["outside_regular"] - data["outside_spot"]
        rows = data["rows"]
        self.pinned: Counter[int] = Counter()
        self.pinned_fd: Counter[tuple[int, int]] = Counter()
        for s, f, count, klass in zip(
            rows["slot"], rows["fault_domain"], rows["count"], rows["class"], strict=True
        ):
            if klass < 0:
                self.pinned[s] += count
                self.pinned_fd[s, min(f, self.fds - 1)] += count
        #: Per available zone, the (lowest, highest) count of the best reachable shape.
        self.zone_target = water_fill([self.pinned[s] for s in self.available], inside)
        self.floor = min((lo for lo, _ in self.zone_target), default=0)
        self.ceil = max((hi for _, hi in self.zone_target), default=0)

    def pinned_zone(self, s: int) -> bool:
        """Whether any fault domain of zone ``s`` holds instances that cannot move."""
        return any(self.pinned_fd[s, f] for f in range(self.fds))

    def measure(
        self, zone: Counter[int], fd: Counter[tuple[int, int]], regular: int, off_model: int
    ) -> dict[str, int]:
        zones = sum(
            max(0, zone[s] - hi) + max(0, lo - zone[s])
            for s, (lo, hi) in zip(self.available, self.zone_target, strict=True)
        )
        fds = 0
        for s in self.available:
            counts = [fd[s, f] for f in range(self.fds)]
            pins = [self.pinned_fd[s, f] for f in range(self.fds)]
            targets = water_fill(pins, zone[s])
            fds += sum(max(0, c - hi) + max(0, lo - c) for c, (lo, hi) in zip(counts, targets, strict=True))
        mix = abs(regular - self.regular_target) if self.regular_target is not None else 0
        return {"zones": zones, "fault_domains": fds, "priority_mix": mix, "vm_sizes": off_model}


def water_fill(pinned: list[int], total: int) -> list[tuple[int, int]]:
    """The best reachable spread of ``total`` instances over vessels already holding ``pinned`` ones that
    cannot move: each vessel's (lowest, highest) count. Vessels below the common level ``L`` get ``L`` (or
    ``L + 1`` while the remainder lasts, either is fine); vessels above it keep their pinned count. Without
    pins this is the even split: floor and ceiling of ``total / vessels``."""
    if not pinned:
        return []
    lo, hi = 0, max(total, 0)
    while lo < hi:  # the largest level whose fill fits
        mid = (lo + hi + 1) // 2
        if sum(max(p, mid) for p in pinned) <= total:
            lo = mid
        else:
            hi = mid - 1
    level = lo
    remainder = total - sum(max(p, level) for p in pinned)
    return [(p, p) if p > level else (level, level + (1 if remainder > 0 else 0)) for p in pinned]


def _pinned_fd_terms(
    model: cp_model.CpModel,
    shape: _Shape,
    s: int,
    z: Any,
    fd_terms: dict[tuple[int, int], list[Any]],
    inside: int,
) -> list[Any]:
    """Fault-domain violation in a zone with pinned instances, exactly as :func:`water_fill` measures it,
    for a zone count the solver chooses: the level, each fault domain's target, and the remainder."""
    fds = shape.fds
    # The water level: the highest at which every fault domain's target (the larger of its pinned count
    # and the level) fits in the zone; what is left over (the remainder) may stand one above its target.
    level = model.new_int_var(0, inside, f"level{s}")
    above = model.new_int_var(1, inside + 1, f"above{s}")
    model.add(above == level + 1)
    targets, next_targets, spare = [], [], []
    out: list[Any] = []
    for f in range(fds):
        pinned = shape.pinned_fd[s, f]
        t = model.new_int_var(0, inside, f"target{s}_{f}")
        model.add_max_equality(t, [level, pinned])
        t_next = model.new_int_var(0, inside + 1, f"next{s}_{f}")
        model.add_max_equality(t_next, [above, pinned])
        extra = model.new_bool_var(f"extra{s}_{f}")
        targets.append(t)
        next_targets.append(t_next)
        spare.append(extra)
        cnt = sum(fd_terms[s, f])
        fo, fu = model.new_int_var(0, inside, f"pfo{s}_{f}"), model.new_int_var(0, inside, f"pfu{s}_{f}")
        model.add(fo >= cnt - t - extra)
        model.add(fu >= level - cnt)
        out += [fo, fu]
    model.add(sum(targets) <= z)
    model.add(sum(next_targets) >= z + 1)
    model.add(sum(spare) <= z - sum(targets))
    return out


def _in_units(value: float, objective: str, unit: float) -> int:
    """A stage's value as reported: the price in millionths even where the model used coarser units (at
    most the largest int64), every other objective as it is."""
    if objective != "price" or unit == _PRICE_SCALE:
        return int(value)
    return min(2**63 - 1, round(value * _PRICE_SCALE / unit)) if unit else 2**63 - 1


def _solver(time_limit_s: float, num_workers: int, random_seed: int) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = num_workers
    solver.parameters.random_seed = random_seed
    return solver


def solve_rebalance(
    engine: Engine,
    name: str,
    *,
    max_replacements: int | None,
    max_surge: int,
    time_limit_s: float | None,
    num_workers: int,
    random_seed: int = 0,
) -> tuple[RebalancePlan, list[int]]:
    """Plans a rebalance of ``name``; returns the plan and the removal count per pool row. Without a
    ``time_limit_s``, the limit is :func:`default_time_limit_s` of the scale set's capacity."""
    if max_surge < 1:
        raise invalid_input(f"max_surge must be at least 1, got {max_surge}.")
    if time_limit_s is not None and not time_limit_s > 0:
        raise invalid_input(f"time_limit_s must be positive, got {time_limit_s}.")
    started = time.perf_counter()
    data = engine.rebalance_input(name)
    if time_limit_s is None:
        time_limit_s = default_time_limit_s(data["capacity"])
    shape = _Shape(data)
    rows, pools = data["rows"], data["new_pools"]
    n_rows, n_pools, fds = len(rows["count"]), len(pools["slot"]), shape.fds
    movable = [c >= 0 for c in rows["class"]]
    budget = sum(c for c, m in zip(rows["count"], movable, strict=False) if m)
    if max_replacements is not None:
        budget = min(budget, max_replacements)

    model = cp_model.CpModel()
    keep = [
        model.new_int_var(0, count, f"keep{r}") if movable[r] else count
        for r, count in enumerate(rows["count"])
    ]
    new: dict[tuple[int, int], Any] = {}
    caps: dict[int, int] = {}  # each new variable's bound, by pool
    for q in range(n_pools):
        cap = budget if pools["available"][q] is None else min(budget, pools["available"][q])
        if cap <= 0:
            continue
        caps[q] = cap
        per_fd = [model.new_int_var(0, cap, f"new{q}_{f}") for f in range(fds)]
        model.add(sum(per_fd) <= cap)
        for f, var in enumerate(per_fd):
            new[q, f] = var
    removed = [rows["count"][r] - keep[r] for r in range(n_rows) if movable[r]]
    replacements = sum(removed) if removed else 0
    model.add(sum(new.values()) == replacements)
    model.add(replacements <= budget)

    # Shape terms.
    zone_terms: dict[int, list[Any]] = {s: [] for s in shape.available}
    fd_terms: dict[tuple[int, int], list[Any]] = {(s, f): [] for s in shape.available for f in range(fds)}
    regular_terms: list[Any] = []
    for r in range(n_rows):
        s, f = rows["slot"][r], rows["fault_domain"][r]
        zone_terms[s].append(keep[r])
        fd_terms[s, min(f, fds - 1)].append(keep[r])
        if rows["priority"][r] == "Regular":
            regular_terms.append(keep[r])
    for (q, f), var in new.items():
        s = pools["slot"][q]
        zone_terms[s].append(var)
        fd_terms[s, f].append(var)
        if pools["priority"][q] == "Regular":
            regular_terms.append(var)
    violations: list[Any] = []
    inside = sum(c for c in rows["count"])
    for s, (z_lo, z_hi) in zip(shape.available, shape.zone_target, strict=True):
        z = sum(zone_terms[s])
        over, under = model.new_int_var(0, inside, f"over{s}"), model.new_int_var(0, inside, f"under{s}")
        model.add(over >= z - z_hi)
        model.add(under >= z_lo - z)
        violations += [WEIGHTS["zones"] * over, WEIGHTS["zones"] * under]
        if fds > 1 and shape.pinned_zone(s):
            violations += [
                WEIGHTS["fault_domains"] * v for v in _pinned_fd_terms(model, shape, s, z, fd_terms, inside)
            ]
        elif fds > 1:
            hi, lo = model.new_int_var(0, inside, f"hi{s}"), model.new_int_var(0, inside, f"lo{s}")
            model.add(fds * hi >= z)
            model.add(fds * hi <= z + fds - 1)
            model.add(fds * lo <= z)
            model.add(fds * lo >= z - fds + 1)
            for f in range(fds):
                cnt = sum(fd_terms[s, f])
                fo, fu = (
                    model.new_int_var(0, inside, f"fo{s}_{f}"),
                    model.new_int_var(0, inside, f"fu{s}_{f}"),
                )
                model.add(fo >= cnt - hi)
                model.add(fu >= lo - cnt)
                violations += [WEIGHTS["fault_domains"] * fo, WEIGHTS["fault_domains"] * fu]
    if shape.regular_target is not None:
        regular = shape.outside_regular + sum(regular_terms)
        mix = model.new_int_var(0, data["capacity"], "mix")
        model.add(mix >= regular - shape.regular_target)
        model.add(mix >= shape.regular_target - regular)
        violations.append(WEIGHTS["priority_mix"] * mix)
    off_model = [keep[r] for r in range(n_rows) if movable[r] and rows["vm_size"][r] not in shape.model_sizes]
    violations += [WEIGHTS["vm_sizes"] * k for k in off_model]
    violation = sum(violations)

    # Hint: the current placement.
    for r in range(n_rows):
        if movable[r]:
            model.add_hint(keep[r], rows["count"][r])
    for var in new.values():
        model.add_hint(var, 0)

    # The objectives, most important first, each solved with the ones before held at their optimum:
    # small coefficients in every stage, however large the scale set.
    movable_rows = [r for r in range(n_rows) if movable[r]]
    most = sum(rows["price"][r] * rows["count"][r] for r in movable_rows) + sum(
        pools["price"][q] * caps[q] for q, _ in new
    )
    unit = _PRICE_SCALE if most * _PRICE_SCALE <= _MAX_PRICE_OBJECTIVE else _MAX_PRICE_OBJECTIVE / most
    price_total = sum(keep[r] * round(rows["price"][r] * unit) for r in movable_rows) + sum(
        var * round(pools["price"][q] * unit) for (q, _), var in new.items()
    )
    class_cost = sum((rows["count"][r] - keep[r]) * rows["class"][r] for r in movable_rows)
    objectives = [
        ("violation", violation),
        ("replacements", replacements),
        ("replacement_order", class_cost),
        ("price", price_total),
    ]
    stages: list[RebalanceStage] = []
    solver: cp_model.CpSolver | None = None
    status = cp_model.OPTIMAL
    bound = 0
    for k, (objective, expression) in enumerate(objectives):
        if k >= 2 and stages[1].value == 0:
            break  # nothing is replaced: which ones, and the price of the result, are settled
        if solver is not None:  # hold what the stage before proved, start from its plan
            previous = objectives[k - 1][1]
            model.add(previous == solver.value(previous))
            model.clear_hints()
            for r in movable_rows:
                model.add_hint(keep[r], solver.value(keep[r]))
            for var in new.values():
                model.add_hint(var, solver.value(var))
        model.minimize(expression)
        remaining = time_limit_s - (time.perf_counter() - started)
        stage_solver = _solver(max(0.01, remaining), num_workers, random_seed)
        stage_started = time.perf_counter()
        stage_status = stage_solver.solve(model)
        if stage_status == cp_model.MODEL_INVALID:
            raise RuntimeError(f"rebalance model is invalid at stage {objective}: {model.validate()}")
        if stage_status == cp_model.INFEASIBLE:
            # Keeping every instance where it is always fits, so this is a bug, not a user error.
            raise RuntimeError(f"the rebalance model is infeasible at stage {objective}")
        found = stage_status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
        stages.append(
            RebalanceStage(
                objective=objective,
                status=stage_solver.status_name(stage_status),
                value=_in_units(stage_solver.objective_value, objective, unit) if found else -1,
                bound=_in_units(max(0.0, stage_solver.best_objective_bound), objective, unit),
                seconds=time.perf_counter() - stage_started,
            )
        )
        if k == 0:
            bound = stages[0].bound
        if not found:
            status = cp_model.FEASIBLE
            break  # no plan within the time left: keep the last stage's
        solver = stage_solver
        if stage_status != cp_model.OPTIMAL:
            status = cp_model.FEASIBLE
            break  # what a later stage would hold is not proven: stop at this plan

    if solver is None:
        # No solution within the time limit (status is FEASIBLE): the current placement (no moves) is the
        # best plan known.
        log.warning(
            "rebalance of %s: no better plan found within %.3f s; returning the empty plan",
            name,
            time_limit_s,
        )
        removals, news = [0] * n_rows, {}
    else:
        keep_values = [solver.value(k) if movable[r] else k for r, k in enumerate(keep)]
        removals = [rows["count"][r] - keep_values[r] if movable[r] else 0 for r in range(n_rows)]
        news = {key: solver.value(var) for key, var in new.items() if solver.value(var) > 0}
    plan = _assemble(
        engine, name, data, shape, removals, news, max_surge, status, bound, started, stages, time_limit_s
    )
    return plan, removals


def _assemble(
    engine: Engine,
    name: str,
    data: dict[str, Any],
    shape: _Shape,
    removals: list[int],
    news: dict[tuple[int, int], int],
    surge: int,
    status: int,
    bound: int,
    started: float,
    stages: list[RebalanceStage],
    time_limit_s: float,
) -> RebalancePlan:
    rows, pools = data["rows"], data["new_pools"]
    slots = shape.slots
    zone_b: Counter[int] = Counter()
    fd_b: Counter[tuple[int, int]] = Counter()
    regular_b = shape.outside_regular
    off_b = 0
    for r, count in enumerate(rows["count"]):
        s, f = rows["slot"][r], min(rows["fault_domain"][r], shape.fds - 1)
        zone_b[s] += count
        fd_b[s, f] += count
        regular_b += count if rows["priority"][r] == "Regular" else 0
        off_b += count if rows["class"][r] >= 0 and rows["vm_size"][r] not in shape.model_sizes else 0
    zone_a, fd_a, regular_a, off_a = Counter(zone_b), Counter(fd_b), regular_b, off_b
    for r, gone in enumerate(removals):
        s, f = rows["slot"][r], min(rows["fault_domain"][r], shape.fds - 1)
        zone_a[s] -= gone
        fd_a[s, f] -= gone
        regular_a -= gone if rows["priority"][r] == "Regular" else 0
        off_a -= gone if rows["vm_size"][r] not in shape.model_sizes else 0
    for (q, f), n in news.items():
        s = pools["slot"][q]
        zone_a[s] += n
        fd_a[s, f] += n
        regular_a += n if pools["priority"][q] == "Regular" else 0
    before = shape.measure(zone_b, fd_b, regular_b, off_b)
    after = shape.measure(zone_a, fd_a, regular_a, off_a)
    target = f"{shape.floor}" if shape.floor == shape.ceil else f"{shape.floor}-{shape.ceil}"
    if shape.pinned:
        target += " around the instances that cannot move"

    def zone_note(s: int) -> str:
        return (
            f"zone {slots[s] or 'regional'}: {zone_b[s]} -> {zone_a[s]} instances (balanced share {target})"
        )

    def mix_note(priority: str) -> str:
        if shape.regular_target is None:
            return ""
        return f"; {priority} for the priority mix (Regular {regular_b} -> {regular_a}, target {shape.regular_target})"

    creates: list[tuple[str | None, int, str, str, str]] = []
    for (q, f), n in sorted(news.items()):
        s, size, priority = pools["slot"][q], pools["vm_size"][q], pools["priority"][q]
        reason = f"rebalance: {zone_note(s)}; fault domain {f} {fd_b[s, f]} -> {fd_a[s, f]}{mix_note(priority) if regular_b != regular_a else ''}"
        creates.extend([(slots[s], f, size, priority, reason)] * n)
    ids = engine.select_rebalance_deletes(name, removals) if any(removals) else []
    # Ids come pool row by pool row (rows are ordered by slot, fault domain, size, priority, class).
    ranked: list[tuple[int, int, str | None, int, str, str, str]] = []
    pos = 0
    for r, gone in enumerate(removals):
        if not gone:
            continue
        s, f = rows["slot"][r], rows["fault_domain"][r]
        size, priority, klass = rows["vm_size"][r], rows["priority"][r], rows["class"][r]
        why = [f"{_CLASS_NAMES[klass]}", zone_note(s)]
        if size not in shape.model_sizes:
            why.append(f"{size} is no longer in the model")
        reason = (
            "rebalance: replaced; " + "; ".join(why) + (mix_note(priority) if regular_b != regular_a else "")
        )
        ranked.extend((klass, i, slots[s], f, size, priority, reason) for i in ids[pos : pos + gone])
        pos += gone
    # Waves replace unhealthy instances first, then out-of-date ones, then the rest; oldest first.
    ranked.sort(key=lambda d: (d[0], d[1]))
    deletes = [d[1:] for d in ranked]
    first_id = engine.next_instance_id(name)
    plan = RebalancePlan(
        scale_set=name,
        status="OPTIMAL" if status == cp_model.OPTIMAL else "FEASIBLE",
        dry_run=True,
        capacity=data["capacity"],
        max_surge=surge,
        replacements=len(deletes),
        violation_before=before,
        violation_after=after,
        violation_bound=bound,
        solve_seconds=time.perf_counter() - started,
        zone_counts_before={slots[s]: zone_b[s] for s in sorted(set(zone_b) | set(shape.available))},
        zone_counts_after={slots[s]: zone_a[s] for s in sorted(set(zone_a) | set(shape.available))},
        fault_domain_counts_before={(slots[s], f): n for (s, f), n in sorted(fd_b.items())},
        fault_domain_counts_after={(slots[s], f): n for (s, f), n in sorted(fd_a.items())},
        waves=rebalance_waves(creates, deletes, surge, first_id),
        _creates=creates,
        _deletes=deletes,
        first_instance_id=first_id,
        stages=tuple(stages),
        time_limit_s=time_limit_s,
    )
    assert plan.replacements == len(creates), f"{len(creates)} creates for {plan.replacements} deletes"
    return plan
