//! Invariants of the placement core, checked with proptest over random regions, specs and fleets.

use proptest::prelude::*;
use scaleset_core::*;

const SIZE: &str = "Standard_D2s_v5";

fn spec(zones: &[&str], mix: Option<(u32, u32)>, rule: ScaleInRule) -> ScaleSetSpec {
    ScaleSetSpec {
        priority: if mix.is_some() {
            Priority::Spot
        } else {
            Priority::Regular
        },
        priority_mix_policy: mix.map(|(b, p)| PriorityMixPolicy {
            base_regular_priority_count: b,
            regular_priority_percentage_above_base: p,
        }),
        scale_in_policy: ScaleInPolicy {
            rules: vec![rule],
            ..ScaleInPolicy::default()
        },
        ..ScaleSetSpec::with_sku("p", zones, SIZE)
    }
}

fn engine() -> Engine {
    let region = Region::new(vec!["1".into(), "2".into(), "3".into()], 3).expect("valid region");
    Engine::new(region, Some(100_000))
}

fn zone_counts(e: &Engine) -> Vec<u64> {
    let set = e.scale_set("p").expect("exists");
    (0..3u16)
        .map(|z| set.instances.iter().filter(|i| i.zone == Some(z)).count() as u64)
        .collect()
}

fn spread(counts: &[u64]) -> u64 {
    counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0)
}

fn arb_rule() -> impl Strategy<Value = ScaleInRule> {
    prop_oneof![
        Just(ScaleInRule::Default),
        Just(ScaleInRule::NewestVm),
        Just(ScaleInRule::OldestVm)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// With every zone healthy, scale-out never widens the zone spread, and a balanced set stays balanced.
    #[test]
    fn scale_out_never_widens_the_zone_spread(
        start in proptest::collection::vec(0u16..3, 0..40),
        extra in 0u64..60,
    ) {
        let mut e = engine();
        e.create_scale_set(spec(&["1", "2", "3"], None, ScaleInRule::Default), 0).expect("create");
        let inputs = start.iter().enumerate().map(|(i, &z)| InstanceInput {
            instance_id: i as u64, name: None, zone: Some((z + 1).to_string()), fault_domain: 0,
            vm_size: SIZE.into(), priority: Priority::Regular, power_state: PowerState::Running,
            health: Health::Unknown, model_version: None, protect_from_scale_in: false,
            provisioning_state: ProvisioningState::Succeeded,
            protect_from_scale_set_actions: false,
        }).collect();
        e.import_instances("p", inputs).expect("import");
        let before = spread(&zone_counts(&e));
        let n = start.len() as u64 + extra;
        e.set_capacity("p", n, false).expect("scale out");
        let after = spread(&zone_counts(&e));
        prop_assert!(after <= before.max(1));
        if before <= 1 { prop_assert!(after <= 1); }
    }

    /// No pool ever goes past its capacity: plans fail rather than overdraw.
    #[test]
    fn pools_are_never_overdrawn(caps in proptest::collection::vec(0u64..8, 3), want in 0u64..30) {
        let mut e = engine();
        for (z, &cap) in caps.iter().enumerate() {
            e.set_pool_capacity(Some(&(z + 1).to_string()), SIZE, Priority::Regular, Some(cap), None).expect("pool");
        }
        e.create_scale_set(spec(&["1", "2", "3"], None, ScaleInRule::Default), 0).expect("create");
        let ok = e.set_capacity("p", want, false).is_ok();
        let counts = zone_counts(&e);
        for (z, &cap) in caps.iter().enumerate() {
            prop_assert!(counts[z] <= cap);
            let left = e.region().pool(Some(z as u16), SIZE, Priority::Regular).available.expect("limited");
            prop_assert_eq!(left + counts[z], cap);
        }
        if !ok { prop_assert_eq!(counts.iter().sum::<u64>(), 0); }
    }

    /// After a scale-out from empty, the priority mix is exact.
    #[test]
    fn priority_mix_is_exact_after_scale_out(base in 0u32..20, pct in 0u32..=100, steps in proptest::collection::vec(0u64..80, 1..5)) {
        let mut e = engine();
        e.create_scale_set(spec(&["1", "2"], Some((base, pct)), ScaleInRule::Default), 0).expect("create");
        let mut n = 0;
        for s in steps {
            n += s;
            e.set_capacity("p", n, false).expect("scale out");
            let set = e.scale_set("p").expect("exists");
            let regular = set.instances.iter().filter(|i| i.priority == Priority::Regular).count() as u64;
            let mix = set.spec.priority_mix_policy.expect("mix");
            prop_assert_eq!(regular, mix.regular_target(n));
        }
    }

    /// Scale-in never removes a protected instance, whatever the rule; it fails whole instead.
    #[test]
    fn protected_instances_survive_scale_in(
        n in 1u64..50,
        protected in proptest::collection::btree_set(0u64..50, 0..20),
        target in 0u64..50,
        rule in arb_rule(),
    ) {
        let mut e = engine();
        e.create_scale_set(spec(&["1", "2", "3"], None, rule), n).expect("create");
        let ids: Vec<u64> = protected.into_iter().filter(|&i| i < n).collect();
        e.set_protection("p", &ids, true, false).expect("protect");
        let target = target.min(n);
        let result = e.set_capacity("p", target, false);
        let set = e.scale_set("p").expect("exists");
        for id in &ids {
            prop_assert!(set.instances.iter().any(|i| i.instance_id == *id));
        }
        match result {
            Ok(_) => prop_assert_eq!(set.capacity(), target),
            Err(err) => {
                prop_assert_eq!(err.code, codes::SCALE_IN_BLOCKED_BY_PROTECTION);
                prop_assert_eq!(set.capacity(), n);
                prop_assert!((ids.len() as u64) > target);
            }
        }
    }

    /// Same state and request, same plan.
    #[test]
    fn plans_are_deterministic(a in 0u64..120, b in 0u64..120, rule in arb_rule()) {
        let run = || {
            let mut e = engine();
            e.create_scale_set(spec(&["1", "2", "3"], Some((3, 40)), rule), a).expect("create");
            e.plan_capacity("p", b).expect("plan")
        };
        prop_assert_eq!(run(), run());
    }
}

#[derive(Debug, Clone)]
enum Step {
    ScaleOut(u64),
    ScaleInOne,
    ScaleInMany(u64),
    Protect(usize),
    Unhealthy(usize),
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u64..40).prop_map(Step::ScaleOut),
        Just(Step::ScaleOut(1)),
        Just(Step::ScaleOut(1)),
        Just(Step::ScaleInOne),
        Just(Step::ScaleInOne),
        Just(Step::ScaleInOne),
        (2u64..40).prop_map(Step::ScaleInMany),
        (0usize..100).prop_map(Step::Protect),
        (0usize..100).prop_map(Step::Unhealthy),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// One scale-in decision, or a scale-out, over the engine's kept groups picks exactly what a pass
    /// over every instance picks, with the same reason, whatever changes came before (scale-outs,
    /// scale-ins, protection, health), with or without strict zone balance and a LowestPrice mix of sizes.
    #[test]
    fn kept_groups_decide_as_a_full_pass_does(
        rule in arb_rule(),
        mix in proptest::option::of((0u32..5, 0u32..100)),
        unhealthy_first in any::<bool>(),
        strict in any::<bool>(),
        prices in proptest::option::of(proptest::collection::vec(1u32..4, 18)),
        steps in proptest::collection::vec(arb_step(), 1..40),
    ) {
        let mut e = engine();
        let mut s = spec(&["1", "2", "3"], mix, rule);
        s.scale_in_policy.prioritize_unhealthy_vms = unhealthy_first;
        s.zone_balance = strict;
        if let Some(prices) = &prices {
            // Three sizes, priced per zone, size and priority (few distinct prices: ties happen).
            let sizes = ["Standard_D2s_v5", "Standard_D4s_v5", "Standard_E2s_v5"];
            let mut price = prices.iter();
            for zone in ["1", "2", "3"] {
                for size in sizes {
                    for priority in [Priority::Regular, Priority::Spot] {
                        let p = f64::from(*price.next().expect("18 prices"));
                        e.set_pool_capacity(Some(zone), size, priority, None, Some(p)).expect("pool");
                    }
                }
            }
            s.sku = Some(Sku { name: "Mix".into(), tier: None });
            s.sku_profile = Some(SkuProfile {
                vm_sizes: sizes.iter().map(|n| VmSize { name: (*n).into(), rank: None }).collect(),
                allocation_strategy: AllocationStrategy::LowestPrice,
            });
        }
        e.create_scale_set(s, 10).expect("valid");
        for step in steps {
            let set = e.scale_set("p").expect("exists");
            let capacity = set.capacity();
            let id_at = |k: usize| set.instances.get(k % set.instances.len().max(1)).map(|i| i.instance_id);
            match step {
                Step::ScaleOut(n) => {
                    // A scale-out counts from the kept groups as from every instance.
                    let mut full = e.clone();
                    full.report_health("p", &[], &[]).expect("no-op");
                    let expected = full.plan_capacity("p", capacity + n).map(|p| p.creates);
                    let got = e.set_capacity("p", capacity + n, false).map(|p| p.creates);
                    prop_assert_eq!(got.is_ok(), expected.is_ok());
                    if let (Ok(got), Ok(expected)) = (got, expected) {
                        prop_assert_eq!(got, expected);
                    }
                }
                Step::ScaleInOne if capacity > 0 => {
                    // A full pass (on a copy whose groups were dropped by a no-op health report) ...
                    let mut full = e.clone();
                    full.report_health("p", &[], &[]).expect("no-op");
                    let expected = full.plan_capacity("p", capacity - 1).map(|p| p.deletes);
                    // ... and the decision over the kept groups agree.
                    let got = e.set_capacity("p", capacity - 1, false).map(|p| p.deletes);
                    prop_assert_eq!(got.is_ok(), expected.is_ok());
                    if let (Ok(got), Ok(expected)) = (got, expected) {
                        prop_assert_eq!(got, expected);
                    }
                }
                Step::ScaleInMany(n) if capacity >= n => { let _ = e.set_capacity("p", capacity - n, false); }
                Step::Protect(k) => {
                    if let Some(id) = id_at(k) { e.set_protection("p", &[id], true, false).expect("exists"); }
                }
                Step::Unhealthy(k) => {
                    if let Some(id) = id_at(k) { e.report_health("p", &[id], &[Health::Unhealthy]).expect("exists"); }
                }
                _ => {}
            }
        }
    }
}
