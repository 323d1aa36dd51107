//! Development aids, never on a production path:
//!
//! - [`demo`]: `portcullis demo [--tls]`, a gateway plus a demo backend on loopback;
//! - [`devcerts`]: `portcullis dev-certs`, a local CA issuing server and
//!   client certificates (also used by `demo --tls` and the tests).

pub mod demo;
pub mod devcerts;
