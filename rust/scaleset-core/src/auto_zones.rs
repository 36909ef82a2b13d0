//! Automatic zone placement (preview, reference §2.6): the scale set names no zones; the engine chooses
//! them. It targets an even spread over three zones (or `max_zone_count`), at least two; no zone holds
//! more than `max_instance_percent_per_zone` of the target capacity (50% unless set); it expands to more
//! eligible zones only when the ones it uses cannot take the next instance, never beyond
//! `max_zone_count`; and a request that cannot be placed in full is a partial allocation: as many
//! instances as the policy allows are created, the rest are reported, the request does not fail.
//! Existing instances never move.

use crate::error::{codes, CoreError, Result};
use crate::model::{Priority, Region, ScaleSetSpec, ZoneSlot};
use crate::plan::{
    CreateCause, CreateReason, PlannedCreate, PriorityChoice, SizeChoice, ZoneChoice,
};
use crate::scale_out::SetView;

/// Zones an automatically placed scale set spreads over to begin with.
pub const DEFAULT_ZONE_TARGET: usize = 3;
/// The default cap of any one zone, as a percentage of the target capacity.
pub const DEFAULT_MAX_INSTANCE_PERCENT: u32 = 50;

fn invalid(field: &'static str, message: String) -> CoreError {
    CoreError::invalid(codes::INVALID_PARAMETER, message).at(field)
}

/// Whether the spec asks for automatic zone placement.
pub fn is_auto(spec: &ScaleSetSpec) -> bool {
    spec.placement.is_some()
}

/// The zones the set may use, in the region's order: include_zones, else every zone, less exclude_zones.
pub fn eligible_zones(spec: &ScaleSetSpec, region: &Region) -> Vec<String> {
    let Some(p) = &spec.placement else {
        return Vec::new();
    };
    region
        .zones
        .iter()
        .filter(|z| p.include_zones.is_empty() || p.include_zones.contains(z))
        .filter(|z| !p.exclude_zones.contains(z))
        .cloned()
        .collect()
}

/// The most zones the set may use: the eligible ones, at most `max_zone_count`.
pub fn max_zones(spec: &ScaleSetSpec, region: &Region) -> usize {
    let eligible = eligible_zones(spec, region).len();
    let cap = spec
        .zone_allocation_policy
        .as_ref()
        .and_then(|p| p.max_zone_count)
        .map_or(eligible, |c| c as usize);
    eligible.min(cap)
}

/// The per-zone cap's percentage: the policy's value when enabled, none when disabled, 50 by default;
/// none with zone balance (the policy is not supported there).
pub fn max_instance_percent(spec: &ScaleSetSpec) -> Option<u32> {
    if spec.zone_balance {
        return None;
    }
    match spec
        .zone_allocation_policy
        .as_ref()
        .and_then(|p| p.max_instance_percent_per_zone_policy)
    {
        Some(p) if p.enabled => Some(p.value),
        Some(_) => None,
        None => Some(DEFAULT_MAX_INSTANCE_PERCENT),
    }
}

/// Checks an automatically placed spec (reference §2.6's rules and incompatibilities).
pub fn validate(spec: &mut ScaleSetSpec, region: &Region) -> Result<()> {
    let Some(p) = &spec.placement else {
        if spec.zone_allocation_policy.is_some() {
            return Err(invalid(
                "zone_allocation_policy",
                "zone_allocation_policy applies only with placement.zone_placement_policy Auto."
                    .into(),
            ));
        }
        return Ok(());
    };
    if !p.zone_placement_policy.eq_ignore_ascii_case("Auto") {
        return Err(invalid(
            "placement.zone_placement_policy",
            format!(
                "zone_placement_policy '{}' is not valid; use Auto.",
                p.zone_placement_policy
            ),
        ));
    }
    if !p.include_zones.is_empty() && !p.exclude_zones.is_empty() {
        return Err(invalid(
            "placement",
            "set placement.include_zones or placement.exclude_zones, not both.".into(),
        ));
    }
    for z in p.include_zones.iter().chain(&p.exclude_zones) {
        region.zone_index(z)?;
    }
    if spec.sku_profile.is_some() {
        return Err(CoreError::invalid(
            codes::SKU_PROFILE_SCENARIO_NOT_SUPPORTED,
            "automatic zone placement is not supported with an instance mix (sku_profile).",
        )
        .at("sku_profile"));
    }
    if spec.overprovision == Some(true) {
        return Err(invalid(
            "overprovision",
            "automatic zone placement needs overprovision set to false (Azure fails the deployment otherwise).".into(),
        ));
    }
    spec.overprovision = Some(false);
    let policy = spec.zone_allocation_policy.as_ref();
    let max_zone_count = policy.and_then(|p| p.max_zone_count);
    if max_zone_count.is_some_and(|c| c < 2) {
        return Err(invalid(
            "zone_allocation_policy.max_zone_count",
            "max_zone_count must be at least 2: automatic placement spreads over two zones or more.".into(),
        ));
    }
    if spec.zone_balance && max_zone_count.is_none() {
        return Err(invalid(
            "zone_allocation_policy.max_zone_count",
            "zone_balance with automatic zone placement requires zone_allocation_policy.max_zone_count.".into(),
        ));
    }
    let zones = max_zones(spec, region);
    if zones < 2 {
        return Err(invalid(
            "placement",
            format!("automatic zone placement needs at least two eligible zones; {zones} remain after include_zones, exclude_zones and max_zone_count."),
        ));
    }
    if let Some(pct) = policy.and_then(|p| p.max_instance_percent_per_zone_policy) {
        if spec.zone_balance {
            return Err(invalid(
                "zone_allocation_policy.max_instance_percent_per_zone_policy",
                "max_instance_percent_per_zone_policy is supported only when zone_balance is false.".into(),
            ));
        }
        let minimum = 100u32.div_ceil(zones as u32);
        if pct.enabled && !(minimum..=100).contains(&pct.value) {
            return Err(invalid(
                "zone_allocation_policy.max_instance_percent_per_zone_policy.value",
                format!(
                    "max instance percent per zone must be between ceil(100 / {zones} eligible zones) = {minimum} and 100, got {}.",
                    pct.value
                ),
            ));
        }
    }
    Ok(())
}

/// The zones a new automatically placed set starts with: the first eligible zones that are up (then any
/// eligible ones), up to three or `max_zone_count`, in the region's order.
pub fn initial_zones(spec: &ScaleSetSpec, region: &Region) -> Vec<String> {
    let eligible = eligible_zones(spec, region);
    let want = max_zones(spec, region).min(DEFAULT_ZONE_TARGET.max(2));
    let up = |z: &String| {
        region
            .zone_index(z)
            .is_ok_and(|i| region.is_available(Some(i)))
    };
    let mut zones: Vec<String> = eligible
        .iter()
        .filter(|z| up(z))
        .take(want)
        .cloned()
        .collect();
    for z in &eligible {
        if zones.len() >= want {
            break;
        }
        if !zones.contains(z) {
            zones.push(z.clone());
        }
    }
    let order = |z: &String| eligible.iter().position(|e| e == z);
    zones.sort_by_key(order);
    zones
}

/// An automatic placement: the creates, the zones used afterwards, and what could not be placed.
pub struct AutoPlan {
    pub creates: Vec<PlannedCreate>,
    pub zones: Vec<String>,
    pub unallocated: u64,
    pub unallocated_reason: String,
}

/// Places `count` instances (ids from `next_id`) under automatic zone placement.
pub fn plan(view: &SetView<'_>, count: u64, next_id: u64) -> Result<AutoPlan> {
    let spec = view.spec;
    let region = view.region;
    let eligible = eligible_zones(spec, region);
    let limit = max_zones(spec, region);
    let mut zones: Vec<String> = spec.zones.clone();
    let size_id = view.size_ids.first().copied().unwrap_or(0);
    let size_name = spec
        .vm_size_names()
        .first()
        .map(|s| (*s).to_owned())
        .unwrap_or_default();
    let span = view.fault_domain_span()? as usize;
    let target = view.instances.len() as u64 + count;
    let cap = max_instance_percent(spec).map(|pct| (u64::from(pct) * target).div_ceil(100));

    let slot = |z: &str| region.zone_index(z).ok();
    let slots_total = region.zones.len();
    let mut zone_count = vec![0u64; slots_total];
    let mut fd_count = vec![0u64; slots_total * span];
    let mut used = vec![[0u64; 2]; slots_total];
    let mut regular = 0u64;
    for inst in view.instances {
        regular += u64::from(inst.priority == Priority::Regular);
        if let Some(z) = inst.zone {
            zone_count[usize::from(z)] += 1;
            if let Some(c) = fd_count.get_mut(usize::from(z) * span + inst.fault_domain as usize) {
                *c += 1;
            }
        }
    }
    let room = |z: u16, priority: Priority, used: &[[u64; 2]]| -> bool {
        let pool = region.pool(Some(z), &size_name, priority);
        let max_price = spec
            .max_price
            .filter(|&p| p > 0.0 && priority == Priority::Spot);
        pool.available
            .is_none_or(|a| used[usize::from(z)][priority.index()] < a)
            && max_price.is_none_or(|m| pool.price <= m)
    };

    let mut creates = Vec::new();
    let mut why_short = String::new();
    for i in 0..count {
        let total_after = view.instances.len() as u64 + i + 1;
        let (priority, priority_choice) = match spec.priority_mix_policy {
            Some(mix) => {
                let want = mix.regular_target(total_after);
                let p = if regular < want {
                    Priority::Regular
                } else {
                    Priority::Spot
                };
                (
                    p,
                    PriorityChoice::Mix {
                        regular_target: want,
                        total: total_after,
                    },
                )
            }
            None => (spec.priority, PriorityChoice::Spec),
        };
        let usable = |z: u16, used: &[[u64; 2]]| {
            region.is_available(Some(z))
                && cap.is_none_or(|c| zone_count[usize::from(z)] < c)
                && room(z, priority, used)
        };
        let mut current: Vec<u16> = zones.iter().filter_map(|z| slot(z)).collect();
        current.sort_by_key(|&z| (zone_count[usize::from(z)], z));
        let fewest = current.first().map(|&z| zone_count[usize::from(z)]);
        let mut chosen = current
            .iter()
            .copied()
            .filter(|&z| !spec.zone_balance || Some(zone_count[usize::from(z)]) == fewest)
            .find(|&z| usable(z, &used));
        let mut expanded = false;
        if chosen.is_none() && zones.len() < limit {
            // Expand: the next eligible zone (in the region's order) that can take it.
            if let Some(next) = eligible
                .iter()
                .filter(|z| !zones.contains(z))
                .filter_map(|z| slot(z))
                .find(|&z| usable(z, &used))
            {
                zones.push(region.zones[usize::from(next)].clone());
                chosen = Some(next);
                expanded = true;
            }
        }
        let Some(z) = chosen else {
            why_short = format!(
                "the {} zones in use ({}) cannot take more {priority} {size_name}{}{}",
                zones.len(),
                zones.join(", "),
                cap.map_or(String::new(), |c| format!(
                    " (at most {c} per zone: max_instance_percent_per_zone)"
                )),
                if zones.len() >= limit {
                    format!(" and no more zones may be used (at most {limit})")
                } else {
                    " and no other eligible zone can".to_owned()
                },
            );
            break;
        };
        let zi = usize::from(z);
        let fd = (0..span)
            .min_by_key(|&f| (fd_count[zi * span + f], f))
            .unwrap_or(0);
        let count_before = zone_count[zi];
        creates.push(PlannedCreate {
            instance_id: next_id + i,
            zone: Some(z) as ZoneSlot,
            fault_domain: fd as u32,
            vm_size: size_id,
            priority,
            cause: CreateCause::ScaleOut(CreateReason {
                zone: if expanded {
                    ZoneChoice::FewestAvailable {
                        count: count_before as u32,
                    }
                } else {
                    ZoneChoice::Fewest {
                        count: count_before as u32,
                    }
                },
                fault_domain_count: fd_count[zi * span + fd] as u32,
                priority: priority_choice,
                size: SizeChoice::Only,
            }),
        });
        zone_count[zi] += 1;
        fd_count[zi * span + fd] += 1;
        used[zi][priority.index()] += 1;
        regular += u64::from(priority == Priority::Regular);
    }
    let placed = creates.len() as u64;
    zones.sort_by_key(|z| eligible.iter().position(|e| e == z));
    Ok(AutoPlan {
        creates,
        zones,
        unallocated: count - placed,
        unallocated_reason: if placed < count {
            format!(
                "automatic zone placement: {placed} of {count} instances placed; {} could not be: {why_short} (a partial allocation, not a failed request)",
                count - placed
            )
        } else {
            String::new()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::model::{MaxInstancePercentPerZonePolicy, Placement, ZoneAllocationPolicy};

    fn auto(include: &[&str]) -> ScaleSetSpec {
        ScaleSetSpec {
            placement: Some(Placement {
                zone_placement_policy: "Auto".into(),
                include_zones: include.iter().map(|z| (*z).to_owned()).collect(),
                exclude_zones: Vec::new(),
            }),
            ..ScaleSetSpec::with_sku("web", &[], "Standard_D2s_v5")
        }
    }

    fn engine(zones: usize) -> Engine {
        let names = (1..=zones).map(|z| z.to_string()).collect();
        Engine::new(Region::new(names, 3).expect("valid"), None)
    }

    #[test]
    fn three_zones_of_four_by_default() {
        let mut e = engine(4);
        let (spec, plan) = e.create_scale_set(auto(&[]), 6).expect("placed");
        assert_eq!(spec.zones, ["1", "2", "3"]);
        assert_eq!((plan.capacity_after, plan.unallocated), (6, 0));
    }

    #[test]
    fn the_cap_makes_a_partial_allocation() {
        let mut e = engine(2);
        e.create_scale_set(auto(&[]), 0).expect("valid");
        e.set_zone_available("2", false).expect("zone");
        let plan = e
            .set_capacity("web", 8, false)
            .expect("partial, not failed");
        assert_eq!((plan.capacity_after, plan.unallocated), (4, 4));
        assert!(plan.unallocated_reason.contains("partial allocation"));
    }

    #[test]
    fn the_least_valid_percentage_follows_the_eligible_zones() {
        let mut e = engine(3);
        let mut spec = auto(&[]);
        spec.zone_allocation_policy = Some(ZoneAllocationPolicy {
            max_zone_count: None,
            max_instance_percent_per_zone_policy: Some(MaxInstancePercentPerZonePolicy {
                enabled: true,
                value: 33,
            }),
        });
        let err = e.create_scale_set(spec, 0).expect_err("33 < ceil(100 / 3)");
        assert_eq!(
            err.field,
            Some("zone_allocation_policy.max_instance_percent_per_zone_policy.value")
        );
    }
}
