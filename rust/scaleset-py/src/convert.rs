//! Plain-data conversions between Python and the core. Python sends dicts and columns (built by
//! `scaleset.engine`); the core's own parsers validate every enum, so their errors carry stable codes.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use scaleset_core as core;
use scaleset_core::{codes, CoreError};

use crate::to_py_err;

/// Extracts a DTO, turning a shape or type mismatch into `InvalidInputError` (code `InvalidParameter`).
pub fn extract<'py, T: for<'a> FromPyObject<'a, 'py>>(
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<T> {
    obj.extract::<T>().map_err(|e| {
        let e: PyErr = e.into();
        to_py_err(CoreError::invalid(
            codes::INVALID_PARAMETER,
            format!("invalid {what}: {e}"),
        ))
    })
}

pub fn parse<T>(text: &str, f: fn(&str) -> core::Result<T>) -> PyResult<T> {
    f(text).map_err(to_py_err)
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct PoolDto {
    pub zone: Option<String>,
    pub vm_size: String,
    pub priority: String,
    pub available: Option<u64>,
    pub price: f64,
    /// Absent in regions saved before restricted sizes existed.
    #[pyo3(default)]
    pub restricted: bool,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct CoreQuotaDto {
    pub family: String,
    pub cores: u64,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct RegionDto {
    pub zones: Vec<String>,
    pub fault_domains_per_zone: u32,
    pub unavailable_zones: Vec<String>,
    pub pools: Vec<PoolDto>,
    /// Absent in regions saved before core quotas existed.
    #[pyo3(default)]
    pub core_quotas: Vec<CoreQuotaDto>,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct SkuDto {
    pub name: String,
    pub tier: Option<String>,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct VmSizeDto {
    pub name: String,
    pub rank: Option<u32>,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct SkuProfileDto {
    pub vm_sizes: Vec<VmSizeDto>,
    pub allocation_strategy: String,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct PriorityMixDto {
    pub base_regular_priority_count: u32,
    pub regular_priority_percentage_above_base: u32,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct ScaleInPolicyDto {
    pub rules: Vec<String>,
    pub force_deletion: bool,
    pub prioritize_unhealthy_vms: bool,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct PlacementDto {
    pub zone_placement_policy: String,
    pub include_zones: Vec<String>,
    pub exclude_zones: Vec<String>,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct MaxInstancePercentDto {
    pub enabled: bool,
    pub value: u32,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct ZoneAllocationDto {
    pub max_zone_count: Option<u32>,
    pub max_instance_percent_per_zone_policy: Option<MaxInstancePercentDto>,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct ZoneRebalancingDto {
    pub enabled: bool,
    pub rebalance_strategy: String,
    pub rebalance_behavior: String,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct RollingUpgradeDto {
    pub max_batch_instance_percent: u32,
    pub max_unhealthy_instance_percent: u32,
    pub max_unhealthy_upgraded_instance_percent: u32,
    pub pause_time_between_batches: String,
    pub prioritize_unhealthy_instances: bool,
    pub enable_cross_zone_upgrade: bool,
    pub max_surge: bool,
    pub rollback_failed_instances_on_policy_breach: bool,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct UpgradePolicyDto {
    pub mode: String,
    pub rolling_upgrade_policy: RollingUpgradeDto,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct RepairsDto {
    pub enabled: bool,
    pub grace_period: String,
    pub repair_action: String,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct SpotRestoreDto {
    pub enabled: bool,
    pub restore_timeout: String,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct LifecycleHookDto {
    pub name: String,
    pub transition: String,
    pub heartbeat_timeout: String,
    pub default_result: String,
}

#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct SpecDto {
    pub name: String,
    pub orchestration_mode: String,
    pub zones: Vec<String>,
    pub zone_balance: bool,
    pub platform_fault_domain_count: Option<u32>,
    pub sku: Option<SkuDto>,
    pub sku_profile: Option<SkuProfileDto>,
    pub priority: String,
    pub eviction_policy: Option<String>,
    pub max_price: Option<f64>,
    pub priority_mix_policy: Option<PriorityMixDto>,
    pub scale_in_policy: ScaleInPolicyDto,
    pub single_placement_group: Option<bool>,
    pub image_kind: String,
    pub overprovision: Option<bool>,
    pub do_not_run_extensions_on_overprovisioned_vms: bool,
    pub overprovision_percent: Option<u32>,
    pub placement: Option<PlacementDto>,
    pub zone_allocation_policy: Option<ZoneAllocationDto>,
    pub automatic_zone_rebalancing_policy: Option<ZoneRebalancingDto>,
    pub upgrade_policy: UpgradePolicyDto,
    pub automatic_repairs_policy: Option<RepairsDto>,
    /// Absent in specs saved before Try & restore existed.
    #[pyo3(default)]
    pub spot_restore_policy: Option<SpotRestoreDto>,
    /// Absent in specs saved before lifecycle hooks existed.
    #[pyo3(default)]
    pub lifecycle_hooks: Vec<LifecycleHookDto>,
    pub model_version: u64,
}

pub fn spec_from_dto(d: SpecDto) -> PyResult<core::ScaleSetSpec> {
    let convert = || -> core::Result<core::ScaleSetSpec> {
        Ok(core::ScaleSetSpec {
            name: d.name,
            orchestration_mode: core::OrchestrationMode::parse(&d.orchestration_mode)?,
            zones: d.zones,
            zone_balance: d.zone_balance,
            platform_fault_domain_count: d.platform_fault_domain_count,
            sku: d.sku.map(|s| core::Sku {
                name: s.name,
                tier: s.tier,
            }),
            sku_profile: d
                .sku_profile
                .map(|p| -> core::Result<core::SkuProfile> {
                    Ok(core::SkuProfile {
                        vm_sizes: p
                            .vm_sizes
                            .into_iter()
                            .map(|v| core::VmSize {
                                name: v.name,
                                rank: v.rank,
                            })
                            .collect(),
                        allocation_strategy: core::AllocationStrategy::parse(
                            &p.allocation_strategy,
                        )?,
                    })
                })
                .transpose()?,
            priority: core::Priority::parse(&d.priority)?,
            eviction_policy: d
                .eviction_policy
                .as_deref()
                .map(core::EvictionPolicy::parse)
                .transpose()?,
            max_price: d.max_price,
            priority_mix_policy: d.priority_mix_policy.map(|m| core::PriorityMixPolicy {
                base_regular_priority_count: m.base_regular_priority_count,
                regular_priority_percentage_above_base: m.regular_priority_percentage_above_base,
            }),
            scale_in_policy: core::ScaleInPolicy {
                rules: d
                    .scale_in_policy
                    .rules
                    .iter()
                    .map(|r| core::ScaleInRule::parse(r))
                    .collect::<core::Result<_>>()?,
                force_deletion: d.scale_in_policy.force_deletion,
                prioritize_unhealthy_vms: d.scale_in_policy.prioritize_unhealthy_vms,
            },
            single_placement_group: d.single_placement_group,
            image_kind: core::ImageKind::parse(&d.image_kind)?,
            overprovision: d.overprovision,
            do_not_run_extensions_on_overprovisioned_vms: d
                .do_not_run_extensions_on_overprovisioned_vms,
            overprovision_percent: d.overprovision_percent,
            placement: d.placement.map(|p| core::Placement {
                zone_placement_policy: p.zone_placement_policy,
                include_zones: p.include_zones,
                exclude_zones: p.exclude_zones,
            }),
            zone_allocation_policy: d
                .zone_allocation_policy
                .map(|z| core::ZoneAllocationPolicy {
                    max_zone_count: z.max_zone_count,
                    max_instance_percent_per_zone_policy: z
                        .max_instance_percent_per_zone_policy
                        .map(|m| core::MaxInstancePercentPerZonePolicy {
                            enabled: m.enabled,
                            value: m.value,
                        }),
                }),
            automatic_zone_rebalancing_policy: d.automatic_zone_rebalancing_policy.map(|p| {
                core::AutomaticZoneRebalancingPolicy {
                    enabled: p.enabled,
                    rebalance_strategy: p.rebalance_strategy,
                    rebalance_behavior: p.rebalance_behavior,
                }
            }),
            upgrade_policy: {
                let r = d.upgrade_policy.rolling_upgrade_policy;
                core::UpgradePolicy {
                    mode: core::UpgradeMode::parse(&d.upgrade_policy.mode)?,
                    rolling_upgrade_policy: core::RollingUpgradePolicy {
                        max_batch_instance_percent: r.max_batch_instance_percent,
                        max_unhealthy_instance_percent: r.max_unhealthy_instance_percent,
                        max_unhealthy_upgraded_instance_percent: r
                            .max_unhealthy_upgraded_instance_percent,
                        pause_time_between_batches: r.pause_time_between_batches,
                        prioritize_unhealthy_instances: r.prioritize_unhealthy_instances,
                        enable_cross_zone_upgrade: r.enable_cross_zone_upgrade,
                        max_surge: r.max_surge,
                        rollback_failed_instances_on_policy_breach: r
                            .rollback_failed_instances_on_policy_breach,
                    },
                }
            },
            automatic_repairs_policy: d
                .automatic_repairs_policy
                .map(|p| -> core::Result<core::AutomaticRepairsPolicy> {
                    Ok(core::AutomaticRepairsPolicy {
                        enabled: p.enabled,
                        grace_period: p.grace_period,
                        repair_action: core::RepairAction::parse(&p.repair_action)?,
                    })
                })
                .transpose()?,
            spot_restore_policy: d.spot_restore_policy.map(|p| core::SpotRestorePolicy {
                enabled: p.enabled,
                restore_timeout: p.restore_timeout,
            }),
            lifecycle_hooks: d
                .lifecycle_hooks
                .into_iter()
                .map(|h| -> core::Result<core::LifecycleHook> {
                    Ok(core::LifecycleHook {
                        name: h.name,
                        transition: core::LifecycleTransition::parse(&h.transition)?,
                        heartbeat_timeout: h.heartbeat_timeout,
                        default_result: core::LifecycleHookDefaultResult::parse(&h.default_result)?,
                    })
                })
                .collect::<core::Result<Vec<_>>>()?,
            model_version: d.model_version,
        })
    };
    convert().map_err(to_py_err)
}

pub fn spec_to_dto(s: &core::ScaleSetSpec) -> SpecDto {
    SpecDto {
        name: s.name.clone(),
        orchestration_mode: s.orchestration_mode.as_str().to_owned(),
        zones: s.zones.clone(),
        zone_balance: s.zone_balance,
        platform_fault_domain_count: s.platform_fault_domain_count,
        sku: s.sku.as_ref().map(|k| SkuDto {
            name: k.name.clone(),
            tier: k.tier.clone(),
        }),
        sku_profile: s.sku_profile.as_ref().map(|p| SkuProfileDto {
            vm_sizes: p
                .vm_sizes
                .iter()
                .map(|v| VmSizeDto {
                    name: v.name.clone(),
                    rank: v.rank,
                })
                .collect(),
            allocation_strategy: p.allocation_strategy.as_str().to_owned(),
        }),
        priority: s.priority.as_str().to_owned(),
        eviction_policy: s.eviction_policy.map(|e| e.as_str().to_owned()),
        max_price: s.max_price,
        priority_mix_policy: s.priority_mix_policy.map(|m| PriorityMixDto {
            base_regular_priority_count: m.base_regular_priority_count,
            regular_priority_percentage_above_base: m.regular_priority_percentage_above_base,
        }),
        scale_in_policy: ScaleInPolicyDto {
            rules: s
                .scale_in_policy
                .rules
                .iter()
                .map(|r| r.as_str().to_owned())
                .collect(),
            force_deletion: s.scale_in_policy.force_deletion,
            prioritize_unhealthy_vms: s.scale_in_policy.prioritize_unhealthy_vms,
        },
        single_placement_group: s.single_placement_group,
        image_kind: s.image_kind.as_str().to_owned(),
        overprovision: s.overprovision,
        do_not_run_extensions_on_overprovisioned_vms: s
            .do_not_run_extensions_on_overprovisioned_vms,
        overprovision_percent: s.overprovision_percent,
        placement: s.placement.as_ref().map(|p| PlacementDto {
            zone_placement_policy: p.zone_placement_policy.clone(),
            include_zones: p.include_zones.clone(),
            exclude_zones: p.exclude_zones.clone(),
        }),
        zone_allocation_policy: s
            .zone_allocation_policy
            .as_ref()
            .map(|z| ZoneAllocationDto {
                max_zone_count: z.max_zone_count,
                max_instance_percent_per_zone_policy: z.max_instance_percent_per_zone_policy.map(
                    |m| MaxInstancePercentDto {
                        enabled: m.enabled,
                        value: m.value,
                    },
                ),
            }),
        automatic_zone_rebalancing_policy: s.automatic_zone_rebalancing_policy.as_ref().map(|p| {
            ZoneRebalancingDto {
                enabled: p.enabled,
                rebalance_strategy: p.rebalance_strategy.clone(),
                rebalance_behavior: p.rebalance_behavior.clone(),
            }
        }),
        upgrade_policy: {
            let r = &s.upgrade_policy.rolling_upgrade_policy;
            UpgradePolicyDto {
                mode: s.upgrade_policy.mode.as_str().to_owned(),
                rolling_upgrade_policy: RollingUpgradeDto {
                    max_batch_instance_percent: r.max_batch_instance_percent,
                    max_unhealthy_instance_percent: r.max_unhealthy_instance_percent,
                    max_unhealthy_upgraded_instance_percent: r
                        .max_unhealthy_upgraded_instance_percent,
                    pause_time_between_batches: r.pause_time_between_batches.clone(),
                    prioritize_unhealthy_instances: r.prioritize_unhealthy_instances,
                    enable_cross_zone_upgrade: r.enable_cross_zone_upgrade,
                    max_surge: r.max_surge,
                    rollback_failed_instances_on_policy_breach: r
                        .rollback_failed_instances_on_policy_breach,
                },
            }
        },
        automatic_repairs_policy: s.automatic_repairs_policy.as_ref().map(|p| RepairsDto {
            enabled: p.enabled,
            grace_period: p.grace_period.clone(),
            repair_action: p.repair_action.as_str().to_owned(),
        }),
        spot_restore_policy: s.spot_restore_policy.as_ref().map(|p| SpotRestoreDto {
            enabled: p.enabled,
            restore_timeout: p.restore_timeout.clone(),
        }),
        lifecycle_hooks: s
            .lifecycle_hooks
            .iter()
            .map(|h| LifecycleHookDto {
                name: h.name.clone(),
                transition: h.transition.as_str().to_owned(),
                heartbeat_timeout: h.heartbeat_timeout.clone(),
                default_result: h.default_result.as_str().to_owned(),
            })
            .collect(),
        model_version: s.model_version,
    }
}

/// Instances as columns: one list per field, all the same length.
#[derive(FromPyObject, IntoPyObject)]
#[pyo3(from_item_all)]
pub struct InstanceColumns {
    pub instance_id: Vec<u64>,
    pub name: Vec<Option<String>>,
    pub zone: Vec<Option<String>>,
    pub fault_domain: Vec<u32>,
    pub vm_size: Vec<String>,
    pub priority: Vec<String>,
    pub power_state: Vec<String>,
    pub health: Vec<String>,
    /// Absent in columns saved before provisioning states existed: every such instance had succeeded.
    #[pyo3(default)]
    pub provisioning_state: Vec<String>,
    pub model_version: Vec<Option<u64>>,
    pub protect_from_scale_in: Vec<bool>,
    pub protect_from_scale_set_actions: Vec<bool>,
}

pub fn instance_columns(e: &core::Engine, s: &core::ScaleSetState) -> InstanceColumns {
    let zones = &e.region().zones;
    let sizes = e.sizes();
    let n = s.instances.len();
    let mut c = InstanceColumns {
        instance_id: Vec::with_capacity(n),
        name: Vec::with_capacity(n),
        zone: Vec::with_capacity(n),
        fault_domain: Vec::with_capacity(n),
        vm_size: Vec::with_capacity(n),
        priority: Vec::with_capacity(n),
        power_state: Vec::with_capacity(n),
        health: Vec::with_capacity(n),
        provisioning_state: Vec::with_capacity(n),
        model_version: Vec::with_capacity(n),
        protect_from_scale_in: Vec::with_capacity(n),
        protect_from_scale_set_actions: Vec::with_capacity(n),
    };
    for i in &s.instances {
        c.instance_id.push(i.instance_id);
        c.name.push(i.name.clone());
        c.zone
            .push(i.zone.map(|z| core::zone_label(zones, Some(z)).to_owned()));
        c.fault_domain.push(i.fault_domain);
        c.vm_size.push(
            sizes
                .get(usize::from(i.vm_size))
                .cloned()
                .unwrap_or_default(),
        );
        c.priority.push(i.priority.as_str().to_owned());
        c.power_state.push(i.power_state.as_str().to_owned());
        c.health.push(i.health.as_str().to_owned());
        c.provisioning_state
            .push(i.provisioning_state.as_str().to_owned());
        c.model_version.push(Some(i.model_version));
        c.protect_from_scale_in.push(i.protect_from_scale_in);
        c.protect_from_scale_set_actions
            .push(i.protect_from_scale_set_actions);
    }
    c
}

pub fn instance_inputs(c: InstanceColumns) -> PyResult<Vec<core::InstanceInput>> {
    let n = c.instance_id.len();
    let lengths = [
        c.name.len(),
        c.zone.len(),
        c.fault_domain.len(),
        c.vm_size.len(),
        c.priority.len(),
        c.power_state.len(),
        c.health.len(),
        c.model_version.len(),
        c.protect_from_scale_in.len(),
        c.protect_from_scale_set_actions.len(),
    ];
    let states = c.provisioning_state.len();
    if lengths.iter().any(|&l| l != n) || (states != 0 && states != n) {
        return Err(to_py_err(CoreError::invalid(
            codes::INVALID_PARAMETER,
            "instance columns must all have the same length.",
        )));
    }
    let mut out = Vec::with_capacity(n);
    let mut name = c.name.into_iter();
    let mut zone = c.zone.into_iter();
    let mut vm_size = c.vm_size.into_iter();
    for i in 0..n {
        out.push(core::InstanceInput {
            instance_id: c.instance_id[i],
            name: name.next().flatten(),
            zone: zone.next().flatten(),
            fault_domain: c.fault_domain[i],
            vm_size: vm_size.next().unwrap_or_default(),
            priority: parse(&c.priority[i], core::Priority::parse)?,
            power_state: parse(&c.power_state[i], core::PowerState::parse)?,
            health: parse(&c.health[i], core::Health::parse)?,
            provisioning_state: match c.provisioning_state.get(i) {
                Some(text) => parse(text, core::ProvisioningState::parse)?,
                None => core::ProvisioningState::Succeeded,
            },
            model_version: c.model_version[i],
            protect_from_scale_in: c.protect_from_scale_in[i],
            protect_from_scale_set_actions: c.protect_from_scale_set_actions[i],
        });
    }
    Ok(out)
}

/// Plan items as columns, for callers that want thousands of items without one object each.
pub fn plan_columns<'py>(
    py: Python<'py>,
    zones: &[String],
    sizes: &[String],
    items: impl ExactSizeIterator<Item = (u64, core::ZoneSlot, u32, u16, core::Priority)>,
) -> PyResult<Bound<'py, PyDict>> {
    let n = items.len();
    let (mut ids, mut zs, mut fds, mut vs, mut ps) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (id, zone, fd, size, priority) in items {
        ids.push(id);
        zs.push(zone.map(|z| core::zone_label(zones, Some(z))));
        fds.push(fd);
        vs.push(sizes.get(usize::from(size)).map_or("?", String::as_str));
        ps.push(priority.as_str());
    }
    let d = PyDict::new(py);
    d.set_item("instance_id", PyList::new(py, ids)?)?;
    d.set_item("zone", PyList::new(py, zs)?)?;
    d.set_item("fault_domain", PyList::new(py, fds)?)?;
    d.set_item("vm_size", PyList::new(py, vs)?)?;
    d.set_item("priority", PyList::new(py, ps)?)?;
    Ok(d)
}

/// The rebalancer's input as plain Python data: scalars, and pool rows / new pools as columns.
pub fn rebalance_input_to_py<'py>(
    py: Python<'py>,
    input: &core::RebalanceInput,
    zones: &[String],
    sizes: &[String],
) -> PyResult<Bound<'py, PyDict>> {
    let size = |i: u16| sizes.get(usize::from(i)).map_or("?", String::as_str);
    let d = PyDict::new(py);
    d.set_item("capacity", input.capacity)?;
    d.set_item("fault_domains", input.fault_domains)?;
    d.set_item(
        "slots",
        input
            .slots
            .iter()
            .map(|&s| s.map(|_| core::zone_label(zones, s)))
            .collect::<Vec<_>>(),
    )?;
    d.set_item("slot_available", &input.slot_available)?;
    d.set_item("regular_target", input.regular_target)?;
    d.set_item("outside_regular", input.outside[0])?;
    d.set_item("outside_spot", input.outside[1])?;
    d.set_item(
        "model_sizes",
        input
            .model_sizes
            .iter()
            .map(|&s| size(s))
            .collect::<Vec<_>>(),
    )?;
    let rows = PyDict::new(py);
    rows.set_item(
        "slot",
        input.rows.iter().map(|r| r.slot).collect::<Vec<_>>(),
    )?;
    rows.set_item(
        "fault_domain",
        input
            .rows
            .iter()
            .map(|r| r.fault_domain)
            .collect::<Vec<_>>(),
    )?;
    rows.set_item(
        "vm_size",
        input
            .rows
            .iter()
            .map(|r| size(r.vm_size))
            .collect::<Vec<_>>(),
    )?;
    rows.set_item(
        "priority",
        input
            .rows
            .iter()
            .map(|r| r.priority.as_str())
            .collect::<Vec<_>>(),
    )?;
    // -1 marks fixed (immovable) instances; 0 unhealthy, 1 out-of-date model, 2 current.
    rows.set_item(
        "class",
        input
            .rows
            .iter()
            .map(|r| r.class.map_or(-1, |c| c as i32))
            .collect::<Vec<_>>(),
    )?;
    rows.set_item(
        "count",
        input.rows.iter().map(|r| r.count).collect::<Vec<_>>(),
    )?;
    rows.set_item(
        "price",
        input.rows.iter().map(|r| r.price).collect::<Vec<_>>(),
    )?;
    d.set_item("rows", rows)?;
    let pools = PyDict::new(py);
    pools.set_item(
        "slot",
        input.new_pools.iter().map(|p| p.slot).collect::<Vec<_>>(),
    )?;
    pools.set_item(
        "vm_size",
        input
            .new_pools
            .iter()
            .map(|p| size(p.vm_size))
            .collect::<Vec<_>>(),
    )?;
    pools.set_item(
        "priority",
        input
            .new_pools
            .iter()
            .map(|p| p.priority.as_str())
            .collect::<Vec<_>>(),
    )?;
    pools.set_item(
        "available",
        input
            .new_pools
            .iter()
            .map(|p| (p.available != u64::MAX).then_some(p.available))
            .collect::<Vec<_>>(),
    )?;
    pools.set_item(
        "price",
        input.new_pools.iter().map(|p| p.price).collect::<Vec<_>>(),
    )?;
    d.set_item("new_pools", pools)?;
    Ok(d)
}
