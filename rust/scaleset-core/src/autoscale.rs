//! Autoscale (reference §9): a bounded time-series buffer of pushed metrics, the aggregation a metric
//! trigger asks for (statistic per time grain, then a time aggregation over the window), and Azure
//! Monitor's decision rules: bounds first, any scale-out rule wins (the largest result), scale-in only
//! when every scale-in rule fires (the smallest change), the flapping check on every scale-in, and the
//! cooldown of the last action.
//!
//! Time is milliseconds since the epoch, always passed in. Which profile applies (schedules, time zones)
//! is decided above the core; the core gets the chosen profile's bounds and rules.

use std::collections::{BTreeMap, VecDeque};

use crate::error::{codes, CoreError, Result};

macro_rules! names {
    ($name:ident, $field:literal, { $($variant:ident = $text:literal),+ $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub fn parse(text: &str) -> Result<Self> {
                $(if text.eq_ignore_ascii_case($text) { return Ok($name::$variant); })+
                let allowed: Vec<&str> = vec![$($text),+];
                Err(CoreError::invalid(
                    codes::INVALID_PARAMETER,
                    format!("{} '{}' is not valid; use one of: {}.", $field, text, allowed.join(", ")),
                ).at($field))
            }

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }
    };
}

names!(Statistic, "metric_trigger.statistic",
    { Average = "Average", Min = "Min", Max = "Max", Sum = "Sum", Count = "Count" });
names!(TimeAggregation, "metric_trigger.time_aggregation",
    { Average = "Average", Minimum = "Minimum", Maximum = "Maximum", Total = "Total", Count = "Count", Last = "Last" });
names!(Operator, "metric_trigger.operator", {
    Equals = "Equals", NotEquals = "NotEquals", GreaterThan = "GreaterThan",
    GreaterThanOrEqual = "GreaterThanOrEqual", LessThan = "LessThan", LessThanOrEqual = "LessThanOrEqual",
});
names!(Direction, "scale_action.direction", { None = "None", Increase = "Increase", Decrease = "Decrease" });
names!(ScaleType, "scale_action.type", {
    ChangeCount = "ChangeCount", PercentChangeCount = "PercentChangeCount", ExactCount = "ExactCount",
    ServiceAllowedNextValue = "ServiceAllowedNextValue",
});

impl Operator {
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Operator::Equals => value == threshold,
            Operator::NotEquals => value != threshold,
            Operator::GreaterThan => value > threshold,
            Operator::GreaterThanOrEqual => value >= threshold,
            Operator::LessThan => value < threshold,
            Operator::LessThanOrEqual => value <= threshold,
        }
    }
}

// ----- the metric buffer ------------------------------------------------------------------------------

/// Samples pushed for one (scale set, metric), oldest first.
#[derive(Debug, Clone, Default)]
pub struct Series {
    samples: VecDeque<(i64, f64)>,
}

impl Series {
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn samples(&self) -> impl Iterator<Item = (i64, f64)> + '_ {
        self.samples.iter().copied()
    }
}

/// One value per time, every value finite.
fn check_samples(times_ms: &[i64], values: &[f64]) -> Result<()> {
    if times_ms.len() != values.len() {
        return Err(CoreError::invalid(
            codes::INVALID_PARAMETER,
            format!(
                "{} sample times but {} values; send one value per time.",
                times_ms.len(),
                values.len()
            ),
        )
        .at("samples"));
    }
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        return Err(CoreError::invalid(
            codes::INVALID_PARAMETER,
            format!("metric values must be finite numbers, got {bad}."),
        )
        .at("samples.value"));
    }
    Ok(())
}

/// Every scale set's pushed metrics. Bounded twice: samples older than the retention are dropped as new
/// ones arrive, and a series never holds more than `max_samples` (the oldest go first), so memory stays
/// bounded however long the server runs and however fast clients push.
#[derive(Debug, Clone)]
pub struct MetricBuffer {
    series: BTreeMap<(String, String), Series>,
    retention_ms: BTreeMap<String, i64>,
    default_retention_ms: i64,
    max_samples: usize,
}

/// Bytes one buffered sample costs (its time and value).
pub const SAMPLE_BYTES: usize = std::mem::size_of::<(i64, f64)>();

impl MetricBuffer {
    pub fn new(default_retention_ms: i64, max_samples: usize) -> Self {
        Self {
            series: BTreeMap::new(),
            retention_ms: BTreeMap::new(),
            default_retention_ms,
            max_samples: max_samples.max(1),
        }
    }

    /// How much history `scale_set` keeps: its setting's largest time window (and grain).
    pub fn set_retention(&mut self, scale_set: &str, retention_ms: i64) {
        self.retention_ms
            .insert(scale_set.to_owned(), retention_ms.max(0));
    }

    /// `scale_set` keeps the default history again (its setting was deleted), as it would after a
    /// restart, which knows only the retention of the settings there are.
    pub fn clear_retention(&mut self, scale_set: &str) {
        self.retention_ms.remove(scale_set);
    }

    /// Adds samples (in any order) and drops what fell out of the retention or over the cap.
    pub fn add(
        &mut self,
        scale_set: &str,
        metric: &str,
        times_ms: &[i64],
        values: &[f64],
    ) -> Result<()> {
        check_samples(times_ms, values)?;
        let retention = *self
            .retention_ms
            .get(scale_set)
            .unwrap_or(&self.default_retention_ms);
        let series = self.insert(scale_set, metric, times_ms, values);
        if let Some(&(newest, _)) = series.samples.back() {
            while series
                .samples
                .front()
                .is_some_and(|&(t, _)| t < newest - retention)
            {
                series.samples.pop_front();
            }
        }
        Ok(())
    }

    /// Puts back a series as [`MetricBuffer::export`] gave it: every sample, none dropped for the
    /// retention (a snapshot is restored before the retention of every scale set is known again).
    pub fn restore(
        &mut self,
        scale_set: &str,
        metric: &str,
        times_ms: &[i64],
        values: &[f64],
    ) -> Result<()> {
        check_samples(times_ms, values)?;
        self.insert(scale_set, metric, times_ms, values);
        Ok(())
    }

    /// Inserts samples in time order and drops the oldest over the cap; the series, for the caller to
    /// trim further.
    fn insert(
        &mut self,
        scale_set: &str,
        metric: &str,
        times_ms: &[i64],
        values: &[f64],
    ) -> &mut Series {
        let cap = self.max_samples;
        let series = self
            .series
            .entry((scale_set.to_owned(), metric.to_owned()))
            .or_default();
        for (&t, &v) in times_ms.iter().zip(values) {
            match series.samples.back() {
                Some(&(last, _)) if t < last => {
                    let at = series.samples.partition_point(|&(s, _)| s <= t);
                    series.samples.insert(at, (t, v));
                }
                _ => series.samples.push_back((t, v)),
            }
        }
        while series.samples.len() > cap {
            series.samples.pop_front();
        }
        series
    }

    pub fn series(&self, scale_set: &str, metric: &str) -> Option<&Series> {
        self.series.get(&(scale_set.to_owned(), metric.to_owned()))
    }

    /// Forgets every metric of a scale set (it was deleted).
    pub fn remove_scale_set(&mut self, scale_set: &str) {
        self.series.retain(|(s, _), _| s != scale_set);
        self.retention_ms.remove(scale_set);
    }

    /// Every series as (scale set, metric, times, values), for snapshots.
    pub fn export(&self) -> Vec<(String, String, Vec<i64>, Vec<f64>)> {
        self.series
            .iter()
            .map(|((s, m), series)| {
                let (t, v) = series.samples.iter().copied().unzip();
                (s.clone(), m.clone(), t, v)
            })
            .collect()
    }

    /// Samples held in all series.
    pub fn sample_count(&self) -> usize {
        self.series.values().map(Series::len).sum()
    }
}

// ----- aggregation ------------------------------------------------------------------------------------

/// The metric value a trigger sees at `now_ms`: samples in `[now - window, now)` are grouped into grains
/// of `grain_ms` (aligned to the window's end); each grain's `statistic` is taken over the samples in it
/// (one sample per instance per grain gives Azure's across-instance statistic); then `aggregation`
/// combines the grains that hold samples. None when the window holds no sample.
pub fn aggregate(
    series: &Series,
    now_ms: i64,
    grain_ms: i64,
    window_ms: i64,
    statistic: Statistic,
    aggregation: TimeAggregation,
) -> Option<f64> {
    let start = now_ms - window_ms;
    let grain_ms = grain_ms.max(1);
    let samples = &series.samples;
    let first = samples.partition_point(|&(t, _)| t < start);
    let end = samples.partition_point(|&(t, _)| t < now_ms);
    if first >= end {
        return None;
    }
    let mut grains: Vec<f64> = Vec::new();
    let mut count_total = 0.0;
    let mut i = first;
    while i < end {
        let grain = (samples[i].0 - start) / grain_ms;
        let (mut sum, mut min, mut max, mut n) = (0.0, f64::INFINITY, f64::NEG_INFINITY, 0.0);
        while i < end && (samples[i].0 - start) / grain_ms == grain {
            let v = samples[i].1;
            sum += v;
            min = min.min(v);
            max = max.max(v);
            n += 1.0;
            i += 1;
        }
        count_total += n;
        grains.push(match statistic {
            Statistic::Average => sum / n,
            Statistic::Min => min,
            Statistic::Max => max,
            Statistic::Sum => sum,
            Statistic::Count => n,
        });
    }
    let k = grains.len() as f64;
    Some(match aggregation {
        TimeAggregation::Average => grains.iter().sum::<f64>() / k,
        TimeAggregation::Minimum => grains.iter().copied().fold(f64::INFINITY, f64::min),
        TimeAggregation::Maximum => grains.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        TimeAggregation::Total => grains.iter().sum(),
        TimeAggregation::Count => count_total,
        TimeAggregation::Last => *grains.last().unwrap_or(&0.0),
    })
}

// ----- decisions --------------------------------------------------------------------------------------

/// One rule of the active profile, with its durations in milliseconds.
#[derive(Debug, Clone)]
pub struct Rule {
    pub metric_name: String,
    pub time_grain_ms: i64,
    pub time_window_ms: i64,
    pub statistic: Statistic,
    pub time_aggregation: TimeAggregation,
    pub operator: Operator,
    pub threshold: f64,
    pub divide_per_instance: bool,
    pub direction: Direction,
    pub scale_type: ScaleType,
    pub value: u64,
    pub cooldown_ms: i64,
}

impl Rule {
    /// Whether the metric is per instance, so it scales as `value x current / n` with the instance count
    /// (an average, minimum or maximum across instances, or a total divided per instance); a total
    /// (Sum, Count) is the same whatever the count.
    pub fn per_instance(&self) -> bool {
        self.divide_per_instance
            || matches!(
                self.statistic,
                Statistic::Average | Statistic::Min | Statistic::Max
            )
    }

    /// The capacity this rule asks for from `capacity` (before the profile's bounds).
    pub fn target(&self, capacity: u64) -> u64 {
        let step = match self.scale_type {
            ScaleType::ChangeCount => self.value,
            // A percentage of the current count, rounded up: a rule always moves at least one instance.
            ScaleType::PercentChangeCount => (capacity * self.value).div_ceil(100).max(1),
            ScaleType::ServiceAllowedNextValue => 1,
            ScaleType::ExactCount => {
                return match self.direction {
                    Direction::Increase => self.value.max(capacity),
                    Direction::Decrease => self.value.min(capacity),
                    Direction::None => capacity,
                }
            }
        };
        match self.direction {
            Direction::Increase => capacity.saturating_add(step),
            Direction::Decrease => capacity.saturating_sub(step),
            Direction::None => capacity,
        }
    }
}

/// What autoscale decided at one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionKind {
    /// Scale out or in to `capacity`.
    Scale,
    /// Nothing to do (no rule fired, or the count is already where the rules want it).
    NoAction,
    /// A scale action was due but held back (cooldown, flapping).
    Skipped,
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub kind: DecisionKind,
    pub capacity_before: u64,
    pub capacity: u64,
    /// The rule that decided (its index in the profile), if one did.
    pub rule: Option<usize>,
    /// The cooldown that starts if the decision is carried out.
    pub cooldown_ms: i64,
    /// Each rule's metric value (None: no samples in its window).
    pub metric_values: Vec<Option<f64>>,
    /// Why, in words: every bound, rule, cooldown and flapping adjustment considered.
    pub explanation: Vec<String>,
}

/// The profile's bounds (`minimum <= default <= maximum`).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub minimum: u64,
    pub maximum: u64,
    pub default: u64,
}

fn fires(rule: &Rule, value: f64) -> bool {
    rule.operator.holds(value, rule.threshold)
}

/// Each rule's metric value at `now_ms` from the buffer (divided by the instance count where asked).
pub fn metric_values(
    buffer: &MetricBuffer,
    scale_set: &str,
    rules: &[Rule],
    capacity: u64,
    now_ms: i64,
) -> Vec<Option<f64>> {
    rules
        .iter()
        .map(|r| {
            let series = buffer.series(scale_set, &r.metric_name)?;
            let v = aggregate(
                series,
                now_ms,
                r.time_grain_ms,
                r.time_window_ms,
                r.statistic,
                r.time_aggregation,
            )?;
            Some(if r.divide_per_instance {
                v / capacity.max(1) as f64
            } else {
                v
            })
        })
        .collect()
}

/// Azure Monitor autoscale's decision for one profile (reference §9.2, §9.3).
///
/// `cooldown_until_ms` is when the cooldown of the last scale action ends (None: no action yet).
pub fn decide(
    rules: &[Rule],
    values: &[Option<f64>],
    capacity: u64,
    bounds: Bounds,
    now_ms: i64,
    cooldown_until_ms: Option<i64>,
) -> Decision {
    let mut d = Decision {
        kind: DecisionKind::NoAction,
        capacity_before: capacity,
        capacity,
        rule: None,
        cooldown_ms: 0,
        metric_values: values.to_vec(),
        explanation: Vec::new(),
    };
    let Bounds {
        minimum,
        maximum,
        default,
    } = bounds;
    // 1. The profile's bounds come first, whatever the metrics and the cooldown say.
    if capacity < minimum || capacity > maximum {
        d.kind = DecisionKind::Scale;
        d.capacity = capacity.clamp(minimum, maximum);
        d.explanation.push(format!(
            "{capacity} instances are outside the profile's range {minimum}-{maximum}: set to {}",
            d.capacity
        ));
        return d;
    }
    let describe = |i: usize, v: f64| {
        let r = &rules[i];
        format!(
            "rule {} ({} {} {} {}{}): {:.4}",
            i + 1,
            r.metric_name,
            r.time_aggregation.as_str(),
            r.operator.as_str(),
            r.threshold,
            if r.divide_per_instance {
                " per instance"
            } else {
                ""
            },
            v
        )
    };
    // 2. A metric that cannot be read: scale out to the default, never in.
    if let Some(missing) = values.iter().position(Option::is_none) {
        let name = &rules[missing].metric_name;
        if capacity < default {
            d.kind = DecisionKind::Scale;
            d.capacity = default;
            d.explanation.push(format!(
                "metric {name} has no samples in its window: scaled out to the default capacity {default}"
            ));
        } else {
            d.explanation.push(format!(
                "metric {name} has no samples in its window and {capacity} instances are at or above the default {default}: no scale-in"
            ));
        }
        return d;
    }
    let value = |i: usize| values[i].unwrap_or(0.0);
    // 3. Scale-out: any rule that fires; the largest result wins.
    let mut out: Option<(u64, usize)> = None;
    for (i, r) in rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.direction == Direction::Increase)
    {
        if fires(r, value(i)) {
            let target = r.target(capacity).min(maximum);
            d.explanation.push(format!(
                "{} fires: scale out to {target}",
                describe(i, value(i))
            ));
            if out.is_none_or(|(best, _)| target > best) {
                out = Some((target, i));
            }
        } else {
            d.explanation
                .push(format!("{} does not fire", describe(i, value(i))));
        }
    }
    let mut chosen = out.filter(|&(t, _)| t > capacity);
    if out.is_some() && chosen.is_none() {
        d.explanation
            .push(format!("already at the maximum {maximum}"));
    }
    // 4. Scale-in only when no scale-out rule fired, and only if every scale-in rule fires.
    if out.is_none() {
        let ins: Vec<usize> = (0..rules.len())
            .filter(|&i| rules[i].direction == Direction::Decrease)
            .collect();
        let all = !ins.is_empty() && ins.iter().all(|&i| fires(&rules[i], value(i)));
        for &i in &ins {
            let verdict = if fires(&rules[i], value(i)) {
                "fires"
            } else {
                "does not fire"
            };
            d.explanation
                .push(format!("{} {verdict}", describe(i, value(i))));
        }
        if all {
            // The smallest change: the largest of the targets.
            let (target, rule) = ins
                .iter()
                .map(|&i| (rules[i].target(capacity).max(minimum), i))
                .max_by_key(|&(t, i)| (t, std::cmp::Reverse(i)))
                .unwrap_or((capacity, 0));
            if target < capacity {
                chosen = flapping_check(rules, values, capacity, target, &mut d.explanation)
                    .map(|t| (t, rule));
                if chosen.is_none() {
                    d.kind = DecisionKind::Skipped;
                    d.rule = Some(rule);
                    return d;
                }
            } else if !ins.is_empty() {
                d.explanation
                    .push(format!("already at the minimum {minimum}"));
            }
        }
    }
    let Some((target, rule)) = chosen else {
        return d;
    };
    // 5. The cooldown of the most recent action holds back the next one, in either direction.
    if let Some(until) = cooldown_until_ms.filter(|&u| now_ms < u) {
        d.kind = DecisionKind::Skipped;
        d.rule = Some(rule);
        d.explanation.push(format!(
            "scale to {target} deferred: the last scale action's cooldown runs {} s more",
            (until - now_ms + 999) / 1000
        ));
        return d;
    }
    d.kind = DecisionKind::Scale;
    d.capacity = target;
    d.rule = Some(rule);
    d.cooldown_ms = rules[rule].cooldown_ms;
    d
}

/// A per-instance value at `capacity` instances, spread over `n` (over none: an unbounded load, or no
/// load if there was none).
fn projected(value: f64, capacity: u64, n: u64) -> f64 {
    if n == 0 {
        if value == 0.0 {
            0.0
        } else {
            f64::INFINITY.copysign(value)
        }
    } else {
        value * capacity as f64 / n as f64
    }
}

/// The largest scale-in between `target` and `capacity - 1` whose projected metrics fire no scale-out
/// rule (reference §9.3): None when every count would flap.
fn flapping_check(
    rules: &[Rule],
    values: &[Option<f64>],
    capacity: u64,
    target: u64,
    why: &mut Vec<String>,
) -> Option<u64> {
    for n in target..capacity {
        let project = |r: &Rule, v: f64| {
            if r.per_instance() {
                projected(v, capacity, n)
            } else {
                v
            }
        };
        let flap = rules.iter().enumerate().find(|(i, r)| {
            r.direction == Direction::Increase && fires(r, project(r, values[*i].unwrap_or(0.0)))
        });
        match flap {
            Some((i, r)) => {
                let v = values[i].unwrap_or(0.0);
                let projected = project(r, v);
                why.push(format!(
                    "scale in to {n} would flap: {} projected to {projected:.4} at {n} instances ({v:.4} x {capacity} / {n}) fires scale-out rule {}",
                    r.metric_name,
                    i + 1
                ));
            }
            None => {
                if n != target {
                    why.push(format!(
                        "scale in lowered to {n} instances, which does not flap"
                    ));
                }
                return Some(n);
            }
        }
    }
    why.push(
        "every smaller count would trigger a scale-out: scale-in skipped until the next evaluation"
            .into(),
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(direction: Direction, operator: Operator, threshold: f64, value: u64) -> Rule {
        Rule {
            metric_name: "cpu".into(),
            time_grain_ms: 60_000,
            time_window_ms: 300_000,
            statistic: Statistic::Average,
            time_aggregation: TimeAggregation::Average,
            operator,
            threshold,
            divide_per_instance: false,
            direction,
            scale_type: ScaleType::ChangeCount,
            value,
            cooldown_ms: 300_000,
        }
    }

    const WIDE: Bounds = Bounds {
        minimum: 1,
        maximum: 100,
        default: 1,
    };

    #[test]
    fn grains_then_window() {
        let mut b = MetricBuffer::new(3_600_000, 1000);
        // Two instances per minute: grain averages 10, 20, 30; the window's average is 20.
        let times = [0, 1, 60_000, 60_001, 120_000, 120_001];
        b.add("s", "cpu", &times, &[5.0, 15.0, 10.0, 30.0, 30.0, 30.0])
            .expect("valid");
        let s = b.series("s", "cpu").expect("exists");
        let v = |stat, agg| aggregate(s, 180_000, 60_000, 180_000, stat, agg);
        assert_eq!(v(Statistic::Average, TimeAggregation::Average), Some(20.0));
        assert_eq!(v(Statistic::Max, TimeAggregation::Maximum), Some(30.0));
        assert_eq!(v(Statistic::Sum, TimeAggregation::Last), Some(60.0));
        assert_eq!(v(Statistic::Average, TimeAggregation::Count), Some(6.0));
        assert_eq!(
            aggregate(
                s,
                500_000,
                60_000,
                180_000,
                Statistic::Average,
                TimeAggregation::Average
            ),
            None
        );
    }

    #[test]
    fn the_buffer_is_bounded_by_retention_and_count() {
        let mut b = MetricBuffer::new(10_000, 5);
        let times: Vec<i64> = (0..20).map(|i| i * 1000).collect();
        b.add("s", "m", &times, &[1.0; 20]).expect("valid");
        assert_eq!(b.series("s", "m").expect("exists").len(), 5);
        b.set_retention("s", 2_000);
        b.add("s", "m", &[30_000], &[1.0]).expect("valid");
        assert_eq!(b.series("s", "m").expect("exists").len(), 1);
        assert!(b.add("s", "m", &[1], &[f64::NAN]).is_err());
    }

    #[test]
    fn a_restored_series_keeps_every_sample_and_a_cleared_retention_is_the_default() {
        let mut b = MetricBuffer::new(10_000, 5);
        b.set_retention("s", 2_000);
        // A snapshot holds what a longer retention kept: restored as it was, whatever the retention now.
        b.restore("s", "m", &[0, 5_000, 20_000], &[1.0, 2.0, 3.0])
            .expect("valid");
        let kept = |b: &MetricBuffer| b.series("s", "m").expect("exists").samples().count();
        assert_eq!(kept(&b), 3);
        b.add("s", "m", &[21_000], &[4.0]).expect("valid"); // an add trims to the retention
        assert_eq!(kept(&b), 2);
        b.clear_retention("s");
        b.add("s", "m", &[25_000], &[5.0]).expect("valid");
        assert_eq!(kept(&b), 3); // 20,000 to 25,000: within the default 10,000 again
        assert!(b.restore("s", "m", &[1], &[]).is_err());
    }

    #[test]
    fn threads_example_skips_the_flapping_scale_in() {
        let rules = [
            rule(Direction::Increase, Operator::GreaterThanOrEqual, 600.0, 1),
            rule(Direction::Decrease, Operator::LessThanOrEqual, 600.0, 1),
        ];
        let up = decide(&rules, &[Some(625.0), Some(625.0)], 2, WIDE, 0, None);
        assert_eq!((up.kind, up.capacity), (DecisionKind::Scale, 3));
        let down = decide(&rules, &[Some(575.0), Some(575.0)], 3, WIDE, 0, None);
        assert_eq!((down.kind, down.capacity), (DecisionKind::Skipped, 3));
        assert!(
            down.explanation.iter().any(|e| e.contains("862.5")),
            "{:?}",
            down.explanation
        );
    }

    #[test]
    fn percent_and_exact_targets() {
        let mut r = rule(Direction::Decrease, Operator::LessThan, 1.0, 50);
        r.scale_type = ScaleType::PercentChangeCount;
        assert_eq!(r.target(10), 5);
        r.scale_type = ScaleType::ExactCount;
        r.value = 7;
        assert_eq!(r.target(10), 7);
        r.direction = Direction::Increase;
        r.scale_type = ScaleType::PercentChangeCount;
        r.value = 15;
        assert_eq!(r.target(3), 4);
    }
}
