//! The connection layer: listeners and connection lifecycle.
//!
//! - `accept`: the accept loop, connection cap, TLS handshake (when
//!   `server.tls` is set; ALPN `h2`/`http/1.1`, certificate reloaded when its
//!   files change), graceful drain with a deadline;
//! - `connection`: one connection served by hyper (HTTP/1.1 and HTTP/2 on one
//!   port), drain and idle watchdog;
//! - [`conn_io`]: the IO under hyper: read and send deadlines, 408 for a head
//!   cut short;
//! - [`parse_errors`]: hyper's bare error answers rewritten as envelopes;
//! - `live`: the state being served, swapped on reload;
//! - `admin`: the admin listener (`/metrics`, `/healthz`, `/readyz`);
//! - `signals`: SIGHUP reload, SIGINT/SIGTERM shutdown.

mod accept;
mod admin;
pub mod conn_io;
mod connection;
mod live;
pub mod parse_errors;
mod signals;

pub use accept::{serve, serve_live};
pub use admin::serve_admin;
pub use live::Live;
pub use signals::shutdown_signal;

use crate::gateway::State;
use signals::reload_on_sighup;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Binds `addr` and serves until SIGINT/SIGTERM. With a configuration path,
/// SIGHUP reloads it: a valid new configuration is swapped in atomically
/// (sessions and in-flight requests survive), an invalid one is refused with
/// its problems logged and the running one keeps serving.
pub async fn run(
    state: Arc<State>,
    addr: SocketAddr,
    config_path: Option<PathBuf>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(listen = %listener.local_addr()?, "portcullis serving");
    let live = Live::new(state);
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(admin) = live.state().config.server.admin_listen {
        let admin_listener = TcpListener::bind(admin).await?;
        tracing::info!(listen = %admin_listener.local_addr()?, "admin endpoints (/metrics, /healthz, /readyz)");
        tokio::spawn(serve_admin(admin_listener, Arc::clone(&live), async {
            let _ = admin_stopped.await;
        }));
    }
    if let Some(path) = config_path {
        tokio::spawn(reload_on_sighup(Arc::clone(&live), path));
    }
    let result = serve_live(listener, live, shutdown_signal()).await;
    let _ = admin_stop.send(());
    result
}
