//! One test per scale-in and validation rule, through the core's public API (reference §2, §3).

use scaleset_core::*;

const SIZE: &str = "Standard_D2s_v5";

fn engine(zones: &[&str], fds: u32) -> Engine {
    let region =
        Region::new(zones.iter().map(|z| (*z).to_owned()).collect(), fds).expect("valid region");
    Engine::new(region, Some(10_000))
}

fn with_rule(rule: ScaleInRule) -> ScaleSetSpec {
    ScaleSetSpec {
        scale_in_policy: ScaleInPolicy {
            rules: vec![rule],
            ..ScaleInPolicy::default()
        },
        ..ScaleSetSpec::with_sku("web", &["1", "2", "3"], SIZE)
    }
}

fn instance(id: u64, zone: &str, fd: u32) -> InstanceInput {
    InstanceInput {
        instance_id: id,
        name: None,
        zone: Some(zone.to_owned()),
        fault_domain: fd,
        vm_size: SIZE.to_owned(),
        priority: Priority::Regular,
        power_state: PowerState::Running,
        health: Health::Healthy,
        provisioning_state: ProvisioningState::Succeeded,
        model_version: Some(1),
        protect_from_scale_in: false,
        protect_from_scale_set_actions: false,
    }
}

/// The ids a scale-in of `count` would delete, in order.
fn victims(e: &mut Engine, count: u64) -> Vec<u64> {
    let capacity = e.scale_set("web").expect("exists").capacity();
    let plan = e
        .set_capacity("web", capacity - count, true)
        .expect("plannable");
    plan.deletes.iter().map(|d| d.instance_id).collect()
}

fn code(result: Result<impl std::fmt::Debug>) -> &'static str {
    result.expect_err("must be refused").code
}

// ----- scale-in ------------------------------------------------------------------------------------------

#[test]
fn default_rule_takes_from_the_fullest_zone_then_the_highest_id() {
    let mut e = engine(&["1", "2", "3"], 1);
    e.create_scale_set(with_rule(ScaleInRule::Default), 0)
        .expect("valid");
    let fleet = [(0, "1"), (1, "1"), (2, "1"), (3, "2"), (4, "3")];
    e.import_instances(
        "web",
        fleet.iter().map(|&(i, z)| instance(i, z, 0)).collect(),
    )
    .expect("imported");
    assert_eq!(victims(&mut e, 2), vec![2, 1]);
}

#[test]
fn default_rule_takes_from_the_fullest_fault_domain_in_the_zone() {
    let mut e = engine(&["1"], 3);
    let spec = ScaleSetSpec {
        zones: vec!["1".into()],
        ..with_rule(ScaleInRule::Default)
    };
    e.create_scale_set(spec, 0).expect("valid");
    let fleet = [(0, 0), (1, 0), (2, 1), (3, 2)];
    e.import_instances(
        "web",
        fleet.iter().map(|&(i, f)| instance(i, "1", f)).collect(),
    )
    .expect("imported");
    assert_eq!(victims(&mut e, 1), vec![1]); // fault domain 0 holds two
}

#[test]
fn newest_vm_takes_the_highest_ids_while_zones_stay_balanced() {
    let mut e = engine(&["1", "2", "3"], 1);
    e.create_scale_set(with_rule(ScaleInRule::NewestVm), 6)
        .expect("valid");
    assert_eq!(victims(&mut e, 3), vec![5, 4, 3]);
}

#[test]
fn oldest_vm_takes_the_lowest_ids_while_zones_stay_balanced() {
    let mut e = engine(&["1", "2", "3"], 1);
    e.create_scale_set(with_rule(ScaleInRule::OldestVm), 6)
        .expect("valid");
    assert_eq!(victims(&mut e, 3), vec![0, 1, 2]);
}

#[test]
fn prioritize_unhealthy_vms_goes_first_whatever_the_rule() {
    let mut e = engine(&["1", "2", "3"], 1);
    let mut spec = with_rule(ScaleInRule::OldestVm);
    spec.scale_in_policy.prioritize_unhealthy_vms = true;
    e.create_scale_set(spec, 6).expect("valid");
    e.report_health("web", &[4], &[Health::Unhealthy])
        .expect("reported");
    assert_eq!(victims(&mut e, 1), vec![4]);
}

#[test]
fn protected_instances_are_never_chosen_and_block_when_nothing_else_is_left() {
    let mut e = engine(&["1", "2", "3"], 1);
    e.create_scale_set(with_rule(ScaleInRule::OldestVm), 3)
        .expect("valid");
    e.set_protection("web", &[0, 1], true, false)
        .expect("protected");
    assert_eq!(victims(&mut e, 1), vec![2]);
    assert_eq!(
        code(e.set_capacity("web", 1, true)),
        codes::SCALE_IN_BLOCKED_BY_PROTECTION
    );
}

#[test]
fn regional_instances_go_before_zonal_ones() {
    let mut e = engine(&["1", "2", "3"], 1);
    e.create_scale_set(with_rule(ScaleInRule::NewestVm), 0)
        .expect("valid");
    let mut regional = instance(0, "1", 0);
    regional.zone = None;
    e.import_instances(
        "web",
        vec![regional, instance(1, "1", 0), instance(2, "2", 0)],
    )
    .expect("imported");
    assert_eq!(victims(&mut e, 1), vec![0]);
}

// ----- validation ----------------------------------------------------------------------------------------

#[test]
fn names_follow_azures_resource_name_rule() {
    let mut e = engine(&["1"], 1);
    let bad = ScaleSetSpec::with_sku("-web", &["1"], SIZE);
    let err = e.create_scale_set(bad, 0).expect_err("invalid name");
    assert_eq!(
        (err.code, err.field),
        (codes::INVALID_RESOURCE_NAME, Some("name"))
    );
}

#[test]
fn fault_domain_counts_follow_the_mode_and_zone_table() {
    let mut e = engine(&["1", "2"], 5);
    let zonal_flex = ScaleSetSpec {
        platform_fault_domain_count: Some(5),
        ..ScaleSetSpec::with_sku("web", &["1", "2"], SIZE)
    };
    assert_eq!(
        code(e.create_scale_set(zonal_flex, 0)),
        codes::INVALID_FAULT_DOMAIN_COUNT
    );
}

#[test]
fn zone_balance_needs_several_zones() {
    let mut e = engine(&["1"], 1);
    let spec = ScaleSetSpec {
        zone_balance: true,
        ..ScaleSetSpec::with_sku("web", &["1"], SIZE)
    };
    assert_eq!(
        code(e.create_scale_set(spec, 0)),
        codes::ZONE_BALANCE_REQUIRES_MULTIPLE_ZONES
    );
}

#[test]
fn spot_only_properties_are_refused_on_regular_sets() {
    let mut e = engine(&["1"], 1);
    let max_price = ScaleSetSpec {
        max_price: Some(0.5),
        ..ScaleSetSpec::with_sku("web", &["1"], SIZE)
    };
    assert_eq!(
        code(e.create_scale_set(max_price, 0)),
        codes::MAX_PRICE_ONLY_FOR_SPOT
    );
    let eviction = ScaleSetSpec {
        eviction_policy: Some(EvictionPolicy::Delete),
        ..ScaleSetSpec::with_sku("web", &["1"], SIZE)
    };
    assert_eq!(
        code(e.create_scale_set(eviction, 0)),
        codes::EVICTION_POLICY_ONLY_FOR_SPOT
    );
}

#[test]
fn max_price_is_minus_one_or_positive() {
    let mut e = engine(&["1"], 1);
    let spec = ScaleSetSpec {
        priority: Priority::Spot,
        max_price: Some(-2.0),
        ..ScaleSetSpec::with_sku("web", &["1"], SIZE)
    };
    assert_eq!(
        code(e.create_scale_set(spec, 0)),
        codes::MAX_PRICE_VALUE_INVALID
    );
}

#[test]
fn priority_mix_needs_flexible_spot() {
    let mut e = engine(&["1"], 1);
    let spec = ScaleSetSpec {
        priority_mix_policy: Some(PriorityMixPolicy {
            base_regular_priority_count: 1,
            regular_priority_percentage_above_base: 50,
        }),
        ..ScaleSetSpec::with_sku("web", &["1"], SIZE)
    };
    assert_eq!(
        code(e.create_scale_set(spec, 0)),
        codes::PRIORITY_MIX_NOT_SUPPORTED
    );
}

#[test]
fn sku_profiles_follow_azures_rules() {
    let mut e = engine(&["1"], 1);
    let sizes = |names: &[&str]| -> Vec<VmSize> {
        names
            .iter()
            .map(|n| VmSize {
                name: (*n).to_owned(),
                rank: None,
            })
            .collect()
    };
    let mix = |vm_sizes: Vec<VmSize>, sku_name: &str| ScaleSetSpec {
        sku: Some(Sku {
            name: sku_name.to_owned(),
            tier: None,
        }),
        sku_profile: Some(SkuProfile {
            vm_sizes,
            allocation_strategy: AllocationStrategy::LowestPrice,
        }),
        ..ScaleSetSpec::with_sku("web", &["1"], SIZE)
    };
    assert_eq!(
        code(e.create_scale_set(mix(vec![], "Mix"), 0)),
        codes::SKU_PROFILE_VM_SIZES_EMPTY
    );
    let six = sizes(&["a", "b", "c", "d", "e", "f"]);
    assert_eq!(
        code(e.create_scale_set(mix(six, "Mix"), 0)),
        codes::SKU_PROFILE_TOO_MANY_VM_SIZES
    );
    let twice = sizes(&["a", "a"]);
    assert_eq!(
        code(e.create_scale_set(mix(twice, "Mix"), 0)),
        codes::SKU_PROFILE_DUPLICATE_VM_SIZE
    );
    assert_eq!(
        code(e.create_scale_set(mix(sizes(&["a", "b"]), SIZE), 0)),
        codes::SKU_NAME_MUST_BE_MIX
    );
}

#[test]
fn immutable_properties_cannot_change() {
    let mut e = engine(&["1", "2"], 1);
    e.create_scale_set(ScaleSetSpec::with_sku("web", &["1", "2"], SIZE), 0)
        .expect("valid");
    let changed = ScaleSetSpec {
        orchestration_mode: OrchestrationMode::Uniform,
        ..ScaleSetSpec::with_sku("web", &["1", "2"], SIZE)
    };
    assert_eq!(
        code(e.update_scale_set(changed)),
        codes::PROPERTY_CHANGE_NOT_ALLOWED
    );
}

#[test]
fn instance_limits_are_enforced() {
    let region = Region::new(vec!["1".into()], 1).expect("valid region");
    let mut e = Engine::new(region, None);
    e.create_scale_set(ScaleSetSpec::with_sku("web", &["1"], SIZE), 0)
        .expect("valid");
    assert!(e.set_capacity("web", 1_000, true).is_ok());
    assert_eq!(
        e.set_capacity("web", 1_001, true)
            .expect_err("over the limit")
            .kind,
        ErrorKind::Capacity
    );
}

#[test]
fn unknown_enum_values_name_their_field() {
    let err = Priority::parse("Cheap").expect_err("unknown");
    assert_eq!(
        (err.code, err.field),
        (codes::INVALID_PARAMETER, Some("priority"))
    );
}

// ----- core quotas -----------------------------------------------------------------------------------------

#[test]
fn quota_families_follow_azures_size_names() {
    let family = |name: &str| quota_family(name, Priority::Regular);
    assert_eq!(
        family("Standard_D2s_v5"),
        Some(("standardDSv5Family".into(), 2))
    );
    assert_eq!(
        family("Standard_D4_v3"),
        Some(("standardDv3Family".into(), 4))
    );
    assert_eq!(
        family("Standard_E64-32ds_v4"),
        Some(("standardEDSv4Family".into(), 64))
    );
    assert_eq!(
        family("Standard_F2s_v2"),
        Some(("standardFSv2Family".into(), 2))
    );
    assert_eq!(
        quota_family("Standard_D8s_v5", Priority::Spot),
        Some(("lowPriorityCores".into(), 8))
    );
    assert_eq!(family("custom-size"), None);
}

#[test]
fn a_plan_beyond_a_core_quota_is_refused_whole_and_a_dry_run_says_so() {
    let mut e = engine(&["1", "2", "3"], 1);
    e.set_core_quota("standardDSv5Family", Some(10))
        .expect("quota");
    e.create_scale_set(with_rule(ScaleInRule::Default), 4)
        .expect("8 of 10 cores");
    let err = e.set_capacity("web", 6, true).expect_err("12 > 10");
    assert_eq!(err.code, "OperationNotAllowed");
    assert!(err
        .message
        .contains("Current Limit: 10, Current Usage: 8, Additional Required: 4"));
    assert_eq!(code(e.set_capacity("web", 6, false)), "OperationNotAllowed");
    assert_eq!(e.scale_set("web").expect("exists").capacity(), 4);
    e.set_capacity("web", 5, false).expect("10 of 10");
    e.set_core_quota("standardDSv5Family", None)
        .expect("no quota");
    e.set_capacity("web", 9, false).expect("unlimited");
}

#[test]
fn a_create_beyond_a_core_quota_leaves_no_scale_set() {
    // It stored the set, then refused the plan: a refused call left an empty scale set (found by the fuzz).
    let mut e = engine(&["1", "2", "3"], 1);
    e.set_core_quota("standardDSv5Family", Some(4))
        .expect("quota");
    let err = e
        .create_scale_set(with_rule(ScaleInRule::Default), 3)
        .expect_err("6 > 4 cores");
    assert_eq!(err.code, "OperationNotAllowed");
    assert!(e.scale_set("web").is_err());
    e.create_scale_set(with_rule(ScaleInRule::Default), 2)
        .expect("4 of 4 cores, under the same name");
}

// ----- the unavailable-capacity overlay and provisioning states -------------------------------------------

#[test]
fn a_blocked_pool_is_skipped_until_unblocked_and_keeps_its_capacity() {
    let mut e = engine(&["1", "2", "3"], 1);
    e.create_scale_set(with_rule(ScaleInRule::Default), 0)
        .expect("valid");
    e.set_pool_capacity(Some("1"), SIZE, Priority::Regular, Some(7), None)
        .expect("pool");
    e.set_pool_blocked(Some("1"), SIZE, Priority::Regular, true)
        .expect("block");
    let plan = e.set_capacity("web", 4, false).expect("two zones left");
    assert!(plan.creates.iter().all(|c| c.zone != Some(0)));
    assert_eq!(plan.creates.len(), 4);
    e.set_pool_blocked(Some("1"), SIZE, Priority::Regular, false)
        .expect("unblock");
    assert_eq!(
        e.region().pool(Some(0), SIZE, Priority::Regular).available,
        Some(7)
    );
    let plan = e.set_capacity("web", 6, false).expect("zone 1 again");
    assert!(plan.creates.iter().all(|c| c.zone == Some(0)));
}

#[test]
fn provisioning_state_starts_succeeded_and_is_set_all_or_nothing() {
    let mut e = engine(&["1", "2", "3"], 1);
    e.create_scale_set(with_rule(ScaleInRule::Default), 3)
        .expect("valid");
    let states = |e: &Engine| -> Vec<ProvisioningState> {
        e.scale_set("web")
            .expect("exists")
            .instances
            .iter()
            .map(|i| i.provisioning_state)
            .collect()
    };
    assert_eq!(states(&e), vec![ProvisioningState::Succeeded; 3]);
    assert_eq!(
        code(e.set_provisioning_state("web", &[0, 99], ProvisioningState::Creating)),
        "InstanceNotFound"
    );
    assert_eq!(states(&e), vec![ProvisioningState::Succeeded; 3]);
    e.set_provisioning_state("web", &[1], ProvisioningState::Creating)
        .expect("known id");
    assert_eq!(states(&e)[1], ProvisioningState::Creating);
}
