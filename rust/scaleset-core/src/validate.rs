//! Validation of scale-set models against Azure's documented rules, the defaults Azure fills in, the
//! instance limits, and which properties may change after creation.

use crate::error::{codes, CoreError, Result};
use crate::model::{
    AllocationStrategy, ImageKind, OrchestrationMode, Priority, Region, ScaleSetSpec, Sku,
};

pub const MAX_SKU_PROFILE_SIZES: usize = 5;
/// The longest pause between rolling-upgrade batches (ours; Azure gives no maximum): a week.
pub const MAX_PAUSE_S: f64 = 7.0 * 86_400.0;

fn invalid(code: &'static str, message: String) -> CoreError {
    CoreError::invalid(code, message)
}

/// `text` as an error message may quote it: at most 64 characters, so a huge input never bloats the error.
pub fn shown(text: &str) -> String {
    if text.chars().count() <= 64 {
        text.to_owned()
    } else {
        let head: String = text.chars().take(61).collect();
        format!("{head}... ({} characters)", text.chars().count())
    }
}

/// A VM size name: 1 to 128 letters, digits, '_' or '-' (Azure's size names, e.g. Standard_D2s_v5).
pub fn check_size_name(name: &str, field: &'static str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if !ok {
        return Err(invalid(
            codes::INVALID_PARAMETER,
            format!("VM size name '{}' is invalid: use 1 to 128 letters, digits, '_' or '-' (e.g. Standard_D2s_v5).", shown(name)),
        )
        .at(field));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok_first || !ok_rest || name.len() > 64 {
        return Err(invalid(
            codes::INVALID_RESOURCE_NAME,
            format!(
                "scale set name '{}' is invalid: use 1 to 64 letters, digits, '-', '_' or '.', starting with a letter or digit.",
                shown(name)
            ),
        )
        .at("name"));
    }
    Ok(())
}

/// Supported `platform_fault_domain_count` values and the default, from Azure's table (reference §2.4).
pub fn fault_domain_rule(mode: OrchestrationMode, zonal: bool) -> (&'static [u32], u32) {
    match (mode, zonal) {
        (OrchestrationMode::Uniform, true) => (&[1, 5], 1),
        (OrchestrationMode::Uniform, false) => (&[1, 2, 3, 4, 5], 5),
        (OrchestrationMode::Flexible, true) => (&[1], 1),
        (OrchestrationMode::Flexible, false) => (&[1, 2, 3], 1),
    }
}

/// B, D, E and F-series sizes support memory-preserving updates (reference §1.2); others do not.
pub fn supports_memory_preserving_updates(vm_size: &str) -> bool {
    let family = vm_size.split_once('_').map_or(vm_size, |(_, rest)| rest);
    matches!(
        family.chars().next().map(|c| c.to_ascii_uppercase()),
        Some('B' | 'D' | 'E' | 'F')
    )
}

/// Validate a spec and fill in Azure's defaults. The result is what the engine stores.
pub fn resolve(mut spec: ScaleSetSpec, region: &Region) -> Result<ScaleSetSpec> {
    check_name(&spec.name)?;
    crate::auto_zones::validate(&mut spec, region)?;
    let flexible = spec.orchestration_mode == OrchestrationMode::Flexible;

    let mut seen = std::collections::BTreeSet::new();
    for zone in &spec.zones {
        region
            .zone_index(zone)
            .map_err(|e| invalid(codes::INVALID_PARAMETER, e.message).at("zones"))?;
        if !seen.insert(zone.as_str()) {
            return Err(invalid(
                codes::INVALID_PARAMETER,
                format!("zone '{zone}' is listed twice in zones."),
            )
            .at("zones"));
        }
    }
    if spec.zone_balance && spec.zones.len() < 2 {
        return Err(invalid(
            codes::ZONE_BALANCE_REQUIRES_MULTIPLE_ZONES,
            "zone_balance can only be set when zones lists more than one zone; remove zone_balance or add zones.".into(),
        )
        .at("zone_balance"));
    }

    let (allowed, default_fd) = fault_domain_rule(spec.orchestration_mode, spec.is_zonal());
    let fd = spec.platform_fault_domain_count.unwrap_or(default_fd);
    if !allowed.contains(&fd) {
        let kind = if spec.is_zonal() {
            "zonal or zone-spanning"
        } else {
            "regional"
        };
        return Err(invalid(
            codes::INVALID_FAULT_DOMAIN_COUNT,
            format!(
                "platform_fault_domain_count {fd} is not supported for a {kind} {} scale set; supported values: {allowed:?}.",
                spec.orchestration_mode
            ),
        )
        .at("platform_fault_domain_count"));
    }
    spec.platform_fault_domain_count = Some(fd);

    resolve_sku(&mut spec)?;
    for size in spec.vm_size_names() {
        check_size_name(size, "sku.name")?;
    }

    // Spot-only properties.
    match spec.priority {
        Priority::Regular => {
            if spec.eviction_policy.is_some() {
                return Err(invalid(
                    codes::EVICTION_POLICY_ONLY_FOR_SPOT,
                    "Eviction policy can be set only on Azure Spot Virtual Machines; remove eviction_policy or set priority to Spot.".into(),
                )
        .at("eviction_policy"));
            }
            if spec.max_price.is_some() {
                return Err(invalid(
                    codes::MAX_PRICE_ONLY_FOR_SPOT,
                    "Max price is supported only for Azure Spot Virtual Machines; remove max_price or set priority to Spot.".into(),
                )
        .at("max_price"));
            }
        }
        Priority::Spot => {
            spec.eviction_policy = Some(
                spec.eviction_policy
                    .unwrap_or(crate::model::EvictionPolicy::Deallocate),
            );
        }
    }
    if let Some(price) = spec.max_price {
        if !(price == -1.0 || (price.is_finite() && price > 0.0)) {
            return Err(invalid(
                codes::MAX_PRICE_VALUE_INVALID,
                format!("Invalid max price value {price}. The only supported values for max price are -1 or a decimal greater than zero."),
            )
        .at("max_price"));
        }
    }

    // Single placement group: a Uniform concept. Regional Uniform defaults to one group, zonal to many.
    match spec.orchestration_mode {
        OrchestrationMode::Flexible => {
            if spec.single_placement_group == Some(true) {
                return Err(invalid(
                    codes::INVALID_PARAMETER,
                    "single_placement_group is not supported with Flexible orchestration; leave it unset.".into(),
                )
        .at("single_placement_group"));
            }
            spec.single_placement_group = Some(false);
            if spec.overprovision == Some(true) {
                return Err(invalid(
                    codes::INVALID_PARAMETER,
                    "overprovision is not supported with Flexible orchestration; leave it unset or false.".into(),
                )
                .at("overprovision"));
            }
            spec.overprovision = Some(false);
        }
        OrchestrationMode::Uniform => {
            spec.overprovision = Some(spec.overprovision.unwrap_or(true));
            let spg = spec.single_placement_group.unwrap_or(!spec.is_zonal());
            if spg && fd == 1 && spec.is_zonal() {
                return Err(invalid(
                    codes::INVALID_PARAMETER,
                    "max spreading (platform_fault_domain_count 1) across zones needs multiple placement groups; set single_placement_group to false.".into(),
                )
        .at("single_placement_group"));
            }
            spec.single_placement_group = Some(spg);
        }
    }

    if spec.overprovision_percent.is_some_and(|p| p > 100) {
        return Err(invalid(
            codes::INVALID_PARAMETER,
            format!(
                "overprovision_percent must be 0 to 100, got {}.",
                spec.overprovision_percent.unwrap_or_default()
            ),
        )
        .at("overprovision_percent"));
    }

    if let Some(mix) = spec.priority_mix_policy {
        if !flexible || spec.priority != Priority::Spot {
            return Err(invalid(
                codes::PRIORITY_MIX_NOT_SUPPORTED,
                "priority_mix_policy needs a Flexible scale set whose priority is Spot.".into(),
            )
            .at("priority_mix_policy"));
        }
        if fd > 1 {
            return Err(invalid(
                codes::PRIORITY_MIX_NOT_SUPPORTED,
                "Spot and Regular instances cannot be mixed with fixed fault-domain spreading; use platform_fault_domain_count 1.".into(),
            )
        .at("platform_fault_domain_count"));
        }
        if mix.regular_priority_percentage_above_base > 100 {
            return Err(invalid(
                codes::INVALID_PARAMETER,
                format!(
                    "priority_mix_policy.regular_priority_percentage_above_base must be between 0 and 100, got {}.",
                    mix.regular_priority_percentage_above_base
                ),
            )
        .at("priority_mix_policy.regular_priority_percentage_above_base"));
        }
    }

    if let Some(policy) = &spec.automatic_zone_rebalancing_policy {
        if !policy.rebalance_strategy.eq_ignore_ascii_case("Recreate") {
            return Err(invalid(
                codes::INVALID_PARAMETER,
                format!("automatic_zone_rebalancing_policy.rebalance_strategy '{}' is not supported; the only value is Recreate.", policy.rebalance_strategy),
            )
        .at("automatic_zone_rebalancing_policy.rebalance_strategy"));
        }
        if !policy
            .rebalance_behavior
            .eq_ignore_ascii_case("CreateBeforeDelete")
        {
            return Err(invalid(
                codes::INVALID_PARAMETER,
                format!("automatic_zone_rebalancing_policy.rebalance_behavior '{}' is not supported; the only value is CreateBeforeDelete.", policy.rebalance_behavior),
            )
        .at("automatic_zone_rebalancing_policy.rebalance_behavior"));
        }
        if policy.enabled && (spec.zones.len() < 2 || spec.zone_balance) {
            return Err(invalid(
                codes::INVALID_PARAMETER,
                "automatic zone balance needs a zone-spanning scale set (two or more zones) without strict zone_balance.".into(),
            )
        .at("automatic_zone_rebalancing_policy.enabled"));
        }
    }
    let rolling = &spec.upgrade_policy.rolling_upgrade_policy;
    for (field, value, min) in [
        (
            "max_batch_instance_percent",
            rolling.max_batch_instance_percent,
            5,
        ),
        (
            "max_unhealthy_instance_percent",
            rolling.max_unhealthy_instance_percent,
            5,
        ),
        (
            "max_unhealthy_upgraded_instance_percent",
            rolling.max_unhealthy_upgraded_instance_percent,
            0,
        ),
    ] {
        if value < min || value > 100 {
            return Err(invalid(
                codes::INVALID_PARAMETER,
                format!(
                    "rolling_upgrade_policy.{field} must be between {min} and 100, got {value}."
                ),
            ));
        }
    }
    if !crate::model::parse_duration(&rolling.pause_time_between_batches)
        .is_some_and(|s| (0.0..=MAX_PAUSE_S).contains(&s))
    {
        return Err(invalid(
            codes::INVALID_PARAMETER,
            format!(
                "rolling_upgrade_policy.pause_time_between_batches '{}' must be an ISO 8601 duration from PT0S to P7D, such as PT5M.",
                shown(&rolling.pause_time_between_batches)
            ),
        )
        .at("upgrade_policy.rolling_upgrade_policy.pause_time_between_batches"));
    }
    if let Some(repairs) = &spec.automatic_repairs_policy {
        let minutes = crate::model::parse_duration(&repairs.grace_period).map(|s| s / 60.0);
        if !minutes.is_some_and(|m| (10.0..=90.0).contains(&m)) {
            return Err(invalid(
                codes::INVALID_PARAMETER,
                format!(
                    "automatic_repairs_policy.grace_period '{}' must be an ISO 8601 duration between 10 and 90 minutes (PT10M to PT90M).",
                    repairs.grace_period
                ),
            )
        .at("automatic_repairs_policy.grace_period"));
        }
    }
    if let Some(restore) = &spec.spot_restore_policy {
        if restore.enabled && spec.priority != Priority::Spot {
            return Err(invalid(
                codes::SPOT_RESTORE_ONLY_FOR_SPOT,
                "spot_restore_policy (Try & restore) is supported only for Azure Spot scale sets (priority Spot).".into(),
            )
            .at("spot_restore_policy.enabled"));
        }
        let seconds = crate::model::parse_duration(&restore.restore_timeout);
        if !seconds.is_some_and(|s| s > 0.0 && s <= 30.0 * 86_400.0) {
            return Err(invalid(
                codes::INVALID_PARAMETER,
                format!(
                    "spot_restore_policy.restore_timeout '{}' must be an ISO 8601 duration above zero and at most 30 days, such as PT1H.",
                    shown(&restore.restore_timeout)
                ),
            )
            .at("spot_restore_policy.restore_timeout"));
        }
    }
    check_lifecycle_hooks(&spec.lifecycle_hooks)?;
    if spec.scale_in_policy.rules.len() > 1 {
        return Err(invalid(
            codes::INVALID_PARAMETER,
            "scale_in_policy.rules takes at most one rule (Default, NewestVM or OldestVM).".into(),
        )
        .at("scale_in_policy.rules"));
    }
    if spec.scale_in_policy.rules.is_empty() {
        spec.scale_in_policy
            .rules
            .push(crate::model::ScaleInRule::Default);
    }
    Ok(spec)
}

fn resolve_sku(spec: &mut ScaleSetSpec) -> Result<()> {
    let Some(profile) = &spec.sku_profile else {
        match &spec.sku {
            Some(sku) if !sku.name.trim().is_empty() && !sku.name.eq_ignore_ascii_case("Mix") => return Ok(()),
            Some(sku) if sku.name.eq_ignore_ascii_case("Mix") => {
                return Err(invalid(
                    codes::SKU_PROFILE_VM_SIZES_EMPTY,
                    "sku name 'Mix' needs a sku_profile listing the VM sizes.".into(),
                )
        .at("sku_profile"))
            }
            _ => {
                return Err(invalid(
                    codes::INVALID_PARAMETER,
                    "a scale set needs a sku with a VM size name (e.g. Standard_D2s_v5) or a sku_profile.".into(),
                )
        .at("sku.name"))
            }
        }
    };
    if spec.orchestration_mode != OrchestrationMode::Flexible {
        return Err(invalid(
            codes::SKU_PROFILE_SCENARIO_NOT_SUPPORTED,
            "sku_profile (instance mix) is supported only on Flexible scale sets.".into(),
        )
        .at("sku_profile"));
    }
    match &spec.sku {
        None => spec.sku = Some(Sku { name: "Mix".into(), tier: None }),
        Some(sku) if !sku.name.eq_ignore_ascii_case("Mix") => {
            return Err(invalid(
                codes::SKU_NAME_MUST_BE_MIX,
                format!("Sku name is {}. Virtual Machine Scale Sets with Sku Profile must have the Sku name property set to \"Mix\".", sku.name),
            )
        .at("sku.name"))
        }
        Some(Sku { tier: Some(tier), .. }) => {
            return Err(invalid(
                codes::SKU_TIER_MUST_NOT_BE_SET,
                format!("Sku tier is {tier}. Virtual Machine Scale Sets with Sku Profile must not have the Sku tier property set."),
            )
        .at("sku.tier"))
        }
        Some(_) => {}
    }
    if profile.vm_sizes.is_empty() {
        return Err(invalid(
            codes::SKU_PROFILE_VM_SIZES_EMPTY,
            "Sku Profile VM Sizes cannot be null or empty. Please provide a valid list of VM Sizes and retry.".into(),
        )
        .at("sku_profile.vm_sizes"));
    }
    if profile.vm_sizes.len() > MAX_SKU_PROFILE_SIZES {
        return Err(invalid(
            codes::SKU_PROFILE_TOO_MANY_VM_SIZES,
            "Too many VM Sizes were specified in the request. Please provide no more than 5 VM Sizes.".into(),
        )
        .at("sku_profile.vm_sizes"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for size in &profile.vm_sizes {
        if size.name.trim().is_empty() {
            return Err(invalid(
                codes::INVALID_PARAMETER,
                "a sku_profile VM size needs a name.".into(),
            )
            .at("sku_profile.vm_sizes.name"));
        }
        if !seen.insert(size.name.to_ascii_lowercase()) {
            return Err(invalid(
                codes::SKU_PROFILE_DUPLICATE_VM_SIZE,
                format!("Sku Profile contains duplicate VM Size: {}. Please remove any duplicates and retry.", size.name),
            )
        .at("sku_profile.vm_sizes.name"));
        }
        if size.rank.is_some() && profile.allocation_strategy != AllocationStrategy::Prioritized {
            return Err(invalid(
                codes::SKU_PROFILE_RANK_INVALID,
                format!("VM size {} has a rank, but ranks are used only with the Prioritized allocation strategy.", size.name),
            )
        .at("sku_profile.vm_sizes.rank"));
        }
    }
    Ok(())
}

/// The most instances this scale set may hold (reference §1.2, §1.4). `override_limit` replaces Azure's
/// ceilings for private fleets.
pub fn instance_limit(spec: &ScaleSetSpec, override_limit: Option<u64>) -> u64 {
    if let Some(limit) = override_limit {
        return limit;
    }
    if spec.single_placement_group == Some(true) {
        return 100;
    }
    let fixed_spreading = spec.fault_domain_count() > 1;
    if spec.orchestration_mode == OrchestrationMode::Flexible
        && fixed_spreading
        && !spec
            .vm_size_names()
            .iter()
            .all(|s| supports_memory_preserving_updates(s))
    {
        return 200;
    }
    if spec.image_kind == ImageKind::ManagedImage {
        return 600;
    }
    1000
}

pub fn limit_error(name: &str, limit: u64) -> CoreError {
    CoreError::capacity(
        codes::OPERATION_NOT_ALLOWED,
        format!(
            "Unable to create or update Virtual Machine Scale Set '{name}' as it exceeds the total limit of '{limit}' Virtual Machine instances."
        ),
    )
}

fn changed(property: &str) -> CoreError {
    CoreError::conflict(
        codes::PROPERTY_CHANGE_NOT_ALLOWED,
        format!("Changing property '{property}' is not allowed."),
    )
}

/// Check an update of a stored (resolved) spec; returns whether the VM model changed.
pub fn check_update(old: &ScaleSetSpec, new: &ScaleSetSpec) -> Result<bool> {
    if old.orchestration_mode != new.orchestration_mode {
        return Err(CoreError::conflict(
            codes::PROPERTY_CHANGE_NOT_ALLOWED,
            "Changing property 'orchestrationMode' is not allowed: the orchestration mode is fixed when the scale set is created.",
        )
        .at("orchestration_mode"));
    }
    if old.platform_fault_domain_count != new.platform_fault_domain_count {
        return Err(changed("platformFaultDomainCount").at("platform_fault_domain_count"));
    }
    if old.priority != new.priority {
        return Err(changed("priority").at("priority"));
    }
    if old.eviction_policy != new.eviction_policy {
        return Err(changed("evictionPolicy").at("eviction_policy"));
    }
    // Zones can be added (zone expansion) but never removed, and a zonal set never becomes regional.
    if let Some(removed) = old.zones.iter().find(|z| !new.zones.contains(z)) {
        return Err(CoreError::conflict(
            codes::PROPERTY_CHANGE_NOT_ALLOWED,
            format!("Changing property 'zones' is not allowed: zone '{removed}' cannot be removed; zones can only be added."),
        )
        .at("zones"));
    }
    if old.single_placement_group == Some(false) && new.single_placement_group == Some(true) {
        return Err(CoreError::conflict(
            codes::PROPERTY_CHANGE_NOT_ALLOWED,
            "Changing property 'singlePlacementGroup' from false to true is not allowed.",
        )
        .at("single_placement_group"));
    }
    if let (Some(before), Some(after)) =
        (&old.automatic_repairs_policy, &new.automatic_repairs_policy)
    {
        if before.enabled && after.enabled && before.repair_action != after.repair_action {
            return Err(CoreError::conflict(
                codes::PROPERTY_CHANGE_NOT_ALLOWED,
                format!(
                    "Changing property 'automaticRepairsPolicy.repairAction' from {} to {} is not allowed while automatic repairs are enabled: disable them (enabled: false) first, then enable them with the new action.",
                    before.repair_action.as_str(),
                    after.repair_action.as_str()
                ),
            )
            .at("automatic_repairs_policy.repair_action"));
        }
    }
    let model_changed = old.sku != new.sku
        || old.sku_profile != new.sku_profile
        || old.image_kind != new.image_kind;
    Ok(model_changed)
}

/// The most lifecycle hooks a scale set may have (AWS Auto Scaling's limit).
pub const MAX_LIFECYCLE_HOOKS: usize = 50;

fn check_lifecycle_hooks(hooks: &[crate::model::LifecycleHook]) -> Result<()> {
    if hooks.len() > MAX_LIFECYCLE_HOOKS {
        return Err(invalid(
            codes::INVALID_PARAMETER,
            format!(
                "a scale set has at most {MAX_LIFECYCLE_HOOKS} lifecycle hooks, got {}.",
                hooks.len()
            ),
        )
        .at("lifecycle_hooks"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for hook in hooks {
        let valid = !hook.name.is_empty()
            && hook.name.len() <= 255
            && hook
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/' | '.'));
        if !valid {
            return Err(invalid(
                codes::INVALID_PARAMETER,
                format!(
                    "lifecycle hook name '{}' must be 1 to 255 letters, digits, '-', '_', '/' or '.'.",
                    shown(&hook.name)
                ),
            )
            .at("lifecycle_hooks.name"));
        }
        if !seen.insert(hook.name.as_str()) {
            return Err(invalid(
                codes::INVALID_PARAMETER,
                format!(
                    "lifecycle hook names must be distinct; '{}' is given twice.",
                    hook.name
                ),
            )
            .at("lifecycle_hooks.name"));
        }
        let seconds = crate::model::parse_duration(&hook.heartbeat_timeout);
        if !seconds.is_some_and(|s| (30.0..=7200.0).contains(&s)) {
            return Err(invalid(
                codes::INVALID_PARAMETER,
                format!(
                    "lifecycle hook '{}': heartbeat_timeout '{}' must be an ISO 8601 duration from PT30S to PT2H.",
                    hook.name,
                    shown(&hook.heartbeat_timeout)
                ),
            )
            .at("lifecycle_hooks.heartbeat_timeout"));
        }
    }
    Ok(())
}
