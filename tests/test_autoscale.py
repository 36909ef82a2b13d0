"""Autoscale (reference §9) through the public API, with time passed explicitly: every worked example of
§9.2-§9.4, profiles and time zones across a DST change, validation, and durability of the decisions."""

from __future__ import annotations

import dataclasses
import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scaleset import (
    AutoscaleCapacity,
    AutoscaleProfile,
    AutoscaleSetting,
    Controller,
    MetricTrigger,
    Recurrence,
    RecurrentSchedule,
    Region,
    ScaleAction,
    ScaleRule,
    TimeWindow,
)
from scaleset import commands as cmd
from scaleset.engine import MetricBuffer, compile_rules
from scaleset.errors import InvalidInputError, NotFoundError
from scaleset.policies.autoscale import MAX_METRICS
from scaleset.testing import autoscale_reference

from tests.conftest import zonal_spec

T0 = 1_800_000_000.0  # a Friday, 2027-01-15 08:00 UTC
MIN = 60.0


def rule(
    metric: str,
    operator: str,
    threshold: float,
    direction: str,
    value: int = 1,
    *,
    type: str = "ChangeCount",
    cooldown: str = "PT5M",
    statistic: str = "Average",
    per_instance: bool = False,
) -> ScaleRule:
    return ScaleRule(
        MetricTrigger(metric, operator, threshold, statistic=statistic, divide_per_instance=per_instance),
        ScaleAction(direction, type, value, cooldown),
    )


def setting(
    *rules: ScaleRule, minimum: int = 1, maximum: int = 20, default: int | None = None
) -> AutoscaleSetting:
    bounds = AutoscaleCapacity(minimum, maximum, minimum if default is None else default)
    return AutoscaleSetting([AutoscaleProfile("default", bounds, rules)])


def fleet(n: int, s: AutoscaleSetting) -> Controller:
    c = Controller(Region(zones=["1", "2", "3"]))
    c.create_scale_set(zonal_spec(), n, now=T0 - 3600)
    c.set_autoscale_setting("web", s, now=T0 - 3600)
    return c


def load(
    c: Controller, metric: str, per_instance: float, now: float, minutes: int = 5, total: bool = False
) -> None:
    """Every instance reports ``per_instance`` once a minute over the last ``minutes`` (or, with ``total``,
    one sample per minute for the whole scale set)."""
    n = 1 if total else c.capacity("web")
    samples = [(now - k * MIN - 1, per_instance) for k in range(minutes) for _ in range(n)]
    c.report_metrics("web", metric, samples, now=now)


def step(c: Controller, now: float) -> str:
    actions = [a for a in c.advance(now) if a.kind.startswith("Autoscale")]
    return actions[0].kind if actions else ""


# ----- §9.3: the flapping check, verbatim ------------------------------------------------------------


def test_threads_example_scales_out_then_skips_the_scale_in_that_would_flap() -> None:
    c = fleet(
        2,
        setting(
            rule("threads", "GreaterThanOrEqual", 600, "Increase"),
            rule("threads", "LessThanOrEqual", 600, "Decrease"),
        ),
    )
    load(c, "threads", 625, T0)
    assert step(c, T0) == "AutoscaleScaleOut" and c.capacity("web") == 3
    later = T0 + 10 * MIN
    load(c, "threads", 575, later)
    decision = c.evaluate_autoscale("web", later)
    assert decision.kind == "Skipped" and decision.capacity == 3
    assert any("862.5" in e for e in decision.explanation)  # 575 x 3 / 2
    assert step(c, later) == "AutoscaleSkipped" and c.capacity("web") == 3


def test_cpu_example_defers_at_60_and_scales_in_at_50() -> None:
    c = fleet(
        2,
        setting(
            rule("cpu", "GreaterThanOrEqual", 80, "Increase"), rule("cpu", "LessThanOrEqual", 60, "Decrease")
        ),
    )
    load(c, "cpu", 80, T0)
    assert step(c, T0) == "AutoscaleScaleOut" and c.capacity("web") == 3
    load(c, "cpu", 60, T0 + 10 * MIN)
    assert step(c, T0 + 10 * MIN) == "AutoscaleSkipped"  # 60 x 3 / 2 = 90 >= 80
    load(c, "cpu", 50, T0 + 20 * MIN)
    assert step(c, T0 + 20 * MIN) == "AutoscaleScaleIn" and c.capacity("web") == 2  # 75 < 80


def test_flapping_article_defers_the_scale_in_at_t1() -> None:
    c = fleet(1, setting(rule("cpu", "GreaterThan", 50, "Increase"), rule("cpu", "LessThan", 30, "Decrease")))
    load(c, "cpu", 56, T0)
    assert step(c, T0) == "AutoscaleScaleOut" and c.capacity("web") == 2
    load(c, "cpu", 28, T0 + 10 * MIN)  # the same total load over two instances
    assert step(c, T0 + 10 * MIN) == "AutoscaleSkipped" and c.capacity("web") == 2
    load(c, "cpu", 20, T0 + 20 * MIN)
    assert step(c, T0 + 20 * MIN) == "AutoscaleScaleIn" and c.capacity("web") == 1


def test_a_flapping_scale_in_is_lowered_to_a_count_that_does_not_flap() -> None:
    c = fleet(
        10, setting(rule("cpu", "GreaterThan", 80, "Increase"), rule("cpu", "LessThan", 50, "Decrease", 5))
    )
    load(c, "cpu", 40, T0)  # 40 x 10 / 5 = 80 (no flap at 5? 80 > 80 is false) -> 5 is fine
    assert c.evaluate_autoscale("web", T0).capacity == 5
    load(c, "cpu", 45, T0 + 10 * MIN)  # 45 x 10 / 5 = 90 flaps; 45 x 10 / 6 = 75 does not
    decision = c.evaluate_autoscale("web", T0 + 10 * MIN)
    assert decision.kind == "Scale" and decision.capacity == 6
    assert any("lowered to 6" in e for e in decision.explanation)


# ----- §9.2 and §9.4: conflicts, bounds, defaults, cooldown -----------------------------------------------


def test_queue_length_per_instance_example() -> None:
    c = fleet(
        2,
        setting(
            rule("queue", "GreaterThanOrEqual", 50, "Increase", per_instance=True),
            rule("queue", "LessThanOrEqual", 10, "Decrease", per_instance=True),
            minimum=2,
        ),
    )
    load(c, "queue", 50, T0, total=True)
    assert step(c, T0) == ""  # 25 per instance
    load(c, "queue", 100, T0 + 10 * MIN, total=True)
    assert step(c, T0 + 10 * MIN) == "AutoscaleScaleOut" and c.capacity("web") == 3
    load(c, "queue", 149, T0 + 20 * MIN, total=True)
    assert step(c, T0 + 20 * MIN) == ""  # the next scale-out is at 150 with three instances
    load(c, "queue", 30, T0 + 30 * MIN, total=True)
    assert step(c, T0 + 30 * MIN) == "AutoscaleScaleIn" and c.capacity("web") == 2  # 30 / 3 = 10


def test_any_scale_out_wins_and_scale_in_needs_every_rule() -> None:
    rules = [
        rule("cpu", "GreaterThan", 75, "Increase"),
        rule("memory", "GreaterThan", 75, "Increase"),
        rule("cpu", "LessThan", 30, "Decrease"),
        rule("memory", "LessThan", 50, "Decrease"),
    ]
    for cpu, memory, expected in [(76, 50, 6), (50, 76, 6), (25, 51, 5), (29, 49, 4)]:
        c = fleet(5, setting(*rules))
        load(c, "cpu", cpu, T0)
        load(c, "memory", memory, T0)
        assert c.evaluate_autoscale("web", T0).capacity == expected, (cpu, memory)


def test_the_largest_scale_out_and_the_smallest_scale_in_win() -> None:
    out = setting(
        rule("cpu", "GreaterThan", 50, "Increase", 3), rule("cpu", "GreaterThan", 50, "Increase", 5)
    )
    c = fleet(3, out)
    load(c, "cpu", 90, T0)
    assert c.evaluate_autoscale("web", T0).capacity == 8
    pct = setting(
        rule("cpu", "GreaterThan", 50, "Increase", 3),
        rule("cpu", "GreaterThan", 50, "Increase", 15, type="PercentChangeCount"),
        maximum=50,
    )
    c = fleet(30, pct)
    load(c, "cpu", 90, T0)
    assert c.evaluate_autoscale("web", T0).capacity == 35  # 15% of 30 (4.5, rounded up to 5) beats 3
    inward = setting(
        rule("cpu", "LessThan", 20, "Decrease", 50, type="PercentChangeCount"),
        rule("cpu", "LessThan", 20, "Decrease", 3),
    )
    c = fleet(10, inward)
    load(c, "cpu", 5, T0)
    assert c.evaluate_autoscale("web", T0).capacity == 7  # -50% -> 5 and -3 -> 7: as little as possible


def test_bounds_are_enforced_first() -> None:
    c = fleet(2, setting(rule("cpu", "GreaterThan", 50, "Increase"), minimum=2, maximum=2, default=2))
    load(c, "cpu", 99, T0)
    assert c.evaluate_autoscale("web", T0).kind == "NoAction"
    c = fleet(1, setting(minimum=3, maximum=6, default=3))
    assert step(c, T0) == "AutoscaleScaleOut" and c.capacity("web") == 3
    c.set_capacity("web", 8, now=T0 + MIN)  # a manual change outside the range
    assert step(c, T0 + 2 * MIN) == "AutoscaleScaleIn" and c.capacity("web") == 6


def test_missing_metrics_scale_out_to_the_default_never_in() -> None:
    c = fleet(
        1,
        setting(
            rule("cpu", "GreaterThan", 50, "Increase"), rule("cpu", "LessThan", 10, "Decrease"), default=4
        ),
    )
    assert step(c, T0) == "AutoscaleScaleOut" and c.capacity("web") == 4
    c.set_capacity("web", 6, now=T0 + MIN)
    decision = c.evaluate_autoscale("web", T0 + 2 * MIN)
    assert decision.kind == "NoAction" and decision.capacity == 6
    assert any("no samples" in e for e in decision.explanation)


def test_cooldown_of_the_most_recent_action_blocks_both_directions() -> None:
    """Reference §9.4: scale-out cooldown 60 minutes, scale-in cooldown 40 minutes."""
    c = fleet(
        2,
        setting(
            rule("cpu", "GreaterThan", 70, "Increase", cooldown="PT60M"),
            rule("cpu", "LessThan", 30, "Decrease", cooldown="PT40M"),
        ),
    )
    ten = T0 + 2 * 3600  # 10:00
    load(c, "cpu", 90, ten)
    assert step(c, ten) == "AutoscaleScaleOut"
    load(c, "cpu", 90, ten + 30 * MIN)
    assert step(c, ten + 30 * MIN) == "AutoscaleSkipped"  # the 60-minute cooldown
    load(c, "cpu", 10, ten + 3 * 3600)  # 13:00
    assert step(c, ten + 3 * 3600) == "AutoscaleScaleIn"
    load(c, "cpu", 90, ten + 3 * 3600 + 20 * MIN)  # 13:20: deferred by the scale-in's cooldown
    assert step(c, ten + 3 * 3600 + 20 * MIN) == "AutoscaleSkipped"
    load(c, "cpu", 90, ten + 3 * 3600 + 40 * MIN)  # 13:40
    assert step(c, ten + 3 * 3600 + 40 * MIN) == "AutoscaleScaleOut"


def test_repeated_skips_are_recorded_once() -> None:
    c = fleet(2, setting(rule("cpu", "GreaterThan", 70, "Increase", cooldown="PT60M")))
    load(c, "cpu", 90, T0)
    step(c, T0)
    kinds = [step(c, T0 + k * MIN) for k in range(1, 10) if not load(c, "cpu", 90, T0 + k * MIN)]
    assert kinds.count("AutoscaleSkipped") == 1
    assert [d.kind for d in c.autoscale_history("web")] == ["Scale", "Skipped"]


# ----- profiles and time zones --------------------------------------------------------------------------


def weekly(
    name: str, minimum: int, days: list[str], hour: int, tz: str = "W. Europe Standard Time"
) -> AutoscaleProfile:
    return AutoscaleProfile(
        name,
        AutoscaleCapacity(minimum, 10, minimum),
        (),
        recurrence=Recurrence(RecurrentSchedule(tz, days, [hour], [0])),
    )


def test_recurring_profiles_follow_local_time_across_a_dst_change() -> None:
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    s = AutoscaleSetting([weekly("day", 4, days, 8), weekly("night", 2, days, 20)])
    c = fleet(2, s)
    berlin = ZoneInfo("Europe/Berlin")
    # Summer time starts on Sunday 2027-03-28: 08:00 local is 07:00 UTC the day before, 06:00 UTC after.
    for day in (27, 28, 29):
        at = dt.datetime(2027, 3, day, 8, 0, tzinfo=berlin).timestamp()
        profile = c.policies.evaluate_autoscale(c.engine, "web", at - 1).profile
        assert profile == "night", day
        assert c.evaluate_autoscale("web", at).profile == "day", day
    assert (
        dt.datetime.fromtimestamp(dt.datetime(2027, 3, 29, 8, 0, tzinfo=berlin).timestamp(), dt.UTC).hour == 6
    )


def test_fixed_date_beats_recurrence_beats_default() -> None:
    s = AutoscaleSetting(
        [
            AutoscaleProfile("default", AutoscaleCapacity(2, 10, 2)),
            weekly("monday", 3, ["Monday"], 0, tz="UTC"),
            AutoscaleProfile(
                "launch",
                AutoscaleCapacity(8, 10, 8),
                fixed_date=TimeWindow("2027-01-18T09:00:00", "2027-01-18T18:00:00", "UTC"),
            ),
        ]
    )
    c = fleet(2, s)
    monday = dt.datetime(2027, 1, 18, tzinfo=dt.UTC).timestamp()
    assert step(c, monday + 60) == "AutoscaleScaleOut" and c.capacity("web") == 3  # Monday's minimum
    assert c.evaluate_autoscale("web", monday + 10 * 3600).profile == "launch"
    assert c.evaluate_autoscale("web", monday + 10 * 3600).capacity == 8


def test_back_on_the_default_profile_the_count_returns_to_its_range() -> None:
    s = AutoscaleSetting(
        [AutoscaleProfile("default", AutoscaleCapacity(2, 10, 2)), weekly("monday", 3, ["Monday"], 0, "UTC")]
    )
    c = fleet(12, dataclasses.replace(s, profiles=[s.profiles[0]]))
    c.set_autoscale_setting("web", s, now=T0)
    assert step(c, T0) == "AutoscaleScaleIn" and c.capacity("web") == 10


# ----- validation, interplay, durability -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (setting(rule("cpu", "Above", 1, "Increase")), "profiles[0].rules.metric_trigger.operator"),
        (
            setting(
                dataclasses.replace(
                    rule("cpu", "GreaterThan", 1, "Increase"),
                    metric_trigger=MetricTrigger("cpu", "GreaterThan", 1, time_grain="PT30S"),
                )
            ),
            "profiles[0].rules[0].metric_trigger.time_grain",
        ),
        (
            setting(rule("cpu", "GreaterThan", 1, "Increase", cooldown="P8D")),
            "profiles[0].rules[0].scale_action.cooldown",
        ),
        (setting(minimum=5, maximum=3, default=4), "profiles[0].capacity"),
        (AutoscaleSetting([]), "profiles"),
        (AutoscaleSetting([weekly("x", 1, ["Funday"], 1)]), "profiles[0].recurrence.schedule.days"),
        (AutoscaleSetting([weekly("x", 1, ["Monday"], 1, tz="Mars/Olympus")]), "time_zone"),
    ],
)
def test_invalid_settings_name_their_field(bad: AutoscaleSetting, field: str) -> None:
    c = fleet(1, setting())
    with pytest.raises(InvalidInputError) as caught:
        c.set_autoscale_setting("web", bad)
    assert caught.value.field == field


def test_a_rolling_upgrade_defers_scaling_and_protection_is_respected() -> None:
    from scaleset import RollingUpgradePolicy, Sku, UpgradePolicy

    c = Controller(Region(zones=["1"]))
    spec = dataclasses.replace(
        zonal_spec(zones=["1"]), upgrade_policy=UpgradePolicy("Rolling", RollingUpgradePolicy())
    )
    c.create_scale_set(spec, 5, now=T0 - 3600)
    c.report_health("web", range(5), "Healthy", now=T0 - 3600)
    c.set_autoscale_setting(
        "web", setting(rule("cpu", "LessThan", 30, "Decrease", 4), minimum=1), now=T0 - 3600
    )
    c.update_scale_set(dataclasses.replace(c.get_spec("web"), sku=Sku(name="Standard_D4s_v5")), now=T0 - 60)
    load(c, "cpu", 5, T0)
    assert step(c, T0) == "AutoscaleSkipped" and c.capacity("web") == 5  # the upgrade's first batch runs
    assert "rolling upgrade" in c.autoscale_history("web")[-1].reason
    c.cancel_rolling_upgrade("web", now=T0 + 1)
    c.set_protection("web", [0, 1, 2, 3], protect_from_scale_in=True, now=T0 + 2)
    load(c, "cpu", 5, T0 + 10 * MIN)
    assert step(c, T0 + 10 * MIN) == "AutoscaleScaleIn"
    assert c.capacity("web") == 4 and {i.instance_id for i in c.get_scale_set("web").instances} == {
        0,
        1,
        2,
        3,
    }


def test_settings_cooldowns_history_and_metrics_survive_export_and_restore() -> None:
    c = fleet(2, setting(rule("cpu", "GreaterThan", 70, "Increase", cooldown="PT60M")))
    load(c, "cpu", 90, T0)
    step(c, T0)
    copy = Controller.from_state(c.export_state())
    assert copy.get_autoscale_setting("web") == c.get_autoscale_setting("web")
    assert copy.autoscale_history("web") == c.autoscale_history("web")
    assert copy.evaluate_autoscale("web", T0 + MIN) == c.evaluate_autoscale(
        "web", T0 + MIN
    )  # metrics and cooldown


def test_unknown_scale_sets_and_settings() -> None:
    c = fleet(1, setting())
    with pytest.raises(NotFoundError):
        c.report_metrics("nope", "cpu", [(T0, 1.0)])
    c.delete_autoscale_setting("web")
    with pytest.raises(NotFoundError) as caught:
        c.evaluate_autoscale("web", T0)
    assert caught.value.code == "AutoscaleSettingNotFound"
    with pytest.raises(InvalidInputError) as bad:
        c.report_metrics("web", "cpu", [(T0, float("nan"))])
    assert bad.value.field == "samples.value"


@pytest.mark.parametrize(
    ("bad", "field"),
    [(("", (T0,), (1.0,)), "metric_name"), (("mem", (T0,), (float("inf"),)), "samples.value")],
)
def test_a_report_with_one_bad_series_stores_none_of_them(bad: tuple[object, ...], field: str) -> None:
    c = fleet(2, setting())
    before = c.export_state()
    with pytest.raises(InvalidInputError) as caught:
        c.execute(cmd.ReportMetrics("web", (("cpu", (T0,), (50.0,)), bad)))  # type: ignore[arg-type]
    assert caught.value.field == field
    assert c.export_state() == before


def test_a_report_that_would_pass_the_distinct_metrics_limit_stores_nothing() -> None:
    c = fleet(2, setting())
    for i in range(MAX_METRICS - 2):  # two more names reach the limit, three pass it
        c.report_metrics("web", f"m{i}", [(T0, 1.0)])
    before = c.export_state()
    series = (("cpu", (T0,), (50.0,)), ("new1", (T0,), (1.0,)), ("new2", (T0,), (1.0,)))
    with pytest.raises(InvalidInputError) as caught:
        c.execute(cmd.ReportMetrics("web", series))
    assert caught.value.code == "TooManyMetrics" and c.export_state() == before
    c.execute(cmd.ReportMetrics("web", series[:2]))  # up to the limit; then known names only
    c.report_metrics("web", "cpu", [(T0 + 60, 60.0)])
    with pytest.raises(InvalidInputError):
        c.report_metrics("web", "new2", [(T0, 1.0)])


def test_the_distinct_metrics_limit_of_a_scale_set_without_a_setting_holds_across_a_restart() -> None:
    """The metric names pushed for a scale set with no autoscale setting are part of its saved state
    (they were not: after a restart the limit counted from zero, and a setting set later started with
    other names than the server that logged it had)."""
    c = Controller(Region(zones=["1", "2", "3"]))
    c.create_scale_set(zonal_spec(), 2, now=T0)
    for i in range(MAX_METRICS):
        c.report_metrics("web", f"m{i}", [(T0, 1.0)])
    again = Controller.from_state(c.export_state())
    assert again.export_state() == c.export_state()
    with pytest.raises(InvalidInputError) as caught:
        again.report_metrics("web", "one more", [(T0, 1.0)])
    assert caught.value.code == "TooManyMetrics"


def restarted(c: Controller) -> Controller:
    """``c`` as a restart rebuilds it from a snapshot in parts: the document, then each scale set's part
    (which holds its autoscale setting)."""
    again = Controller.from_state(c.export_state(scale_sets=False))
    for name in c.scale_set_names():
        again.restore_scale_set(c.export_scale_set(name))
    return again


def test_a_restart_keeps_the_metric_history_a_long_window_needs() -> None:
    """A 12-hour window keeps 12 hours of samples, and a restart keeps them all (it restored them before
    the scale set's part said how much to keep, and dropped what the default hour did not cover)."""
    rule = ScaleRule(MetricTrigger("cpu", "GreaterThan", 70, time_window="PT12H"), ScaleAction("Increase"))
    c = fleet(2, setting(rule))
    for minutes in range(0, 180, 10):
        c.report_metrics("web", "cpu", [(T0 + 60 * minutes, 50.0)])
    assert [len(times) for _, _, times, _ in c.export_state()["policies"]["metrics"]] == [18]
    assert restarted(c).export_state() == c.export_state()


def test_a_deleted_setting_leaves_the_default_history_as_a_restart_does() -> None:
    """Without its setting a scale set keeps the default hour of samples again, as a restart (which knows
    only the settings there are) does; it kept the deleted setting's 5-minute window until a restart."""
    c = fleet(2, setting(ScaleRule(MetricTrigger("cpu", "GreaterThan", 70), ScaleAction("Increase"))))
    c.report_metrics("web", "cpu", [(T0, 50.0)])
    c.delete_autoscale_setting("web", now=T0)
    c.report_metrics("web", "cpu", [(T0 + 1200, 50.0)])
    assert [times for _, _, times, _ in c.export_state()["policies"]["metrics"]] == [
        [int(T0 * 1000), int((T0 + 1200) * 1000)]
    ]
    again = restarted(c)
    for each in (c, again):
        each.report_metrics("web", "cpu", [(T0 + 1800, 50.0)])
    assert again.export_state() == c.export_state()


def test_a_deleted_scale_set_leaves_no_metrics_behind() -> None:
    """Its samples and metric names go with it (they stayed for good: memory and snapshots grew with every
    scale set deleted, and one created again under the name inherited them); its setting stays."""
    c = fleet(2, setting())
    c.report_metrics("web", "cpu", [(T0, 90.0)])
    c.create_scale_set(dataclasses.replace(zonal_spec(), name="api"), 1, now=T0)
    c.report_metrics("api", "queue", [(T0, 5.0)])
    c.delete_scale_set("web", now=T0)
    c.delete_scale_set("api", now=T0)
    policies = c.export_state()["policies"]
    assert policies["metrics"] == [] and policies["loose_metrics"] == {}
    assert list(policies["autoscale"]) == ["web"]


# ----- the Rust evaluator against the plain-Python rules ---------------------------------------------------

OPERATORS = ["Equals", "NotEquals", "GreaterThan", "GreaterThanOrEqual", "LessThan", "LessThanOrEqual"]
rules_strategy = st.lists(
    st.builds(
        lambda metric, op, threshold, stat, agg, per, direction, kind, value: ScaleRule(
            MetricTrigger(
                metric, op, float(threshold), statistic=stat, time_aggregation=agg, divide_per_instance=per
            ),
            ScaleAction(direction, kind, value),
        ),
        st.sampled_from(["cpu", "queue"]),
        st.sampled_from(OPERATORS),
        st.integers(0, 100),
        st.sampled_from(["Average", "Min", "Max", "Sum", "Count"]),
        st.sampled_from(["Average", "Minimum", "Maximum", "Total", "Count", "Last"]),
        st.booleans(),
        st.sampled_from(["Increase", "Decrease"]),
        st.sampled_from(["ChangeCount", "PercentChangeCount", "ExactCount"]),
        st.integers(1, 60),
    ),
    min_size=1,
    max_size=4,
)
samples_strategy = st.lists(st.tuples(st.integers(0, 400), st.integers(0, 100)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    rules=rules_strategy,
    cpu=samples_strategy,
    queue=samples_strategy,
    capacity=st.integers(0, 30),
    bounds=st.tuples(st.integers(0, 10), st.integers(0, 10), st.integers(0, 40)),
    cooling=st.booleans(),
)
def test_the_core_decides_as_the_reference_rules(
    rules: list[ScaleRule],
    cpu: list[tuple[int, int]],
    queue: list[tuple[int, int]],
    capacity: int,
    bounds: tuple[int, int, int],
    cooling: bool,
) -> None:
    minimum, extra_default, extra_max = bounds
    capacity_bounds = AutoscaleCapacity(minimum, minimum + extra_default + extra_max, minimum + extra_default)
    now = T0 + 300
    data = {m: [(T0 + t, float(v)) for t, v in series] for m, series in (("cpu", cpu), ("queue", queue))}
    buffer = MetricBuffer()
    for metric, series in data.items():
        buffer.add("s", metric, [t for t, _ in series], [v for _, v in series])
    cooldown = now + 60 if cooling else None
    got = buffer.evaluate("s", compile_rules(rules), capacity, capacity_bounds, now, cooldown)
    expected = autoscale_reference.decide(rules, data, capacity, capacity_bounds, now, cooldown)
    assert (got["kind"], got["capacity"]) == expected
