//! A Rust client of the scaleset gRPC API, generated with tonic from `proto/scaleset/v1/scaleset.proto`
//! (the contract every language uses), with the error details decoded the way the server sends them.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use scaleset_client::pb::{scale_sets_client::ScaleSetsClient, SetCapacityRequest};
//! let mut client = ScaleSetsClient::connect("http://127.0.0.1:50051").await?;
//! let reply = client
//!     .set_capacity(SetCapacityRequest { name: "web".into(), capacity: Some(10), ..Default::default() })
//!     .await;
//! if let Err(status) = reply {
//!     let details = scaleset_client::ErrorDetails::of(&status);
//!     eprintln!("{:?} {} (field {:?})", status.code(), details.reason, details.field);
//! }
//! # Ok(()) }
//! ```

/// The generated messages and clients of package `scaleset.v1`.
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("scaleset.v1");
}

use tonic_types::StatusExt;

/// What a failed call's status carries: `google.rpc.ErrorInfo` (the stable code as `reason`, and the
/// field as the domain names it), `google.rpc.BadRequest` (the field's path in the request) and
/// `google.rpc.RetryInfo` (when a retry can succeed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErrorDetails {
    pub reason: String,
    pub domain: String,
    pub field: Option<String>,
    pub metadata: std::collections::HashMap<String, String>,
    pub field_violations: Vec<(String, String)>,
    pub retry_after: Option<std::time::Duration>,
}

impl ErrorDetails {
    pub fn of(status: &tonic::Status) -> Self {
        let mut out = Self::default();
        for detail in status.get_error_details_vec() {
            match detail {
                tonic_types::ErrorDetail::ErrorInfo(info) => {
                    out.reason = info.reason;
                    out.domain = info.domain;
                    out.field = info.metadata.get("field").cloned();
                    out.metadata = info.metadata;
                }
                tonic_types::ErrorDetail::BadRequest(bad) => {
                    out.field_violations = bad
                        .field_violations
                        .into_iter()
                        .map(|v| (v.field, v.description))
                        .collect();
                }
                tonic_types::ErrorDetail::RetryInfo(retry) => out.retry_after = retry.retry_delay,
                _ => {}
            }
        }
        out
    }
}

/// The `--flag value` pairs of a command line (`std::env::args().skip(1)`), in order: the soak's binaries
/// (`scaleset-load`, `scaleset-watch`) take nothing else. A flag without a value is an error naming it.
pub fn flag_values(
    mut given: impl Iterator<Item = String>,
) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    while let Some(flag) = given.next() {
        let value = given.next().ok_or(format!("{flag} needs a value"))?;
        pairs.push((flag, value));
    }
    Ok(pairs)
}
