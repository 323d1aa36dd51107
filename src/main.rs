//! The `portcullis` command line. All logic lives in the library.

use clap::{Parser, Subcommand};
use portcullis::config::Config;
use portcullis::crypto::{self, Keyring};
use portcullis::gateway::State;
use portcullis::secret::{self, Secret};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

/// jemalloc, not the system allocator: an idle connection's few long-lived
/// allocations share pages with others of their size, so the pages a burst
/// of requests used and freed (hyper's buffers, request futures) empty out
/// and go back to the system ([`JEMALLOC_CONF`]). glibc's malloc kept most
/// of them: about 8 KiB per idle connection after a burst (`bench/memory.sh`,
/// docs/benchmarks.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A C string's address, as jemalloc reads its options.
#[repr(transparent)]
pub struct ConfString(*const std::ffi::c_char);

// SAFETY: the address of a constant string, never written.
unsafe impl Sync for ConfString {}

/// jemalloc's options, read when it starts (`_RJEM_MALLOC_CONF` in the
/// environment adds to them): a background thread gives pages freed for a
/// second back to the system, so what a burst left does not stay resident
/// while the gateway idles, and requests never pay for it.
#[export_name = "_rjem_malloc_conf"]
pub static JEMALLOC_CONF: ConfString =
    ConfString(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// Exit status for an invalid configuration or usage (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "portcullis", version, about = "An API gateway for DMZs")]
struct Cli {
    /// Configuration file (for `run` and `check`).
    #[arg(long, short, global = true, default_value = "config/portcullis.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with the configuration file (the default command).
    Run,
    /// Start the gateway and a demo backend on loopback and print a curl session.
    Demo {
        /// Serve the demo over HTTPS with freshly generated certificates
        /// (also when PORTCULLIS_DEMO_TLS is set to a non-empty value other than 0).
        #[arg(long)]
        tls: bool,
    },
    /// Create a local CA and a server certificate for localhost, 127.0.0.1 and ::1.
    DevCerts {
        /// Directory to write ca.crt, ca.key, server.crt and server.key into.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
    },
    /// Validate the configuration, print its routes and every problem.
    Check,
    /// Run commands for a gateway on this host (`--config runner.toml`):
    /// dials out to the gateway, listens on nothing.
    Runner,
    /// Read a secret on stdin and print its `sha256:` form.
    HashSecret,
    /// Print a new base64 AES-256 key.
    Keygen,
    /// Decrypt an encrypted query parameter value (backend-side debugging).
    Decrypt {
        /// The key: base64, `env:VAR` or `file:/path`.
        #[arg(long)]
        key: String,
        /// The key's id (default: the id inside the value).
        #[arg(long)]
        key_id: Option<u8>,
        /// The parameter name (bound as AAD).
        #[arg(long)]
        param: String,
        /// The encrypted value.
        value: String,
    },
    /// Audit log tools (remote operations).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain; reports the first edited, deleted or reordered
    /// line and exits 1 (2 when the file cannot be read).
    Verify {
        /// The audit log (`commands.audit_log`).
        file: PathBuf,
        /// The last `seq` and `head` of an `audit record written` line in the
        /// process log, as SEQ:HASH: the log must still hold that record,
        /// which also catches lines deleted at its end.
        #[arg(long, value_name = "SEQ:HASH")]
        anchor: Option<portcullis::audit::Anchor>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&cli.config),
        Command::Demo { tls } => demo(
            tls || std::env::var("PORTCULLIS_DEMO_TLS").is_ok_and(|v| !v.is_empty() && v != "0"),
        ),
        Command::DevCerts { out } => dev_certs(&out),
        Command::Check => check(&cli.config),
        Command::Runner => runner(&cli.config),
        Command::HashSecret => hash_secret(),
        Command::Keygen => {
            println!("{}", crypto::generate_key());
            ExitCode::SUCCESS
        }
        Command::Decrypt {
            key,
            key_id,
            param,
            value,
        } => decrypt(&key, key_id, &param, &value),
        Command::Audit {
            command: AuditCommand::Verify { file, anchor },
        } => ExitCode::from(portcullis::audit::verify_command(&file, anchor.as_ref())),
    }
}

fn init_logging() {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The audit log's anchors (one line per audit record) are part of its
    // tamper evidence: a quieter `PORTCULLIS_LOG` does not drop them.
    if let Ok(audit) = "portcullis::audit=info".parse() {
        filter = filter.add_directive(audit);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// `portcullis runner`: loads `runner.toml` and serves jobs until SIGTERM.
fn runner(path: &std::path::Path) -> ExitCode {
    init_logging();
    let cfg = match portcullis::runner::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match runtime() {
        Ok(rt) => {
            rt.block_on(portcullis::runner::run(cfg));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime: one worker per CPU this process may run on. With a
/// single CPU (a pinned or CPU-limited container), the single-threaded
/// scheduler does the same work without the work-stealing bookkeeping.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cpus)
            .enable_all()
            .build()
    }
}

fn load(path: &std::path::Path) -> Result<std::sync::Arc<State>, ExitCode> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("{}: invalid configuration:\n{problems}", path.display());
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    };
    State::new(config).map_err(|problems| {
        eprintln!("{}: invalid configuration:", path.display());
        for p in problems {
            eprintln!("  - {p}");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

fn run(path: &std::path::Path) -> ExitCode {
    init_logging();
    let state = match load(path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    for w in &state.config.warnings {
        tracing::warn!("{w}");
    }
    let addr = state.config.server.listen;
    let result = runtime().and_then(|rt| {
        rt.block_on(portcullis::server::run(
            state,
            addr,
            Some(path.to_path_buf()),
        ))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("cannot serve on {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(tls: bool) -> ExitCode {
    init_logging();
    match runtime().and_then(|rt| rt.block_on(portcullis::dev::demo::run(tls))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dev_certs(out: &std::path::Path) -> ExitCode {
    let files = match portcullis::dev::devcerts::write_dev_certs(out) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cannot write certificates to {}: {e}", out.display());
            return ExitCode::FAILURE;
        }
    };
    println!(
        "Wrote a development CA and a server certificate for localhost, 127.0.0.1 and ::1:
  {ca}        the CA certificate: trust this one
  {ca_key}        the CA key (mode 0600; delete it if you will not issue more certificates)
  {crt}    the server certificate (valid one year)
  {key}    the server key (mode 0600)

Add to the [server] section of your configuration:
  tls = {{ cert = \"{crt}\", key = \"{key}\" }}

Trust the CA:
  curl:      curl --cacert {ca} https://localhost:8443/...
  Debian:    sudo cp {ca} /usr/local/share/ca-certificates/portcullis-dev.crt && sudo update-ca-certificates
  macOS:     sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {ca}
  Firefox:   Settings > Privacy & Security > Certificates > Import {ca}
For development only: never trust this CA on a machine you do not own.",
        ca = files.ca_cert.display(),
        ca_key = files.ca_key.display(),
        crt = files.server_cert.display(),
        key = files.server_key.display(),
    );
    ExitCode::SUCCESS
}

fn check(path: &std::path::Path) -> ExitCode {
    let state = match load(path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let c = &state.config;
    println!("{}: OK", path.display());
    println!("listen {}  backend {}", c.server.listen, c.backend.address);
    println!(
        "api keys: {}",
        c.api_keys
            .iter()
            .map(|k| k.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("routes:");
    for r in state.router().routes() {
        let r = &r.config;
        let methods: Vec<&str> = r.methods.iter().map(|m| m.as_str()).collect();
        println!(
            "  {:<8} {:<40} -> {:<40} {}{}",
            methods.join(","),
            r.path,
            r.backend_path,
            if r.public { "public" } else { "private" },
            match &r.encrypt_query {
                portcullis::config::EncryptQuery::None => String::new(),
                portcullis::config::EncryptQuery::All => "  encrypt: *".into(),
                portcullis::config::EncryptQuery::Names(n) => format!("  encrypt: {}", n.join(",")),
            }
        );
    }
    if let Some(cmds) = &c.commands {
        let mode = match &cmds.mode {
            portcullis::commands::config::Mode::Allowlist(l) => {
                format!("allowlist ({} names)", l.len())
            }
            portcullis::commands::config::Mode::Blocklist(l) => {
                format!("blocklist ({} names)", l.len())
            }
        };
        println!(
            "remote operations: {} operators, django preset {}, {mode}, {} custom commands, {} schedules, audit log {}",
            c.operators.len(),
            if cmds.django.is_some() { "on" } else { "off" },
            cmds.custom.len(),
            cmds.schedules.len(),
            cmds.audit_log.display()
        );
    }
    if let Some(cl) = &c.cluster {
        println!(
            "cluster: {:?} as instance {:?}, degraded_ttl {}, Redis call deadline {} (Redis not contacted by check)",
            cl.name,
            cl.instance,
            humantime::format_duration(cl.degraded_ttl),
            humantime::format_duration(cl.timeout),
        );
    }
    for w in &c.warnings {
        println!("warning: {w}");
    }
    ExitCode::SUCCESS
}

fn hash_secret() -> ExitCode {
    let mut input = Vec::new();
    if std::io::stdin().read_to_end(&mut input).is_err() {
        eprintln!("cannot read stdin");
        return ExitCode::FAILURE;
    }
    while matches!(input.last(), Some(b'\n' | b'\r')) {
        input.pop();
    }
    if input.is_empty() {
        eprintln!("empty secret on stdin");
        return ExitCode::from(EXIT_CONFIG);
    }
    println!("{}", secret::hash_form(&input));
    ExitCode::SUCCESS
}

fn decrypt(key: &str, key_id: Option<u8>, param: &str, value: &str) -> ExitCode {
    let key = match secret::resolve(key).and_then(|k| crypto::decode_key(&k)) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("--key: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let id = key_id.or_else(|| crypto::key_id_of(value)).unwrap_or(0);
    let Some(ring) = Keyring::new(id, &[(id, key)]) else {
        eprintln!("--key: unusable key");
        return ExitCode::from(EXIT_CONFIG);
    };
    match ring.decrypt(param, value) {
        Ok(plain) => {
            let secret = Secret::new(plain);
            match secret.expose_str() {
                Some(s) => println!("{s}"),
                None => println!("{}", secret::hex(secret.expose())),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot decrypt: {e}");
            ExitCode::FAILURE
        }
    }
}
