//! portcullis: an API gateway for DMZs.
//!
//! Module map (the request path reads top to bottom in [`gateway`]):
//! - [`config`]: raw TOML → validated [`config::Config`], every problem reported.
//! - [`secret`]: secrets that never print; constant-time key matching.
//! - [`routes`]: path normalization and exposed-route lookup.
//! - [`envelope`]: the one place errors become `{"error": {...}}` responses.
//! - [`crypto`]: AES-256-GCM encrypted query parameters.
//! - [`body`]: the body type flowing both ways.

pub mod body;
pub mod config;
pub mod crypto;
pub mod envelope;
pub mod routes;
pub mod secret;
