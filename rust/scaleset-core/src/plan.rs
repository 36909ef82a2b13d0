//! Plans: what the engine will create and delete, each step with the rule that chose it.
//! Reasons are stored as small enums and rendered to text only when somebody reads them, so a plan for
//! 100,000 instances costs no strings.

use crate::model::{zone_label, AllocationStrategy, Priority, ScaleInRule, ZoneSlot};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZoneChoice {
    /// A regional scale set: no zone.
    Regional,
    /// The zone held the fewest instances (`count`, before this one).
    Fewest { count: u32 },
    /// A zone with fewer instances was down or out of capacity, so this one (holding `count`) took it.
    FewestAvailable { count: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriorityChoice {
    /// The scale set's own priority.
    Spec,
    /// The Spot priority mix wants `regular_target` Regular instances at `total` instances.
    Mix { regular_target: u64, total: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeChoice {
    /// The scale set has one VM size.
    Only,
    /// The allocation strategy's first choice.
    Preferred(AllocationStrategy),
    /// The strategy's earlier choices had no capacity (or were above max_price).
    Fallback(AllocationStrategy),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateReason {
    pub zone: ZoneChoice,
    /// Instances in the chosen fault domain of the zone before this one.
    pub fault_domain_count: u32,
    pub priority: PriorityChoice,
    pub size: SizeChoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateCause {
    ScaleOut(CreateReason),
    /// An extra VM of an overprovisioned scale-out (Uniform), placed by the same rules and deleted once
    /// the `requested` instances succeeded; with `no_extensions`, extensions do not run on it.
    Overprovisioned {
        requested: u64,
        no_extensions: bool,
    },
    /// A rebalance moved an instance into this pool (the plan's waves say why, pool by pool).
    Rebalance,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedCreate {
    pub instance_id: u64,
    pub zone: ZoneSlot,
    pub fault_domain: u32,
    /// Index into the engine's VM size table.
    pub vm_size: u16,
    pub priority: Priority,
    pub cause: CreateCause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleInReason {
    pub rule: ScaleInRule,
    /// Chosen among unhealthy or deallocated instances first (`prioritize_unhealthy_vms`).
    pub unhealthy_first: bool,
    /// The priority mix decided which priority goes: (regular target after the deletion, total after).
    pub mix: Option<(u64, u64)>,
    /// A regional instance in a zone-spanning set: removed before any zonal one.
    pub regional_first: bool,
    /// Instances in the instance's zone before the deletion (the most among eligible zones).
    pub zone_count: u32,
    /// Default policy: instances in the instance's fault domain (the most in that zone).
    pub fault_domain_count: Option<u32>,
    /// LowestPrice instance mix: the most expensive size went first.
    pub most_expensive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteCause {
    ScaleIn(ScaleInReason),
    /// The extra VM of an overprovisioned scale-out, deleted once the requested ones succeeded.
    Overprovisioned,
    Manual,
    Evicted,
    Rebalance,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDelete {
    pub instance_id: u64,
    pub zone: ZoneSlot,
    pub fault_domain: u32,
    pub vm_size: u16,
    pub priority: Priority,
    pub cause: DeleteCause,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub scale_set: String,
    pub capacity_before: u64,
    pub capacity_after: u64,
    pub creates: Vec<PlannedCreate>,
    pub deletes: Vec<PlannedDelete>,
    /// Instances a partial allocation could not place (automatic zone placement), and why.
    pub unallocated: u64,
    pub unallocated_reason: String,
}

impl PlannedCreate {
    /// A sentence an operator can read: why this zone, fault domain, priority and size.
    pub fn describe(&self, zones: &[String], sizes: &[String]) -> String {
        let zone = zone_label(zones, self.zone);
        let size = sizes
            .get(usize::from(self.vm_size))
            .map_or("?", String::as_str);
        let r = match &self.cause {
            CreateCause::ScaleOut(r) => r,
            CreateCause::Overprovisioned {
                requested,
                no_extensions,
            } => {
                return format!(
                    "overprovisioning: an extra VM in zone {zone}, fault domain {}, deleted once the {requested} requested instances succeed (not counted toward limits or quota){}",
                    self.fault_domain,
                    if *no_extensions { "; extensions do not run on it" } else { "" }
                )
            }
            CreateCause::Rebalance => {
                return format!(
                    "rebalance: a replacement in zone {zone}, fault domain {}, {} {size}",
                    self.fault_domain, self.priority
                )
            }
        };
        let zone_part = match r.zone {
            ZoneChoice::Regional => "regional scale set".to_owned(),
            ZoneChoice::Fewest { count } => format!("zone {zone} held the fewest instances ({count})"),
            ZoneChoice::FewestAvailable { count } => format!(
                "zone {zone} held the fewest instances ({count}) among zones that could take one (a zone with fewer is down or full)"
            ),
        };
        let priority_part = match r.priority {
            PriorityChoice::Spec => format!("{} per the scale set's priority", self.priority),
            PriorityChoice::Mix {
                regular_target,
                total,
            } => format!(
                "{} per priority_mix_policy ({regular_target} Regular wanted at {total} instances)",
                self.priority
            ),
        };
        let size_part = match r.size {
            SizeChoice::Only => format!("{size} (the scale set's size)"),
            SizeChoice::Preferred(s) => format!("{size} ({s} first choice)"),
            SizeChoice::Fallback(s) => format!("{size} ({s}; preferred sizes had no capacity)"),
        };
        format!(
            "scale-out: {zone_part}; fault domain {} held the fewest in it ({}); {priority_part}; {size_part}",
            self.fault_domain, r.fault_domain_count
        )
    }
}

impl PlannedDelete {
    pub fn describe(&self, zones: &[String]) -> String {
        let zone = zone_label(zones, self.zone);
        match self.cause {
            DeleteCause::Manual => "manual delete requested by the user".to_owned(),
            DeleteCause::Evicted => "Spot eviction with eviction_policy Delete".to_owned(),
            DeleteCause::Overprovisioned => {
                "overprovisioning: the extra VM is deleted, the requested instances succeeded"
                    .to_owned()
            }
            DeleteCause::Rebalance => {
                "rebalance: replaced by an instance in a better place".to_owned()
            }
            DeleteCause::ScaleIn(r) => {
                // One buffer, no formatting machinery: a plan of one delete is a hot path.
                let mut text = String::with_capacity(256);
                text.push_str("scale-in (");
                text.push_str(r.rule.as_str());
                text.push(')');
                if r.unhealthy_first {
                    text.push_str("; unhealthy or deallocated instances go first");
                }
                if let Some((target, total)) = r.mix {
                    text.push_str("; ");
                    text.push_str(self.priority.as_str());
                    text.push_str(" per priority_mix_policy (");
                    push_count(&mut text, target);
                    text.push_str(" Regular wanted at ");
                    push_count(&mut text, total);
                    text.push_str(" instances)");
                }
                if r.regional_first {
                    text.push_str("; regional instances go before zonal ones");
                } else if self.zone.is_some() {
                    text.push_str("; zone ");
                    text.push_str(zone);
                    text.push_str(" held the most instances (");
                    push_count(&mut text, u64::from(r.zone_count));
                    text.push(')');
                }
                if r.most_expensive {
                    text.push_str("; LowestPrice removes the most expensive size first");
                }
                if let Some(fd) = r.fault_domain_count {
                    text.push_str("; fault domain ");
                    push_count(&mut text, u64::from(self.fault_domain));
                    text.push_str(" held the most in its zone (");
                    push_count(&mut text, u64::from(fd));
                    text.push(')');
                }
                text.push_str(match r.rule {
                    ScaleInRule::OldestVm => "; the oldest (lowest instance id) eligible instance",
                    ScaleInRule::NewestVm | ScaleInRule::Default => {
                        "; the newest (highest instance id) eligible instance"
                    }
                });
                text
            }
        }
    }
}

/// Appends `n` in decimal (what `write!(text, "{n}")` writes, without the formatting machinery).
fn push_count(text: &mut String, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    // ASCII digits: always UTF-8.
    text.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_count_writes_what_display_writes() {
        for n in [0, 7, 10, 99, 504, 1_000, u64::from(u32::MAX), u64::MAX] {
            let mut text = String::new();
            push_count(&mut text, n);
            assert_eq!(text, n.to_string());
        }
    }

    #[test]
    fn a_scale_in_reason_names_each_rule_that_decided_in_order() {
        let delete = |reason| PlannedDelete {
            instance_id: 41,
            zone: Some(1),
            fault_domain: 3,
            vm_size: 0,
            priority: Priority::Regular,
            cause: DeleteCause::ScaleIn(reason),
        };
        let zones = ["1".to_owned(), "2".to_owned()];
        let every = ScaleInReason {
            rule: ScaleInRule::Default,
            unhealthy_first: true,
            mix: Some((504, 999)),
            regional_first: false,
            zone_count: 334,
            fault_domain_count: Some(67),
            most_expensive: true,
        };
        assert_eq!(
            delete(every).describe(&zones),
            "scale-in (Default); unhealthy or deallocated instances go first; Regular per \
             priority_mix_policy (504 Regular wanted at 999 instances); zone 2 held the most \
             instances (334); LowestPrice removes the most expensive size first; fault domain 3 held \
             the most in its zone (67); the newest (highest instance id) eligible instance"
        );
        let fewest = ScaleInReason {
            rule: ScaleInRule::OldestVm,
            unhealthy_first: false,
            mix: None,
            regional_first: true,
            zone_count: 0,
            fault_domain_count: None,
            most_expensive: false,
        };
        assert_eq!(
            delete(fewest).describe(&zones),
            "scale-in (OldestVM); regional instances go before zonal ones; the oldest (lowest \
             instance id) eligible instance"
        );
    }
}
