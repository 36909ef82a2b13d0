//! The soak's load generator in Rust (`python bench/soak.py --load rust`): durable SetCapacity calls on a
//! fixed schedule, as bench/load.py's open loop makes them, for a fraction of its CPU. The soak's clients
//! stand in for other machines but share the server's 2 cores, so what the generator spends there is
//! taken from the server.
//!
//! `scaleset-load --target http://127.0.0.1:PORT --rate 500 --seconds 10 [--processes 2]
//! [--per-process 64] [--inflight 64]`: `rate * seconds` calls over the scale sets `load-<p>-<k>`
//! (bench/load.py's create_load_sets), each set alternating between 10 and 11 instances, on one
//! connection for each of `--processes` (bench/load.py's client processes), with at most `--inflight`
//! calls waiting on each. Every call is timed from when it was due, so a stall counts against every call it
//! delayed. Prints `calls errors seconds` on its first line, then every call's latency in microseconds,
//! one a line.

use std::sync::Arc;
use std::time::Duration;

use scaleset_client::pb::{scale_sets_client::ScaleSetsClient, SetCapacityRequest};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Channel;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Args {
    target: String,
    rate: f64,
    seconds: f64,
    processes: usize,
    per_process: usize,
    inflight: usize,
}

fn args() -> Result<Args> {
    let mut out = Args {
        target: String::new(),
        rate: 500.0,
        seconds: 10.0,
        processes: 2,
        per_process: 64,
        inflight: 64,
    };
    for (flag, value) in scaleset_client::flag_values(std::env::args().skip(1))? {
        match flag.as_str() {
            "--target" => out.target = value,
            "--rate" => out.rate = value.parse()?,
            "--seconds" => out.seconds = value.parse()?,
            "--processes" => out.processes = value.parse()?,
            "--per-process" => out.per_process = value.parse()?,
            "--inflight" => out.inflight = value.parse()?,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    if out.target.is_empty() || out.rate <= 0.0 || out.seconds <= 0.0 {
        return Err("--target, and a --rate and --seconds above 0, are needed".into());
    }
    if out.processes == 0 || out.per_process == 0 || out.inflight == 0 {
        return Err("--processes, --per-process and --inflight must be at least 1".into());
    }
    Ok(out)
}

/// Call `j` of the schedule: its connection, and the request bench/load.py's open loop sends as the
/// same call (each connection's calls go round its scale sets, alternating 10 and 11 on each visit).
fn request(j: usize, args: &Args) -> (usize, SetCapacityRequest) {
    let process = j % args.processes;
    let turn = j / args.processes;
    let set = turn % args.per_process;
    let capacity = 10 + (turn / args.per_process % 2) as u64;
    let request = SetCapacityRequest {
        name: format!("load-{process}-{set}"),
        capacity: Some(capacity),
        ..Default::default()
    };
    (process, request)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = args()?;
    let mut clients = Vec::with_capacity(args.processes);
    let mut waiting = Vec::with_capacity(args.processes);
    for _ in 0..args.processes {
        let channel = Channel::from_shared(args.target.clone())?.connect().await?;
        clients.push(ScaleSetsClient::new(channel));
        waiting.push(Arc::new(Semaphore::new(args.inflight)));
    }
    let calls = (args.rate * args.seconds).round() as usize;
    let mut running = JoinSet::new();
    let start = Instant::now();
    for j in 0..calls {
        let due = start + Duration::from_secs_f64(j as f64 / args.rate);
        tokio::time::sleep_until(due).await;
        let (process, request) = request(j, &args);
        let mut client = clients[process].clone();
        let waiting = Arc::clone(&waiting[process]);
        running.spawn(async move {
            let _permit = waiting.acquire_owned().await;
            let ok = client.set_capacity(request).await.is_ok();
            (due.elapsed(), ok)
        });
    }
    let mut latencies = Vec::with_capacity(calls);
    let mut errors = 0;
    while let Some(done) = running.join_next().await {
        let (latency, ok) = done?;
        latencies.push(latency.as_micros());
        errors += usize::from(!ok);
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut out = format!("{} {errors} {seconds}\n", latencies.len());
    for latency in latencies {
        out.push_str(&latency.to_string());
        out.push('\n');
    }
    print!("{out}");
    Ok(())
}
