//! scaleset-core: where every VM of a scale set goes, which ones leave, and why.
//!
//! Pure Rust: no Python, no I/O, no clock, no logging. The same state and request always give the same
//! plan (ordered maps only, no hash iteration).

pub mod auto_zones;
pub mod autoscale;
pub mod engine;
pub mod error;
pub mod model;
pub mod plan;
pub mod rebalance;
pub mod scale_in;
pub mod scale_out;
pub mod snapshot;
pub mod upgrade;
pub mod validate;

pub use engine::{Engine, Eviction, InstanceInput, ScaleSetState};
pub use error::{codes, CoreError, ErrorKind, Result};
pub use model::*;
pub use plan::*;
pub use rebalance::{Class, NewPool, PoolRow, RebalanceInput};
