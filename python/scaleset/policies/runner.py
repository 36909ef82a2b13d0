"""The policy runner: owns the state of every time-driven policy and advances it with explicit time.

Policies sit above the engine and call its facade one way; the engine knows nothing of them. The
commands tell the runner about user changes (:meth:`PolicyRunner.changed`, :meth:`model_changed`), so the
quiet periods, grace periods and rolling upgrades see them; :meth:`advance` runs every policy of a scale
set at one instant. The runner's state is plain data (:meth:`export`, :meth:`restore`) for snapshots.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

from scaleset.engine import Engine, MetricBuffer
from scaleset.errors import conflict, invalid_input, not_found
from scaleset.model import AutoscaleDecision, AutoscaleSetting, ScaleSetSpec
from scaleset.policies import autoscale, repairs, upgrade, zone_balance
from scaleset.policies.autoscale import AutoscaleState
from scaleset.policies.common import Action
from scaleset.policies.lifecycle import Lifecycle
from scaleset.policies.repairs import RepairState
from scaleset.policies.upgrade import RollingUpgrade
from scaleset.policies.zone_balance import ZoneBalanceOperation

log = logging.getLogger(__name__)

__all__ = ["PolicyRunner"]


def _same(value: Any) -> Any:
    return value


def _zone_balance_operation(data: dict[str, Any]) -> ZoneBalanceOperation:
    return ZoneBalanceOperation(**data)


#: The policies' state kept by scale set name: (key in an export, attribute, to plain data, back).
_SECTIONS: tuple[tuple[str, str, Callable[[Any], Any], Callable[[Any], Any]], ...] = (
    ("modified", "_modified", _same, _same),
    ("zone_balance", "_zone_balance", ZoneBalanceOperation.to_dict, _zone_balance_operation),
    ("zone_balance_started", "_zone_balance_started", _same, _same),
    ("upgrades", "_upgrades", RollingUpgrade.to_dict, RollingUpgrade.from_dict),
    ("repairs", "_repairs", RepairState.to_dict, RepairState.from_dict),
    ("autoscale", "_autoscale", AutoscaleState.to_dict, AutoscaleState.from_dict),
    ("loose_metrics", "_loose_metrics", sorted, set),
)


class PolicyRunner:
    """Rolling upgrades, automatic repairs, autoscale and automatic zone balance of every scale set of one
    engine, and the pushed metrics autoscale reads."""

    def __init__(self) -> None:
        self.metrics = MetricBuffer()
        self._autoscale: dict[str, AutoscaleState] = {}
        #: When a user last changed each scale set (Azure's PUT/PATCH/POST), for quiet and grace periods.
        self._modified: dict[str, float] = {}
        self._zone_balance: dict[str, ZoneBalanceOperation] = {}
        self._zone_balance_started: dict[str, float] = {}
        self._upgrades: dict[str, RollingUpgrade] = {}
        self._upgrade_pending: set[str] = set()
        self._repairs: dict[str, RepairState] = {}
        #: Metric names pushed for scale sets without an autoscale setting (bounded like the others, and
        #: saved with them: the bound holds across a restart).
        self._loose_metrics: dict[str, set[str]] = {}
        #: Operations for executors, the unavailable-capacity cache, shortfalls and backoff.
        self.lifecycle = Lifecycle()
        #: Policy steps that raised (:meth:`_guarded`), replayed ones included.
        self.failed_steps = 0

    # ----- what the commands tell the runner ----------------------------------------------------------

    def changed(self, name: str, now: float, *, capacity: bool = False) -> None:
        """A user changed ``name`` at ``now``; a capacity change also cancels an automatic zone balance in
        progress (its new VM stays)."""
        self._modified[name] = now
        self.lifecycle.spec_changed(name)
        if capacity:
            self._zone_balance.pop(name, None)
            self.lifecycle.capacity_set(name)

    def model_changed(self, engine: Engine, spec: ScaleSetSpec) -> None:
        """A new model version: Automatic mode upgrades every out-of-date instance now; Rolling starts a
        rolling upgrade at the next :meth:`advance` (superseding one in progress); Manual does nothing."""
        name, mode = spec.name, spec.upgrade_policy.mode
        if mode == "Automatic":
            cols = engine.instance_columns(name)
            stale = [
                i
                for i, v, p in zip(
                    cols["instance_id"],
                    cols["model_version"],
                    cols["protect_from_scale_set_actions"],
                    strict=True,
                )
                if (v or 0) < spec.model_version and not p
            ]
            if stale:
                engine.upgrade_instances(name, stale)
        elif mode == "Rolling":
            current = self._upgrades.get(name)
            if current is not None and current.active:
                current.status, current.error_message = "Cancelled", "superseded by a newer model"
                current.in_batch, current.surge_old = [], []
            self._upgrade_pending.add(name)

    def updated(self, engine: Engine, spec: ScaleSetSpec) -> None:
        """An update that changed no model property: in Rolling mode it starts the rolling upgrade again if
        the last one stopped on a policy breach with instances still out of date (Azure: "a generic update
        re-triggers the check"). A cancelled upgrade waits for a manual start or a new model."""
        last = self._upgrades.get(spec.name)
        if (
            spec.upgrade_policy.mode != "Rolling"
            or last is None
            or last.status not in ("Faulted", "RolledBack")
        ):
            return
        versions = engine.instance_columns(spec.name)["model_version"]
        if any((v or 0) < spec.model_version for v in versions):
            self._upgrade_pending.add(spec.name)

    def autoscaled(self, name: str) -> bool:
        """Whether an enabled autoscale setting owns ``name``'s instance count."""
        state = self._autoscale.get(name)
        return state is not None and state.setting.enabled is not False

    def deleted(self, name: str) -> None:
        """Forgets every policy's state of a deleted scale set, and its metrics (its autoscale setting
        stays, as an Azure autoscale resource outlives its target)."""
        for state in (
            self._modified,
            self._zone_balance,
            self._zone_balance_started,
            self._upgrades,
            self._repairs,
            self._loose_metrics,
        ):
            state.pop(name, None)
        self._upgrade_pending.discard(name)
        self.metrics.remove(name)
        if (scaling := self._autoscale.get(name)) is not None:
            self.metrics.set_retention(name, autoscale.retention_s(scaling.setting))
        self.lifecycle.deleted(name)

    # ----- time -----------------------------------------------------------------------------------------

    def advance(self, engine: Engine, now: float, name: str | None = None) -> list[Action]:
        """Advances the policies of every scale set, or of ``name``, to ``now``. Returns what was done.
        The same state and ``now`` give the same actions."""
        if name is not None:
            engine.capacity(name)  # NotFoundError: there is nothing to advance
        actions: list[Action] = []
        for n in [name] if name is not None else engine.scale_set_names():
            actions += self._guarded("lifecycle", self.lifecycle.step, engine, n, now)
            actions += self._guarded("rolling upgrade", self._upgrade_step, engine, n, now)
            current = self._upgrades.get(n)
            busy = set(current.in_batch) if current is not None and current.active else set()
            actions += self._guarded("repairs", self._repairs_step, engine, n, now, busy)
            if (scaling := self._autoscale.get(n)) is not None:
                waiting = "a rolling upgrade is in progress" if busy else None
                actions += self._guarded("autoscale", self._autoscale_step, engine, n, now, scaling, waiting)
            actions += self._guarded("zone balance", self._zone_balance_step, engine, n, now)
        return actions

    def _guarded(
        self, policy: str, step: Callable[..., list[Action]], engine: Engine, name: str, *args: Any
    ) -> list[Action]:
        """One policy's step of one scale set. One that raises (a defect) is logged and counted in
        ``failed_steps``, and does nothing more: the set's other policies and the other sets go on, and
        what they did is logged. A replay of the round raises the same way (the steps are deterministic),
        so whatever the failed step changed before it raised is rebuilt too."""
        try:
            return step(engine, name, *args)
        except Exception:
            self.failed_steps += 1
            log.exception("the %s step of '%s' failed; it is tried again next round", policy, name)
            return []

    def _upgrade_step(self, engine: Engine, n: str, now: float) -> list[Action]:
        actions: list[Action] = []
        if n in self._upgrade_pending:
            self._upgrades[n], started = upgrade.start(engine, n, now)
            self._upgrade_pending.discard(n)
            actions += started
        current = self._upgrades.get(n)
        if current is not None:
            actions += upgrade.step(engine, n, now, current)
        return actions

    def _repairs_step(self, engine: Engine, n: str, now: float, busy: set[int]) -> list[Action]:
        repair = self._repairs.get(n, RepairState())
        actions = repairs.step(engine, n, now, repair, self._modified.get(n), busy)
        if repair != RepairState():  # kept once it holds anything (the step said so: it is logged)
            self._repairs[n] = repair
        return actions

    def _autoscale_step(
        self, engine: Engine, n: str, now: float, scaling: AutoscaleState, waiting: str | None
    ) -> list[Action]:
        decision, done = autoscale.step(engine, self.metrics, n, scaling, now, waiting)
        if decision.capacity != decision.capacity_before and done:
            self.changed(n, now, capacity=True)  # like a user's capacity change
        return done

    def _zone_balance_step(self, engine: Engine, n: str, now: float) -> list[Action]:
        op, started, done = zone_balance.step(
            engine,
            n,
            now,
            self._zone_balance.get(n),
            self._zone_balance_started.get(n),
            self._modified.get(n),
        )
        if op is None:
            self._zone_balance.pop(n, None)
        else:
            self._zone_balance[n] = op
        if started is not None:
            self._zone_balance_started[n] = started
        return done

    # ----- rolling upgrades -------------------------------------------------------------------------------

    def start_rolling_upgrade(self, engine: Engine, name: str, now: float) -> RollingUpgrade:
        """Starts a rolling upgrade of ``name``'s out-of-date instances; fails with
        ``RollingUpgradeInProgress`` if one is running."""
        current = self._upgrades.get(name)
        if current is not None and current.active:
            raise conflict(
                f"a rolling upgrade of '{name}' is already in progress; cancel it first.",
                "RollingUpgradeInProgress",
            )
        self._upgrade_pending.discard(name)
        self._upgrades[name], _ = upgrade.start(engine, name, now)
        return self._copy(self._upgrades[name])

    def get_rolling_upgrade(self, name: str) -> RollingUpgrade | None:
        """The latest rolling upgrade of ``name`` (a copy), or None if there has been none."""
        current = self._upgrades.get(name)
        return None if current is None else self._copy(current)

    def cancel_rolling_upgrade(self, name: str, now: float) -> RollingUpgrade:
        """Stops the rolling upgrade in progress; instances already upgraded keep the new model."""
        current = self._upgrades.get(name)
        upgrade.cancel(current, name, now)
        self._upgrade_pending.discard(name)
        assert current is not None  # cancel raised otherwise
        return self._copy(current)

    @staticmethod
    def _copy(u: RollingUpgrade) -> RollingUpgrade:
        return RollingUpgrade.from_dict(u.to_dict())

    # ----- repairs and zone balance ----------------------------------------------------------------------

    def repairs_service_state(self, name: str) -> str:
        """``Running`` or ``Suspended`` (after repeated failed repairs)."""
        return self._repairs.get(name, RepairState()).service_state

    def set_repairs_service_state(self, name: str, state: str) -> None:
        """Resumes (``Running``) or suspends (``Suspended``) automatic repairs of ``name``."""
        if state not in ("Running", "Suspended"):
            raise invalid_input(
                f"the automatic repairs service state must be Running or Suspended, not {state!r}.",
                field="state",
            )
        repair = self._repairs.setdefault(name, RepairState())
        repair.service_state = state
        repair.consecutive_failures = 0

    def zone_balance_operation(self, name: str) -> ZoneBalanceOperation | None:
        """The automatic zone balance operation in progress on ``name``, if any."""
        return self._zone_balance.get(name)

    # ----- autoscale ---------------------------------------------------------------------------------------

    def set_autoscale_setting(self, engine: Engine, name: str, setting: AutoscaleSetting) -> AutoscaleSetting:
        """Validates and stores ``name``'s autoscale setting (its cooldown and history carry over)."""
        engine.capacity(name)  # NotFound for an unknown scale set
        autoscale.validate(setting)
        previous = self._autoscale.get(name)
        state = AutoscaleState(setting)
        if previous is not None:
            state.cooldown_until, state.history, state.metric_names = (
                previous.cooldown_until,
                previous.history,
                previous.metric_names,
            )
            state.forecasts = previous.forecasts
        else:
            state.metric_names = self._loose_metrics.pop(name, set())
        self._autoscale[name] = state
        self.metrics.set_retention(name, autoscale.retention_s(setting))
        return setting

    def get_autoscale_setting(self, name: str) -> AutoscaleSetting | None:
        state = self._autoscale.get(name)
        return None if state is None else state.setting

    def delete_autoscale_setting(self, name: str) -> None:
        if self._autoscale.pop(name, None) is None:
            raise not_found(f"scale set '{name}' has no autoscale setting.", "AutoscaleSettingNotFound")
        self.metrics.clear_retention(name)

    def report_metrics(
        self,
        engine: Engine,
        name: str,
        series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    ) -> None:
        """Adds samples for ``name`` (per instance or per set; times in seconds): (metric, times, values)
        series, all of them or (a series refused) none."""
        engine.capacity(name)
        state = self._autoscale.get(name)
        known = state.metric_names if state is not None else self._loose_metrics.get(name, set())
        for metric, _, _ in series:
            if not isinstance(metric, str) or not metric or len(metric) > 256:
                raise invalid_input("metric_name must be 1 to 256 characters.", field="metric_name")
        new = {metric for metric, _, _ in series} - known
        if new and len(known) + len(new) > autoscale.MAX_METRICS:
            raise invalid_input(
                f"scale set '{name}' would report more than {autoscale.MAX_METRICS} distinct metrics; "
                "reuse a metric name or delete old ones by recreating the autoscale setting.",
                "TooManyMetrics",
                field="metric_name",
            )
        if state is None:
            known = self._loose_metrics.setdefault(name, set())
        for metric, times, values in series:
            self.metrics.add(name, metric, times, values)
            known.add(metric)
            if state is not None:
                autoscale.record_forecast_samples(
                    state, metric, list(times), list(values), engine.capacity(name)
                )

    def evaluate_autoscale(self, engine: Engine, name: str, now: float) -> AutoscaleDecision:
        """What autoscale would decide for ``name`` at ``now`` (a dry run)."""
        engine.capacity(name)
        state = self._autoscale.get(name)
        if state is None:
            raise not_found(f"scale set '{name}' has no autoscale setting.", "AutoscaleSettingNotFound")
        return autoscale.evaluate(engine, self.metrics, name, state, now)

    def autoscale_queries(self) -> dict[str, list[tuple[str, str]]]:
        """(metric name, PromQL query) pairs of every enabled setting's triggers that name a query."""
        out: dict[str, list[tuple[str, str]]] = {}
        for name, state in sorted(self._autoscale.items()):
            if not state.setting.enabled:
                continue
            pairs = {
                (r.metric_trigger.metric_name, r.metric_trigger.query)
                for p in state.setting.profiles
                for r in p.rules
                if r.metric_trigger.query
            }
            if pairs:
                out[name] = sorted(pairs)
        return out

    def autoscale_forecast(self, name: str, metric: str, at: float) -> float | None:
        """Predictive autoscale's forecast of the whole scale set's ``metric`` load at ``at`` (None without
        predictive autoscale or with under 7 days of history)."""
        state = self._autoscale.get(name)
        history = None if state is None else state.forecasts.get(metric)
        return (
            None
            if history is None or state is None
            else history.forecast(at, autoscale.local_zone(state.setting))
        )

    def autoscale_history(self, name: str) -> list[AutoscaleDecision]:
        """The recorded decisions of ``name`` (scales, skips, forecasts), oldest first."""
        state = self._autoscale.get(name)
        return [] if state is None else list(state.history)

    # ----- snapshots ------------------------------------------------------------------------------------------

    def _per_scale_set(
        self,
    ) -> Iterator[tuple[str, dict[str, Any], Callable[[Any], Any], Callable[[Any], Any]]]:
        """The state kept by scale set name, section by section: (key, the dict, to plain data, back)."""
        for key, attribute, encode, decode in _SECTIONS:
            yield key, getattr(self, attribute), encode, decode

    def export(self, *, without: Collection[str] = ()) -> dict[str, Any]:
        """Every policy's state as plain data, but for the scale sets named in ``without`` (a snapshot saves
        theirs with each scale set: :meth:`export_scale_set`)."""
        state: dict[str, Any] = {
            key: {n: encode(v) for n, v in items.items() if n not in without}
            for key, items, encode, _ in self._per_scale_set()
        }
        state["upgrade_pending"] = sorted(n for n in self._upgrade_pending if n not in without)
        state["metrics"] = self.metrics.export()
        state["lifecycle"] = self.lifecycle.export()
        return state

    @staticmethod
    def scale_sets_in(state: dict[str, Any]) -> set[str]:
        """The names whose per-scale-set state an :meth:`export` holds."""
        return {n for key, *_ in _SECTIONS for n in state.get(key, {})} | set(
            state.get("upgrade_pending", [])
        )

    def export_scale_set(self, name: str) -> dict[str, Any]:
        """The policies' state of one scale set as plain data (:meth:`restore_scale_set` puts it back)."""
        state = {key: encode(items[name]) for key, items, encode, _ in self._per_scale_set() if name in items}
        if name in self._upgrade_pending:
            state["upgrade_pending"] = True
        return state

    @classmethod
    def restore(cls, state: dict[str, Any]) -> PolicyRunner:
        """A runner with the state :meth:`export` saved."""
        runner = cls()
        for key, items, _, decode in runner._per_scale_set():
            items.update((n, decode(v)) for n, v in state.get(key, {}).items())
        runner._upgrade_pending = set(state.get("upgrade_pending", []))
        for n, a in runner._autoscale.items():
            runner.metrics.set_retention(n, autoscale.retention_s(a.setting))
        runner.metrics.restore(state.get("metrics", []))
        runner.lifecycle = Lifecycle.restore(state.get("lifecycle", {}))
        return runner

    def restore_scale_set(self, name: str, state: dict[str, Any]) -> None:
        """Puts back one scale set's policy state as :meth:`export_scale_set` saved it."""
        for key, items, _, decode in self._per_scale_set():
            if key in state:
                items[name] = decode(state[key])
        if state.get("upgrade_pending"):
            self._upgrade_pending.add(name)
        if (scaling := self._autoscale.get(name)) is not None:
            self.metrics.set_retention(name, autoscale.retention_s(scaling.setting))
