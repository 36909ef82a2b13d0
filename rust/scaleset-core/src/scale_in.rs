//! Scale-in: which instances go, per Azure's scale-in policy (reference §3).
//!
//! For every deletion, in order: unhealthy or deallocated instances first (`prioritize_unhealthy_vms`);
//! the priority the Spot mix wants removed; regional instances before zonal ones; the zones holding the
//! most instances; with LowestPrice instance mix, the most expensive size; with the Default rule, the fault
//! domain holding the most in its zone; then the highest instance id (Default, NewestVM) or the lowest
//! (OldestVM). Protected instances are never candidates.
//!
//! Instances are grouped into buckets of interchangeable instances (slot, fault domain, priority, size,
//! health), so each decision looks at a few hundred buckets at most, never at every instance. One
//! decision over the groups the engine keeps ranks each group in one integer instead and never looks at
//! the instances (see `decide`).

use std::cell::RefCell;

use crate::error::{codes, CoreError, Result};
use crate::model::{AllocationStrategy, Priority, ScaleInRule, ZoneSlot};
use crate::plan::{DeleteCause, PlannedDelete, ScaleInReason};
use crate::scale_out::SetView;

struct Bucket {
    slot: usize,
    fd: usize,
    priority: Priority,
    bad: bool,
    price: f64,
    /// `flat[head..tail]` are this bucket's instances still present, ascending by instance id.
    head: usize,
    tail: usize,
}

impl Bucket {
    fn is_empty(&self) -> bool {
        self.head >= self.tail
    }
}

/// A decision's working buffers, kept per thread between decisions: one decision at a time then
/// allocates only the deletes it returns. A buffer grown past [`SCRATCH_KEPT`] entries by a large
/// scale-in is let go afterwards.
#[derive(Default)]
struct Scratch {
    slots: Vec<ZoneSlot>,
    slot_table: Vec<usize>,
    counts: Vec<u32>,
    buckets: Vec<Bucket>,
    flat: Vec<u64>,
    active: Vec<usize>,
    cands: Vec<usize>,
    ranked: Vec<Ranked>,
}

/// A kept group as one decision over the groups ranks it (see `decide`).
struct Ranked {
    /// Unhealthy (bit 34), of the priority the mix wants (33), regional (32), and its zone's count:
    /// the higher, the sooner its instances go.
    rank: u64,
    slot: usize,
    /// (slot, fault domain) as an index into the fault-domain counts.
    fd_cell: usize,
    price: f64,
    oldest: u64,
    newest: u64,
    /// Its position among the groups.
    at: usize,
}

const SCRATCH_KEPT: usize = 1 << 16;

impl Scratch {
    fn let_go_of_large_buffers(&mut self) {
        if self.flat.capacity() > SCRATCH_KEPT
            || self.buckets.capacity() > SCRATCH_KEPT
            || self.ranked.capacity() > SCRATCH_KEPT
        {
            *self = Self::default();
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

fn balanced(counts: &[u32]) -> bool {
    match (counts.iter().max(), counts.iter().min()) {
        (Some(max), Some(min)) => max - min <= 1,
        _ => true,
    }
}

/// Strict zone balance: refuses a deletion from `slot` that would unbalance zones balanced before.
fn check_strict_balance(
    strict: bool,
    slot: usize,
    zone_slots: usize,
    zone_count: &mut [u32],
    name: &str,
) -> Result<()> {
    if !strict || slot >= zone_slots {
        return Ok(());
    }
    let before = balanced(&zone_count[..zone_slots]);
    zone_count[slot] -= 1;
    let after = balanced(&zone_count[..zone_slots]);
    zone_count[slot] += 1;
    if before && !after {
        return Err(CoreError::capacity(
            codes::ZONE_BALANCE_BLOCKED,
            format!(
                "scale-in of '{name}' is blocked by strict zone balance: the zones holding the most instances have only protected instances left, so any deletion would unbalance the zones. Lift protection or turn zone_balance off."
            ),
        ));
    }
    Ok(())
}

/// Plans `count` deletions. Fails as a whole when protection or zone rules forbid them.
pub fn plan_scale_in(
    view: &SetView<'_>,
    count: u64,
    size_table: &[String],
) -> Result<Vec<PlannedDelete>> {
    SCRATCH.with_borrow_mut(|scratch| {
        let deletes = decide(scratch, view, count, size_table);
        scratch.let_go_of_large_buffers();
        deletes
    })
}

fn decide(
    scratch: &mut Scratch,
    view: &SetView<'_>,
    count: u64,
    size_table: &[String],
) -> Result<Vec<PlannedDelete>> {
    let Scratch {
        slots,
        slot_table,
        counts,
        buckets,
        flat,
        active,
        cands,
        ranked,
    } = scratch;
    let spec = view.spec;
    let instances = view.instances;
    let zonal = spec.is_zonal();
    let strict = spec.zone_balance;
    let rule = spec.scale_in_policy.rule();
    let prioritize_unhealthy = spec.scale_in_policy.prioritize_unhealthy_vms;
    let lowest_price = spec
        .sku_profile
        .as_ref()
        .is_some_and(|p| p.allocation_strategy == AllocationStrategy::LowestPrice);

    // Slots: the set's zones, plus one for regional instances of a zone-spanning set (last).
    view.slots_into(slots)?;
    let zone_slots = if zonal { slots.len() } else { 0 };
    if zonal {
        slots.push(None);
    }
    let span = view.fault_domain_span()?.max(1) as usize;
    // Zone -> slot as a table indexed by the region's zone index (the last entry is "no zone").
    let region_zones = view.region.zones.len();
    slot_table.clear();
    slot_table.resize(region_zones + 1, slots.len() - 1);
    for (i, slot) in slots.iter().enumerate() {
        if let Some(z) = slot {
            slot_table[usize::from(*z)] = i;
        }
    }
    let slot_of =
        |zone: ZoneSlot| slot_table[zone.map_or(region_zones, usize::from).min(region_zones)];
    if zonal && !strict {
        let down = slots[..zone_slots]
            .iter()
            .filter(|&&s| !view.region.is_available(s))
            .count();
        if down >= 2 {
            return Err(CoreError::capacity(
                codes::TOO_MANY_ZONES_UNAVAILABLE,
                format!(
                    "scaling '{}' is blocked: {down} of its zones are unavailable and best-effort zone balance tolerates only one; wait for a zone to recover.",
                    spec.name
                ),
            ));
        }
    }

    let single = count == 1;
    // The decision's counts share one allocation (one decision at a time is a hot path): a cell per
    // (slot, fault domain, priority), then per slot, per (slot, fault domain), and each slot's largest
    // fault domain among the candidates.
    let cells_len = slots.len() * span * 2;
    counts.clear();
    counts.resize(cells_len + slots.len() * (span + 2), 0);
    let (cells, rest) = counts.split_at_mut(cells_len);
    let (zone_count, rest) = rest.split_at_mut(slots.len());
    let (fd_count, most_in_slot) = rest.split_at_mut(slots.len() * span);
    let cell_of = |zone: ZoneSlot, fault_domain: u32, priority: Priority| {
        let fd = fault_domain as usize;
        (slot_of(zone) * span + if fd < span { fd } else { span - 1 }) * 2 + priority.index()
    };
    let price_of = |zone: ZoneSlot, vm_size: u16, priority: Priority| {
        if !lowest_price {
            return 0.0;
        }
        let size_name = size_table
            .get(usize::from(vm_size))
            .map_or("", String::as_str);
        view.region.pool(zone, size_name, priority).price
    };
    let bucket = |zone: ZoneSlot, fault_domain: u32, priority, bad, price, head, tail| Bucket {
        slot: slot_of(zone),
        fd: (fault_domain as usize).min(span - 1),
        priority,
        bad,
        price,
        head,
        tail,
    };
    let mut eligible = 0u64;
    buckets.clear();
    // `flat[bucket.head..bucket.tail]` are a bucket's candidates: positions in `instances`.
    flat.clear();
    if let (true, Some(groups)) = (single, view.groups) {
        // One decision over the engine's kept groups (O(groups), below): here only the counts.
        for group in groups.iter() {
            let g = &group.key;
            let n = group.len() as u32;
            cells[cell_of(g.zone, g.fault_domain, g.priority)] += n;
            if !g.protected {
                eligible += u64::from(n);
            }
        }
    } else {
        // Pass 1 counts the buckets and notes each one's oldest and newest member. A single decision
        // needs nothing more; larger scale-ins lay every bucket out in one flat array (pass 2), so even a
        // large set costs a handful of allocations. Per instance it touches one (slot, fd, priority)
        // cell; zone, fault-domain and Regular counts are summed from the cells afterwards.
        const NONE: usize = usize::MAX;
        let sizes = size_table.len().max(1);
        let key_space = slots.len() * span * 2 * sizes * 2;
        let mut keys = Vec::with_capacity(if single { 0 } else { instances.len() });
        let mut per_key = vec![0u32; key_space];
        let mut first = vec![NONE; key_space];
        let mut last = vec![NONE; key_space];
        for (i, inst) in instances.iter().enumerate() {
            let cell = cell_of(inst.zone, inst.fault_domain, inst.priority);
            cells[cell] += 1;
            if inst.is_protected_from_scale_in() {
                if !single {
                    keys.push(NONE);
                }
                continue;
            }
            eligible += 1;
            let bad = prioritize_unhealthy && inst.is_unhealthy_or_inactive();
            let size = usize::from(inst.vm_size);
            let key =
                (cell * sizes + if size < sizes { size } else { sizes - 1 }) * 2 + usize::from(bad);
            per_key[key] += 1;
            if first[key] == NONE {
                first[key] = i;
            }
            last[key] = i;
            if !single {
                keys.push(key);
            }
        }
        let nonempty = per_key.iter().filter(|&&n| n > 0).count();
        buckets.reserve(nonempty);
        flat.reserve(if single {
            2 * nonempty
        } else {
            eligible as usize
        });
        let mut fill = vec![0usize; if single { 0 } else { key_space }];
        for (key, &n) in per_key.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let inst = &instances[first[key]];
            let head = flat.len();
            let len = if single {
                // Only the oldest and the newest can be picked by one decision.
                flat.push(first[key] as u64);
                if n > 1 {
                    flat.push(last[key] as u64);
                }
                flat.len() - head
            } else {
                fill[key] = head;
                flat.resize(head + n as usize, 0);
                n as usize
            };
            let price = price_of(inst.zone, inst.vm_size, inst.priority);
            buckets.push(bucket(
                inst.zone,
                inst.fault_domain,
                inst.priority,
                key % 2 == 1,
                price,
                head,
                head + len,
            ));
        }
        for (i, &key) in keys.iter().enumerate() {
            if key != NONE {
                flat[fill[key]] = i as u64;
                fill[key] += 1;
            }
        }
    }
    let mut regular = 0u64;
    // Cells are laid out slot-major, then fault domain, then priority (no divisions: this is per decision).
    for (slot, zone_cells) in cells.chunks_exact(span * 2).enumerate() {
        for (fd, fd_cells) in zone_cells.chunks_exact(2).enumerate() {
            let n = fd_cells[0] + fd_cells[1];
            fd_count[slot * span + fd] = n;
            zone_count[slot] += n;
            regular += u64::from(fd_cells[Priority::Regular.index()]);
        }
    }
    if eligible < count {
        return Err(CoreError::conflict(
            codes::SCALE_IN_BLOCKED_BY_PROTECTION,
            format!(
                "cannot remove {count} instances from '{}': only {eligible} of its {} instances are not protected from scale-in. Lift protection or scale in by fewer.",
                spec.name,
                instances.len()
            ),
        ));
    }

    if let (true, Some(groups)) = (single, view.groups) {
        // One decision over the kept groups. Each filter of the general path below keeps the candidates
        // with a property when any has one, so together they pick the lexicographic best of (unhealthy,
        // the priority the mix wants, regional, zone count): one integer, a group's rank. Then the most
        // expensive, the fault domain holding the most in its zone, and the instance id, in sweeps of
        // the ranked groups, with no buckets laid out. A group tells instances apart at least as finely
        // as a bucket does, and only its oldest and newest can be picked.
        let total = instances.len() as u64;
        let mix = spec.priority_mix_policy.map(|m| {
            let target = m.regular_target(total - 1);
            let want = if regular > target {
                Priority::Regular
            } else {
                Priority::Spot
            };
            (target, want)
        });
        ranked.clear();
        for (at, group) in groups.iter().enumerate() {
            let g = &group.key;
            if g.protected {
                continue;
            }
            let slot = slot_of(g.zone);
            let flags = u64::from(prioritize_unhealthy && g.bad) << 34
                | u64::from(mix.is_some_and(|(_, want)| g.priority == want)) << 33
                | u64::from(zonal && slot == zone_slots) << 32;
            ranked.push(Ranked {
                rank: flags | u64::from(zone_count[slot]),
                slot,
                fd_cell: slot * span + (g.fault_domain as usize).min(span - 1),
                price: price_of(g.zone, g.vm_size, g.priority),
                oldest: group.oldest(),
                newest: group.newest(),
                at,
            });
        }
        let Some(best) = ranked.iter().map(|r| r.rank).max() else {
            return Err(CoreError::conflict(
                codes::SCALE_IN_BLOCKED_BY_PROTECTION,
                format!("no instance of '{}' is eligible for scale-in.", spec.name),
            ));
        };
        ranked.retain(|r| r.rank == best);
        let (mut cheapest, mut dearest) = (f64::INFINITY, f64::NEG_INFINITY);
        if lowest_price {
            for r in ranked.iter() {
                cheapest = cheapest.min(r.price);
                dearest = dearest.max(r.price);
            }
            ranked.retain(|r| r.price == dearest);
        }
        if rule == ScaleInRule::Default {
            most_in_slot.iter_mut().for_each(|m| *m = 0);
            for r in ranked.iter() {
                most_in_slot[r.slot] = most_in_slot[r.slot].max(fd_count[r.fd_cell]);
            }
            ranked.retain(|r| fd_count[r.fd_cell] == most_in_slot[r.slot]);
        }
        let picked = match rule {
            ScaleInRule::OldestVm => ranked
                .iter()
                .min_by_key(|r| r.oldest)
                .map(|r| (r, r.oldest)),
            ScaleInRule::NewestVm | ScaleInRule::Default => ranked
                .iter()
                .max_by_key(|r| r.newest)
                .map(|r| (r, r.newest)),
        };
        let (r, instance_id) = picked.expect("the best-ranked group is a candidate");
        let g = &groups.get(r.at).expect("ranked from the groups").key;
        check_strict_balance(strict, r.slot, zone_slots, zone_count, &spec.name)?;
        return Ok(vec![PlannedDelete {
            instance_id,
            zone: g.zone,
            fault_domain: g.fault_domain,
            vm_size: g.vm_size,
            priority: g.priority,
            cause: DeleteCause::ScaleIn(ScaleInReason {
                rule,
                unhealthy_first: best >> 34 & 1 == 1,
                mix: mix.map(|(target, _)| (target, total - 1)),
                regional_first: best >> 32 & 1 == 1,
                zone_count: best as u32,
                fault_domain_count: (rule == ScaleInRule::Default).then(|| fd_count[r.fd_cell]),
                most_expensive: lowest_price && cheapest < dearest,
            }),
        }]);
    }

    let mut total = instances.len() as u64;
    active.clear();
    active.extend(0..buckets.len());
    let mut deletes = Vec::with_capacity(usize::try_from(count.min(1 << 16)).unwrap_or(0));
    for _ in 0..count {
        active.retain(|&b| !buckets[b].is_empty());
        cands.clear();
        cands.extend_from_slice(active);
        let mut reason = ScaleInReason {
            rule,
            unhealthy_first: false,
            mix: None,
            regional_first: false,
            zone_count: 0,
            fault_domain_count: None,
            most_expensive: false,
        };

        if prioritize_unhealthy && cands.iter().any(|&b| buckets[b].bad) {
            cands.retain(|&b| buckets[b].bad);
            reason.unhealthy_first = true;
        }
        if let Some(mix) = spec.priority_mix_policy {
            let target = mix.regular_target(total - 1);
            let want = if regular > target {
                Priority::Regular
            } else {
                Priority::Spot
            };
            if cands.iter().any(|&b| buckets[b].priority == want) {
                cands.retain(|&b| buckets[b].priority == want);
            }
            reason.mix = Some((target, total - 1));
        }
        if zonal && cands.iter().any(|&b| buckets[b].slot == zone_slots) {
            cands.retain(|&b| buckets[b].slot == zone_slots);
            reason.regional_first = true;
        }
        let max_zone = cands
            .iter()
            .map(|&b| zone_count[buckets[b].slot])
            .max()
            .unwrap_or(0);
        cands.retain(|&b| zone_count[buckets[b].slot] == max_zone);
        reason.zone_count = max_zone;
        if lowest_price {
            let max_price = cands
                .iter()
                .map(|&b| buckets[b].price)
                .fold(f64::NEG_INFINITY, f64::max);
            reason.most_expensive = cands.iter().any(|&b| buckets[b].price < max_price);
            cands.retain(|&b| buckets[b].price == max_price);
        }
        if rule == ScaleInRule::Default {
            // In each zone, only the fault domains holding the most of it stay candidates.
            let fd_of = |b: usize| fd_count[buckets[b].slot * span + buckets[b].fd];
            most_in_slot.iter_mut().for_each(|m| *m = 0);
            for &b in cands.iter() {
                let m = &mut most_in_slot[buckets[b].slot];
                *m = (*m).max(fd_of(b));
            }
            cands.retain(|&b| fd_of(b) == most_in_slot[buckets[b].slot]);
        }

        let id_at = |pos: usize| instances[flat[pos] as usize].instance_id;
        let pick = match rule {
            ScaleInRule::OldestVm => cands
                .iter()
                .copied()
                .min_by_key(|&b| id_at(buckets[b].head)),
            ScaleInRule::NewestVm | ScaleInRule::Default => cands
                .iter()
                .copied()
                .max_by_key(|&b| id_at(buckets[b].tail - 1)),
        };
        let Some(b) = pick else {
            return Err(CoreError::conflict(
                codes::SCALE_IN_BLOCKED_BY_PROTECTION,
                format!("no instance of '{}' is eligible for scale-in.", spec.name),
            ));
        };
        let member = match rule {
            ScaleInRule::OldestVm => {
                buckets[b].head += 1;
                flat[buckets[b].head - 1]
            }
            ScaleInRule::NewestVm | ScaleInRule::Default => {
                buckets[b].tail -= 1;
                flat[buckets[b].tail]
            }
        };
        let inst = &instances[member as usize];
        let slot = buckets[b].slot;
        let fd = buckets[b].fd;
        if rule == ScaleInRule::Default {
            reason.fault_domain_count = Some(fd_count[slot * span + fd]);
        }
        check_strict_balance(strict, slot, zone_slots, zone_count, &spec.name)?;
        zone_count[slot] -= 1;
        fd_count[slot * span + fd] -= 1;
        total -= 1;
        if inst.priority == Priority::Regular {
            regular -= 1;
        }
        deletes.push(PlannedDelete {
            instance_id: inst.instance_id,
            zone: inst.zone,
            fault_domain: inst.fault_domain,
            vm_size: inst.vm_size,
            priority: inst.priority,
            cause: DeleteCause::ScaleIn(reason),
        });
    }
    Ok(deletes)
}
