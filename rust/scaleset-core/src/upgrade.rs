//! Upgrades: which instances run an out-of-date model, in what batches a rolling upgrade takes them,
//! and moving instances to the current model (or back).
//!
//! Batches (reference §7.3): out-of-date instances, skipping those protected from scale-set actions;
//! `batch_size` at most; zone by zone unless cross-zone upgrades are enabled (a batch never spans zones);
//! inside a zone, taken round-robin over fault domains (fullest first) so that no batch takes a whole
//! fault domain down when another choice exists; with `prioritize_unhealthy`, unhealthy (or Unknown)
//! instances first, and zones holding more of them first.

use std::collections::BTreeMap;

use crate::engine::Engine;
use crate::error::{codes, CoreError, Result};
use crate::model::{Health, Instance, ZoneSlot};

fn unhealthy(i: &Instance) -> bool {
    matches!(i.health, Health::Unhealthy | Health::Unknown)
}

/// Interleaves one zone's candidates over fault domains (fullest remaining first) and cuts batches.
/// Fault domains are keyed (zone rank, fault domain), so cross-zone batches tell zones' fault domains apart.
type FdKey = (usize, u32);

/// Interleaves one zone's candidates over fault domains (fullest remaining first) and cuts batches.
fn zone_batches(
    by_fd: BTreeMap<FdKey, Vec<u64>>,
    fd_totals: &BTreeMap<FdKey, usize>,
    batch_size: usize,
    out: &mut Vec<Vec<u64>>,
) {
    // (key, ids, next unread, instances of the fault domain, taken into the current batch)
    let mut queues: Vec<(FdKey, Vec<u64>, usize, usize, usize)> = by_fd
        .into_iter()
        .map(|(k, ids)| (k, ids, 0, fd_totals.get(&k).copied().unwrap_or(0), 0))
        .collect();
    let mut left: usize = queues.iter().map(|q| q.1.len()).sum();
    let mut batch: Vec<u64> = Vec::with_capacity(batch_size);
    while left > 0 {
        // The fault domain with the most left to upgrade (ties: the lowest key); but not one this batch
        // would take down whole (all of its two or more instances; a lone instance's fault domain goes
        // down whenever it is upgraded), while another fault domain still has candidates.
        let mut best: Option<(usize, usize)> = None; // (remaining, index), preferring non-whole
        let mut fallback: Option<(usize, usize)> = None;
        for (k, (_, ids, next, total, taken)) in queues.iter().enumerate() {
            let remaining = ids.len() - next;
            if remaining == 0 {
                continue;
            }
            if fallback.is_none_or(|(r, _)| remaining > r) {
                fallback = Some((remaining, k));
            }
            let whole = *total > 1 && taken + 1 >= *total;
            if !whole && best.is_none_or(|(r, _)| remaining > r) {
                best = Some((remaining, k));
            }
        }
        let Some((_, k)) = best.or(fallback) else {
            break;
        };
        let q = &mut queues[k];
        batch.push(q.1[q.2]);
        q.2 += 1;
        q.4 += 1;
        left -= 1;
        if batch.len() == batch_size {
            out.push(std::mem::replace(
                &mut batch,
                Vec::with_capacity(batch_size),
            ));
            for q in &mut queues {
                q.4 = 0;
            }
        }
    }
    if !batch.is_empty() {
        out.push(batch);
    }
}

impl Engine {
    /// Out-of-date instances in rolling-upgrade batches of at most `batch_size`.
    pub fn plan_upgrade_batches(
        &self,
        name: &str,
        batch_size: usize,
        prioritize_unhealthy: bool,
        cross_zone: bool,
    ) -> Result<Vec<Vec<u64>>> {
        let state = self.scale_set(name)?;
        let version = state.spec.model_version;
        let batch_size = batch_size.max(1);
        // Zone order: the scale set's zones, then regional instances.
        let zone_rank = |z: ZoneSlot| match z {
            Some(z) => state
                .spec
                .zones
                .iter()
                .position(|n| n == self.region().zone_name(Some(z)))
                .unwrap_or(usize::MAX - 1),
            None => usize::MAX,
        };
        // group -> (unhealthy?, fd) -> ids; and every instance per (group, fd) for the whole-fault-domain rule.
        let mut groups: BTreeMap<usize, BTreeMap<(bool, FdKey), Vec<u64>>> = BTreeMap::new();
        let mut totals: BTreeMap<usize, BTreeMap<FdKey, usize>> = BTreeMap::new();
        for i in &state.instances {
            let rank = zone_rank(i.zone);
            let group = if cross_zone { 0 } else { rank };
            let fd = (rank, i.fault_domain);
            *totals.entry(group).or_default().entry(fd).or_default() += 1;
            if i.model_version >= version || i.protect_from_scale_set_actions {
                continue;
            }
            let first = prioritize_unhealthy && unhealthy(i);
            groups
                .entry(group)
                .or_default()
                .entry((!first, fd))
                .or_default()
                .push(i.instance_id);
        }
        let mut order: Vec<(usize, usize)> = groups
            .iter()
            .map(|(&g, q)| {
                (
                    g,
                    q.iter()
                        .filter(|((later, _), _)| !later)
                        .map(|(_, ids)| ids.len())
                        .sum(),
                )
            })
            .collect();
        if prioritize_unhealthy {
            order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        }
        let mut batches = Vec::new();
        for (group, _) in order {
            let queues = groups.remove(&group).unwrap_or_default();
            let fd_totals = totals.remove(&group).unwrap_or_default();
            // Unhealthy first (their batches may share with healthy ones only at the boundary).
            let mut first: BTreeMap<FdKey, Vec<u64>> = BTreeMap::new();
            let mut rest: BTreeMap<FdKey, Vec<u64>> = BTreeMap::new();
            for ((later, fd), ids) in queues {
                if later {
                    rest.insert(fd, ids);
                } else {
                    first.insert(fd, ids);
                }
            }
            let mut group_batches = Vec::new();
            zone_batches(first, &fd_totals, batch_size, &mut group_batches);
            // Top up a partial last unhealthy batch with healthy instances before starting new batches.
            let carry =
                group_batches.last().map_or(
                    0,
                    |b: &Vec<u64>| if b.len() < batch_size { b.len() } else { 0 },
                );
            let mut healthy = Vec::new();
            zone_batches(rest, &fd_totals, batch_size, &mut healthy);
            if carry > 0 {
                let flat: Vec<u64> = healthy.concat();
                let (top, tail) = flat.split_at((batch_size - carry).min(flat.len()));
                if let Some(last) = group_batches.last_mut() {
                    last.extend_from_slice(top);
                }
                healthy = tail.chunks(batch_size).map(<[u64]>::to_vec).collect();
            }
            group_batches.extend(healthy);
            batches.extend(group_batches);
        }
        Ok(batches)
    }

    /// Moves instances to the current model in place (a reimage): model version, the model's VM size
    /// (the first one if theirs left the model), and health `Initializing` until they report.
    pub fn upgrade_instances(&mut self, name: &str, ids: &[u64]) -> Result<()> {
        self.set_instance_model(name, ids, None)
    }

    /// Puts instances back on `model_version` (a rollback after a policy breach); health `Initializing`.
    pub fn roll_back_instances(
        &mut self,
        name: &str,
        ids: &[u64],
        model_version: u64,
    ) -> Result<()> {
        self.set_instance_model(name, ids, Some(model_version))
    }

    fn set_instance_model(&mut self, name: &str, ids: &[u64], version: Option<u64>) -> Result<()> {
        let state = self.scale_set(name)?;
        let current = state.spec.model_version;
        if let Some(v) = version {
            if v > current {
                return Err(CoreError::invalid(
                    codes::INVALID_PARAMETER,
                    format!("model version {v} does not exist yet (the current one is {current})."),
                ));
            }
        }
        let mut positions = Vec::with_capacity(ids.len());
        for &id in ids {
            let p = state
                .instances
                .binary_search_by_key(&id, |i| i.instance_id)
                .map_err(|_| {
                    CoreError::not_found(
                        codes::INSTANCE_NOT_FOUND,
                        format!("scale set '{name}' has no instance with id {id}."),
                    )
                })?;
            positions.push(p);
        }
        let model_sizes = state.size_ids().to_vec();
        let state = self.scale_set_mut(name)?;
        state.touched();
        for p in positions {
            let inst = &mut state.instances[p];
            inst.model_version = version.unwrap_or(current);
            if version.is_none() && !model_sizes.contains(&inst.vm_size) {
                if let Some(&size) = model_sizes.first() {
                    inst.vm_size = size;
                }
            }
            inst.health = Health::Initializing;
        }
        Ok(())
    }
}
