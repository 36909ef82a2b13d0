//! The autoscale part of the binding: the metric buffer and compiled rules as Python objects, and the
//! decision as a plain dict. Rules arrive as dicts built by `scaleset.engine`; the core parses every enum.

use std::sync::Mutex;

use pyo3::prelude::*;
use scaleset_core::autoscale as core;
use scaleset_core::{codes, CoreError};

use crate::convert::{extract, parse};
use crate::detached;

#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct RuleDto {
    metric_name: String,
    time_grain_ms: i64,
    time_window_ms: i64,
    statistic: String,
    time_aggregation: String,
    operator: String,
    threshold: f64,
    divide_per_instance: bool,
    direction: String,
    scale_type: String,
    value: u64,
    cooldown_ms: i64,
}

/// A profile's rules, parsed once and reused at every evaluation.
#[pyclass(frozen, module = "scaleset._core")]
pub struct AutoscaleRules {
    rules: Vec<core::Rule>,
}

#[pymethods]
impl AutoscaleRules {
    #[new]
    fn new(rules: &Bound<'_, PyAny>) -> PyResult<Self> {
        let dtos: Vec<RuleDto> = extract(rules, "autoscale rules")?;
        let rules = dtos
            .into_iter()
            .map(|d| {
                Ok(core::Rule {
                    metric_name: d.metric_name,
                    time_grain_ms: d.time_grain_ms,
                    time_window_ms: d.time_window_ms,
                    statistic: parse(&d.statistic, core::Statistic::parse)?,
                    time_aggregation: parse(&d.time_aggregation, core::TimeAggregation::parse)?,
                    operator: parse(&d.operator, core::Operator::parse)?,
                    threshold: d.threshold,
                    divide_per_instance: d.divide_per_instance,
                    direction: parse(&d.direction, core::Direction::parse)?,
                    scale_type: parse(&d.scale_type, core::ScaleType::parse)?,
                    value: d.value,
                    cooldown_ms: d.cooldown_ms,
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        Ok(Self { rules })
    }

    fn __len__(&self) -> usize {
        self.rules.len()
    }
}

/// (scale set, metric, times in ms, values): one series of the buffer.
type ExportedSeries = (String, String, Vec<i64>, Vec<f64>);

#[derive(IntoPyObject)]
pub struct DecisionDto {
    kind: &'static str,
    capacity_before: u64,
    capacity: u64,
    rule: Option<usize>,
    cooldown_ms: i64,
    metric_values: Vec<Option<f64>>,
    explanation: Vec<String>,
}

/// Pushed metrics of every scale set, bounded by retention and by a cap on samples per series.
#[pyclass(frozen, module = "scaleset._core")]
pub struct MetricBuffer {
    inner: Mutex<core::MetricBuffer>,
}

impl MetricBuffer {
    fn with<T>(
        &self,
        f: impl FnOnce(&mut core::MetricBuffer) -> scaleset_core::Result<T>,
    ) -> scaleset_core::Result<T> {
        let mut guard = self.inner.lock().map_err(|_| {
            CoreError::conflict(
                codes::OPERATION_NOT_ALLOWED,
                "the metric buffer is unusable after a panic",
            )
        })?;
        f(&mut guard)
    }
}

#[pymethods]
impl MetricBuffer {
    #[new]
    fn new(default_retention_ms: i64, max_samples: usize) -> Self {
        Self {
            inner: Mutex::new(core::MetricBuffer::new(default_retention_ms, max_samples)),
        }
    }

    /// Bytes one buffered sample costs.
    #[classattr]
    const SAMPLE_BYTES: usize = core::SAMPLE_BYTES;

    fn set_retention(&self, py: Python<'_>, scale_set: &str, retention_ms: i64) -> PyResult<()> {
        detached(py, || {
            self.with(|b| {
                b.set_retention(scale_set, retention_ms);
                Ok(())
            })
        })
    }

    fn add(
        &self,
        py: Python<'_>,
        scale_set: &str,
        metric: &str,
        times_ms: Vec<i64>,
        values: Vec<f64>,
    ) -> PyResult<()> {
        detached(py, || {
            self.with(|b| b.add(scale_set, metric, &times_ms, &values))
        })
    }

    fn clear_retention(&self, py: Python<'_>, scale_set: &str) -> PyResult<()> {
        detached(py, || {
            self.with(|b| {
                b.clear_retention(scale_set);
                Ok(())
            })
        })
    }

    fn restore(
        &self,
        py: Python<'_>,
        scale_set: &str,
        metric: &str,
        times_ms: Vec<i64>,
        values: Vec<f64>,
    ) -> PyResult<()> {
        detached(py, || {
            self.with(|b| b.restore(scale_set, metric, &times_ms, &values))
        })
    }

    fn remove_scale_set(&self, py: Python<'_>, scale_set: &str) -> PyResult<()> {
        detached(py, || {
            self.with(|b| {
                b.remove_scale_set(scale_set);
                Ok(())
            })
        })
    }

    /// Every series as (scale set, metric, times, values).
    fn export(&self, py: Python<'_>) -> PyResult<Vec<ExportedSeries>> {
        detached(py, || self.with(|b| Ok(b.export())))
    }

    fn sample_count(&self, py: Python<'_>) -> PyResult<usize> {
        detached(py, || self.with(|b| Ok(b.sample_count())))
    }

    /// The active profile's decision for `scale_set` at `now_ms` (see the core's `autoscale::decide`).
    #[pyo3(signature = (scale_set, rules, capacity, minimum, maximum, default, now_ms, cooldown_until_ms))]
    #[allow(clippy::too_many_arguments)]
    fn evaluate(
        &self,
        py: Python<'_>,
        scale_set: &str,
        rules: &AutoscaleRules,
        capacity: u64,
        minimum: u64,
        maximum: u64,
        default: u64,
        now_ms: i64,
        cooldown_until_ms: Option<i64>,
    ) -> PyResult<DecisionDto> {
        let bounds = core::Bounds {
            minimum,
            maximum,
            default,
        };
        let d = detached(py, || {
            self.with(|b| {
                let values = core::metric_values(b, scale_set, &rules.rules, capacity, now_ms);
                Ok(core::decide(
                    &rules.rules,
                    &values,
                    capacity,
                    bounds,
                    now_ms,
                    cooldown_until_ms,
                ))
            })
        })?;
        Ok(DecisionDto {
            kind: match d.kind {
                core::DecisionKind::Scale => "Scale",
                core::DecisionKind::NoAction => "NoAction",
                core::DecisionKind::Skipped => "Skipped",
            },
            capacity_before: d.capacity_before,
            capacity: d.capacity,
            rule: d.rule,
            cooldown_ms: d.cooldown_ms,
            metric_values: d.metric_values,
            explanation: d.explanation,
        })
    }
}
