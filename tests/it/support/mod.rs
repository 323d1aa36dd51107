//! The one harness of the integration tests, split by concern:
//!
//! - [`backend`]: a real HTTP test backend that records what it received and
//!   answers scripted replies;
//! - [`bodies`]: pattern, stalling and chunked bodies;
//! - [`gateway`]: a gateway started in-process from a TOML config on an
//!   ephemeral port, and the keys every test config holds;
//! - [`client`]: a hyper client (`Req`, `Resp`, `KeepAlive`);
//! - [`raw`]: raw bytes on a socket, for requests a normal client would refuse;
//! - [`process`]: child processes (the compiled binary, Python servers),
//!   process limits and the panic watch;
//! - [`commands`]: the remote operations service (`/__manage__`), its
//!   operators and audit log (not re-exported: `use crate::support::commands::*`);
//! - [`runners`]: the compiled gateway over TLS with `portcullis runner`
//!   processes dialling in (not re-exported).
//! - [`cluster`]: a real `redis-server` and gateway processes in cluster mode
//!   (not re-exported: `use crate::support::cluster::*`).
//!
//! Everything binds `127.0.0.1:0`; everything started here is stopped on
//! drop, so a failing test leaves nothing running.

pub mod backend;
pub mod bodies;
pub mod client;
pub mod cluster;
pub mod commands;
pub mod gateway;
pub mod process;
pub mod raw;
pub mod runners;

pub use backend::*;
pub use bodies::*;
pub use client::*;
pub use gateway::*;
pub use process::*;
pub use raw::*;

use sha2::{Digest, Sha256};
use std::time::Duration;

/// Upper bound for any single exchange in a test.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// SHA-256 of `data`, lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// `bytes` as lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `q` quantile (0..=1) of `samples` (sorted in place).
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[i.min(samples.len() - 1)]
}
