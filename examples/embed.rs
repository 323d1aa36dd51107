//! Embedding portcullis in your own program: load and validate a
//! configuration, build the gateway's state, serve until Ctrl-C or SIGTERM.
//!
//! ```text
//! cargo run --example embed -- examples/minimal.toml
//! curl -H 'api-key: test' http://127.0.0.1:8080/api/status
//! ```
//!
//! This is what `portcullis run --config FILE` does, minus SIGHUP reload,
//! the admin listener and logging setup (see `portcullis::server::run`).

use portcullis::config::Config;
use portcullis::gateway::State;
use portcullis::server;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    let path = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("examples/minimal.toml"), PathBuf::from);
    // Every problem in the file is reported, not only the first.
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(problems) => {
            eprintln!("{}:\n{problems}", path.display());
            return ExitCode::from(64);
        }
    };
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    let listen = config.server.listen;
    let state = match State::new(config) {
        Ok(state) => state,
        Err(problems) => {
            eprintln!("{}: {}", path.display(), problems.join("; "));
            return ExitCode::from(64);
        }
    };
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("serving on http://{listen} (Ctrl-C stops)");
    match server::serve(listener, state, server::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
