//! Signals: SIGHUP reloads the configuration, SIGINT/SIGTERM shut down.

use super::live::Live;
use std::path::PathBuf;
use std::sync::Arc;

/// Reloads the configuration at `path` on every SIGHUP, logging what was
/// refused or needs a restart.
pub(super) async fn reload_on_sighup(live: Arc<Live>, path: PathBuf) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; configuration reload disabled");
            return;
        };
        while hup.recv().await.is_some() {
            match live.reload(&path) {
                Ok(restart_needed) => {
                    tracing::info!(config = %path.display(), "configuration reloaded");
                    for w in &live.state().config.warnings {
                        tracing::warn!("{w}");
                    }
                    for key in restart_needed {
                        tracing::warn!("changed setting {key} takes effect only after a restart");
                    }
                }
                Err(problems) => {
                    tracing::error!(config = %path.display(), "configuration reload refused; still serving the previous one");
                    for p in problems {
                        tracing::error!("  {p}");
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (live, path);
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = async {
            match signal(SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            () = term => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}
