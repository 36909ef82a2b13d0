//! The PyO3 binding of scaleset-core, importable as `scaleset._core`. It converts plain Python data
//! (dicts and lists built by `scaleset.engine`) to core types, releases the GIL around core calls,
//! and maps `CoreError` to Python exceptions in one place. It holds no logic of its own.

use std::sync::{Arc, Mutex};

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};
use scaleset_core as core;
use scaleset_core::{CoreError, ErrorKind};

mod autoscale;
mod convert;
use convert::{
    extract, instance_columns, parse, plan_columns, spec_from_dto, spec_to_dto, CoreQuotaDto,
    InstanceColumns, PoolDto, RegionDto, SpecDto,
};

create_exception!(
    _core,
    ScaleSetError,
    PyException,
    "Base class of every scaleset error; `.code` is stable."
);
create_exception!(
    _core,
    InvalidInputError,
    ScaleSetError,
    "The request is malformed or out of range."
);
create_exception!(
    _core,
    ConflictError,
    ScaleSetError,
    "The request conflicts with current state."
);
create_exception!(
    _core,
    NotFoundError,
    ScaleSetError,
    "A scale set, instance or zone does not exist."
);
create_exception!(
    _core,
    CapacityError,
    ScaleSetError,
    "The region cannot supply what was asked."
);

/// The one mapping from core errors to Python exceptions: the class by kind, `.code` set on the instance.
pub(crate) fn to_py_err(e: CoreError) -> PyErr {
    let err = match e.kind {
        ErrorKind::InvalidInput => InvalidInputError::new_err(e.message),
        ErrorKind::Conflict => ConflictError::new_err(e.message),
        ErrorKind::NotFound => NotFoundError::new_err(e.message),
        ErrorKind::Capacity => CapacityError::new_err(e.message),
    };
    Python::attach(|py| {
        // Setting an attribute on a fresh exception instance cannot fail in practice; if it ever did,
        // the exception still carries its class and message.
        let value = err.value(py);
        let _ = value.setattr("code", e.code);
        let _ = value.setattr("field", e.field);
        let _ = value.setattr("metadata", pyo3::types::PyDict::new(py));
    });
    err
}

/// Runs a core call with the GIL released (like polars' `enter_polars`), so other Python threads and
/// gRPC handlers keep running, and maps its error.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> core::Result<T> + Send) -> PyResult<T> {
    py.detach(f).map_err(to_py_err)
}

/// The placement engine: one region and its scale sets. Thread-safe; every method releases the GIL
/// (`set_capacity` keeps it for one decision in a small set, which is cheaper than the hand-over).
#[pyclass(frozen, module = "scaleset._core")]
struct Engine {
    inner: Mutex<core::Engine>,
    /// Zone and size names shared with plan handles (sizes only ever grow), so a plan costs no copies.
    names: Mutex<Names>,
}

#[derive(Clone)]
struct Names {
    zones: Arc<[String]>,
    sizes: Arc<[String]>,
    /// The same names as Python strings, made once for each version of the names when a plan's items
    /// are first read: every item then shares them (one decision at a time is a hot path).
    strings: Arc<PyOnceLock<NameStrings>>,
}

/// [`Names`] as Python strings, and the priorities'.
struct NameStrings {
    zones: Vec<Py<PyString>>,
    sizes: Vec<Py<PyString>>,
    priorities: Vec<Py<PyString>>,
    unknown: Py<PyString>,
}

impl Names {
    fn new(zones: Arc<[String]>, sizes: Arc<[String]>) -> Self {
        Self {
            zones,
            sizes,
            strings: Arc::new(PyOnceLock::new()),
        }
    }

    fn strings(&self, py: Python<'_>) -> &NameStrings {
        self.strings.get_or_init(py, || {
            let all = |names: &[String]| {
                names
                    .iter()
                    .map(|n| PyString::new(py, n).unbind())
                    .collect()
            };
            NameStrings {
                zones: all(&self.zones),
                sizes: all(&self.sizes),
                priorities: core::Priority::ALL
                    .iter()
                    .map(|p| PyString::new(py, p.as_str()).unbind())
                    .collect(),
                unknown: PyString::new(py, "?").unbind(),
            }
        })
    }
}

impl NameStrings {
    fn zone<'py>(&self, py: Python<'py>, slot: core::ZoneSlot) -> Option<Bound<'py, PyString>> {
        slot.map(|z| Self::pick(py, &self.zones, usize::from(z), &self.unknown))
    }

    fn size<'py>(&self, py: Python<'py>, i: u16) -> Bound<'py, PyString> {
        Self::pick(py, &self.sizes, usize::from(i), &self.unknown)
    }

    fn priority<'py>(&self, py: Python<'py>, p: core::Priority) -> Bound<'py, PyString> {
        Self::pick(py, &self.priorities, p.index(), &self.unknown)
    }

    fn pick<'py>(
        py: Python<'py>,
        strings: &[Py<PyString>],
        i: usize,
        unknown: &Py<PyString>,
    ) -> Bound<'py, PyString> {
        strings.get(i).unwrap_or(unknown).bind(py).clone()
    }
}

impl Engine {
    fn with<T>(&self, f: impl FnOnce(&mut core::Engine) -> core::Result<T>) -> core::Result<T> {
        let mut guard = self.inner.lock().map_err(|_| {
            CoreError::conflict(
                "EnginePoisoned",
                "the engine was poisoned by an earlier panic; restart the process.",
            )
        })?;
        f(&mut guard)
    }

    /// A plan handle sharing the engine's current names.
    fn handle(&self, e: &core::Engine, plan: core::Plan) -> PlanHandle {
        let names = match self.names.lock() {
            Ok(mut names) => {
                if names.sizes.len() != e.sizes().len() {
                    *names = Names::new(names.zones.clone(), e.sizes().into());
                }
                names.clone()
            }
            Err(_) => Names::new(e.region().zones.as_slice().into(), e.sizes().into()),
        };
        PlanHandle { plan, names }
    }
}

/// A plan item as the binding reads it: the fields every item has, and its reason.
trait Item {
    /// (instance_id, zone, fault_domain, vm_size, priority)
    fn fields(&self) -> (u64, core::ZoneSlot, u32, u16, core::Priority);
    fn reason(&self, names: &Names) -> String;
}

impl Item for core::PlannedCreate {
    fn fields(&self) -> (u64, core::ZoneSlot, u32, u16, core::Priority) {
        (
            self.instance_id,
            self.zone,
            self.fault_domain,
            self.vm_size,
            self.priority,
        )
    }
    fn reason(&self, names: &Names) -> String {
        self.describe(&names.zones, &names.sizes)
    }
}

impl Item for core::PlannedDelete {
    fn fields(&self) -> (u64, core::ZoneSlot, u32, u16, core::Priority) {
        (
            self.instance_id,
            self.zone,
            self.fault_domain,
            self.vm_size,
            self.priority,
        )
    }
    fn reason(&self, names: &Names) -> String {
        self.describe(&names.zones)
    }
}

/// `tuple.__new__`: makes an instance of a tuple subclass from its fields in C, without the subclass's
/// Python-level `__new__` (a named tuple's checks its arguments one by one).
static TUPLE_NEW: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `items[start..stop]`, clipped to the slice (empty when `start >= stop`), each made as an instance of
/// `kind`: a tuple subclass of the fields (instance_id, zone, fault_domain, vm_size, priority, reason)
/// (the model's `PlannedCreate` or `PlannedDelete`, which the facade passes in, so the binding never
/// imports the Python package). Names are the engine's shared Python strings.
fn window<'py, T: Item>(
    kind: &Bound<'py, PyType>,
    names: &Names,
    items: &[T],
    start: usize,
    stop: usize,
) -> PyResult<Bound<'py, PyTuple>> {
    let py = kind.py();
    let new = TUPLE_NEW
        .get_or_try_init(py, || {
            py.get_type::<PyTuple>()
                .getattr("__new__")
                .map(Bound::unbind)
        })?
        .bind(py);
    let strings = names.strings(py);
    let stop = stop.min(items.len());
    let made = items[start.min(stop)..stop]
        .iter()
        .map(|item| {
            let (id, zone, fault_domain, size, priority) = item.fields();
            let fields = (
                id,
                strings.zone(py, zone),
                fault_domain,
                strings.size(py, size),
                strings.priority(py, priority),
                item.reason(names),
            );
            new.call1((kind, fields))
        })
        .collect::<PyResult<Vec<_>>>()?;
    PyTuple::new(py, made)
}

/// All of `items` as `window` makes them, or `None` when there are more than `at_most`.
fn all_items<'py, T: Item>(
    kind: &Bound<'py, PyType>,
    names: &Names,
    items: &[T],
    at_most: usize,
) -> PyResult<Option<Bound<'py, PyTuple>>> {
    (items.len() <= at_most)
        .then(|| window(kind, names, items, 0, items.len()))
        .transpose()
}

/// An immutable plan; items are rendered to Python objects only when read.
#[pyclass(frozen, module = "scaleset._core")]
struct PlanHandle {
    plan: core::Plan,
    names: Names,
}

#[pymethods]
impl PlanHandle {
    /// (scale_set, capacity_before, capacity_after, unallocated, unallocated_reason, (creates,
    /// deletes)), in one call.
    #[allow(clippy::type_complexity)]
    fn header(&self) -> (&str, u64, u64, u64, &str, (usize, usize)) {
        let p = &self.plan;
        (
            &p.scale_set,
            p.capacity_before,
            p.capacity_after,
            p.unallocated,
            &p.unallocated_reason,
            (p.creates.len(), p.deletes.len()),
        )
    }
    fn creates_len(&self) -> usize {
        self.plan.creates.len()
    }
    fn deletes_len(&self) -> usize {
        self.plan.deletes.len()
    }

    /// Planned creates `start..stop` (clipped to the plan) as instances of `kind`, whose fields are
    /// (instance_id, zone, fault_domain, vm_size, priority, reason).
    fn create_items<'py>(
        &self,
        kind: &Bound<'py, PyType>,
        start: usize,
        stop: usize,
    ) -> PyResult<Bound<'py, PyTuple>> {
        window(kind, &self.names, &self.plan.creates, start, stop)
    }

    /// Planned deletes `start..stop` (clipped to the plan), as `create_items`.
    fn delete_items<'py>(
        &self,
        kind: &Bound<'py, PyType>,
        start: usize,
        stop: usize,
    ) -> PyResult<Bound<'py, PyTuple>> {
        window(kind, &self.names, &self.plan.deletes, start, stop)
    }

    /// Every planned create as `create_items` makes them, or `None` when there are more than `at_most`
    /// (a small plan's items in one call).
    fn all_creates<'py>(
        &self,
        kind: &Bound<'py, PyType>,
        at_most: usize,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        all_items(kind, &self.names, &self.plan.creates, at_most)
    }

    /// Every planned delete, as `all_creates`.
    fn all_deletes<'py>(
        &self,
        kind: &Bound<'py, PyType>,
        at_most: usize,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        all_items(kind, &self.names, &self.plan.deletes, at_most)
    }

    /// The creates as columns (no reasons): instance_id, zone, fault_domain, vm_size, priority.
    fn create_columns<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        plan_columns(
            py,
            &self.names.zones,
            &self.names.sizes,
            self.plan
                .creates
                .iter()
                .map(|c| (c.instance_id, c.zone, c.fault_domain, c.vm_size, c.priority)),
        )
    }

    /// The deletes as columns (no reasons): instance_id, zone, fault_domain, vm_size, priority.
    fn delete_columns<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        plan_columns(
            py,
            &self.names.zones,
            &self.names.sizes,
            self.plan
                .deletes
                .iter()
                .map(|d| (d.instance_id, d.zone, d.fault_domain, d.vm_size, d.priority)),
        )
    }
}

#[pymethods]
impl Engine {
    /// Engine(region: dict, instance_limit: int | None): a region of zones, fault domains and pools.
    #[new]
    #[pyo3(signature = (region, instance_limit=None))]
    fn new(region: &Bound<'_, PyAny>, instance_limit: Option<u64>) -> PyResult<Self> {
        let dto: RegionDto = extract(region, "region")?;
        let mut r = core::Region::new(dto.zones, dto.fault_domains_per_zone).map_err(to_py_err)?;
        for zone in &dto.unavailable_zones {
            let z = r.zone_index(zone).map_err(to_py_err)?;
            r.zone_available[usize::from(z)] = false;
        }
        let mut engine = core::Engine::new(r, instance_limit);
        for pool in dto.pools {
            let priority = parse(&pool.priority, core::Priority::parse)?;
            engine
                .set_pool_capacity(
                    pool.zone.as_deref(),
                    &pool.vm_size,
                    priority,
                    pool.available,
                    Some(pool.price),
                )
                .map_err(to_py_err)?;
            if pool.restricted {
                engine
                    .set_pool_restricted(pool.zone.as_deref(), &pool.vm_size, priority, true)
                    .map_err(to_py_err)?;
            }
        }
        for quota in dto.core_quotas {
            engine
                .set_core_quota(&quota.family, Some(quota.cores))
                .map_err(to_py_err)?;
        }
        let names = Names::new(
            engine.region().zones.as_slice().into(),
            engine.sizes().into(),
        );
        Ok(Self {
            inner: Mutex::new(engine),
            names: Mutex::new(names),
        })
    }

    /// Validates and stores a scale set, scales it to `capacity`; returns (stored spec, plan).
    fn create_scale_set(
        &self,
        py: Python<'_>,
        spec: &Bound<'_, PyAny>,
        capacity: u64,
    ) -> PyResult<(SpecDto, PlanHandle)> {
        let spec = spec_from_dto(extract(spec, "spec")?)?;
        let (stored, handle) = detached(py, || {
            self.with(|e| {
                let (stored, plan) = e.create_scale_set(spec, capacity)?;
                Ok((stored, self.handle(e, plan)))
            })
        })?;
        Ok((spec_to_dto(&stored), handle))
    }

    fn update_scale_set(&self, py: Python<'_>, spec: &Bound<'_, PyAny>) -> PyResult<SpecDto> {
        let spec = spec_from_dto(extract(spec, "spec")?)?;
        let stored = detached(py, || self.with(|e| e.update_scale_set(spec)))?;
        Ok(spec_to_dto(&stored))
    }

    fn delete_scale_set(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        detached(py, || self.with(|e| e.delete_scale_set(name)))
    }

    /// The stored spec of one scale set.
    fn get_spec(&self, py: Python<'_>, name: &str) -> PyResult<SpecDto> {
        let spec = detached(py, || self.with(|e| Ok(e.scale_set(name)?.spec.clone())))?;
        Ok(spec_to_dto(&spec))
    }

    /// Names of all scale sets, sorted.
    fn list_scale_sets(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        detached(py, || {
            self.with(|e| Ok(e.scale_sets().map(|s| s.spec.name.clone()).collect()))
        })
    }

    /// The id the next new instance of `name` will get.
    fn next_instance_id(&self, py: Python<'_>, name: &str) -> PyResult<u64> {
        detached(py, || {
            self.with(|e| Ok(e.scale_set(name)?.next_instance_id))
        })
    }

    /// Puts back a saved scale set exactly: stored spec (with model version), instances as columns, next id.
    fn restore_scale_set(
        &self,
        py: Python<'_>,
        spec: &Bound<'_, PyAny>,
        columns: &Bound<'_, PyAny>,
        next_instance_id: u64,
    ) -> PyResult<()> {
        let spec = spec_from_dto(extract(spec, "spec")?)?;
        let inputs = convert::instance_inputs(extract(columns, "instances")?)?;
        detached(py, || {
            self.with(|e| e.restore_scale_set(spec, inputs, next_instance_id))
        })
    }

    /// Restores a scale set from its spec, its instances as `encode_instances` gave them, and the next
    /// instance id.
    fn restore_encoded(
        &self,
        py: Python<'_>,
        spec: &Bound<'_, PyAny>,
        data: &[u8],
        next_instance_id: u64,
    ) -> PyResult<()> {
        let spec = spec_from_dto(extract(spec, "spec")?)?;
        detached(py, || {
            let inputs = core::snapshot::decode_instances(data)?;
            self.with(|e| e.restore_scale_set(spec, inputs, next_instance_id))
        })
    }

    /// The instances of one scale set in the snapshot encoding (bytes).
    fn encode_instances<'py>(
        &self,
        py: Python<'py>,
        name: &str,
    ) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let data = detached(py, || {
            self.with(|e| core::snapshot::encode_instances(e, name))
        })?;
        Ok(pyo3::types::PyBytes::new(py, &data))
    }

    /// The scale sets changed (created, mutated, deleted) since the last call, by name.
    fn take_changed(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        detached(py, || self.with(|e| Ok(e.take_changed())))
    }

    fn capacity(&self, py: Python<'_>, name: &str) -> PyResult<u64> {
        detached(py, || self.with(|e| Ok(e.scale_set(name)?.capacity())))
    }

    fn instance_limit(&self, py: Python<'_>, name: &str) -> PyResult<u64> {
        detached(py, || self.with(|e| e.instance_limit(name)))
    }

    /// The instances of one scale set as columns (see `InstanceColumns`).
    fn instances(&self, py: Python<'_>, name: &str) -> PyResult<InstanceColumns> {
        detached(py, || {
            self.with(|e| Ok(instance_columns(e, e.scale_set(name)?)))
        })
    }

    #[pyo3(signature = (name, capacity, dry_run=false))]
    fn set_capacity(
        &self,
        py: Python<'_>,
        name: &str,
        capacity: u64,
        dry_run: bool,
    ) -> PyResult<PlanHandle> {
        // One decision in a small set costs less than handing the GIL to another thread and taking it
        // back, so when the engine is free it runs holding the GIL; anything else releases it.
        if let Ok(mut e) = self.inner.try_lock() {
            if e.is_one_small_decision(name, capacity) {
                let plan = e.set_capacity(name, capacity, dry_run).map_err(to_py_err)?;
                return Ok(self.handle(&e, plan));
            }
        }
        detached(py, || {
            self.with(|e| {
                e.set_capacity(name, capacity, dry_run)
                    .map(|plan| self.handle(e, plan))
            })
        })
    }

    /// Adopts instances given as columns (the same shape `instances()` returns).
    fn import_instances(
        &self,
        py: Python<'_>,
        name: &str,
        columns: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let inputs = convert::instance_inputs(extract(columns, "instances")?)?;
        detached(py, || self.with(|e| e.import_instances(name, inputs)))
    }

    fn delete_instances(
        &self,
        py: Python<'_>,
        name: &str,
        instance_ids: Vec<u64>,
    ) -> PyResult<PlanHandle> {
        detached(py, || {
            self.with(|e| {
                e.delete_instances(name, &instance_ids)
                    .map(|plan| self.handle(e, plan))
            })
        })
    }

    /// Evicts Spot instances; returns (deleted ids, deallocated ids).
    fn evict(
        &self,
        py: Python<'_>,
        name: &str,
        instance_ids: Vec<u64>,
    ) -> PyResult<(Vec<u64>, Vec<u64>)> {
        let ev = detached(py, || self.with(|e| e.evict(name, &instance_ids)))?;
        Ok((ev.deleted, ev.deallocated))
    }

    fn set_protection(
        &self,
        py: Python<'_>,
        name: &str,
        instance_ids: Vec<u64>,
        protect_from_scale_in: bool,
        protect_from_scale_set_actions: bool,
    ) -> PyResult<()> {
        detached(py, || {
            self.with(|e| {
                e.set_protection(
                    name,
                    &instance_ids,
                    protect_from_scale_in,
                    protect_from_scale_set_actions,
                )
            })
        })
    }

    /// Records health for many instances atomically: `health[i]` is the state of `instance_ids[i]`.
    fn report_health(
        &self,
        py: Python<'_>,
        name: &str,
        instance_ids: Vec<u64>,
        health: Vec<String>,
    ) -> PyResult<()> {
        let health = health
            .iter()
            .map(|h| parse(h, core::Health::parse))
            .collect::<PyResult<Vec<_>>>()?;
        detached(py, || {
            self.with(|e| e.report_health(name, &instance_ids, &health))
        })
    }

    /// Records what the infrastructure did with instances (Creating, Succeeded, Failed, Updating, Deleting).
    fn set_provisioning_state(
        &self,
        py: Python<'_>,
        name: &str,
        instance_ids: Vec<u64>,
        provisioning_state: &str,
    ) -> PyResult<()> {
        let state = parse(provisioning_state, core::ProvisioningState::parse)?;
        detached(py, || {
            self.with(|e| e.set_provisioning_state(name, &instance_ids, state))
        })
    }

    /// Sets a quota family's vCPU quota (None: no quota).
    fn set_core_quota(&self, py: Python<'_>, family: &str, cores: Option<u64>) -> PyResult<()> {
        detached(py, || self.with(|e| e.set_core_quota(family, cores)))
    }

    /// Marks a size as not offered in a zone for a priority (SkuNotAvailable at placement), or offered.
    fn set_pool_restricted(
        &self,
        py: Python<'_>,
        zone: Option<&str>,
        vm_size: &str,
        priority: &str,
        restricted: bool,
    ) -> PyResult<()> {
        let priority = parse(priority, core::Priority::parse)?;
        detached(py, || {
            self.with(|e| e.set_pool_restricted(zone, vm_size, priority, restricted))
        })
    }

    /// Makes placement skip a pool whatever its capacity (`blocked`), or consider it again.
    fn set_pool_blocked(
        &self,
        py: Python<'_>,
        zone: Option<&str>,
        vm_size: &str,
        priority: &str,
        blocked: bool,
    ) -> PyResult<()> {
        let priority = parse(priority, core::Priority::parse)?;
        detached(py, || {
            self.with(|e| e.set_pool_blocked(zone, vm_size, priority, blocked))
        })
    }

    fn set_zone_available(&self, py: Python<'_>, zone: &str, available: bool) -> PyResult<()> {
        detached(py, || self.with(|e| e.set_zone_available(zone, available)))
    }

    #[pyo3(signature = (zone, vm_size, priority, available, price=None))]
    fn set_pool_capacity(
        &self,
        py: Python<'_>,
        zone: Option<&str>,
        vm_size: &str,
        priority: &str,
        available: Option<u64>,
        price: Option<f64>,
    ) -> PyResult<()> {
        let priority = parse(priority, core::Priority::parse)?;
        detached(py, || {
            self.with(|e| e.set_pool_capacity(zone, vm_size, priority, available, price))
        })
    }

    /// The scale set grouped into pools for the rebalancer (see `scaleset.rebalance`), as plain columns.
    fn rebalance_input<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyDict>> {
        let (input, zones, sizes) = detached(py, || {
            self.with(|e| {
                Ok((
                    e.rebalance_input(name)?,
                    e.region().zones.clone(),
                    e.sizes().to_vec(),
                ))
            })
        })?;
        convert::rebalance_input_to_py(py, &input, &zones, &sizes)
    }

    /// Which instances leave: `removals[r]` of pool row `r` (oldest first).
    fn select_rebalance_deletes(
        &self,
        py: Python<'_>,
        name: &str,
        removals: Vec<u64>,
    ) -> PyResult<Vec<u64>> {
        detached(py, || {
            self.with(|e| e.select_rebalance_deletes(name, &removals))
        })
    }

    /// Applies rebalance moves: creates as (zone, fault_domain, vm_size, priority) columns, then deletes.
    #[allow(clippy::too_many_arguments)] // one argument per column, as Python passes them
    fn apply_rebalance(
        &self,
        py: Python<'_>,
        name: &str,
        zones: Vec<Option<String>>,
        fault_domains: Vec<u32>,
        vm_sizes: Vec<String>,
        priorities: Vec<String>,
        deletes: Vec<u64>,
    ) -> PyResult<PlanHandle> {
        if [fault_domains.len(), vm_sizes.len(), priorities.len()]
            .iter()
            .any(|&l| l != zones.len())
        {
            return Err(to_py_err(CoreError::invalid(
                core::codes::INVALID_PARAMETER,
                "create columns must all have the same length.",
            )));
        }
        let priorities = priorities
            .iter()
            .map(|p| parse(p, core::Priority::parse))
            .collect::<PyResult<Vec<_>>>()?;
        detached(py, || {
            self.with(|e| {
                let mut creates = Vec::with_capacity(zones.len());
                for (k, zone) in zones.iter().enumerate() {
                    let slot = zone
                        .as_deref()
                        .map(|z| e.region().zone_index(z))
                        .transpose()?;
                    let size = e
                        .sizes()
                        .iter()
                        .position(|s| *s == vm_sizes[k])
                        .ok_or_else(|| {
                            CoreError::invalid(
                                core::codes::INVALID_PARAMETER,
                                format!("unknown VM size '{}'.", vm_sizes[k]),
                            )
                        })?;
                    creates.push((slot, fault_domains[k], size as u16, priorities[k]));
                }
                let plan = e.apply_rebalance(name, &creates, &deletes)?;
                Ok(self.handle(e, plan))
            })
        })
    }

    /// Out-of-date instances in rolling-upgrade batches (see scaleset-core's `upgrade` module).
    fn plan_upgrade_batches(
        &self,
        py: Python<'_>,
        name: &str,
        batch_size: usize,
        prioritize_unhealthy: bool,
        cross_zone: bool,
    ) -> PyResult<Vec<Vec<u64>>> {
        detached(py, || {
            self.with(|e| {
                e.plan_upgrade_batches(name, batch_size, prioritize_unhealthy, cross_zone)
            })
        })
    }

    /// Moves instances to the current model in place; health becomes Initializing.
    fn upgrade_instances(
        &self,
        py: Python<'_>,
        name: &str,
        instance_ids: Vec<u64>,
    ) -> PyResult<()> {
        detached(py, || {
            self.with(|e| e.upgrade_instances(name, &instance_ids))
        })
    }

    /// Puts instances back on an earlier model version; health becomes Initializing.
    fn roll_back_instances(
        &self,
        py: Python<'_>,
        name: &str,
        instance_ids: Vec<u64>,
        model_version: u64,
    ) -> PyResult<()> {
        detached(py, || {
            self.with(|e| e.roll_back_instances(name, &instance_ids, model_version))
        })
    }

    /// The region as it stands: zones, which are down, fault domains, pools.
    fn region(&self, py: Python<'_>) -> PyResult<RegionDto> {
        detached(py, || {
            self.with(|e| {
                let r = e.region();
                Ok(RegionDto {
                    zones: r.zones.clone(),
                    fault_domains_per_zone: r.fault_domains_per_zone,
                    unavailable_zones: r
                        .zones
                        .iter()
                        .zip(&r.zone_available)
                        .filter(|(_, &up)| !up)
                        .map(|(z, _)| z.clone())
                        .collect(),
                    pools: r
                        .pools
                        .iter()
                        .map(|(k, p)| PoolDto {
                            zone: k
                                .zone
                                .map(|z| core::zone_label(&r.zones, Some(z)).to_owned()),
                            vm_size: k.vm_size.clone(),
                            priority: k.priority.as_str().to_owned(),
                            available: p.available,
                            price: p.price,
                            restricted: p.restricted,
                        })
                        .collect(),
                    core_quotas: r
                        .core_quotas
                        .iter()
                        .map(|(family, &cores)| CoreQuotaDto {
                            family: family.clone(),
                            cores,
                        })
                        .collect(),
                })
            })
        })
    }
}

/// Seconds in an ISO 8601 duration of days, hours, minutes and seconds ("PT1M", "P1DT2H"), or None if
/// the text is not one. The one parser of durations: specs, policies and autoscale rules all use it.
#[pyfunction]
fn parse_duration(text: &str) -> Option<f64> {
    core::parse_duration(text)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Engine>()?;
    m.add_class::<PlanHandle>()?;
    m.add_function(wrap_pyfunction!(parse_duration, m)?)?;
    m.add_class::<autoscale::MetricBuffer>()?;
    m.add_class::<autoscale::AutoscaleRules>()?;
    m.add("ScaleSetError", py.get_type::<ScaleSetError>())?;
    m.add("InvalidInputError", py.get_type::<InvalidInputError>())?;
    m.add("ConflictError", py.get_type::<ConflictError>())?;
    m.add("NotFoundError", py.get_type::<NotFoundError>())?;
    m.add("CapacityError", py.get_type::<CapacityError>())?;
    Ok(())
}
