//! The domain: Azure's property names, snake_cased. Enumerations parse case-insensitively (Azure's own
//! documentation spells `lowestPrice` and `LowestPrice` alike) and print in Azure's canonical spelling.

use crate::error::{codes, CoreError, Result};

macro_rules! azure_enum {
    ($(#[$meta:meta])* $name:ident, $field:literal, $code:expr, { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Result<Self> {
                $(if text.eq_ignore_ascii_case($text) { return Ok($name::$variant); })+
                let allowed: Vec<&str> = vec![$($text),+];
                Err(CoreError::invalid(
                    $code,
                    format!("{} '{}' is not valid; use one of: {}.", $field, text, allowed.join(", ")),
                ).at($field))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

azure_enum!(OrchestrationMode, "orchestration_mode", codes::INVALID_PARAMETER,
    { Uniform = "Uniform", Flexible = "Flexible" });
azure_enum!(
    /// Regular (on-demand) or Spot. `Regular` sorts first and indexes slot 0 of per-priority tables.
    Priority, "priority", codes::INVALID_PARAMETER, { Regular = "Regular", Spot = "Spot" });
azure_enum!(EvictionPolicy, "eviction_policy", codes::INVALID_PARAMETER,
    { Deallocate = "Deallocate", Delete = "Delete" });
azure_enum!(AllocationStrategy, "sku_profile.allocation_strategy", codes::SKU_PROFILE_ALLOCATION_STRATEGY_INVALID,
    { LowestPrice = "LowestPrice", CapacityOptimized = "CapacityOptimized", Prioritized = "Prioritized" });
azure_enum!(ScaleInRule, "scale_in_policy.rules", codes::INVALID_PARAMETER,
    { Default = "Default", NewestVm = "NewestVM", OldestVm = "OldestVM" });
azure_enum!(PowerState, "power_state", codes::INVALID_PARAMETER,
    { Running = "running", Deallocated = "deallocated" });
azure_enum!(
    /// Application Health states. `Initializing` waits; `Unknown` counts as unhealthy for repairs and upgrades.
    Health, "health", codes::INVALID_PARAMETER,
    { Unknown = "Unknown", Initializing = "Initializing", Healthy = "Healthy", Unhealthy = "Unhealthy" });
azure_enum!(
    /// Azure's provisioning states: what the infrastructure has done with an instance. Without executors
    /// every instance is `Succeeded` at once; with them it is `Creating` until an executor reports back.
    ProvisioningState, "provisioning_state", codes::INVALID_PARAMETER,
    { Creating = "Creating", Succeeded = "Succeeded", Failed = "Failed", Updating = "Updating", Deleting = "Deleting" });
azure_enum!(
    /// What the OS image is; a legacy managed image lowers the instance limit to 600.
    ImageKind, "image_kind", codes::INVALID_PARAMETER,
    { Marketplace = "Marketplace", Gallery = "Gallery", ManagedImage = "ManagedImage" });

impl Priority {
    pub fn index(self) -> usize {
        match self {
            Priority::Regular => 0,
            Priority::Spot => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sku {
    pub name: String,
    pub tier: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VmSize {
    pub name: String,
    pub rank: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SkuProfile {
    pub vm_sizes: Vec<VmSize>,
    pub allocation_strategy: AllocationStrategy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriorityMixPolicy {
    pub base_regular_priority_count: u32,
    pub regular_priority_percentage_above_base: u32,
}

impl PriorityMixPolicy {
    /// Regular instances wanted at `total` instances: min(total, base) + floor(max(0, total - base) * pct / 100).
    /// Floor matches every row of Azure's worked tables ("2.5 rounded to 2"; "Spot VMs get the extra VM").
    pub fn regular_target(&self, total: u64) -> u64 {
        let base = u64::from(self.base_regular_priority_count);
        let above = total.saturating_sub(base);
        total.min(base) + above * u64::from(self.regular_priority_percentage_above_base) / 100
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleInPolicy {
    pub rules: Vec<ScaleInRule>,
    pub force_deletion: bool,
    pub prioritize_unhealthy_vms: bool,
}

impl Default for ScaleInPolicy {
    fn default() -> Self {
        Self {
            rules: vec![ScaleInRule::Default],
            force_deletion: false,
            prioritize_unhealthy_vms: false,
        }
    }
}

impl ScaleInPolicy {
    pub fn rule(&self) -> ScaleInRule {
        self.rules.first().copied().unwrap_or(ScaleInRule::Default)
    }
}

azure_enum!(UpgradeMode, "upgrade_policy.mode", codes::INVALID_PARAMETER,
    { Manual = "Manual", Automatic = "Automatic", Rolling = "Rolling" });
azure_enum!(RepairAction, "automatic_repairs_policy.repair_action", codes::INVALID_PARAMETER,
    { Replace = "Replace", Reimage = "Reimage", Restart = "Restart" });

/// `upgrade_policy.rolling_upgrade_policy` (reference §7.2); durations are ISO 8601 ("PT10S").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollingUpgradePolicy {
    pub max_batch_instance_percent: u32,
    pub max_unhealthy_instance_percent: u32,
    pub max_unhealthy_upgraded_instance_percent: u32,
    pub pause_time_between_batches: String,
    pub prioritize_unhealthy_instances: bool,
    pub enable_cross_zone_upgrade: bool,
    pub max_surge: bool,
    pub rollback_failed_instances_on_policy_breach: bool,
}

impl Default for RollingUpgradePolicy {
    fn default() -> Self {
        Self {
            max_batch_instance_percent: 20,
            max_unhealthy_instance_percent: 20,
            max_unhealthy_upgraded_instance_percent: 20,
            pause_time_between_batches: "PT0S".into(),
            prioritize_unhealthy_instances: false,
            enable_cross_zone_upgrade: false,
            max_surge: false,
            rollback_failed_instances_on_policy_breach: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradePolicy {
    pub mode: UpgradeMode,
    pub rolling_upgrade_policy: RollingUpgradePolicy,
}

/// `automatic_repairs_policy` (reference §8.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutomaticRepairsPolicy {
    pub enabled: bool,
    /// ISO 8601 minutes, 10 to 90 ("PT10M").
    pub grace_period: String,
    pub repair_action: RepairAction,
}

azure_enum!(
    /// When a lifecycle hook holds an instance: after it is created, or before it is deleted.
    LifecycleTransition, "lifecycle_hooks.transition", codes::INVALID_PARAMETER,
    { Launching = "Launching", Terminating = "Terminating" });
azure_enum!(
    /// What a lifecycle hook's timeout decides: go on, or give the instance up.
    LifecycleHookDefaultResult, "lifecycle_hooks.default_result", codes::INVALID_PARAMETER,
    { Continue = "Continue", Abandon = "Abandon" });

/// A lifecycle hook (ours, after AWS Auto Scaling's; Azure has terminate notifications): holds instances
/// at a transition until an operator completes the action or the heartbeat timeout passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleHook {
    pub name: String,
    pub transition: LifecycleTransition,
    /// ISO 8601, 30 seconds to 2 hours (default "PT1H").
    pub heartbeat_timeout: String,
    pub default_result: LifecycleHookDefaultResult,
}

/// `spot_restore_policy` (reference §5.4, Try & restore): keep trying to restore Spot instances evicted
/// for capacity, for at most `restore_timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpotRestorePolicy {
    pub enabled: bool,
    /// ISO 8601 duration (ours by default: "PT1H"; Azure documents none).
    pub restore_timeout: String,
}

/// Seconds in an ISO 8601 duration of days, hours, minutes and seconds ("PT1H30M", "P1DT2H", "PT0.5S").
pub fn parse_duration(text: &str) -> Option<f64> {
    let rest = text.strip_prefix('P')?;
    let (days, time) = match rest.split_once('T') {
        Some((d, t)) => (d, t),
        None => (rest, ""),
    };
    let mut total = 0.0;
    let mut seen = false;
    for (part, units) in [
        (days, &[('D', 86_400.0)][..]),
        (time, &[('H', 3600.0), ('M', 60.0), ('S', 1.0)][..]),
    ] {
        let mut number = String::new();
        let mut allowed = units.iter();
        for c in part.chars() {
            if c.is_ascii_digit() || c == '.' {
                number.push(c);
                continue;
            }
            let (_, scale) = allowed.find(|(u, _)| *u == c)?;
            total += number.parse::<f64>().ok()? * scale;
            number.clear();
            seen = true;
        }
        if !number.is_empty() {
            return None;
        }
    }
    (seen && (time.is_empty() || !text.ends_with('T'))).then_some(total)
}

/// `resiliency_policy.automatic_zone_rebalancing_policy` (Azure's automatic zone balance, preview).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutomaticZoneRebalancingPolicy {
    pub enabled: bool,
    /// Only "Recreate" exists.
    pub rebalance_strategy: String,
    /// Only "CreateBeforeDelete" exists.
    pub rebalance_behavior: String,
}

/// `placement` (automatic zone placement, preview): the engine chooses the zones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Only "Auto".
    pub zone_placement_policy: String,
    pub include_zones: Vec<String>,
    pub exclude_zones: Vec<String>,
}

/// `resiliency_policy.zone_allocation_policy.max_instance_percent_per_zone_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxInstancePercentPerZonePolicy {
    pub enabled: bool,
    pub value: u32,
}

/// `resiliency_policy.zone_allocation_policy` (with automatic zone placement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneAllocationPolicy {
    pub max_zone_count: Option<u32>,
    pub max_instance_percent_per_zone_policy: Option<MaxInstancePercentPerZonePolicy>,
}

/// A scale set's model. Optional fields left `None` take Azure's default when the scale set is created
/// (see `validate::resolve`), and the stored spec always has them filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleSetSpec {
    pub name: String,
    pub orchestration_mode: OrchestrationMode,
    pub zones: Vec<String>,
    pub zone_balance: bool,
    pub platform_fault_domain_count: Option<u32>,
    pub sku: Option<Sku>,
    pub sku_profile: Option<SkuProfile>,
    pub priority: Priority,
    pub eviction_policy: Option<EvictionPolicy>,
    pub max_price: Option<f64>,
    pub priority_mix_policy: Option<PriorityMixPolicy>,
    pub scale_in_policy: ScaleInPolicy,
    pub single_placement_group: Option<bool>,
    pub image_kind: ImageKind,
    /// Uniform only (Azure's default there: true): scale-outs create extra VMs and delete them once the
    /// requested ones succeeded.
    pub overprovision: Option<bool>,
    pub do_not_run_extensions_on_overprovisioned_vms: bool,
    /// Ours (Azure does not document how many): extra VMs as a percentage of a scale-out, rounded up.
    pub overprovision_percent: Option<u32>,
    pub placement: Option<Placement>,
    pub zone_allocation_policy: Option<ZoneAllocationPolicy>,
    pub automatic_zone_rebalancing_policy: Option<AutomaticZoneRebalancingPolicy>,
    pub upgrade_policy: UpgradePolicy,
    pub automatic_repairs_policy: Option<AutomaticRepairsPolicy>,
    pub spot_restore_policy: Option<SpotRestorePolicy>,
    pub lifecycle_hooks: Vec<LifecycleHook>,
    /// Engine-managed: bumped whenever the VM model (size, sizes, image) changes.
    pub model_version: u64,
}

impl ScaleSetSpec {
    /// A Flexible scale set of one VM size, every optional property at Azure's default.
    pub fn with_sku(name: &str, zones: &[&str], vm_size: &str) -> Self {
        Self {
            name: name.to_owned(),
            orchestration_mode: OrchestrationMode::Flexible,
            zones: zones.iter().map(|z| (*z).to_owned()).collect(),
            zone_balance: false,
            platform_fault_domain_count: None,
            sku: Some(Sku {
                name: vm_size.to_owned(),
                tier: None,
            }),
            sku_profile: None,
            priority: Priority::Regular,
            eviction_policy: None,
            max_price: None,
            priority_mix_policy: None,
            scale_in_policy: ScaleInPolicy::default(),
            single_placement_group: None,
            image_kind: ImageKind::Marketplace,
            overprovision: None,
            do_not_run_extensions_on_overprovisioned_vms: false,
            overprovision_percent: None,
            placement: None,
            zone_allocation_policy: None,
            automatic_zone_rebalancing_policy: None,
            upgrade_policy: UpgradePolicy {
                mode: UpgradeMode::Manual,
                rolling_upgrade_policy: RollingUpgradePolicy::default(),
            },
            automatic_repairs_policy: None,
            spot_restore_policy: None,
            lifecycle_hooks: Vec::new(),
            model_version: 0,
        }
    }

    /// The VM sizes this scale set may use, in the order the user listed them.
    pub fn vm_size_names(&self) -> Vec<&str> {
        match (&self.sku_profile, &self.sku) {
            (Some(profile), _) => profile.vm_sizes.iter().map(|s| s.name.as_str()).collect(),
            (None, Some(sku)) => vec![sku.name.as_str()],
            (None, None) => Vec::new(),
        }
    }

    pub fn is_zonal(&self) -> bool {
        !self.zones.is_empty()
    }

    pub fn fault_domain_count(&self) -> u32 {
        self.platform_fault_domain_count.unwrap_or(1)
    }
}

/// One VM. `zone` and `vm_size` are indexes: into the region's zones and the engine's size table.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub instance_id: u64,
    /// Set only when an imported instance brought its own name; otherwise the name is `{scale set}_{id}`.
    pub name: Option<String>,
    pub zone: Option<u16>,
    pub fault_domain: u32,
    pub vm_size: u16,
    pub priority: Priority,
    pub power_state: PowerState,
    pub health: Health,
    pub provisioning_state: ProvisioningState,
    pub model_version: u64,
    pub protect_from_scale_in: bool,
    pub protect_from_scale_set_actions: bool,
}

impl Instance {
    pub fn is_protected_from_scale_in(&self) -> bool {
        self.protect_from_scale_in || self.protect_from_scale_set_actions
    }

    /// "Unhealthy and inactive" in the sense of `prioritize_unhealthy_vms`.
    pub fn is_unhealthy_or_inactive(&self) -> bool {
        self.health == Health::Unhealthy || self.power_state == PowerState::Deallocated
    }
}

/// The display name of a zone slot: the zone's name, or "regional".
pub fn zone_label(zones: &[String], slot: ZoneSlot) -> &str {
    match slot {
        Some(z) => zones.get(usize::from(z)).map_or("?", String::as_str),
        None => "regional",
    }
}

/// The quota a VM size draws on and its vCPUs, from Azure's size naming
/// (`Standard_<family letters><vCPUs>[-<constrained vCPUs>]<features>[_<accelerator>]_v<version>`): Spot
/// instances draw on the regional `lowPriorityCores`; Regular ones on `standard<LETTERS><FEATURES>v<N>Family`
/// (`Standard_D2s_v5` -> `standardDSv5Family`, 2). Azure's own family names differ for a few series (B,
/// some GPU sizes); a quota is keyed by the name this gives, which every quota error shows. None for a
/// name outside the pattern (no quota applies).
pub fn quota_family(vm_size: &str, priority: Priority) -> Option<(String, u64)> {
    let rest = vm_size
        .strip_prefix("Standard_")
        .or_else(|| vm_size.strip_prefix("standard_"))?;
    let mut parts = rest.split('_');
    let head = parts.next()?;
    let letters: String = head
        .chars()
        .take_while(|c| c.is_ascii_uppercase())
        .collect();
    let digits: String = head[letters.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let cores: u64 = digits.parse().ok()?;
    if letters.is_empty() {
        return None;
    }
    if priority == Priority::Spot {
        return Some(("lowPriorityCores".to_owned(), cores));
    }
    let tail = &head[letters.len() + digits.len()..];
    let tail = tail.trim_start_matches(|c: char| c == '-' || c.is_ascii_digit());
    let features = tail.to_ascii_uppercase();
    let version = parts
        .rfind(|p| p.len() > 1 && p.starts_with('v') && p[1..].chars().all(|c| c.is_ascii_digit()))
        .unwrap_or("");
    Some((format!("standard{letters}{features}{version}Family"), cores))
}

/// Where a pool is: a zone of the region, or the regional (non-zonal) capacity.
pub type ZoneSlot = Option<u16>;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pool {
    /// How many more instances the pool can take; `None` is unlimited.
    pub available: Option<u64>,
    /// Price per hour (Spot price for Spot pools).
    pub price: f64,
    /// The size is not offered here (placement refuses it with SkuNotAvailable, before any try).
    pub restricted: bool,
}

impl Default for Pool {
    fn default() -> Self {
        Self {
            available: None,
            price: 0.0,
            restricted: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PoolKey {
    pub zone: ZoneSlot,
    pub vm_size: String,
    pub priority: Priority,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    pub zones: Vec<String>,
    pub zone_available: Vec<bool>,
    pub fault_domains_per_zone: u32,
    pub pools: std::collections::BTreeMap<PoolKey, Pool>,
    /// vCPU quotas by quota family (see [`quota_family`]): the cores of running instances never exceed them.
    pub core_quotas: std::collections::BTreeMap<String, u64>,
    /// Pools placement skips for now whatever their capacity (the unavailable-capacity cache: a pool that
    /// just failed an allocation). Owned by the caller, which decides when a pool is tried again.
    pub blocked: std::collections::BTreeSet<PoolKey>,
}

impl Region {
    pub fn new(zones: Vec<String>, fault_domains_per_zone: u32) -> Result<Self> {
        if fault_domains_per_zone == 0 || fault_domains_per_zone > 20 {
            return Err(CoreError::invalid(
                codes::INVALID_PARAMETER,
                format!("fault_domains_per_zone must be between 1 and 20, got {fault_domains_per_zone}."),
            )
        .at("fault_domains_per_zone"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for zone in &zones {
            if zone.is_empty() || !seen.insert(zone.as_str()) {
                return Err(CoreError::invalid(
                    codes::INVALID_PARAMETER,
                    format!("region zones must be distinct, non-empty names; got {zones:?}."),
                )
                .at("zones"));
            }
        }
        if zones.len() > usize::from(u16::MAX) {
            return Err(CoreError::invalid(
                codes::INVALID_PARAMETER,
                "a region has too many zones.",
            )
            .at("zones"));
        }
        let zone_available = vec![true; zones.len()];
        Ok(Self {
            zones,
            zone_available,
            fault_domains_per_zone,
            pools: Default::default(),
            core_quotas: Default::default(),
            blocked: Default::default(),
        })
    }

    pub fn zone_index(&self, zone: &str) -> Result<u16> {
        self.zones
            .iter()
            .position(|z| z == zone)
            .map(|i| i as u16)
            .ok_or_else(|| {
                CoreError::not_found(
                    codes::ZONE_NOT_FOUND,
                    format!(
                        "zone '{zone}' is not a zone of this region (zones: {}).",
                        self.zones.join(", ")
                    ),
                )
            })
    }

    pub fn zone_name(&self, slot: ZoneSlot) -> &str {
        zone_label(&self.zones, slot)
    }

    pub fn is_available(&self, slot: ZoneSlot) -> bool {
        match slot {
            Some(z) => self
                .zone_available
                .get(usize::from(z))
                .copied()
                .unwrap_or(false),
            // Regional capacity survives a zone outage unless every zone is down.
            None => self.zone_available.is_empty() || self.zone_available.iter().any(|&up| up),
        }
    }

    /// Whether the size is not offered in this zone (or regionally) for this priority.
    pub fn is_restricted(&self, zone: ZoneSlot, vm_size: &str, priority: Priority) -> bool {
        self.pools
            .get(&PoolKey {
                zone,
                vm_size: vm_size.to_owned(),
                priority,
            })
            .is_some_and(|p| p.restricted)
    }

    pub fn pool(&self, zone: ZoneSlot, vm_size: &str, priority: Priority) -> Pool {
        let key = PoolKey {
            zone,
            vm_size: vm_size.to_owned(),
            priority,
        };
        let pool = self.pools.get(&key).copied().unwrap_or_default();
        if pool.restricted || (!self.blocked.is_empty() && self.blocked.contains(&key)) {
            return Pool {
                available: Some(0),
                ..pool
            };
        }
        pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_target_matches_azures_scenario_table() {
        let mix = PriorityMixPolicy {
            base_regular_priority_count: 10,
            regular_priority_percentage_above_base: 50,
        };
        let rows = [
            (10, 10),
            (20, 15),
            (30, 20),
            (40, 25),
            (41, 25),
            (42, 26),
            (44, 27),
            (5, 5),
            (0, 0),
        ];
        for (total, regular) in rows {
            assert_eq!(mix.regular_target(total), regular, "total {total}");
        }
    }

    #[test]
    fn iso_8601_durations() {
        assert_eq!(parse_duration("PT0S"), Some(0.0));
        assert_eq!(parse_duration("PT10M"), Some(600.0));
        assert_eq!(parse_duration("PT1H30M10S"), Some(5410.0));
        assert_eq!(parse_duration("P1DT1S"), Some(86_401.0));
        for bad in ["", "P", "PT", "10M", "PT10", "PT1M1H", "PTXS"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn enums_parse_case_insensitively_and_print_canonically() {
        assert_eq!(
            AllocationStrategy::parse("lowestPrice").map(|s| s.as_str()),
            Ok("LowestPrice")
        );
        assert_eq!(
            ScaleInRule::parse("newestvm").map(|s| s.as_str()),
            Ok("NewestVM")
        );
        let err = Priority::parse("Cheap").expect_err("invalid");
        assert_eq!(err.code, crate::codes::INVALID_PARAMETER);
        assert!(err.message.contains("Regular, Spot"));
    }
}
