//! The soak's watchers in Rust (`python bench/soak.py --watch rust`): many WatchEvents streams of every
//! scale set, as bench/load.py's watcher processes open them, for a fraction of their CPU. Like the load
//! generator, they stand in for other machines but share the server's 2 cores.
//!
//! `scaleset-watch --target http://127.0.0.1:PORT --streams 500 [--per-connection 200] [--reads yes|no]
//! [--resume yes|no]`: `--streams` streams from the start, `--per-connection` on each connection. Each
//! message is kept as bytes (the events in it are not decoded: that is the watcher's own work, not the
//! server's); with `--reads no` a stream takes one message and then holds the stream without reading
//! another, so its flow control fills. A stream that fails before its first message (a connection refused)
//! opens again; with `--resume yes` a reading stream that fails later resumes after its last event, as a
//! real watcher would. Connections keep tonic's fixed flow-control windows (2 MB a stream, 5 MB a
//! connection), so a never-reading connection's streams stop together once it has taken 5 MB. With hyper's
//! adaptive window instead, which measures each connection's throughput with pings, a watch proxy serving
//! these watchers took 80% of a core where it takes a third (docs/soak.md).
//!
//! It answers lines on its standard input, one line each: `first` prints the least, over its streams, of
//! the sequence of the first event of the stream's last message (each stream has every event before it), and
//! how many times a stream opened again; `last` prints the least last event's sequence, and the same count.
//! A stream that has no message yet counts 0, one that ended -1. It stops at the end of its input.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::bytes::{Buf, Bytes};
use prost::encoding::decode_varint;
use prost::Message;
use scaleset_client::pb::{Event, WatchEventsRequest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tonic::client::Grpc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

type StdResult<T, E> = std::result::Result<T, E>;
type Result<T> = StdResult<T, Box<dyn std::error::Error + Send + Sync>>;

/// WatchEvents with each response kept as its bytes: reading a message costs a scan of its fields, not a
/// decode (or an allocation) for every event in it.
#[derive(Default)]
struct RawResponses;

impl Codec for RawResponses {
    type Encode = WatchEventsRequest;
    type Decode = Bytes;
    type Encoder = RawResponses;
    type Decoder = RawResponses;

    fn encoder(&mut self) -> Self {
        RawResponses
    }

    fn decoder(&mut self) -> Self {
        RawResponses
    }
}

impl Encoder for RawResponses {
    type Item = WatchEventsRequest;
    type Error = Status;

    fn encode(
        &mut self,
        item: WatchEventsRequest,
        dst: &mut EncodeBuf<'_>,
    ) -> StdResult<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Decoder for RawResponses {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> StdResult<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The key of a WatchEventsResponse's events: field 1, length-delimited.
const EVENTS_TAG: u64 = (1 << 3) | 2;

/// The sequences of the first and the last event of a WatchEventsResponse (None without events), decoding
/// those two events only.
fn first_and_last(mut message: &[u8]) -> Result<Option<(u64, u64)>> {
    let (mut first, mut last) = (None, &[][..]);
    while !message.is_empty() {
        let tag = decode_varint(&mut message)?;
        let length = usize::try_from(decode_varint(&mut message)?)?;
        if tag != EVENTS_TAG || length > message.len() {
            return Err("not a WatchEventsResponse of events".into());
        }
        let (event, rest) = message.split_at(length);
        if first.is_none() {
            first = Some(Event::decode(event)?.sequence);
        }
        (last, message) = (event, rest);
    }
    Ok(match first {
        Some(first) => Some((first, Event::decode(last)?.sequence)),
        None => None,
    })
}

struct Args {
    target: String,
    streams: usize,
    per_connection: usize,
    reads: bool,
    resume: bool,
}

fn yes(flag: &str, value: &str) -> Result<bool> {
    match value {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err(format!("{flag} takes yes or no, not {value:?}").into()),
    }
}

fn args() -> Result<Args> {
    let mut out = Args {
        target: String::new(),
        streams: 0,
        per_connection: 200,
        reads: true,
        resume: false,
    };
    for (flag, value) in scaleset_client::flag_values(std::env::args().skip(1))? {
        match flag.as_str() {
            "--target" => out.target = value,
            "--streams" => out.streams = value.parse()?,
            "--per-connection" => out.per_connection = value.parse()?,
            "--reads" => out.reads = yes(&flag, &value)?,
            "--resume" => out.resume = yes(&flag, &value)?,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    if out.target.is_empty() || out.streams == 0 || out.per_connection == 0 {
        return Err(
            "--target, and --streams and --per-connection of at least 1, are needed".into(),
        );
    }
    Ok(out)
}

/// Where one stream is: the sequence of the first event of its last message and of its last event (0
/// before any), and whether it ended.
#[derive(Default)]
struct Position {
    first: AtomicU64,
    last: AtomicU64,
    ended: AtomicBool,
}

impl Position {
    fn report(&self, which: &str) -> i64 {
        if self.ended.load(Ordering::Relaxed) {
            return -1;
        }
        let at = if which == "first" {
            &self.first
        } else {
            &self.last
        };
        at.load(Ordering::Relaxed) as i64
    }
}

/// One stream, opened again as the module says until it ends; `reopened` counts the times.
async fn follow(
    mut grpc: Grpc<Channel>,
    at: Arc<Position>,
    k: u64,
    args: Arc<Args>,
    reopened: Arc<AtomicI64>,
) {
    let path = PathAndQuery::from_static("/scaleset.v1.ScaleSets/WatchEvents");
    let mut had_message = false;
    for attempt in 0u64.. {
        let request = WatchEventsRequest {
            after: at.last.load(Ordering::Relaxed),
            ..Default::default()
        };
        let outcome: Result<()> = async {
            grpc.ready().await?;
            let mut stream = grpc
                .server_streaming(tonic::Request::new(request), path.clone(), RawResponses)
                .await?
                .into_inner();
            while let Some(message) = stream.message().await? {
                had_message = true;
                if let Some((first, last)) = first_and_last(&message)? {
                    at.first.store(first, Ordering::Relaxed);
                    at.last.store(last, Ordering::Relaxed);
                }
                if !args.reads {
                    std::future::pending::<()>().await;
                }
            }
            Ok(())
        }
        .await;
        if outcome.is_err() && (!had_message || (args.resume && args.reads)) {
            reopened.fetch_add(1, Ordering::Relaxed);
            // 1-2 s, spread over the streams and attempts so that they do not come back together.
            let spread = (k * 7919 + attempt * 104_729) % 1000;
            tokio::time::sleep(Duration::from_millis(1000 + spread)).await;
            continue;
        }
        at.ended.store(true, Ordering::Relaxed);
        return;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Arc::new(args()?);
    let mut connections = Vec::new();
    for _ in 0..args.streams.div_ceil(args.per_connection) {
        // Connected on the first call (and again after a failure): a stream opened before the server
        // listens fails, and opens again.
        let endpoint = Endpoint::from_shared(args.target.clone())?;
        connections.push(Grpc::new(endpoint.connect_lazy()));
    }
    let positions: Vec<Arc<Position>> = (0..args.streams).map(|_| Arc::default()).collect();
    let reopened = Arc::new(AtomicI64::new(0));
    for (k, at) in positions.iter().enumerate() {
        let grpc = connections[k / args.per_connection].clone();
        tokio::spawn(follow(
            grpc,
            Arc::clone(at),
            k as u64,
            Arc::clone(&args),
            Arc::clone(&reopened),
        ));
    }
    let mut asks = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Some(ask) = asks.next_line().await? {
        let which = ask.trim();
        if which != "first" && which != "last" {
            return Err(format!("unknown question {which:?}: ask first or last").into());
        }
        let least = positions
            .iter()
            .map(|at| at.report(which))
            .min()
            .unwrap_or(0);
        let answer = format!("{least} {}\n", reopened.load(Ordering::Relaxed));
        out.write_all(answer.as_bytes()).await?;
        out.flush().await?;
    }
    Ok(())
}
