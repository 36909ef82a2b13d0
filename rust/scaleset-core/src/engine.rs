//! The engine: the region, every scale set and its instances, and the operations on them. Planning
//! borrows the state immutably (so dry runs are free); applying a plan is the only mutation path.

use std::collections::{BTreeMap, BTreeSet};

use crate::auto_zones;
use crate::error::{codes, CoreError, Result};
use crate::model::{
    EvictionPolicy, Health, Instance, PoolKey, PowerState, Priority, ProvisioningState, Region,
    ScaleSetSpec, ZoneSlot,
};
use crate::plan::{CreateCause, DeleteCause, Plan, PlannedDelete};
use crate::scale_in::plan_scale_in;
use crate::scale_out::{plan_scale_out, SetView};
use crate::validate::{check_update, instance_limit, limit_error, resolve};

/// The largest instance id: 2^53 - 1, so ids stay exact in JSON clients and `id + 1` never overflows.
pub const MAX_INSTANCE_ID: u64 = (1 << 53) - 1;

#[derive(Debug, Clone, PartialEq)]
pub struct ScaleSetState {
    pub spec: ScaleSetSpec,
    /// Sorted by instance id, ascending.
    pub instances: Vec<Instance>,
    pub next_instance_id: u64,
    size_ids: Vec<u16>,
    /// The instances grouped as scale-in decides, kept up to date by scale-outs and scale-ins of a few
    /// instances (so one decision costs O(groups + log N), not O(N)); dropped by other changes and built
    /// again by the next single scale-in.
    groups: GroupCache,
}

/// What a scale-in decision tells instances apart by: everything else makes them interchangeable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupKey {
    pub zone: ZoneSlot,
    pub fault_domain: u32,
    pub priority: Priority,
    pub vm_size: u16,
    pub protected: bool,
    /// Unhealthy or deallocated (`prioritize_unhealthy_vms`).
    pub bad: bool,
}

impl GroupKey {
    fn of(i: &Instance) -> Self {
        Self {
            zone: i.zone,
            fault_domain: i.fault_domain,
            priority: i.priority,
            vm_size: i.vm_size,
            protected: i.is_protected_from_scale_in(),
            bad: i.is_unhealthy_or_inactive(),
        }
    }
}

/// One group: its key, its instance ids, and the oldest and newest of them (what a decision reads).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub key: GroupKey,
    ids: BTreeSet<u64>,
    oldest: u64,
    newest: u64,
}

impl Group {
    /// How many instances the group holds (never 0).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The lowest instance id.
    pub fn oldest(&self) -> u64 {
        self.oldest
    }

    /// The highest instance id.
    pub fn newest(&self) -> u64 {
        self.newest
    }
}

/// Instance ids by [`GroupKey`]: the groups in one vector, ascending by key, so a decision reads them
/// in one sweep of memory (a set holds tens or hundreds of groups; a new group is rare).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Groups(Vec<Group>);

impl Groups {
    /// The groups of `instances`, from scratch.
    pub fn build(instances: &[Instance]) -> Self {
        let mut groups = Self::default();
        for i in instances {
            groups.insert(i);
        }
        groups
    }

    fn find(&self, key: &GroupKey) -> std::result::Result<usize, usize> {
        self.0.binary_search_by(|g| g.key.cmp(key))
    }

    fn insert(&mut self, i: &Instance) {
        let (key, id) = (GroupKey::of(i), i.instance_id);
        match self.find(&key) {
            Ok(at) => {
                let g = &mut self.0[at];
                g.ids.insert(id);
                g.oldest = g.oldest.min(id);
                g.newest = g.newest.max(id);
            }
            Err(at) => self.0.insert(
                at,
                Group {
                    key,
                    ids: BTreeSet::from([id]),
                    oldest: id,
                    newest: id,
                },
            ),
        }
    }

    fn remove(&mut self, i: &Instance) {
        let Ok(at) = self.find(&GroupKey::of(i)) else {
            return;
        };
        let g = &mut self.0[at];
        g.ids.remove(&i.instance_id);
        match (g.ids.first(), g.ids.last()) {
            (Some(&oldest), Some(&newest)) => (g.oldest, g.newest) = (oldest, newest),
            _ => {
                self.0.remove(at);
            }
        }
    }

    /// How many groups there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every group (none is empty), ascending by key.
    pub fn iter(&self) -> std::slice::Iter<'_, Group> {
        self.0.iter()
    }

    /// The group at a position of `iter`.
    pub fn get(&self, at: usize) -> Option<&Group> {
        self.0.get(at)
    }
}

/// A cache: two states are equal whatever their caches hold.
#[derive(Debug, Clone, Default)]
struct GroupCache(Option<Groups>);

impl PartialEq for GroupCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl ScaleSetState {
    /// The scale-in groups, if kept up to date (see `groups` above).
    pub fn groups(&self) -> Option<&Groups> {
        self.groups.0.as_ref()
    }

    /// A change scale-in groups are not kept through (health, protection, sizes, imports, many changes).
    pub(crate) fn touched(&mut self) {
        self.groups.0 = None;
    }

    pub fn capacity(&self) -> u64 {
        self.instances.len() as u64
    }

    /// The spec's VM sizes as indexes into the engine's size table.
    pub fn size_ids(&self) -> &[u16] {
        &self.size_ids
    }

    fn position(&self, instance_id: u64) -> Option<usize> {
        self.instances
            .binary_search_by_key(&instance_id, |i| i.instance_id)
            .ok()
    }
}

/// An instance as a user describes it when importing an existing fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceInput {
    pub instance_id: u64,
    pub name: Option<String>,
    pub zone: Option<String>,
    pub fault_domain: u32,
    pub vm_size: String,
    pub priority: Priority,
    pub power_state: PowerState,
    pub health: Health,
    pub provisioning_state: ProvisioningState,
    pub model_version: Option<u64>,
    pub protect_from_scale_in: bool,
    pub protect_from_scale_set_actions: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Eviction {
    pub deleted: Vec<u64>,
    pub deallocated: Vec<u64>,
}

#[derive(Debug, Clone)]
pub struct Engine {
    region: Region,
    sets: BTreeMap<String, ScaleSetState>,
    sizes: Vec<String>,
    instance_limit_override: Option<u64>,
    /// Scale sets changed (created, mutated or deleted) since [`Engine::take_changed`] last ran: what an
    /// incremental snapshot must write again.
    changed: BTreeSet<String>,
}

/// Extra VMs of an overprovisioned scale-out, as a percentage of it (ours; Azure does not document it).
pub const DEFAULT_OVERPROVISION_PERCENT: u32 = 20;

/// Scale sets up to this size count as small for [`Engine::is_one_small_decision`].
pub const SMALL_SET: u64 = 10_000;

fn not_found(name: &str) -> CoreError {
    CoreError::not_found(
        codes::RESOURCE_NOT_FOUND,
        format!("scale set '{name}' does not exist."),
    )
}

impl Engine {
    pub fn new(region: Region, instance_limit_override: Option<u64>) -> Self {
        Self {
            region,
            sets: BTreeMap::new(),
            sizes: Vec::new(),
            instance_limit_override,
            changed: BTreeSet::new(),
        }
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The engine's VM size table; instances and plans refer to sizes by index into it.
    pub fn sizes(&self) -> &[String] {
        &self.sizes
    }

    pub fn scale_set(&self, name: &str) -> Result<&ScaleSetState> {
        self.sets.get(name).ok_or_else(|| not_found(name))
    }

    pub(crate) fn scale_set_mut(&mut self, name: &str) -> Result<&mut ScaleSetState> {
        let state = self.sets.get_mut(name).ok_or_else(|| not_found(name))?;
        if !self.changed.contains(name) {
            self.changed.insert(name.to_owned());
        }
        Ok(state)
    }

    /// The scale sets changed since the last call (each at most once, by name; a deleted one too), and
    /// forgets them.
    pub fn take_changed(&mut self) -> Vec<String> {
        std::mem::take(&mut self.changed).into_iter().collect()
    }

    pub fn scale_sets(&self) -> impl Iterator<Item = &ScaleSetState> {
        self.sets.values()
    }

    pub fn instance_limit(&self, name: &str) -> Result<u64> {
        Ok(instance_limit(
            &self.scale_set(name)?.spec,
            self.instance_limit_override,
        ))
    }

    fn intern_size(&mut self, name: &str) -> Result<u16> {
        if let Some(i) = self.sizes.iter().position(|s| s == name) {
            return Ok(i as u16);
        }
        if self.sizes.len() >= usize::from(u16::MAX) {
            return Err(CoreError::invalid(
                codes::INVALID_PARAMETER,
                "too many distinct VM sizes.",
            )
            .at("vm_size"));
        }
        self.sizes.push(name.to_owned());
        Ok((self.sizes.len() - 1) as u16)
    }

    fn intern_spec_sizes(&mut self, spec: &ScaleSetSpec) -> Result<Vec<u16>> {
        spec.vm_size_names()
            .into_iter()
            .map(|s| self.intern_size(s))
            .collect()
    }

    fn view<'a>(&'a self, state: &'a ScaleSetState) -> SetView<'a> {
        SetView {
            spec: &state.spec,
            instances: &state.instances,
            size_ids: &state.size_ids,
            region: &self.region,
            groups: state.groups(),
        }
    }

    // ----- scale sets -------------------------------------------------------------------------------

    /// Creates a scale set and scales it to `capacity`; nothing is stored if either step fails.
    pub fn create_scale_set(
        &mut self,
        spec: ScaleSetSpec,
        capacity: u64,
    ) -> Result<(ScaleSetSpec, Plan)> {
        let mut spec = spec;
        if auto_zones::is_auto(&spec) {
            if !spec.zones.is_empty() {
                return Err(CoreError::invalid(
                    codes::INVALID_PARAMETER,
                    "zones and placement.zone_placement_policy Auto are mutually exclusive: leave zones empty and the engine chooses them.",
                )
                .at("zones"));
            }
            spec.zones = auto_zones::initial_zones(&spec, &self.region);
        }
        let mut spec = resolve(spec, &self.region)?;
        if self.sets.contains_key(&spec.name) {
            return Err(CoreError::conflict(
                codes::SCALE_SET_ALREADY_EXISTS,
                format!(
                    "scale set '{}' already exists; update it or choose another name.",
                    spec.name
                ),
            ));
        }
        spec.model_version = 1;
        let limit = instance_limit(&spec, self.instance_limit_override);
        if capacity > limit {
            return Err(limit_error(&spec.name, limit));
        }
        // A failed create leaves no trace, not even its VM sizes in the engine's size table.
        let sizes_before = self.sizes.len();
        let result = self.create_placed(spec, capacity);
        if result.is_err() {
            self.sizes.truncate(sizes_before);
        }
        result
    }

    fn create_placed(&mut self, spec: ScaleSetSpec, capacity: u64) -> Result<(ScaleSetSpec, Plan)> {
        let size_ids = self.intern_spec_sizes(&spec)?;
        let state = ScaleSetState {
            spec: spec.clone(),
            instances: Vec::new(),
            next_instance_id: 0,
            size_ids,
            groups: GroupCache::default(),
        };
        let mut plan = Plan {
            scale_set: spec.name.clone(),
            capacity_before: 0,
            capacity_after: capacity,
            ..Plan::default()
        };
        self.scale_out_into(&state, capacity, &mut plan)?;
        // Before the set is stored: a create beyond a core quota leaves no scale set behind.
        self.check_quota(&plan)?;
        let name = spec.name.clone();
        self.changed.insert(name.clone());
        self.sets.insert(name, state);
        self.apply_within_quota(&plan)?;
        Ok((spec, plan))
    }

    /// Replaces a scale set's model. Unset optional fields keep their stored values. Returns the stored spec.
    pub fn update_scale_set(&mut self, mut spec: ScaleSetSpec) -> Result<ScaleSetSpec> {
        let old = self.scale_set(&spec.name)?.spec.clone();
        spec.platform_fault_domain_count = spec
            .platform_fault_domain_count
            .or(old.platform_fault_domain_count);
        spec.single_placement_group = spec.single_placement_group.or(old.single_placement_group);
        spec.overprovision = spec.overprovision.or(old.overprovision);
        if old.placement.is_some() {
            if spec.placement.is_none() {
                return Err(CoreError::conflict(
                    codes::PROPERTY_CHANGE_NOT_ALLOWED,
                    "Changing property 'placement' is not allowed: a scale set with automatic zone placement cannot return to regional or explicit zones.",
                )
                .at("placement"));
            }
            if !spec.zones.is_empty() && spec.zones != old.zones {
                return Err(CoreError::conflict(
                    codes::PROPERTY_CHANGE_NOT_ALLOWED,
                    "Changing property 'zones' is not allowed: automatic zone placement chooses the zones.",
                )
                .at("zones"));
            }
            spec.zones = old.zones.clone();
        } else if spec.placement.is_some() {
            if !old.zones.is_empty() {
                return Err(CoreError::conflict(
                    codes::PROPERTY_CHANGE_NOT_ALLOWED,
                    "Changing property 'placement' is not allowed: only a regional scale set can switch to automatic zone placement.",
                )
                .at("placement"));
            }
            // The one-way switch from regional (reference §2.6): existing instances stay where they are.
            spec.zones = auto_zones::initial_zones(&spec, &self.region);
        }
        if spec.priority == old.priority {
            spec.eviction_policy = spec.eviction_policy.or(old.eviction_policy);
        }
        // Immutable properties first, so a forbidden change says so rather than failing validation.
        check_update(&old, &spec)?;
        let mut spec = resolve(spec, &self.region)?;
        let model_changed = check_update(&old, &spec)?;
        if spec.max_price != old.max_price {
            // Azure: a Spot VM's max price changes only while it is deallocated.
            let state = self.scale_set(&spec.name)?;
            if let Some(vm) = state
                .instances
                .iter()
                .find(|i| i.priority == Priority::Spot && i.power_state == PowerState::Running)
            {
                let vm_name = vm
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{}_{}", spec.name, vm.instance_id));
                return Err(CoreError::conflict(
                    codes::MAX_PRICE_CHANGE_NOT_ALLOWED_FOR_ALLOCATED_VMS,
                    format!("Max price change is not allowed when the VM '{vm_name}' is currently allocated. Deallocate and try again."),
                )
                .at("max_price"));
            }
        }
        spec.model_version = old.model_version + u64::from(model_changed);
        let limit = instance_limit(&spec, self.instance_limit_override);
        let capacity = self.scale_set(&spec.name)?.capacity();
        if capacity > limit {
            return Err(limit_error(&spec.name, limit));
        }
        let size_ids = self.intern_spec_sizes(&spec)?;
        let state = self.scale_set_mut(&spec.name)?;
        state.spec = spec.clone();
        state.size_ids = size_ids;
        Ok(spec)
    }

    /// Deletes a scale set and all its instances, returning their capacity to the pools.
    pub fn delete_scale_set(&mut self, name: &str) -> Result<()> {
        let state = self.sets.remove(name).ok_or_else(|| not_found(name))?;
        self.changed.insert(name.to_owned());
        let released: Vec<(ZoneSlot, u16, Priority)> = state
            .instances
            .iter()
            .map(|i| (i.zone, i.vm_size, i.priority))
            .collect();
        self.adjust_pools(&released, true);
        Ok(())
    }

    // ----- capacity -----------------------------------------------------------------------------------

    /// The plan that takes `name` to `capacity` instances; changes nothing.
    pub fn plan_capacity(&self, name: &str, capacity: u64) -> Result<Plan> {
        let state = self.scale_set(name)?;
        let current = state.capacity();
        let view = self.view(state);
        let mut plan = Plan {
            scale_set: name.to_owned(),
            capacity_before: current,
            capacity_after: capacity,
            ..Plan::default()
        };
        if capacity > current {
            let limit = instance_limit(&state.spec, self.instance_limit_override);
            if capacity > limit {
                return Err(limit_error(name, limit));
            }
            self.scale_out_into(state, capacity - current, &mut plan)?;
        } else if capacity < current {
            plan.deletes = plan_scale_in(&view, current - capacity, &self.sizes)?;
        }
        Ok(plan)
    }

    /// The creates of a scale-out by `requested` instances: automatic zone placement (which may place fewer,
    /// a partial allocation), or the zone rules and then overprovisioning's extras.
    fn scale_out_into(&self, state: &ScaleSetState, requested: u64, plan: &mut Plan) -> Result<()> {
        let view = self.view(state);
        if auto_zones::is_auto(&state.spec) {
            let auto = auto_zones::plan(&view, requested, state.next_instance_id)?;
            plan.capacity_after -= auto.unallocated;
            plan.unallocated = auto.unallocated;
            plan.unallocated_reason = auto.unallocated_reason;
            plan.creates = auto.creates;
            return Ok(());
        }
        plan.creates = plan_scale_out(&view, requested, state.next_instance_id)?;
        if state.spec.overprovision == Some(true) {
            self.overprovision(&view, &state.spec, requested, state.next_instance_id, plan);
        }
        Ok(())
    }

    /// Adds an overprovisioned scale-out's extra VMs (placed by the same rules, after the requested ones)
    /// and their deletes. Extras that do not fit anywhere are simply not made: they never fail a request.
    fn overprovision(
        &self,
        view: &SetView<'_>,
        spec: &ScaleSetSpec,
        requested: u64,
        next_id: u64,
        plan: &mut Plan,
    ) {
        let percent = u64::from(
            spec.overprovision_percent
                .unwrap_or(DEFAULT_OVERPROVISION_PERCENT),
        );
        let mut extra = (requested * percent).div_ceil(100);
        while extra > 0 {
            if let Ok(all) = plan_scale_out(view, requested + extra, next_id) {
                let cause = CreateCause::Overprovisioned {
                    requested,
                    no_extensions: spec.do_not_run_extensions_on_overprovisioned_vms,
                };
                for mut c in all
                    .into_iter()
                    .skip(usize::try_from(requested).unwrap_or(usize::MAX))
                {
                    c.cause = cause;
                    plan.deletes.push(PlannedDelete {
                        instance_id: c.instance_id,
                        zone: c.zone,
                        fault_domain: c.fault_domain,
                        vm_size: c.vm_size,
                        priority: c.priority,
                        cause: DeleteCause::Overprovisioned,
                    });
                    plan.creates.push(c);
                }
                return;
            }
            extra /= 2; // capacity short: fewer extras, never a failed request
        }
    }

    /// Whether `set_capacity(name, capacity, _)` is one decision over the kept groups of a set of at most
    /// [`SMALL_SET`] instances: a microsecond or two whatever the rules (applying it moves at most that
    /// many instances in memory; a scale-out is not one when quotas or automatic zone placement apply).
    /// A caller may then run it without handing its own locks over first.
    pub fn is_one_small_decision(&self, name: &str, capacity: u64) -> bool {
        self.sets.get(name).is_some_and(|state| {
            let current = state.capacity();
            state.groups.0.is_some()
                && current <= SMALL_SET
                && (capacity + 1 == current
                    || capacity == current + 1
                        && self.region.core_quotas.is_empty()
                        && !auto_zones::is_auto(&state.spec))
        })
    }

    pub fn set_capacity(&mut self, name: &str, capacity: u64, dry_run: bool) -> Result<Plan> {
        // Not `scale_set_mut`: building the groups (a cache) changes nothing a snapshot holds.
        let state = self.sets.get_mut(name).ok_or_else(|| not_found(name))?;
        if capacity.abs_diff(state.capacity()) == 1 && state.groups.0.is_none() {
            // One decision: worth the groups, which the following decisions reuse.
            state.groups.0 = Some(Groups::build(&state.instances));
        }
        let plan = self.plan_capacity(name, capacity)?;
        if dry_run {
            self.check_quota(&plan)?;
        } else {
            self.apply(&plan)?;
        }
        Ok(plan)
    }

    /// Refuses a plan whose new instances would take a quota family's running vCPUs above its quota
    /// (Azure: OperationNotAllowed, the whole request fails). Costs nothing without quotas; with them,
    /// one pass over the region's instances for each family the plan adds to.
    pub fn check_quota(&self, plan: &Plan) -> Result<()> {
        if self.region.core_quotas.is_empty() || plan.creates.is_empty() {
            return Ok(());
        }
        let transient: std::collections::BTreeSet<u64> = plan
            .creates
            .iter()
            .filter(|c| matches!(c.cause, CreateCause::Overprovisioned { .. }))
            .map(|c| c.instance_id)
            .collect();
        let mut delta: BTreeMap<String, i128> = BTreeMap::new();
        let mut family_of = |size: u16, priority: Priority, sign: i128| {
            let name = self.sizes.get(usize::from(size)).map_or("", String::as_str);
            if let Some((family, cores)) = crate::model::quota_family(name, priority) {
                if self.region.core_quotas.contains_key(&family) {
                    *delta.entry(family).or_default() += sign * i128::from(cores);
                }
            }
        };
        for c in plan
            .creates
            .iter()
            .filter(|c| !transient.contains(&c.instance_id))
        {
            family_of(c.vm_size, c.priority, 1);
        }
        for d in plan
            .deletes
            .iter()
            .filter(|d| !transient.contains(&d.instance_id))
        {
            family_of(d.vm_size, d.priority, -1);
        }
        for (family, added) in delta.into_iter().filter(|(_, added)| *added > 0) {
            let limit = self.region.core_quotas[&family];
            let used: u64 = self
                .sets
                .values()
                .flat_map(|s| s.instances.iter())
                .filter(|i| i.power_state == PowerState::Running)
                .filter_map(|i| {
                    let name = self.sizes.get(usize::from(i.vm_size))?;
                    crate::model::quota_family(name, i.priority).filter(|(f, _)| *f == family)
                })
                .map(|(_, cores)| cores)
                .sum();
            if i128::from(used) + added > i128::from(limit) {
                return Err(CoreError::capacity(
                    codes::OPERATION_NOT_ALLOWED,
                    format!(
                        "Operation could not be completed as it results in exceeding approved {family} Cores quota. Additional details - Current Limit: {limit}, Current Usage: {used}, Additional Required: {added}, (Minimum) New Limit Required: {}. Raise the quota (SetCoreQuota) or scale to fewer instances.",
                        i128::from(used) + added
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Sets the vCPU quota of a quota family (`None`: no quota).
    pub fn set_core_quota(&mut self, family: &str, cores: Option<u64>) -> Result<()> {
        if family.is_empty()
            || family.len() > 128
            || !family.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(CoreError::invalid(
                codes::INVALID_PARAMETER,
                format!("quota family '{}' must be 1 to 128 letters and digits, such as standardDSv5Family or lowPriorityCores.", crate::validate::shown(family)),
            )
            .at("family"));
        }
        match cores {
            Some(c) => self.region.core_quotas.insert(family.to_owned(), c),
            None => self.region.core_quotas.remove(family),
        };
        Ok(())
    }

    /// Applies a plan made by this engine: creates instances, removes instances, moves pool capacity.
    pub fn apply(&mut self, plan: &Plan) -> Result<()> {
        self.check_quota(plan)?;
        self.apply_within_quota(plan)
    }

    /// [`Engine::apply`] of a plan whose quota was checked against the region as it is.
    fn apply_within_quota(&mut self, plan: &Plan) -> Result<()> {
        self.scale_set_mut(&plan.scale_set)?; // marks it changed
        let state = self
            .sets
            .get_mut(&plan.scale_set)
            .ok_or_else(|| not_found(&plan.scale_set))?;
        let model_version = state.spec.model_version;
        if state.spec.placement.is_some() {
            // Automatic zone placement: a zone a create went to is now one of the set's zones.
            let zones = &self.region.zones;
            for c in &plan.creates {
                if let Some(name) = c.zone.and_then(|z| zones.get(usize::from(z))) {
                    if !state.spec.zones.contains(name) {
                        state.spec.zones.push(name.clone());
                    }
                }
            }
            state
                .spec
                .zones
                .sort_by_key(|z| zones.iter().position(|r| r == z));
        }
        if plan.deletes.len() > 32 || plan.creates.len() > 32 {
            state.touched(); // many changes: the next single scale-in rebuilds the groups in one pass
        }
        if plan.deletes.len() <= 32 {
            // A few deletes (one decision at a time is common): find each by id, remove last first.
            let mut at: Vec<usize> = plan
                .deletes
                .iter()
                .filter_map(|d| {
                    state
                        .instances
                        .binary_search_by_key(&d.instance_id, |i| i.instance_id)
                        .ok()
                })
                .collect();
            at.sort_unstable_by(|a, b| b.cmp(a));
            at.dedup();
            for p in at {
                let gone = state.instances.remove(p);
                if let Some(groups) = state.groups.0.as_mut() {
                    groups.remove(&gone);
                }
            }
        } else {
            let mut gone: Vec<u64> = plan.deletes.iter().map(|d| d.instance_id).collect();
            gone.sort_unstable();
            state
                .instances
                .retain(|i| gone.binary_search(&i.instance_id).is_err());
        }
        for c in &plan.creates {
            state.next_instance_id = state.next_instance_id.max(c.instance_id + 1);
            if matches!(c.cause, CreateCause::Overprovisioned { .. }) {
                continue; // created and deleted within the plan: it takes an id, and nothing stays
            }
            state.instances.push(Instance {
                instance_id: c.instance_id,
                name: None,
                zone: c.zone,
                fault_domain: c.fault_domain,
                vm_size: c.vm_size,
                priority: c.priority,
                power_state: PowerState::Running,
                health: Health::Unknown,
                provisioning_state: ProvisioningState::Succeeded,
                model_version,
                protect_from_scale_in: false,
                protect_from_scale_set_actions: false,
            });
            if let Some(groups) = state.groups.0.as_mut() {
                groups.insert(state.instances.last().expect("just pushed"));
            }
        }
        let taken: Vec<(ZoneSlot, u16, Priority)> = plan
            .creates
            .iter()
            .map(|c| (c.zone, c.vm_size, c.priority))
            .collect();
        let released: Vec<(ZoneSlot, u16, Priority)> = plan
            .deletes
            .iter()
            .filter(|d| d.cause != DeleteCause::Evicted)
            .map(|d| (d.zone, d.vm_size, d.priority))
            .collect();
        self.adjust_pools(&taken, false);
        self.adjust_pools(&released, true);
        Ok(())
    }

    /// Moves limited pools' capacity: `release` gives it back, otherwise it is taken.
    fn adjust_pools(&mut self, items: &[(ZoneSlot, u16, Priority)], release: bool) {
        if self.region.pools.is_empty() {
            return; // no capacity pools: nothing to count
        }
        let mut per_pool: BTreeMap<(ZoneSlot, u16, Priority), u64> = BTreeMap::new();
        for &key in items {
            *per_pool.entry(key).or_default() += 1;
        }
        for ((zone, size, priority), n) in per_pool {
            let key = PoolKey {
                zone,
                vm_size: self.sizes[usize::from(size)].clone(),
                priority,
            };
            if let Some(pool) = self.region.pools.get_mut(&key) {
                if let Some(available) = pool.available.as_mut() {
                    *available = if release {
                        available.saturating_add(n)
                    } else {
                        available.saturating_sub(n)
                    };
                }
            }
        }
    }

    // ----- instances ----------------------------------------------------------------------------------

    /// Adopts existing instances (a migrated fleet, or an exact starting state for tests).
    pub fn import_instances(&mut self, name: &str, inputs: Vec<InstanceInput>) -> Result<()> {
        let state = self.scale_set(name)?;
        let limit = instance_limit(&state.spec, self.instance_limit_override);
        if state.capacity() + inputs.len() as u64 > limit {
            return Err(limit_error(name, limit));
        }
        self.adopt(name, inputs, true)
    }

    /// Puts back a scale set exactly as it was saved (a snapshot): its stored spec with its model
    /// version, its instances, and the next instance id (which may be past every live instance).
    pub fn restore_scale_set(
        &mut self,
        spec: ScaleSetSpec,
        inputs: Vec<InstanceInput>,
        next_instance_id: u64,
    ) -> Result<()> {
        let model_version = spec.model_version;
        let mut spec = resolve(spec, &self.region)?;
        spec.model_version = model_version;
        if self.sets.contains_key(&spec.name) {
            return Err(CoreError::conflict(
                codes::SCALE_SET_ALREADY_EXISTS,
                format!("scale set '{}' already exists.", spec.name),
            ));
        }
        let size_ids = self.intern_spec_sizes(&spec)?;
        let name = spec.name.clone();
        self.changed.insert(name.clone());
        self.sets.insert(
            name.clone(),
            ScaleSetState {
                spec,
                instances: Vec::new(),
                next_instance_id,
                size_ids,
                groups: GroupCache::default(),
            },
        );
        if let Err(e) = self.adopt(&name, inputs, false) {
            self.sets.remove(&name);
            return Err(e);
        }
        Ok(())
    }

    /// Adds instances; `model_sizes_only` also requires each size to be one of the spec's current sizes
    /// (a restore keeps instances of sizes the model has since moved away from).
    fn adopt(
        &mut self,
        name: &str,
        inputs: Vec<InstanceInput>,
        model_sizes_only: bool,
    ) -> Result<()> {
        let state = self.scale_set(name)?;
        let span = self.view(state).fault_domain_span()?;
        let spec = state.spec.clone();
        let allowed_sizes = spec.vm_size_names();
        let mut seen = BTreeSet::new();
        let mut imported = Vec::with_capacity(inputs.len());
        for input in inputs {
            let id = input.instance_id;
            if id > MAX_INSTANCE_ID {
                return Err(CoreError::invalid(
                    codes::INVALID_PARAMETER,
                    format!("instance id {id} is too large: ids must be at most {MAX_INSTANCE_ID} (2^53 - 1, exact in every JSON client)."),
                )
        .at("instances.instance_id"));
            }
            if !seen.insert(id) {
                return Err(CoreError::invalid(
                    codes::INVALID_PARAMETER,
                    format!("instance id {id} is listed twice."),
                ));
            }
            if state.position(id).is_some() {
                return Err(CoreError::conflict(
                    codes::INSTANCE_ALREADY_EXISTS,
                    format!("instance id {id} already exists in scale set '{name}'."),
                ));
            }
            let zone = match &input.zone {
                None => None,
                Some(z) if spec.zones.contains(z) => Some(self.region.zone_index(z)?),
                Some(z) => {
                    return Err(CoreError::invalid(
                        codes::INVALID_PARAMETER,
                        format!(
                            "instance {id}: zone '{z}' is not one of the scale set's zones {:?}.",
                            spec.zones
                        ),
                    )
                    .at("instances.zone"))
                }
            };
            if input.fault_domain >= span {
                return Err(CoreError::invalid(
                    codes::INVALID_PARAMETER,
                    format!("instance {id}: fault_domain {} is out of range; this scale set uses fault domains 0..{}.", input.fault_domain, span - 1),
                )
        .at("instances.fault_domain"));
            }
            if model_sizes_only && !allowed_sizes.contains(&input.vm_size.as_str()) {
                return Err(CoreError::invalid(
                    codes::INVALID_PARAMETER,
                    format!("instance {id}: vm_size '{}' is not one of the scale set's sizes {allowed_sizes:?}.", input.vm_size),
                )
        .at("instances.vm_size"));
            }
            let priority_ok = if spec.priority_mix_policy.is_some() {
                true
            } else {
                input.priority == spec.priority
            };
            if !priority_ok {
                return Err(CoreError::invalid(
                    codes::INVALID_PARAMETER,
                    format!(
                        "instance {id}: priority {} does not match the scale set's priority {}.",
                        input.priority, spec.priority
                    ),
                )
                .at("instances.priority"));
            }
            if input.protect_from_scale_set_actions && !input.protect_from_scale_in {
                return Err(protection_error());
            }
            imported.push((input, zone));
        }
        let mut new_instances = Vec::with_capacity(imported.len());
        for (input, zone) in imported {
            let vm_size = self.intern_size(&input.vm_size)?;
            new_instances.push(Instance {
                instance_id: input.instance_id,
                name: input.name,
                zone,
                fault_domain: input.fault_domain,
                vm_size,
                priority: input.priority,
                power_state: input.power_state,
                health: input.health,
                provisioning_state: input.provisioning_state,
                model_version: input.model_version.unwrap_or(spec.model_version),
                protect_from_scale_in: input.protect_from_scale_in,
                protect_from_scale_set_actions: input.protect_from_scale_set_actions,
            });
        }
        let state = self.scale_set_mut(name)?;
        state.instances.extend(new_instances);
        state.instances.sort_by_key(|i| i.instance_id);
        state.touched();
        let max_id = state.instances.last().map_or(0, |i| i.instance_id + 1);
        state.next_instance_id = state.next_instance_id.max(max_id);
        Ok(())
    }

    /// Positions of `ids` in the scale set, in the order given; rejects duplicates and unknown ids.
    fn positions(&self, name: &str, ids: &[u64]) -> Result<Vec<usize>> {
        let state = self.scale_set(name)?;
        let mut seen = BTreeSet::new();
        let mut missing = Vec::new();
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            if !seen.insert(id) {
                return Err(CoreError::invalid(
                    codes::INVALID_PARAMETER,
                    format!("instance id {id} is listed twice."),
                ));
            }
            match state.position(id) {
                Some(p) => out.push(p),
                None => missing.push(id),
            }
        }
        if !missing.is_empty() {
            let shown: Vec<String> = missing.iter().take(10).map(u64::to_string).collect();
            return Err(CoreError::not_found(
                codes::INSTANCE_NOT_FOUND,
                format!(
                    "scale set '{name}' has no instance with id {}{}.",
                    shown.join(", "),
                    if missing.len() > 10 { ", ..." } else { "" }
                ),
            ));
        }
        Ok(out)
    }

    /// Deletes chosen instances. Allowed for protected instances too: protection guards against
    /// scale-in and scale-set actions, not against a user deleting one instance (reference §4).
    pub fn delete_instances(&mut self, name: &str, ids: &[u64]) -> Result<Plan> {
        let positions = self.positions(name, ids)?;
        let state = self.scale_set(name)?;
        let deletes = positions
            .iter()
            .map(|&p| {
                let i = &state.instances[p];
                PlannedDelete {
                    instance_id: i.instance_id,
                    zone: i.zone,
                    fault_domain: i.fault_domain,
                    vm_size: i.vm_size,
                    priority: i.priority,
                    cause: DeleteCause::Manual,
                }
            })
            .collect::<Vec<_>>();
        let before = state.capacity();
        let plan = Plan {
            scale_set: name.to_owned(),
            capacity_before: before,
            capacity_after: before - deletes.len() as u64,
            creates: Vec::new(),
            deletes,
            ..Plan::default()
        };
        self.apply(&plan)?;
        Ok(plan)
    }

    /// Spot eviction: `Delete` removes the instances (capacity drops; the pool keeps the capacity Azure
    /// reclaimed), `Deallocate` keeps them deallocated (they still count toward capacity and balance).
    pub fn evict(&mut self, name: &str, ids: &[u64]) -> Result<Eviction> {
        let positions = self.positions(name, ids)?;
        let state = self.scale_set(name)?;
        if let Some(&p) = positions
            .iter()
            .find(|&&p| state.instances[p].priority != Priority::Spot)
        {
            return Err(CoreError::invalid(
                codes::NOT_A_SPOT_INSTANCE,
                format!(
                    "instance {} is a Regular instance; only Spot instances can be evicted.",
                    state.instances[p].instance_id
                ),
            )
            .at("instance_ids"));
        }
        let policy = state
            .spec
            .eviction_policy
            .unwrap_or(EvictionPolicy::Deallocate);
        let mut result = Eviction::default();
        match policy {
            EvictionPolicy::Delete => {
                let deletes = positions
                    .iter()
                    .map(|&p| {
                        let i = &state.instances[p];
                        PlannedDelete {
                            instance_id: i.instance_id,
                            zone: i.zone,
                            fault_domain: i.fault_domain,
                            vm_size: i.vm_size,
                            priority: i.priority,
                            cause: DeleteCause::Evicted,
                        }
                    })
                    .collect::<Vec<_>>();
                result.deleted = deletes.iter().map(|d| d.instance_id).collect();
                let before = state.capacity();
                let plan = Plan {
                    scale_set: name.to_owned(),
                    capacity_before: before,
                    capacity_after: before - deletes.len() as u64,
                    creates: Vec::new(),
                    deletes,
                    ..Plan::default()
                };
                self.apply(&plan)?;
            }
            EvictionPolicy::Deallocate => {
                let state = self.scale_set_mut(name)?;
                state.touched();
                for &p in &positions {
                    state.instances[p].power_state = PowerState::Deallocated;
                    result.deallocated.push(state.instances[p].instance_id);
                }
            }
        }
        Ok(result)
    }

    pub fn set_protection(
        &mut self,
        name: &str,
        ids: &[u64],
        protect_from_scale_in: bool,
        protect_from_scale_set_actions: bool,
    ) -> Result<()> {
        if protect_from_scale_set_actions && !protect_from_scale_in {
            return Err(protection_error());
        }
        let positions = self.positions(name, ids)?;
        let state = self.scale_set_mut(name)?;
        state.touched();
        for p in positions {
            state.instances[p].protect_from_scale_in = protect_from_scale_in;
            state.instances[p].protect_from_scale_set_actions = protect_from_scale_set_actions;
        }
        Ok(())
    }

    /// Records Application Health for several instances at once: all ids are checked before any changes.
    pub fn report_health(&mut self, name: &str, ids: &[u64], health: &[Health]) -> Result<()> {
        if ids.len() != health.len() {
            return Err(CoreError::invalid(
                codes::INVALID_PARAMETER,
                "every instance id needs one health state.",
            )
            .at("reports"));
        }
        let positions = self.positions(name, ids)?;
        let state = self.scale_set_mut(name)?;
        state.touched();
        for (p, &h) in positions.into_iter().zip(health) {
            state.instances[p].health = h;
        }
        Ok(())
    }

    /// Records what the infrastructure did with several instances: all ids are checked before any changes.
    pub fn set_provisioning_state(
        &mut self,
        name: &str,
        ids: &[u64],
        provisioning_state: ProvisioningState,
    ) -> Result<()> {
        let positions = self.positions(name, ids)?;
        let state = self.scale_set_mut(name)?;
        for p in positions {
            state.instances[p].provisioning_state = provisioning_state;
        }
        Ok(())
    }

    // ----- region -------------------------------------------------------------------------------------

    /// The key of a pool named by zone (None: regional), size and priority; both names checked.
    fn pool_key(&self, zone: Option<&str>, vm_size: &str, priority: Priority) -> Result<PoolKey> {
        let zone = zone.map(|z| self.region.zone_index(z)).transpose()?;
        crate::validate::check_size_name(vm_size, "pool.vm_size")?;
        Ok(PoolKey {
            zone,
            vm_size: vm_size.to_owned(),
            priority,
        })
    }

    /// Marks a size as not offered in a zone (or regionally) for a priority, or offered again.
    pub fn set_pool_restricted(
        &mut self,
        zone: Option<&str>,
        vm_size: &str,
        priority: Priority,
        restricted: bool,
    ) -> Result<()> {
        let key = self.pool_key(zone, vm_size, priority)?;
        self.region.pools.entry(key).or_default().restricted = restricted;
        Ok(())
    }

    /// Makes placement skip a pool (as if it had no capacity) or consider it again.
    pub fn set_pool_blocked(
        &mut self,
        zone: Option<&str>,
        vm_size: &str,
        priority: Priority,
        blocked: bool,
    ) -> Result<()> {
        let key = self.pool_key(zone, vm_size, priority)?;
        if blocked {
            self.region.blocked.insert(key);
        } else {
            self.region.blocked.remove(&key);
        }
        Ok(())
    }

    pub fn set_zone_available(&mut self, zone: &str, available: bool) -> Result<()> {
        let z = self.region.zone_index(zone)?;
        self.region.zone_available[usize::from(z)] = available;
        Ok(())
    }

    /// Sets how many more instances a pool can take (`None`: unlimited) and optionally its price.
    pub fn set_pool_capacity(
        &mut self,
        zone: Option<&str>,
        vm_size: &str,
        priority: Priority,
        available: Option<u64>,
        price: Option<f64>,
    ) -> Result<()> {
        let key = self.pool_key(zone, vm_size, priority)?;
        if let Some(p) = price {
            if !(p.is_finite() && p >= 0.0) {
                return Err(CoreError::invalid(
                    codes::INVALID_PARAMETER,
                    format!("pool price must be a non-negative number, got {p}."),
                )
                .at("pool.price"));
            }
        }
        let pool = self.region.pools.entry(key).or_default();
        pool.available = available;
        if let Some(p) = price {
            pool.price = p;
        }
        Ok(())
    }
}

fn protection_error() -> CoreError {
    CoreError::invalid(
        codes::INVALID_PROTECTION_POLICY,
        "protect_from_scale_set_actions requires protect_from_scale_in: you can't set protect_from_scale_in to false while protect_from_scale_set_actions is true.",
    )
        .at("protect_from_scale_set_actions")
}
