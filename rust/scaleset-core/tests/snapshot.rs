//! The snapshot encoding of a scale set's instances: a restore from it gives back the same instances,
//! and damaged bytes are refused, never a panic.

use proptest::prelude::*;
use scaleset_core::snapshot::{decode_instances, encode_instances};
use scaleset_core::*;

const SIZE: &str = "Standard_D2s_v5";

fn engine() -> Engine {
    let region = Region::new(vec!["1".into(), "2".into(), "3".into()], 3).expect("valid region");
    Engine::new(region, Some(100_000))
}

fn spot_spec() -> ScaleSetSpec {
    ScaleSetSpec {
        priority: Priority::Spot,
        priority_mix_policy: Some(PriorityMixPolicy {
            base_regular_priority_count: 2,
            regular_priority_percentage_above_base: 50,
        }),
        ..ScaleSetSpec::with_sku("p", &["1", "2", "3"], SIZE)
    }
}

#[derive(Debug, Clone)]
struct Drawn {
    gap: u64,
    zone: usize,
    fault_domain: u32,
    spot: bool,
    power: usize,
    health: usize,
    provisioning: usize,
    model_version: u64,
    protect: (bool, bool),
    name: Option<String>,
}

fn arb_instance() -> impl Strategy<Value = Drawn> {
    (
        (1u64..1_000_000, 0usize..3, 0u32..3, any::<bool>()),
        (0usize..2, 0usize..4, 0usize..5, 0u64..1 << 40),
        (
            any::<(bool, bool)>(),
            proptest::option::of("[a-z][a-z0-9-]{0,20}"),
        ),
    )
        .prop_map(
            |(
                (gap, zone, fault_domain, spot),
                (power, health, provisioning, model_version),
                (protect, name),
            )| Drawn {
                gap,
                zone,
                fault_domain,
                spot,
                power,
                health,
                provisioning,
                model_version,
                protect,
                name,
            },
        )
}

fn inputs(drawn: &[Drawn]) -> Vec<InstanceInput> {
    let mut id = 0;
    drawn
        .iter()
        .enumerate()
        .map(|(k, d)| {
            id += d.gap;
            InstanceInput {
                instance_id: id,
                // Names must be unique in a set.
                name: d.name.as_ref().map(|n| format!("{n}-{k}")),
                zone: Some(["1", "2", "3"][d.zone].to_owned()),
                fault_domain: d.fault_domain,
                vm_size: SIZE.to_owned(),
                priority: if d.spot {
                    Priority::Spot
                } else {
                    Priority::Regular
                },
                power_state: PowerState::ALL[d.power],
                health: Health::ALL[d.health],
                provisioning_state: ProvisioningState::ALL[d.provisioning],
                model_version: Some(d.model_version),
                protect_from_scale_in: d.protect.0 || d.protect.1,
                protect_from_scale_set_actions: d.protect.1,
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Encode, decode, restore: the same instances, every field.
    #[test]
    fn a_restore_from_the_encoding_gives_back_the_same_instances(
        drawn in proptest::collection::vec(arb_instance(), 0..200),
        grown in 0u64..50,
    ) {
        let mut e = engine();
        e.create_scale_set(spot_spec(), 0).expect("valid");
        e.import_instances("p", inputs(&drawn)).expect("importable");
        let capacity = e.scale_set("p").expect("exists").capacity();
        e.set_capacity("p", capacity + grown, false).expect("room");
        let saved = e.scale_set("p").expect("exists").clone();
        let data = encode_instances(&e, "p").expect("exists");

        let decoded = decode_instances(&data).expect("decodable");
        let mut restored = engine();
        restored
            .restore_scale_set(saved.spec.clone(), decoded, saved.next_instance_id)
            .expect("restorable");
        let back = restored.scale_set("p").expect("restored");
        prop_assert_eq!(&back.instances, &saved.instances);
        prop_assert_eq!(back.next_instance_id, saved.next_instance_id);

        // A strict prefix is refused, and a flipped byte refused or decoded; never a panic (about 64
        // of each per case, spread over the encoding).
        let stride = 1 + data.len() / 64;
        for end in (0..data.len()).step_by(stride) {
            prop_assert!(decode_instances(&data[..end]).is_err());
        }
        for k in (0..data.len()).step_by(stride) {
            let mut bad = data.clone();
            bad[k] ^= 0xa5;
            let _ = decode_instances(&bad);
        }
    }
}

#[test]
fn a_scale_out_costs_a_few_bytes_per_instance() {
    let mut e = engine();
    e.create_scale_set(spot_spec(), 10_000).expect("valid");
    let data = encode_instances(&e, "p").expect("exists");
    // id delta, zone, fault domain, size, 4 states, model version, flags: one byte each.
    assert!(data.len() <= 10 * 10_000 + 64, "{} bytes", data.len());
    assert_eq!(decode_instances(&data).expect("decodable").len(), 10_000);
}

#[test]
fn the_engine_names_what_changed_since_it_was_last_asked() {
    let mut e = engine();
    e.create_scale_set(spot_spec(), 3).expect("valid");
    e.create_scale_set(
        ScaleSetSpec {
            name: "q".into(),
            ..spot_spec()
        },
        3,
    )
    .expect("valid");
    assert_eq!(e.take_changed(), ["p", "q"]);
    assert!(e.take_changed().is_empty());
    e.set_capacity("q", 2, true).expect("dry run");
    assert!(e.take_changed().is_empty(), "a dry run changes nothing");
    e.set_capacity("q", 5, false).expect("room");
    let id = e.scale_set("p").expect("exists").instances[0].instance_id;
    e.report_health("p", &[id], &[Health::Unhealthy])
        .expect("exists");
    assert_eq!(e.take_changed(), ["p", "q"]);
    e.delete_scale_set("p").expect("exists");
    assert_eq!(e.take_changed(), ["p"]);
}
