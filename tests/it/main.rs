//! Every integration test, in one binary (one link instead of one per file).
//! Each module is one former `tests/<name>.rs`, so a failing test reads
//! `it <module>::<test>`; the shared harness is [`support`].

mod support;

mod adversarial_backend;
mod adversarial_h2;
mod adversarial_malformed;
mod adversarial_slow;
mod adversarial_smuggling;
mod binary;
mod bodies;
mod cluster;
mod cluster_ops;
mod cluster_runners;
mod cluster_tls;
mod commands_binary;
mod commands_custom;
mod commands_django;
mod commands_options;
mod console;
mod console_runners;
mod encryption;
mod example_config;
mod limits;
mod observability;
mod parking;
mod proptest_gateway;
mod runners;
mod scripts;
mod sessions;
mod single_cpu;
mod stale_sessions;
mod status_codes;
mod tls;
mod upstream;
