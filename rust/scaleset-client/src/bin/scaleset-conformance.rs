//! The conformance run: a non-Python client exercising the API against a real server, as a user of another
//! language would (`scaleset-conformance http://127.0.0.1:PORT`). The test command runs it against a fresh
//! server whose region has zones 1, 2 and 3; it exits non-zero, naming the step, on the first surprise.
//!
//! Steps: create, scale, list with paging, watch, every kind of error decoded from its status details,
//! a rolling upgrade, a rebalance after an outage.

use scaleset_client::pb::{regions_client::RegionsClient, scale_sets_client::ScaleSetsClient, *};
use scaleset_client::ErrorDetails;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const SIZE: &str = "Standard_D2s_v5";

macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+).into());
        }
    };
}

fn spec(name: &str) -> ScaleSetSpec {
    ScaleSetSpec {
        name: name.into(),
        zones: vec!["1".into(), "2".into(), "3".into()],
        sku: Some(Sku {
            name: SIZE.into(),
            tier: None,
        }),
        ..Default::default()
    }
}

/// The error a call must fail with: its gRPC code, the stable reason, and (for invalid input) the field.
async fn expect_error<T>(
    step: &str,
    call: impl std::future::Future<Output = std::result::Result<T, tonic::Status>>,
    code: Code,
    reason: &str,
    field: Option<&str>,
) -> Result<ErrorDetails> {
    let Err(status) = call.await else {
        return Err(format!("{step}: expected {code:?} {reason}, the call succeeded").into());
    };
    let details = ErrorDetails::of(&status);
    check!(
        status.code() == code && details.reason == reason && details.domain == "scaleset",
        "{step}: expected {code:?} {reason}, got {:?} {} ({})",
        status.code(),
        details.reason,
        status.message()
    );
    if let Some(field) = field {
        check!(
            details.field_violations.iter().any(|(f, _)| f == field),
            "{step}: expected a BadRequest violation of {field}, got {:?}",
            details.field_violations
        );
    }
    println!("ok   {step}: {code:?} {reason}");
    Ok(details)
}

async fn lifecycle(client: &mut ScaleSetsClient<Channel>) -> Result<()> {
    let created = client
        .create_scale_set(CreateScaleSetRequest {
            scale_set: Some(spec("web")),
            capacity: 6,
            ..Default::default()
        })
        .await?
        .into_inner();
    let set = created.scale_set.ok_or("create: no scale set")?;
    let plan = created.plan.ok_or("create: no plan")?;
    check!(
        set.capacity == 6 && plan.creates.len() == 6,
        "create: {set:?}"
    );
    let resolved = set.spec.ok_or("create: no spec")?;
    check!(
        resolved.orchestration_mode() == OrchestrationMode::Flexible,
        "create: the default orchestration mode is {:?}",
        resolved.orchestration_mode()
    );
    println!("ok   create: 6 instances, Azure's defaults filled in");

    let scaled = client
        .set_capacity(SetCapacityRequest {
            name: "web".into(),
            capacity: Some(12),
            request_id: "rust-scale-1".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let again = client
        .set_capacity(SetCapacityRequest {
            name: "web".into(),
            capacity: Some(12),
            request_id: "rust-scale-1".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    check!(
        scaled.revision == again.revision
            && scaled.plan.as_ref().map(|p| p.creates.len()) == Some(6),
        "scale: a retry with the same request_id must return the first answer"
    );
    println!("ok   scale: 6 -> 12, retried once with its request_id, applied once");

    let mut ids = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_instances(ListInstancesRequest {
                name: "web".into(),
                page_size: 5,
                page_token: token.clone(),
            })
            .await?
            .into_inner();
        let columns = page.instances.ok_or("list: no columns")?;
        check!(
            columns.zone.len() == columns.instance_id.len(),
            "list: ragged columns"
        );
        ids.extend(columns.instance_id);
        pages += 1;
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    check!(
        pages == 3 && ids.len() == 12 && ids.windows(2).all(|w| w[0] < w[1]),
        "list: {pages} pages, ids {ids:?}"
    );
    println!("ok   list: 12 instances in 3 pages of 5, in id order");
    Ok(())
}

async fn watch(client: &mut ScaleSetsClient<Channel>) -> Result<()> {
    // Headers come at once, so opening a watch and then changing the set works in one task.
    let mut stream = client
        .watch_events(WatchEventsRequest {
            scale_set: "web".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut types = Vec::new();
    while types.len() < 2 {
        let message = stream.next().await.ok_or("watch: the stream ended")??;
        types.extend(message.events.into_iter().map(|e| e.r#type));
    }
    check!(
        types[..2] == ["ScaleSetCreated".to_string(), "CapacitySet".to_string()],
        "watch: {types:?}"
    );
    println!("ok   watch: history replayed in order ({types:?})");
    Ok(())
}

async fn errors(client: &mut ScaleSetsClient<Channel>) -> Result<()> {
    expect_error(
        "error: create an existing scale set",
        client.create_scale_set(CreateScaleSetRequest {
            scale_set: Some(spec("web")),
            ..Default::default()
        }),
        Code::AlreadyExists,
        "ScaleSetAlreadyExists",
        None,
    )
    .await?;
    let mut bad = spec("bad");
    bad.zones.push("9".into());
    expect_error(
        "error: an unknown zone",
        client.create_scale_set(CreateScaleSetRequest {
            scale_set: Some(bad),
            ..Default::default()
        }),
        Code::InvalidArgument,
        "InvalidParameter",
        Some("scale_set.zones"),
    )
    .await?;
    expect_error(
        "error: SetCapacity without a capacity",
        client.set_capacity(SetCapacityRequest {
            name: "web".into(),
            ..Default::default()
        }),
        Code::InvalidArgument,
        "InvalidParameter",
        Some("capacity"),
    )
    .await?;
    expect_error(
        "error: a scale set that does not exist",
        client.get_scale_set(GetScaleSetRequest {
            name: "nowhere".into(),
        }),
        Code::NotFound,
        "ResourceNotFound",
        None,
    )
    .await?;
    let stale = expect_error(
        "error: a stale etag",
        client.set_capacity(SetCapacityRequest {
            name: "web".into(),
            capacity: Some(3),
            etag: "W/\"1-00000000\"".into(),
            ..Default::default()
        }),
        Code::Aborted,
        "EtagMismatch",
        None,
    )
    .await?;
    check!(
        stale.metadata.contains_key("current_etag"),
        "error: the stale etag's reply names the current one"
    );
    expect_error(
        "error: beyond the instance limit",
        client.set_capacity(SetCapacityRequest {
            name: "web".into(),
            capacity: Some(5000),
            ..Default::default()
        }),
        Code::ResourceExhausted,
        "OperationNotAllowed",
        None,
    )
    .await?;
    let mut uniform = spec("web");
    uniform.set_orchestration_mode(OrchestrationMode::Uniform);
    expect_error(
        "error: an immutable property",
        client.update_scale_set(UpdateScaleSetRequest {
            scale_set: Some(uniform),
            ..Default::default()
        }),
        Code::FailedPrecondition,
        "PropertyChangeNotAllowed",
        None,
    )
    .await?;
    expect_error(
        "error: a page token of another query",
        client.list_instances(ListInstancesRequest {
            name: "nowhere".into(),
            page_size: 5,
            page_token: "d2Vi".into(),
        }),
        Code::InvalidArgument,
        "InvalidPageToken",
        Some("page_token"),
    )
    .await?;
    let capacity = client
        .get_scale_set(GetScaleSetRequest { name: "web".into() })
        .await?
        .into_inner()
        .capacity;
    check!(capacity == 12, "errors changed the scale set: {capacity}");
    Ok(())
}

async fn rolling_upgrade(client: &mut ScaleSetsClient<Channel>) -> Result<()> {
    let mut rolling = spec("roll");
    rolling.upgrade_policy = Some(UpgradePolicy {
        mode: UpgradeMode::Rolling as i32,
        rolling_upgrade_policy: None,
    });
    client
        .create_scale_set(CreateScaleSetRequest {
            scale_set: Some(rolling.clone()),
            capacity: 4,
            ..Default::default()
        })
        .await?;
    client
        .report_instance_health(ReportInstanceHealthRequest {
            name: "roll".into(),
            reports: vec![HealthReport {
                instance_ids: (0..4).collect(),
                health: Health::Healthy as i32,
            }],
            ..Default::default()
        })
        .await?;
    // A new VM size is a new model: the rolling upgrade moves the instances to it in batches.
    let mut mask = prost_types::FieldMask::default();
    mask.paths.push("sku".into());
    rolling.sku = Some(Sku {
        name: "Standard_D4s_v5".into(),
        tier: None,
    });
    let updated = client
        .update_scale_set(UpdateScaleSetRequest {
            scale_set: Some(rolling),
            update_mask: Some(mask),
            ..Default::default()
        })
        .await?
        .into_inner();
    check!(
        updated.spec.map(|s| s.model_version) == Some(2),
        "upgrade: the model version did not move to 2"
    );
    let started = client
        .start_rolling_upgrade(StartRollingUpgradeRequest {
            name: "roll".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    check!(
        started.status() == RollingUpgradeState::RollingForward && started.batches_total > 0,
        "upgrade: started as {:?}",
        started.status()
    );
    let cancelled = client
        .cancel_rolling_upgrade(CancelRollingUpgradeRequest {
            name: "roll".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    check!(
        cancelled.status() == RollingUpgradeState::Cancelled,
        "upgrade: cancelled as {:?}",
        cancelled.status()
    );
    println!(
        "ok   rolling upgrade: model 2 in {} batches, rolling forward, then cancelled",
        started.batches_total
    );
    Ok(())
}

async fn rebalance(
    client: &mut ScaleSetsClient<Channel>,
    regions: &mut RegionsClient<Channel>,
) -> Result<()> {
    client
        .create_scale_set(CreateScaleSetRequest {
            scale_set: Some(spec("lopsided")),
            capacity: 6,
            ..Default::default()
        })
        .await?;
    // An outage in zone 3 sends a scale-out to zones 1 and 2; after recovery a rebalance evens it out.
    regions
        .set_zone_availability(SetZoneAvailabilityRequest {
            zone: "3".into(),
            available: false,
            ..Default::default()
        })
        .await?;
    client
        .set_capacity(SetCapacityRequest {
            name: "lopsided".into(),
            capacity: Some(12),
            ..Default::default()
        })
        .await?;
    regions
        .set_zone_availability(SetZoneAvailabilityRequest {
            zone: "3".into(),
            available: true,
            ..Default::default()
        })
        .await?;
    let dry = client
        .rebalance(RebalanceRequest {
            name: "lopsided".into(),
            max_surge: 2,
            ..Default::default()
        })
        .await?
        .into_inner()
        .plan
        .ok_or("rebalance: no plan")?;
    check!(
        dry.dry_run && dry.status == "OPTIMAL" && dry.replacements == 2,
        "rebalance: dry run {} with {} replacements",
        dry.status,
        dry.replacements
    );
    let applied = client
        .rebalance(RebalanceRequest {
            name: "lopsided".into(),
            max_surge: 2,
            dry_run: Some(false),
            ..Default::default()
        })
        .await?
        .into_inner()
        .plan
        .ok_or("rebalance: no plan")?;
    let listed = client
        .list_instances(ListInstancesRequest {
            name: "lopsided".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .instances
        .ok_or("rebalance: no listing")?;
    let mut per_zone = [0usize; 3];
    for &z in &listed.zone {
        let name = &listed.zone_names[z as usize];
        per_zone[name.parse::<usize>()? - 1] += 1;
    }
    check!(
        !applied.dry_run && per_zone == [4, 4, 4],
        "rebalance: zones {per_zone:?}"
    );
    println!(
        "ok   rebalance: {} replacements, zones 5/5/2 -> {per_zone:?}",
        applied.replacements
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let target = std::env::args()
        .nth(1)
        .ok_or("usage: scaleset-conformance http://HOST:PORT")?;
    let channel = Channel::from_shared(target)?.connect().await?;
    let mut client = ScaleSetsClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let mut regions = RegionsClient::new(channel);
    lifecycle(&mut client).await?;
    watch(&mut client).await?;
    errors(&mut client).await?;
    rolling_upgrade(&mut client).await?;
    rebalance(&mut client, &mut regions).await?;
    println!("conformance: every step passed");
    Ok(())
}
