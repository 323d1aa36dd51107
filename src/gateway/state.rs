//! [`State`]: everything the request path needs, built once from a validated
//! configuration, and rebuilt on reload keeping what must survive it.

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::crypto::Keyring;
use crate::metrics::{Metrics, RouteName};
use crate::ratelimit::RateLimiters;
use crate::readahead::ReadAhead;
use crate::routes::Router;
use crate::secret::Matcher;
use crate::sessions::Sessions;
use crate::upstream::Upstream;
use http::header::HeaderValue;
use ipnet::IpNet;
use std::sync::Arc;
use std::time::Duration;

/// Everything the request path needs, built once from a validated config.
pub struct State {
    /// Unique per built state: what a connection's [`AuthMemo`] was made under.
    pub(super) generation: u64,
    pub(super) router: Router,
    pub(super) api_keys: Vec<DeviceKey>,
    pub(super) rate_limits: Arc<RateLimiters>,
    pub(super) login_salt: u64,
    pub(super) sessions: Arc<Sessions>,
    pub(super) upstream: Arc<Upstream>,
    /// Streamed (unbuffered) uploads in flight: at most half the backend
    /// pool, so slow senders of large bodies cannot take every connection.
    pub(super) uploads: Arc<tokio::sync::Semaphore>,
    /// Read-ahead of large backend answers (`limits.response_buffer*`).
    pub(super) read_ahead: Option<Arc<ReadAhead>>,
    pub(super) keyring: Option<Keyring>,
    pub(super) error_type: String,
    pub(super) server_header: HeaderValue,
    pub(super) host_header: HeaderValue,
    pub(super) backend_api_key: Option<HeaderValue>,
    pub(super) trusted_proxies: Vec<IpNet>,
    pub(super) max_body: u64,
    pub(super) backend_timeout: Duration,
    pub(super) metrics: Arc<Metrics>,
    pub(super) access_log: AccessLog,
    pub(super) labels: Labels,
    /// Remote operations, once started ([`State::start_commands`]); a
    /// reloaded state inherits them.
    pub(super) commands: std::sync::OnceLock<Arc<crate::commands::Commands>>,
    /// The configuration this state was built from.
    pub config: Config,
}

/// Route labels for requests that match no configured route.
pub(super) struct Labels {
    pub(super) unmatched: RouteName,
    pub(super) login: RouteName,
    pub(super) logout: RouteName,
    pub(super) manage: RouteName,
    /// `/__runner__/…` (runners).
    pub(super) runner: RouteName,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("routes", &self.router.routes().len())
            .field("api_keys", &self.api_keys.len())
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

impl State {
    /// Builds the serving state; fails with every route problem found.
    pub fn new(config: Config) -> Result<Arc<State>, Vec<String>> {
        State::build(config, None).map(|(state, _)| state)
    }

    /// Builds the state for a new configuration, keeping what must survive a
    /// reload: the session cache, and the backend pool while the backend is
    /// unchanged. Returns the settings that only take effect after a restart.
    pub fn reload(&self, config: Config) -> Result<(Arc<State>, Vec<String>), Vec<String>> {
        State::build(config, Some(self))
    }

    fn build(
        config: Config,
        previous: Option<&State>,
    ) -> Result<(Arc<State>, Vec<String>), Vec<String>> {
        let router = Router::new(&config.routes)?;
        let keyring = match &config.crypto {
            Some(c) => Some(
                Keyring::new(c.active_key, &c.keys)
                    .ok_or_else(|| vec!["crypto: active key missing".to_owned()])?,
            ),
            None => None,
        };
        let backend_api_key = config.backend.api_key.as_ref().and_then(|k| {
            let mut v = HeaderValue::from_bytes(k.expose()).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        let b = &config.backend;
        let mut restart_needed = Vec::new();
        let same_backend = previous.is_some_and(|p| {
            let o = &p.config.backend;
            o.address == b.address
                && o.connect_timeout == b.connect_timeout
                && o.max_connections == b.max_connections
                && o.max_idle == b.max_idle
                // https:// backends get a fresh pool on reload: the CA or
                // client certificate files may have changed.
                && o.tls.is_none()
                && b.tls.is_none()
        });
        let upstream = match previous {
            Some(p) if same_backend => Arc::clone(&p.upstream),
            _ => Upstream::new(
                b.address.clone(),
                b.tls.clone(),
                b.connect_timeout,
                b.max_connections,
                b.max_idle,
            ),
        };
        let uploads = match previous {
            Some(p) if same_backend => Arc::clone(&p.uploads),
            _ => Arc::new(tokio::sync::Semaphore::new((b.max_connections / 2).max(1))),
        };
        let limits = &config.limits;
        let read_ahead = match previous {
            Some(p)
                if p.config.limits.response_buffer == limits.response_buffer
                    && p.config.limits.response_buffer_total == limits.response_buffer_total =>
            {
                p.read_ahead.clone()
            }
            _ => ReadAhead::new(limits.response_buffer, limits.response_buffer_total).map(Arc::new),
        };
        let metrics = match previous {
            Some(p) => Arc::clone(&p.metrics),
            None => Metrics::with_cluster(config.cluster.is_some()),
        };
        let access_log = match previous {
            Some(p) => {
                if p.config.server.access_log != config.server.access_log {
                    restart_needed.push("server.access_log".to_owned());
                }
                p.access_log.clone()
            }
            None => AccessLog::start(&config.server.access_log, Arc::clone(&metrics))
                .map_err(|e| vec![format!("server.access_log: {e}")])?,
        };
        let sessions = match previous {
            Some(p) => {
                let (o, n) = (&p.config.sessions, &config.sessions);
                if (o.max_entries, o.max_ttl, o.negative_ttl, o.stale_if_error)
                    != (n.max_entries, n.max_ttl, n.negative_ttl, n.stale_if_error)
                {
                    restart_needed.push("sessions cache settings (max_entries, max_ttl, negative_ttl, stale_if_error)".to_owned());
                }
                Arc::clone(&p.sessions)
            }
            None => match &config.cluster {
                None => Arc::new(Sessions::with_counters(
                    config.sessions.clone(),
                    metrics.session_hits.clone(),
                    metrics.session_misses.clone(),
                )),
                Some(c) => Arc::new(Sessions::with_cluster(
                    config.sessions.clone(),
                    metrics.session_hits.clone(),
                    metrics.session_misses.clone(),
                    Arc::new(
                        crate::cluster::Cluster::new(c.clone(), b.timeout, metrics.cluster.clone())
                            .map_err(|e| vec![e])?,
                    ),
                )),
            },
        };
        if let Some(p) = previous {
            if p.config.cluster != config.cluster {
                restart_needed.push("[cluster]".to_owned());
            }
        }
        if let Some(p) = previous {
            let (o, n) = (&p.config, &config);
            if o.server.listen != n.server.listen {
                restart_needed.push("server.listen".to_owned());
            }
            if o.server.tls != n.server.tls {
                // The files themselves are watched; their paths are read at start.
                restart_needed.push("server.tls".to_owned());
            }
            if o.server.admin_listen != n.server.admin_listen {
                restart_needed.push("server.admin_listen".to_owned());
            }
            if o.limits != n.limits {
                restart_needed.push("[limits]".to_owned());
            }
        }
        let api_keys = config
            .api_keys
            .iter()
            .map(|k| DeviceKey {
                name: Arc::from(k.name.as_str()),
                header_value: k.header_value.clone(),
                matcher: k.matcher.clone(),
            })
            .collect();
        let rate_limits = match previous {
            Some(p) if p.config.rate_limits == config.rate_limits => Arc::clone(&p.rate_limits),
            _ => Arc::new(RateLimiters::new(&config.rate_limits)),
        };
        if let Some(cluster) = sessions.cluster() {
            share_limits(cluster, &rate_limits, &router);
        }
        if let Some(p) = previous {
            // Remote operations keep running jobs across a reload; operators
            // and most of [commands] apply to the next request.
            match (p.commands.get(), &config.commands) {
                (Some(running), Some(new)) => {
                    restart_needed.extend(running.reload(new, &config.operators));
                }
                (Some(running), None) => {
                    // Turning them off needs a restart; the new (maybe
                    // empty) operator list applies at once.
                    running.set_operators(&config.operators);
                    restart_needed.push("[commands] (removed)".to_owned());
                }
                (None, Some(_)) => restart_needed.push("[commands] (added)".to_owned()),
                (None, None) => {}
            }
        }
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let state = Arc::new(State {
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            router,
            api_keys,
            rate_limits,
            login_salt: match (previous, sessions.cluster()) {
                (Some(p), _) => p.login_salt,
                (None, Some(cluster)) => cluster.login_salt(),
                (None, None) => fastrand::u64(..),
            },
            sessions,
            upstream,
            uploads,
            read_ahead,
            keyring,
            error_type: config.server.error_type.clone(),
            server_header: config.server.server_header.clone(),
            host_header: b.host_header.clone(),
            backend_api_key,
            trusted_proxies: config.server.trusted_proxies.clone(),
            max_body: config.server.max_body,
            backend_timeout: b.timeout,
            metrics,
            access_log,
            labels: Labels {
                unmatched: RouteName::fixed("unmatched"),
                login: RouteName::fixed("/login"),
                logout: RouteName::fixed("/logout"),
                manage: RouteName::fixed("/__manage__"),
                runner: RouteName::fixed("/__runner__"),
            },
            commands: match previous.and_then(|p| p.commands.get()) {
                Some(c) => {
                    c.update_runners(&config.runners);
                    std::sync::OnceLock::from(Arc::clone(c))
                }
                None => std::sync::OnceLock::new(),
            },
            config,
        });
        Ok((state, restart_needed))
    }

    /// The session store (for metrics and tests).
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Bytes of backend answers read ahead of devices now.
    pub fn read_ahead_bytes(&self) -> usize {
        self.read_ahead.as_ref().map_or(0, |r| r.buffered())
    }

    /// The metrics (for the admin listener).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Starts remote operations when `[commands]` is configured and they
    /// are not running yet (opens the audit log and job store, recovers jobs
    /// interrupted by a crash, starts the scheduler).
    pub async fn start_commands(&self) -> Result<(), String> {
        let Some(cfg) = &self.config.commands else {
            return Ok(());
        };
        if self.commands.get().is_some() {
            return Ok(());
        }
        let commands = crate::commands::Commands::start(
            cfg,
            &self.config.operators,
            &self.config.runners,
            &self.error_type,
            self.sessions.cluster().cloned(),
        )
        .await?;
        let _ = self.commands.set(commands);
        Ok(())
    }

    /// Remote operations, if configured and started.
    pub fn commands(&self) -> Option<&Arc<crate::commands::Commands>> {
        self.commands.get()
    }

    /// The router (for `portcullis check`).
    pub fn router(&self) -> &Router {
        &self.router
    }
}

/// A device API key as the request path uses it.
pub(super) struct DeviceKey {
    pub(super) name: Arc<str>,
    pub(super) header_value: HeaderValue,
    pub(super) matcher: Matcher,
}

/// Cluster mode: every rate limit holds for the whole cluster.
fn share_limits(cluster: &Arc<crate::cluster::Cluster>, limits: &RateLimiters, router: &Router) {
    if let Some(l) = &limits.per_api_key {
        l.share(cluster, "api_key");
    }
    if let Some(l) = &limits.per_client_ip {
        l.share(cluster, "client_ip");
    }
    if let Some(l) = &limits.login {
        l.share(cluster, "login");
    }
    for route in router.routes() {
        if let Some(l) = &route.rate_limit {
            l.share(cluster, &format!("route {}", route.config.path));
        }
    }
}
