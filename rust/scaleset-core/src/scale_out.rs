//! Scale-out: where each new instance goes. Zones first (balance), then fault domains inside the zone,
//! then the priority mix, then the VM size per the allocation strategy and the pools' capacity.

use crate::error::{codes, CoreError, Result};
use crate::model::{AllocationStrategy, Instance, Priority, Region, ScaleSetSpec, ZoneSlot};
use crate::plan::{
    CreateCause, CreateReason, PlannedCreate, PriorityChoice, SizeChoice, ZoneChoice,
};

/// Everything a planner reads about one scale set.
pub struct SetView<'a> {
    pub spec: &'a ScaleSetSpec,
    pub instances: &'a [Instance],
    /// The spec's VM sizes as indexes into the engine's size table, in the spec's order.
    pub size_ids: &'a [u16],
    pub region: &'a Region,
    /// The instances grouped as scale-in decides, when the engine keeps them (see `ScaleSetState`).
    pub groups: Option<&'a crate::engine::Groups>,
}

impl SetView<'_> {
    /// Zone slots this scale set places into: its zones, or the regional slot.
    pub fn slots(&self) -> Result<Vec<ZoneSlot>> {
        let mut slots = Vec::with_capacity(self.spec.zones.len().max(1));
        self.slots_into(&mut slots)?;
        Ok(slots)
    }

    /// [`SetView::slots`], written into `slots` (which it clears first).
    pub fn slots_into(&self, slots: &mut Vec<ZoneSlot>) -> Result<()> {
        slots.clear();
        if self.spec.zones.is_empty() {
            slots.push(None);
        }
        for z in &self.spec.zones {
            slots.push(Some(self.region.zone_index(z)?));
        }
        Ok(())
    }

    /// How many fault domains instances spread over in each zone.
    pub fn fault_domain_span(&self) -> Result<u32> {
        let fixed = self.spec.fault_domain_count();
        if fixed <= 1 {
            return Ok(self.region.fault_domains_per_zone);
        }
        if fixed > self.region.fault_domains_per_zone {
            return Err(CoreError::capacity(
                codes::ALLOCATION_FAILED,
                format!(
                    "platform_fault_domain_count {fixed} cannot be met: the region has {} fault domains per zone.",
                    self.region.fault_domains_per_zone
                ),
            ));
        }
        Ok(fixed)
    }
}

/// Remaining capacity and price per (slot, size, priority), consumed as the plan places instances.
struct PoolTable {
    sizes: usize,
    available: Vec<u64>,
    price: Vec<f64>,
}

impl PoolTable {
    fn new(view: &SetView<'_>, slots: &[ZoneSlot], size_names: &[&str]) -> Self {
        let n = slots.len() * size_names.len() * 2;
        let mut available = Vec::with_capacity(n);
        let mut price = Vec::with_capacity(n);
        for &slot in slots {
            for name in size_names {
                for priority in Priority::ALL {
                    let pool = view.region.pool(slot, name, *priority);
                    available.push(pool.available.unwrap_or(u64::MAX));
                    price.push(pool.price);
                }
            }
        }
        Self {
            sizes: size_names.len(),
            available,
            price,
        }
    }

    fn at(&self, slot: usize, size: usize, priority: Priority) -> usize {
        (slot * self.sizes + size) * 2 + priority.index()
    }
}

/// Chooses the size for one instance in `slot`, or None when no size of the scale set has capacity.
fn choose_size(
    spec: &ScaleSetSpec,
    pools: &PoolTable,
    slot: usize,
    priority: Priority,
    order: &mut Vec<usize>,
) -> Option<(usize, SizeChoice)> {
    let max_price = spec
        .max_price
        .filter(|&p| p > 0.0 && priority == Priority::Spot);
    let fits = |j: usize| {
        let k = pools.at(slot, j, priority);
        pools.available[k] > 0 && max_price.is_none_or(|m| pools.price[k] <= m)
    };
    let Some(profile) = &spec.sku_profile else {
        return fits(0).then_some((0, SizeChoice::Only));
    };
    order.clear();
    order.extend(0..profile.vm_sizes.len());
    let strategy = profile.allocation_strategy;
    match strategy {
        AllocationStrategy::LowestPrice => {
            order.sort_by(|&a, &b| {
                let (pa, pb) = (
                    pools.price[pools.at(slot, a, priority)],
                    pools.price[pools.at(slot, b, priority)],
                );
                pa.total_cmp(&pb).then(a.cmp(&b))
            });
        }
        AllocationStrategy::CapacityOptimized => {
            order.sort_by_key(|&j| {
                (
                    std::cmp::Reverse(pools.available[pools.at(slot, j, priority)]),
                    j,
                )
            });
        }
        AllocationStrategy::Prioritized => {
            order.sort_by_key(|&j| {
                let rank = profile.vm_sizes[j].rank.unwrap_or(u32::MAX);
                (
                    rank,
                    std::cmp::Reverse(pools.available[pools.at(slot, j, priority)]),
                    j,
                )
            });
        }
    }
    order.iter().position(|&j| fits(j)).map(|pos| {
        let choice = if pos == 0 {
            SizeChoice::Preferred(strategy)
        } else {
            SizeChoice::Fallback(strategy)
        };
        (order[pos], choice)
    })
}

/// Plans `count` new instances with ids from `next_id`. Fails as a whole: no partial plans.
pub fn plan_scale_out(view: &SetView<'_>, count: u64, next_id: u64) -> Result<Vec<PlannedCreate>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let spec = view.spec;
    let slots = view.slots()?;
    let span = view.fault_domain_span()? as usize;
    let size_names: Vec<&str> = spec.vm_size_names();
    let mut pools = PoolTable::new(view, &slots, &size_names);
    let zonal = spec.is_zonal();
    let strict = spec.zone_balance;

    let mut zone_count = vec![0u32; slots.len()];
    let mut zone_priority_count = vec![[0u32; 2]; slots.len()];
    let mut fd_count = vec![0u32; slots.len() * span];
    let mut regular = 0u64;
    let mut tally = |zone: ZoneSlot, fault_domain: u32, priority: Priority, n: u32| {
        if priority == Priority::Regular {
            regular += u64::from(n);
        }
        if let Some(s) = slots.iter().position(|&slot| slot == zone) {
            zone_count[s] += n;
            zone_priority_count[s][priority.index()] += n;
            if let Some(c) = fd_count.get_mut(s * span + fault_domain as usize) {
                *c += n;
            }
        }
    };
    match view.groups {
        // The engine's kept groups: O(groups), not a pass over every instance.
        Some(groups) => {
            for g in groups.iter() {
                tally(
                    g.key.zone,
                    g.key.fault_domain,
                    g.key.priority,
                    g.len() as u32,
                );
            }
        }
        None => {
            for i in view.instances {
                tally(i.zone, i.fault_domain, i.priority, 1);
            }
        }
    }
    let down: Vec<bool> = slots
        .iter()
        .map(|&s| !view.region.is_available(s))
        .collect();
    let down_count = down.iter().filter(|&&d| d).count();
    if zonal && !strict && down_count >= 2 {
        return Err(CoreError::capacity(
            codes::TOO_MANY_ZONES_UNAVAILABLE,
            format!(
                "scaling '{}' is blocked: {down_count} of its zones are unavailable and best-effort zone balance tolerates only one; wait for a zone to recover.",
                spec.name
            ),
        ));
    }

    let total_before = view.instances.len() as u64;
    let mut creates = Vec::with_capacity(usize::try_from(count.min(1 << 16)).unwrap_or(0));
    let mut order: Vec<usize> = Vec::with_capacity(slots.len());
    let mut size_order: Vec<usize> = Vec::with_capacity(size_names.len());
    for i in 0..count {
        let total_after = total_before + i + 1;
        let (priority, priority_choice) = match spec.priority_mix_policy {
            Some(mix) => {
                let target = mix.regular_target(total_after);
                let p = if regular < target {
                    Priority::Regular
                } else {
                    Priority::Spot
                };
                (
                    p,
                    PriorityChoice::Mix {
                        regular_target: target,
                        total: total_after,
                    },
                )
            }
            None => (spec.priority, PriorityChoice::Spec),
        };

        order.clear();
        order.extend(0..slots.len());
        order.sort_by_key(|&s| (zone_count[s], zone_priority_count[s][priority.index()], s));
        let min_count = zone_count[order[0]];

        let mut chosen = None;
        let mut unable = 0usize;
        for &s in &order {
            if strict && zone_count[s] != min_count {
                break;
            }
            if down[s] {
                unable += 1;
                continue;
            }
            match choose_size(spec, &pools, s, priority, &mut size_order) {
                Some(size) => {
                    chosen = Some((s, size));
                    break;
                }
                None => unable += 1,
            }
        }
        let Some((s, (size, size_choice))) = chosen else {
            return Err(allocation_error(
                view,
                &slots,
                &order,
                &down,
                min_count,
                &zone_count,
                priority,
                strict,
            ));
        };
        if zonal && zone_count[s] > min_count && unable >= 2 {
            return Err(CoreError::capacity(
                codes::ZONAL_ALLOCATION_FAILED,
                format!(
                    "Allocation failed for '{}': two or more zones cannot take {priority} instances (down or out of capacity), and best-effort zone balance allows only one; add capacity or scale to fewer instances.",
                    spec.name
                ),
            ));
        }

        let fd_base = s * span;
        let fd = (0..span)
            .min_by_key(|&f| (fd_count[fd_base + f], f))
            .unwrap_or(0);
        let reason = CreateReason {
            zone: if !zonal {
                ZoneChoice::Regional
            } else if zone_count[s] == min_count {
                ZoneChoice::Fewest {
                    count: zone_count[s],
                }
            } else {
                ZoneChoice::FewestAvailable {
                    count: zone_count[s],
                }
            },
            fault_domain_count: fd_count[fd_base + fd],
            priority: priority_choice,
            size: size_choice,
        };
        creates.push(PlannedCreate {
            instance_id: next_id + i,
            zone: slots[s],
            fault_domain: fd as u32,
            vm_size: view.size_ids[size],
            priority,
            cause: CreateCause::ScaleOut(reason),
        });
        zone_count[s] += 1;
        zone_priority_count[s][priority.index()] += 1;
        fd_count[fd_base + fd] += 1;
        let k = pools.at(s, size, priority);
        if pools.available[k] != u64::MAX {
            pools.available[k] -= 1;
        }
        if priority == Priority::Regular {
            regular += 1;
        }
    }
    Ok(creates)
}

#[allow(clippy::too_many_arguments)]
fn allocation_error(
    view: &SetView<'_>,
    slots: &[ZoneSlot],
    order: &[usize],
    down: &[bool],
    min_count: u32,
    zone_count: &[u32],
    priority: Priority,
    strict: bool,
) -> CoreError {
    let name = &view.spec.name;
    let sizes = view.spec.vm_size_names().join(", ");
    // A size not offered where the instance must go is SkuNotAvailable (Azure's code), not a capacity
    // failure: no retry helps until the operator changes sizes or zones.
    let restricted = |s: usize| {
        view.spec
            .vm_size_names()
            .iter()
            .all(|size| view.region.is_restricted(slots[s], size, priority))
    };
    let must: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&s| !down[s] && (!strict || zone_count[s] == min_count))
        .collect();
    // Every Spot pool it could use is priced above the max price: Azure's SpotPriceGreaterThanProvidedMaxPrice.
    if let Some(max_price) = view
        .spec
        .max_price
        .filter(|&m| m > 0.0 && priority == Priority::Spot)
    {
        let over = |s: usize| -> Option<(f64, &str)> {
            let mut cheapest: Option<(f64, &str)> = None;
            for size in view.spec.vm_size_names() {
                let pool = view.region.pool(slots[s], size, priority);
                if view.region.is_restricted(slots[s], size, priority) {
                    continue;
                }
                if pool.price <= max_price {
                    return None; // this one is affordable: the failure is capacity, not price
                }
                if cheapest.is_none_or(|(p, _)| pool.price < p) {
                    cheapest = Some((pool.price, size));
                }
            }
            cheapest
        };
        let prices: Vec<Option<(f64, &str)>> = must.iter().map(|&s| over(s)).collect();
        if !must.is_empty() && prices.iter().all(Option::is_some) {
            let (price, size) = prices
                .into_iter()
                .flatten()
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .unwrap_or((0.0, ""));
            return CoreError::capacity(
                codes::SPOT_PRICE_ABOVE_MAX_PRICE,
                format!(
                    "Unable to perform operation 'scale out {name}' since the provided max price '{max_price} USD' is lower than the current spot price '{price} USD' for Azure Spot Virtual Machine size '{size}'."
                ),
            );
        }
    }
    if !must.is_empty() && must.iter().all(|&s| restricted(s)) {
        let zones: Vec<&str> = must
            .iter()
            .map(|&s| view.region.zone_name(slots[s]))
            .collect();
        return CoreError::capacity(
            codes::SKU_NOT_AVAILABLE,
            format!(
                "The requested size for resource '{name}' is currently not available in zones '{}' ({priority} {sizes}). Please try another size or deploy to different zones.",
                zones.join(", ")
            ),
        );
    }
    if strict {
        let blocked: Vec<&str> = order
            .iter()
            .filter(|&&s| zone_count[s] == min_count && down[s])
            .map(|&s| view.region.zone_name(slots[s]))
            .collect();
        if !blocked.is_empty() {
            return CoreError::capacity(
                codes::ZONE_BALANCE_BLOCKED,
                format!(
                    "scaling '{name}' is blocked by strict zone balance: the next instance must go to zone {} (it holds the fewest), which is unavailable; wait for it to recover or turn zone_balance off.",
                    blocked.join(" or ")
                ),
            );
        }
    }
    let code = if view.spec.is_zonal() {
        codes::ZONAL_ALLOCATION_FAILED
    } else {
        codes::ALLOCATION_FAILED
    };
    let detail = if view.spec.is_zonal() {
        format!("no zone '{name}' may use has capacity for {priority} {sizes}; add pool capacity, bring a zone back, or scale to fewer instances.")
    } else {
        format!("the region has no capacity for {priority} {sizes} for '{name}'; add pool capacity or scale to fewer instances.")
    };
    // Azure's own messages (reference §12), then what scaleset knows of the cause.
    let azure = if view.spec.single_placement_group == Some(true) {
        SPG_ALLOCATION_FAILED
    } else {
        ALLOCATION_FAILED
    };
    CoreError::capacity(code, format!("{azure} Here: {detail}"))
}

/// Azure's message for an allocation failure (reference §12, S40).
pub const ALLOCATION_FAILED: &str = "Allocation failed. We do not have sufficient capacity for the requested VM size in this region. Read more about improving likelihood of allocation success at https://aka.ms/allocation-guidance.";
/// Azure's message for an allocation failure in a single placement group (reference §12, S40).
pub const SPG_ALLOCATION_FAILED: &str = "Allocation failed. If you are trying to add a new VM to a Virtual Machine Scale Set with a single placement group or update/resize an existing VM in a Virtual Machine Scale Set with a single placement group, please note that such allocation might be scoped to a single cluster, and it is possible that the cluster is out of capacity.";

#[cfg(test)]
mod tests {
    use crate::model::*;
    use crate::Engine;

    fn spec(zones: &[&str]) -> ScaleSetSpec {
        ScaleSetSpec::with_sku("t", zones, "Standard_D2s_v5")
    }

    #[test]
    fn round_robins_zones_then_fault_domains() {
        let region = Region::new(vec!["1".into(), "2".into()], 2).expect("region");
        let mut e = Engine::new(region, None);
        let (_, plan) = e.create_scale_set(spec(&["1", "2"]), 5).expect("create");
        let got: Vec<(Option<u16>, u32)> = plan
            .creates
            .iter()
            .map(|c| (c.zone, c.fault_domain))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(0), 0),
                (Some(1), 0),
                (Some(0), 1),
                (Some(1), 1),
                (Some(0), 0)
            ]
        );
    }

    #[test]
    fn zero_instances_plan_nothing_even_when_zones_are_down() {
        let region = Region::new(vec!["1".into(), "2".into(), "3".into()], 2).expect("region");
        let mut e = Engine::new(region, None);
        e.create_scale_set(spec(&["1", "2", "3"]), 0)
            .expect("create");
        e.set_zone_available("1", false).expect("zone");
        e.set_zone_available("2", false).expect("zone");
        assert!(e
            .set_capacity("t", 0, false)
            .expect("no-op")
            .creates
            .is_empty());
        assert_eq!(
            e.set_capacity("t", 1, false).expect_err("blocked").code,
            crate::codes::TOO_MANY_ZONES_UNAVAILABLE
        );
    }
}
