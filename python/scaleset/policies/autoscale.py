"""Autoscale (reference §9): Azure Monitor autoscale settings applied to a scale set.

One setting per scale set holds up to 20 profiles; the one that applies now is a fixed-date profile whose
period contains now, else the recurring profile that started last (it lasts until the next one starts),
else the default profile (neither). Its bounds and rules go to the core, which aggregates the pushed
metrics and decides: bounds first, any scale-out rule wins (the largest result), scale-in only if every
scale-in rule fires (the smallest change), the flapping check on each scale-in, the cooldown of the last
action, and the default capacity when a metric has no samples. Predictive autoscale adds a scale-out ahead
of forecast demand (:mod:`scaleset.policies.forecast`).

Time zones are Windows names (as Azure's autoscale settings write them, mapped to IANA zones by tzlocal's
table, generated from Unicode CLDR) or IANA names; local times follow the zone's DST rules.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math
from collections import deque
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tzlocal.windows_tz import win_tz

from scaleset.engine import Engine, MetricBuffer, compile_rules, duration_seconds
from scaleset.errors import ScaleSetError, invalid_input
from scaleset.model import AutoscaleDecision, AutoscaleProfile, AutoscaleSetting, ScaleRule
from scaleset.policies.common import Action
from scaleset.policies.forecast import SeasonalHistory

__all__ = [
    "HISTORY",
    "MAX_METRICS",
    "AutoscaleState",
    "active_profile",
    "evaluate",
    "retention_s",
    "step",
    "validate",
]

MAX_PROFILES = 20
MAX_RULES = 10
#: Decisions kept per scale set for `autoscale history`.
HISTORY = 200
#: Distinct metric names one scale set may push (each is a bounded series).
MAX_METRICS = 100
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MINUTE, _HOUR, _WEEK = 60.0, 3600.0, 7 * 86_400.0


@functools.cache
def zone(name: str) -> ZoneInfo:
    """The zone a Windows ("W. Europe Standard Time") or IANA ("Europe/Berlin") name denotes."""
    try:
        return ZoneInfo(win_tz.get(name, name))
    except (ZoneInfoNotFoundError, ValueError):
        raise invalid_input(
            f"time zone {name!r} is not a Windows or IANA time zone name (e.g. 'W. Europe Standard Time', 'UTC').",
            field="time_zone",
        ) from None


def _local(text: str, tz: ZoneInfo, field: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise invalid_input(f"{field} must be an ISO 8601 date-time, got {text!r}.", field=field) from None
    return value.replace(tzinfo=tz) if value.tzinfo is None else value


def _within(seconds: float, low: float, high: float, field: str, text: str) -> None:
    if not low <= seconds <= high:
        raise invalid_input(f"{field} {text} is out of range ({low:g} s to {high:g} s).", field=field)


def validate(setting: AutoscaleSetting) -> None:
    """Azure's limits and ranges, each violation an InvalidParameter naming its field."""
    if not isinstance(setting, AutoscaleSetting):
        raise invalid_input("autoscale_setting must be an AutoscaleSetting.", field="autoscale_setting")
    if not 1 <= len(setting.profiles) <= MAX_PROFILES:
        raise invalid_input(
            f"an autoscale setting has 1 to {MAX_PROFILES} profiles, not {len(setting.profiles)}.",
            field="profiles",
        )
    names = [p.name for p in setting.profiles]
    if len(set(names)) != len(names) or not all(names):
        raise invalid_input(
            f"profile names must be non-empty and unique, got {names}.", field="profiles.name"
        )
    defaults = [p.name for p in setting.profiles if p.fixed_date is None and p.recurrence is None]
    if len(defaults) > 1:
        raise invalid_input(
            f"only one default profile (no fixed date, no recurrence) is allowed: {defaults}.",
            field="profiles",
        )
    for k, profile in enumerate(setting.profiles):
        _validate_profile(profile, f"profiles[{k}]")
    policy = setting.predictive_autoscale_policy
    if policy is not None:
        if policy.scale_mode not in ("Disabled", "ForecastOnly", "Enabled"):
            raise invalid_input(
                f"scale_mode must be Disabled, ForecastOnly or Enabled, not {policy.scale_mode!r}.",
                field="predictive_autoscale_policy.scale_mode",
            )
        if policy.scale_mode != "Disabled":
            field = "predictive_autoscale_policy.scale_look_ahead_time"
            text = policy.scale_look_ahead_time or "PT0M"
            _within(duration_seconds(text, field), 5 * _MINUTE, 60 * _MINUTE, field, text)
            if not any(r.scale_action.direction == "Increase" for p in setting.profiles for r in p.rules):
                raise invalid_input(
                    "predictive autoscale needs a scale-out rule first (it forecasts the metric a scale-out rule watches).",
                    field="predictive_autoscale_policy",
                )


def _validate_profile(profile: AutoscaleProfile, at: str) -> None:
    c = profile.capacity
    if not c.minimum <= c.default <= c.maximum:
        raise invalid_input(
            f"{at}.capacity must have minimum <= default <= maximum, got {c.minimum}, {c.default}, {c.maximum}.",
            field=f"{at}.capacity",
        )
    if len(profile.rules) > MAX_RULES:
        raise invalid_input(
            f"a profile has at most {MAX_RULES} rules, not {len(profile.rules)}.", field=f"{at}.rules"
        )
    for k, rule in enumerate(profile.rules):
        t, a, where = rule.metric_trigger, rule.scale_action, f"{at}.rules[{k}]"
        if not t.metric_name:
            raise invalid_input("metric_name is required.", field=f"{where}.metric_trigger.metric_name")
        grain = duration_seconds(t.time_grain, f"{where}.metric_trigger.time_grain")
        _within(grain, _MINUTE, 12 * _HOUR, f"{where}.metric_trigger.time_grain", t.time_grain)
        window = duration_seconds(t.time_window, f"{where}.metric_trigger.time_window")
        _within(window, 5 * _MINUTE, 12 * _HOUR, f"{where}.metric_trigger.time_window", t.time_window)
        if window < grain:
            raise invalid_input(
                f"time_window {t.time_window} is shorter than time_grain {t.time_grain}.",
                field=f"{where}.metric_trigger.time_window",
            )
        cooldown = duration_seconds(a.cooldown, f"{where}.scale_action.cooldown")
        _within(cooldown, _MINUTE, _WEEK, f"{where}.scale_action.cooldown", a.cooldown)
        if not math.isfinite(t.threshold):
            raise invalid_input(
                "threshold must be a finite number.", field=f"{where}.metric_trigger.threshold"
            )
    try:
        compile_rules(profile.rules)  # the core checks every enum value
    except ScaleSetError as e:
        e.field = f"{at}.rules.{e.field}" if e.field else f"{at}.rules"
        raise
    if profile.fixed_date is not None:
        w, field = profile.fixed_date, f"{at}.fixed_date"
        tz = zone(w.time_zone)
        start, end = _local(w.start, tz, f"{field}.start"), _local(w.end, tz, f"{field}.end")
        if not start < end or end - start > dt.timedelta(days=365):
            raise invalid_input(f"{field} must end after it starts, at most 365 days later.", field=field)
    if profile.recurrence is not None:
        r, field = profile.recurrence, f"{at}.recurrence"
        if r.frequency != "Week":
            raise invalid_input(
                f"recurrence frequency must be Week, not {r.frequency!r}.", field=f"{field}.frequency"
            )
        s = r.schedule
        zone(s.time_zone)
        if not s.days or any(d not in DAYS for d in s.days):
            raise invalid_input(
                f"days must be some of {list(DAYS)}, got {list(s.days)}.", field=f"{field}.schedule.days"
            )
        if not s.hours or any(not 0 <= h <= 23 for h in s.hours):
            raise invalid_input(f"hours must be 0-23, got {list(s.hours)}.", field=f"{field}.schedule.hours")
        if not s.minutes or any(not 0 <= m <= 59 for m in s.minutes):
            raise invalid_input(
                f"minutes must be 0-59, got {list(s.minutes)}.", field=f"{field}.schedule.minutes"
            )


def local_zone(setting: AutoscaleSetting) -> ZoneInfo:
    """The setting's time zone: its first scheduled profile's (UTC without one). Predictive autoscale's
    daily pattern follows it, so the forecast stays at the same local hour across DST changes."""
    for p in setting.profiles:
        if p.recurrence is not None:
            return zone(p.recurrence.schedule.time_zone)
        if p.fixed_date is not None:
            return zone(p.fixed_date.time_zone)
    return zone("UTC")


def retention_s(setting: AutoscaleSetting) -> float:
    """How much metric history the setting's rules look at (their largest window plus a grain)."""
    spans = [
        duration_seconds(r.metric_trigger.time_window) + duration_seconds(r.metric_trigger.time_grain)
        for p in setting.profiles
        for r in p.rules
    ]
    return max(spans, default=3600.0)


# ----- which profile applies --------------------------------------------------------------------------


def _last_start(profile: AutoscaleProfile, now: float) -> float | None:
    """When the recurring profile last started, at or before ``now`` (within the past week)."""
    assert profile.recurrence is not None
    s = profile.recurrence.schedule
    tz = zone(s.time_zone)
    local = dt.datetime.fromtimestamp(now, tz)
    best: float | None = None
    for back in range(8):
        day = (local - dt.timedelta(days=back)).date()
        if DAYS[day.weekday()] not in s.days:
            continue
        for h in s.hours:
            for m in s.minutes:
                start = dt.datetime(day.year, day.month, day.day, h, m, tzinfo=tz).timestamp()
                if start <= now and (best is None or start > best):
                    best = start
    return best


def active_profile(setting: AutoscaleSetting, now: float) -> tuple[AutoscaleProfile | None, str]:
    """The profile that applies at ``now`` and why: fixed date, then recurrence, then default."""
    for p in setting.profiles:
        if p.fixed_date is not None:
            tz = zone(p.fixed_date.time_zone)
            start = _local(p.fixed_date.start, tz, "fixed_date.start").timestamp()
            end = _local(p.fixed_date.end, tz, "fixed_date.end").timestamp()
            if start <= now < end:
                return p, f"fixed date {p.fixed_date.start} - {p.fixed_date.end} ({p.fixed_date.time_zone})"
    started = [
        (t, p) for p in setting.profiles if p.recurrence is not None if (t := _last_start(p, now)) is not None
    ]
    if started:
        t, p = max(started, key=lambda tp: tp[0])
        assert p.recurrence is not None
        local = dt.datetime.fromtimestamp(t, zone(p.recurrence.schedule.time_zone))
        return p, f"recurring, started {local.isoformat()}"
    for p in setting.profiles:
        if p.fixed_date is None and p.recurrence is None:
            return p, "default"
    return None, "no profile applies"


# ----- state and evaluation ----------------------------------------------------------------------------


@dataclasses.dataclass
class AutoscaleState:
    """One scale set's autoscale: its setting, the cooldown, recent decisions and forecast history."""

    setting: AutoscaleSetting
    cooldown_until: float | None = None
    history: deque[AutoscaleDecision] = dataclasses.field(default_factory=lambda: deque(maxlen=HISTORY))
    forecasts: dict[str, SeasonalHistory] = dataclasses.field(default_factory=dict)
    metric_names: set[str] = dataclasses.field(default_factory=set)
    _compiled: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def rules(self, profile: AutoscaleProfile) -> Any:
        if profile.name not in self._compiled:
            self._compiled[profile.name] = compile_rules(profile.rules)
        return self._compiled[profile.name]

    @property
    def predictive(self) -> str:
        p = self.setting.predictive_autoscale_policy
        return "Disabled" if p is None else p.scale_mode

    def to_dict(self) -> dict[str, Any]:
        return {
            "setting": self.setting.to_dict(),
            "cooldown_until": self.cooldown_until,
            "history": [dataclasses.asdict(d) for d in self.history],
            "forecasts": {m: h.to_dict() for m, h in self.forecasts.items()},
            "metric_names": sorted(self.metric_names),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoscaleState:
        state = cls(AutoscaleSetting.from_dict(data["setting"]), data.get("cooldown_until"))
        state.history.extend(AutoscaleDecision(**d) for d in data.get("history", []))
        state.forecasts = {m: SeasonalHistory.from_dict(h) for m, h in data.get("forecasts", {}).items()}
        state.metric_names = set(data.get("metric_names", []))
        return state


def evaluate(
    engine: Engine, metrics: MetricBuffer, name: str, state: AutoscaleState, now: float
) -> AutoscaleDecision:
    """What autoscale would do for ``name`` at ``now`` (changes nothing)."""
    capacity = engine.capacity(name)
    base = AutoscaleDecision(name, now, "NoAction", capacity, capacity)
    if not state.setting.enabled:
        return dataclasses.replace(base, kind="Disabled", explanation=("the autoscale setting is disabled",))
    profile, why = active_profile(state.setting, now)
    if profile is None:
        return dataclasses.replace(base, kind="NoProfile", explanation=(why,))
    raw = metrics.evaluate(name, state.rules(profile), capacity, profile.capacity, now, state.cooldown_until)
    values = {
        _label(k, r): v for k, (r, v) in enumerate(zip(profile.rules, raw["metric_values"], strict=True))
    }
    decision = AutoscaleDecision(
        name,
        now,
        raw["kind"],
        capacity,
        raw["capacity"],
        profile.name,
        raw["rule"],
        values,
        None,
        (f"profile {profile.name} ({why})", *raw["explanation"]),
    )
    if state.predictive != "Disabled":
        decision = _predict(decision, profile, state, capacity, now)
    return decision


def _label(k: int, rule: ScaleRule) -> str:
    return f"{k + 1}:{rule.metric_trigger.metric_name}"


def _predict(
    decision: AutoscaleDecision, profile: AutoscaleProfile, state: AutoscaleState, capacity: int, now: float
) -> AutoscaleDecision:
    """Adds predictive scale-out: the count the forecast metric needs ``scale_look_ahead_time`` from now."""
    policy = state.setting.predictive_autoscale_policy
    assert policy is not None and policy.scale_look_ahead_time is not None
    ahead = duration_seconds(policy.scale_look_ahead_time)
    best: tuple[int, float, int] | None = None
    for k, rule in enumerate(profile.rules):
        t = rule.metric_trigger
        history = state.forecasts.get(t.metric_name)
        if rule.scale_action.direction != "Increase" or history is None or t.threshold <= 0:
            continue
        # The whole scale set's load (see record_forecast_samples), by the setting's local time.
        total = history.forecast(now + ahead, local_zone(state.setting))
        if total is None:
            continue
        # Enough instances that the forecast load per instance stays at or below the threshold.
        need = min(profile.capacity.maximum, math.ceil(total / t.threshold))
        if best is None or need > best[0]:
            best = (need, total / max(capacity, 1), k)
    if best is None:
        return decision
    need, expected, k = best
    metric = profile.rules[k].metric_trigger.metric_name
    note = (
        f"forecast {metric} in {policy.scale_look_ahead_time}: {expected:.2f} per instance at today's {capacity}; "
        f"{need} instances keep it at the threshold"
    )
    if policy.scale_mode == "ForecastOnly":
        if need <= capacity:
            return decision
        return dataclasses.replace(
            decision, forecast=expected, explanation=(*decision.explanation, note + ": forecast only")
        )
    if decision.kind == "Scale" and decision.capacity < decision.capacity_before and decision.capacity < need:
        # The forecast is the floor: no scale-in below what the coming load needs.
        floor = min(need, decision.capacity_before)
        kind = "Scale" if floor < decision.capacity_before else "NoAction"
        decision = dataclasses.replace(
            decision,
            kind=kind,
            capacity=floor,
            forecast=expected,
            explanation=(*decision.explanation, note + f": scale-in held at {floor}"),
        )
    if need <= capacity or (decision.kind == "Scale" and decision.capacity >= need):
        return decision
    if state.cooldown_until is not None and now < state.cooldown_until:
        return dataclasses.replace(
            decision,
            kind="Skipped",
            forecast=expected,
            explanation=(*decision.explanation, note + ": deferred by the cooldown"),
        )
    return dataclasses.replace(
        decision,
        kind="PredictiveScaleOut",
        capacity=need,
        rule=k,
        forecast=expected,
        explanation=(*decision.explanation, note + ": scaling out ahead of it"),
    )


def step(
    engine: Engine, metrics: MetricBuffer, name: str, state: AutoscaleState, now: float, busy: str | None
) -> tuple[AutoscaleDecision, list[Action]]:
    """Evaluates ``name`` at ``now`` and carries a scale decision out through the engine's scale-out and
    scale-in rules. ``busy`` (a rolling upgrade in progress) defers scaling. Returns the decision and what
    was done; scales, skips and forecasts are recorded in the history (a skip repeating the last one once)."""
    decision = evaluate(engine, metrics, name, state, now)
    if decision.kind in ("Scale", "PredictiveScaleOut") and busy is not None:
        decision = dataclasses.replace(
            decision,
            kind="Skipped",
            capacity=decision.capacity_before,
            explanation=(*decision.explanation, f"deferred: {busy}"),
        )
    if decision.kind == "Scale" and decision.capacity < decision.capacity_before:
        decision = _respect_protection(engine, name, decision)
    if decision.kind in ("Scale", "PredictiveScaleOut") and decision.capacity != decision.capacity_before:
        try:
            plan = engine.set_capacity(name, decision.capacity)
        except ScaleSetError as e:
            # Capacity, quota or protection: record why, and try again at the next evaluation.
            decision = dataclasses.replace(
                decision,
                kind="Skipped",
                capacity=decision.capacity_before,
                explanation=(*decision.explanation, f"the scale failed: {e.code}: {e}"),
            )
        else:
            profile = next(p for p in state.setting.profiles if p.name == decision.profile)
            if decision.rule is not None:  # bounds and the default capacity start no cooldown
                state.cooldown_until = now + duration_seconds(
                    profile.rules[decision.rule].scale_action.cooldown
                )
            ids = tuple(c.instance_id for c in plan.creates) + tuple(d.instance_id for d in plan.deletes)
            kind = "AutoscaleScaleOut" if decision.capacity > decision.capacity_before else "AutoscaleScaleIn"
            state.history.append(decision)
            return decision, [Action(name, kind, ids, decision.reason)]
    if (decision.kind == "Skipped" or decision.forecast is not None) and not _repeats(state, decision):
        state.history.append(decision)
        kind = "AutoscaleSkipped" if decision.kind == "Skipped" else "AutoscaleForecast"
        return decision, [Action(name, kind, (), decision.reason)]
    return decision, []


def _respect_protection(engine: Engine, name: str, decision: AutoscaleDecision) -> AutoscaleDecision:
    """A scale-in removes only instances not protected from scale-in: it stops at the protected count."""
    cols = engine.instance_columns(name)
    protected = sum(
        a or b
        for a, b in zip(cols["protect_from_scale_in"], cols["protect_from_scale_set_actions"], strict=True)
    )
    if decision.capacity >= protected:
        return decision
    note = f"{protected} instances are protected from scale-in"
    if protected >= decision.capacity_before:
        return dataclasses.replace(
            decision,
            kind="Skipped",
            capacity=decision.capacity_before,
            explanation=(*decision.explanation, f"{note}: nothing can be removed"),
        )
    return dataclasses.replace(
        decision,
        capacity=protected,
        explanation=(*decision.explanation, f"{note}: scale in stops at {protected}"),
    )


def _repeats(state: AutoscaleState, decision: AutoscaleDecision) -> bool:
    """Whether ``decision`` says again what the last recorded one said (a cooldown or flapping check
    that holds for many evaluations is recorded and published once)."""
    last = state.history[-1] if state.history else None
    return last is not None and (last.kind, last.capacity_before, last.capacity, last.rule, last.profile) == (
        decision.kind,
        decision.capacity_before,
        decision.capacity,
        decision.rule,
        decision.profile,
    )


def record_forecast_samples(
    state: AutoscaleState, metric: str, times: list[float], values: list[float], capacity: int
) -> None:
    """Feeds predictive autoscale's history with the load behind a metric a scale-out rule watches: the
    whole scale set's, so that a forecast does not depend on how many instances carried it (a per-instance
    average is multiplied by the instance count; a total divided per instance is kept as it is)."""
    if state.predictive == "Disabled":
        return
    for p in state.setting.profiles:
        for r in p.rules:
            t = r.metric_trigger
            if t.metric_name == metric and r.scale_action.direction == "Increase":
                scale = 1.0 if t.divide_per_instance else float(max(capacity, 1))
                state.forecasts.setdefault(metric, SeasonalHistory()).add(times, [v * scale for v in values])
                return
