//! Rebalancing, the parts that touch instances: grouping a scale set into capacity pools for the
//! solver (which works on counts, never on individual VMs), choosing which instances leave once the
//! solver has said how many leave each pool, and applying the moves.
//!
//! Pools are (zone, fault domain, VM size, priority). Movable instances are split further by class,
//! the order in which they are preferably replaced: unhealthy, then running an out-of-date model, then
//! the rest. Protected and deallocated instances never move; they are "fixed" pools that still count
//! toward the shape. Instances outside the balance (regional instances of a zone-spanning set, or in a
//! zone that is down) never move and do not count toward zone balance.

use crate::engine::Engine;
use crate::error::{codes, CoreError, Result};
use crate::model::{Health, Instance, PowerState, Priority, ZoneSlot};
use crate::plan::{CreateCause, DeleteCause, Plan, PlannedCreate, PlannedDelete};
use crate::scale_out::SetView;

/// Replacement preference of a movable instance: lower goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Unhealthy = 0,
    Outdated = 1,
    Current = 2,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolRow {
    /// Index into `RebalanceInput::slots`.
    pub slot: usize,
    pub fault_domain: u32,
    /// Index into the engine's size table.
    pub vm_size: u16,
    pub priority: Priority,
    /// `None` for fixed (immovable) instances.
    pub class: Option<Class>,
    pub count: u64,
    pub price: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewPool {
    pub slot: usize,
    pub vm_size: u16,
    pub priority: Priority,
    /// How many more instances the pool can take (`u64::MAX`: unlimited).
    pub available: u64,
    pub price: f64,
}

/// Everything the solver needs, as counts.
#[derive(Debug, Clone, PartialEq)]
pub struct RebalanceInput {
    pub capacity: u64,
    pub fault_domains: u32,
    pub slots: Vec<ZoneSlot>,
    pub slot_available: Vec<bool>,
    /// The Regular count the priority mix wants at this capacity.
    pub regular_target: Option<u64>,
    /// Regular and Spot instances outside the balance (never move).
    pub outside: [u64; 2],
    pub rows: Vec<PoolRow>,
    /// Pools new instances may go to: available zones, the model's sizes, allowed priorities.
    pub new_pools: Vec<NewPool>,
    /// Sizes of the current model (instances on other sizes should be replaced).
    pub model_sizes: Vec<u16>,
}

fn class_of(i: &Instance, model_version: u64) -> Option<Class> {
    if i.protect_from_scale_in
        || i.protect_from_scale_set_actions
        || i.power_state == PowerState::Deallocated
    {
        None
    } else if i.health == Health::Unhealthy {
        Some(Class::Unhealthy)
    } else if i.model_version < model_version {
        Some(Class::Outdated)
    } else {
        Some(Class::Current)
    }
}

/// Where an instance sits for rebalancing: a slot index, or None when it is outside the balance.
fn slot_index(slots: &[ZoneSlot], available: &[bool], zone: ZoneSlot) -> Option<usize> {
    slots
        .iter()
        .position(|&s| s == zone)
        .filter(|&s| available[s])
}

type RowKey = (usize, u32, u16, Priority, Option<Class>);

fn row_key(
    view: &SetView<'_>,
    slots: &[ZoneSlot],
    available: &[bool],
    i: &Instance,
) -> Option<RowKey> {
    let slot = slot_index(slots, available, i.zone)?;
    Some((
        slot,
        i.fault_domain,
        i.vm_size,
        i.priority,
        class_of(i, view.spec.model_version),
    ))
}

impl Engine {
    /// Groups `name` into pools for the rebalancer.
    pub fn rebalance_input(&self, name: &str) -> Result<RebalanceInput> {
        let state = self.scale_set(name)?;
        let view = SetView {
            spec: &state.spec,
            instances: &state.instances,
            size_ids: state.size_ids(),
            region: self.region(),
            groups: None,
        };
        let slots = view.slots()?;
        let available: Vec<bool> = slots
            .iter()
            .map(|&s| self.region().is_available(s))
            .collect();
        let span = view.fault_domain_span()?;
        let mut rows: std::collections::BTreeMap<RowKey, u64> = std::collections::BTreeMap::new();
        let mut outside = [0u64; 2];
        for i in &state.instances {
            match row_key(&view, &slots, &available, i) {
                Some(key) => *rows.entry(key).or_default() += 1,
                None => outside[i.priority.index()] += 1,
            }
        }
        let price = |slot: usize, size: u16, priority: Priority| {
            let size_name = self
                .sizes()
                .get(usize::from(size))
                .map_or("", String::as_str);
            self.region().pool(slots[slot], size_name, priority)
        };
        let rows = rows
            .into_iter()
            .map(
                |((slot, fault_domain, vm_size, priority, class), count)| PoolRow {
                    slot,
                    fault_domain,
                    vm_size,
                    priority,
                    class,
                    count,
                    price: price(slot, vm_size, priority).price,
                },
            )
            .collect();
        let priorities: Vec<Priority> = if state.spec.priority_mix_policy.is_some() {
            vec![Priority::Regular, Priority::Spot]
        } else {
            vec![state.spec.priority]
        };
        let mut new_pools = Vec::new();
        for (slot, &up) in available.iter().enumerate() {
            if !up {
                continue;
            }
            for &size in state.size_ids() {
                for &priority in &priorities {
                    let pool = price(slot, size, priority);
                    let max_price = state
                        .spec
                        .max_price
                        .filter(|&m| m > 0.0 && priority == Priority::Spot);
                    if max_price.is_some_and(|m| pool.price > m) {
                        continue;
                    }
                    new_pools.push(NewPool {
                        slot,
                        vm_size: size,
                        priority,
                        available: pool.available.unwrap_or(u64::MAX),
                        price: pool.price,
                    });
                }
            }
        }
        let capacity = state.capacity();
        Ok(RebalanceInput {
            capacity,
            fault_domains: span,
            slots,
            slot_available: available,
            regular_target: state
                .spec
                .priority_mix_policy
                .map(|m| m.regular_target(capacity)),
            outside,
            rows,
            new_pools,
            model_sizes: state.size_ids().to_vec(),
        })
    }

    /// Chooses which instances leave: `removals[r]` instances of pool row `r` of [`Engine::rebalance_input`],
    /// oldest first, returned row by row. Fails if the scale set changed since the rows were made.
    pub fn select_rebalance_deletes(&self, name: &str, removals: &[u64]) -> Result<Vec<u64>> {
        let input = self.rebalance_input(name)?;
        if removals.len() != input.rows.len() {
            return Err(CoreError::conflict(
                codes::OPERATION_NOT_ALLOWED,
                format!("the rebalance plan for '{name}' is stale: the scale set changed while it was being made; plan again."),
            ));
        }
        let state = self.scale_set(name)?;
        let view = SetView {
            spec: &state.spec,
            instances: &state.instances,
            size_ids: state.size_ids(),
            region: self.region(),
            groups: None,
        };
        let index: std::collections::BTreeMap<RowKey, usize> = input
            .rows
            .iter()
            .enumerate()
            .map(|(r, row)| {
                (
                    (
                        row.slot,
                        row.fault_domain,
                        row.vm_size,
                        row.priority,
                        row.class,
                    ),
                    r,
                )
            })
            .collect();
        let mut left: Vec<u64> = removals.to_vec();
        for (r, row) in input.rows.iter().enumerate() {
            if left[r] > 0 && (row.class.is_none() || left[r] > row.count) {
                return Err(CoreError::invalid(
                    codes::INVALID_PARAMETER,
                    format!(
                        "pool row {r} cannot give up {} instances (it has {} movable).",
                        left[r],
                        if row.class.is_some() { row.count } else { 0 }
                    ),
                ));
            }
        }
        let mut chosen: Vec<Vec<u64>> = vec![Vec::new(); input.rows.len()];
        // Instances are sorted by id, so the first ones met in each pool are its oldest.
        for i in &state.instances {
            if let Some(key) = row_key(&view, &input.slots, &input.slot_available, i) {
                let r = index[&key];
                if left[r] > 0 {
                    left[r] -= 1;
                    chosen[r].push(i.instance_id);
                }
            }
        }
        Ok(chosen.concat())
    }

    /// Applies a rebalance: creates in the given pools (slot as a region zone, fault domain, size,
    /// priority), deletes the given instances. Checks every move first; nothing changes on error.
    pub fn apply_rebalance(
        &mut self,
        name: &str,
        creates: &[(ZoneSlot, u32, u16, Priority)],
        deletes: &[u64],
    ) -> Result<Plan> {
        let state = self.scale_set(name)?;
        let view = SetView {
            spec: &state.spec,
            instances: &state.instances,
            size_ids: state.size_ids(),
            region: self.region(),
            groups: None,
        };
        let span = view.fault_domain_span()?;
        let slots = view.slots()?;
        let mut plan = Plan {
            scale_set: name.to_owned(),
            capacity_before: state.capacity(),
            capacity_after: state.capacity() + creates.len() as u64 - deletes.len() as u64,
            ..Plan::default()
        };
        let mut seen = std::collections::BTreeSet::new();
        for &id in deletes {
            let i = state
                .instances
                .binary_search_by_key(&id, |i| i.instance_id)
                .ok()
                .map(|p| &state.instances[p])
                .ok_or_else(|| {
                    CoreError::not_found(
                        codes::INSTANCE_NOT_FOUND,
                        format!("scale set '{name}' has no instance with id {id}."),
                    )
                })?;
            if !seen.insert(id) {
                return Err(CoreError::invalid(
                    codes::INVALID_PARAMETER,
                    format!("instance id {id} is listed twice."),
                ));
            }
            if class_of(i, state.spec.model_version).is_none() {
                return Err(CoreError::conflict(
                    codes::OPERATION_NOT_ALLOWED,
                    format!(
                        "instance {id} is protected or deallocated; a rebalance never moves it."
                    ),
                ));
            }
            plan.deletes.push(PlannedDelete {
                instance_id: id,
                zone: i.zone,
                fault_domain: i.fault_domain,
                vm_size: i.vm_size,
                priority: i.priority,
                cause: DeleteCause::Rebalance,
            });
        }
        let mut taken: std::collections::BTreeMap<(ZoneSlot, u16, Priority), u64> =
            std::collections::BTreeMap::new();
        for (k, &(zone, fd, size, priority)) in creates.iter().enumerate() {
            let ok_zone = slots.contains(&zone);
            let ok_size = state.size_ids().contains(&size);
            let ok_priority =
                state.spec.priority_mix_policy.is_some() || priority == state.spec.priority;
            if !ok_zone || !ok_size || !ok_priority || fd >= span {
                return Err(CoreError::invalid(
                    codes::INVALID_PARAMETER,
                    format!("rebalance create #{k} targets a pool this scale set cannot use (zone {}, fault domain {fd}).", self.region().zone_name(zone)),
                ));
            }
            if !self.region().is_available(zone) {
                // A zone that is down is a shortage of capacity, as a full pool is: a policy placing a
                // replacement there (a repair, a surge) waits for it instead of failing.
                return Err(CoreError::capacity(
                    codes::ZONAL_ALLOCATION_FAILED,
                    format!(
                        "rebalance create #{k} targets zone {}, which is unavailable; move the instance to an available zone, or retry once this one is available again (SetZoneAvailability).",
                        self.region().zone_name(zone)
                    ),
                ));
            }
            let n = taken.entry((zone, size, priority)).or_default();
            *n += 1;
            let size_name = self
                .sizes()
                .get(usize::from(size))
                .map_or("", String::as_str);
            if let Some(available) = self.region().pool(zone, size_name, priority).available {
                if *n > available {
                    return Err(CoreError::capacity(
                        codes::ZONAL_ALLOCATION_FAILED,
                        format!("pool {}/{size_name}/{priority} has capacity for {available} more instances only.", self.region().zone_name(zone)),
                    ));
                }
            }
            plan.creates.push(PlannedCreate {
                instance_id: state.next_instance_id + k as u64,
                zone,
                fault_domain: fd,
                vm_size: size,
                priority,
                cause: CreateCause::Rebalance,
            });
        }
        self.apply(&plan)?;
        Ok(plan)
    }
}
