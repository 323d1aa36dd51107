//! Rate limits (GCRA, via `governor`): per API key, per client address, per
//! route and API key, and login attempts per (client address, login name).
//!
//! Invariants:
//! - A refusal answers 429 with `Retry-After` (whole seconds, at least 1).
//! - IPv6 clients are limited per /64, so one host cannot rotate addresses
//!   within its prefix to escape its limit.
//! - Login names are keyed by a hash, never stored in clear.
//! - Key state is bounded: idle keys are dropped periodically.
//! - In cluster mode ([`Limiter::share`]) a limit holds for the whole
//!   cluster. A request this instance's own (full-rate) limiter admits
//!   spends a cell of the key's [`Lease`]: cells taken from the cluster's
//!   GCRA in Redis in advance, at most [`LEASE`] of the rate, spent here
//!   without a Redis call and forgotten after [`LEASE`] (so nothing is
//!   admitted beyond the cluster's GCRA, shifted by at most [`LEASE`]). The
//!   lease size adapts: it doubles while leases run out before they expire
//!   and halves when they expire unspent, so a busy instance calls Redis
//!   about ten times a second per key and a quiet one wastes little. A
//!   refusal from Redis is remembered until its wait ends. While Redis is
//!   unavailable each instance enforces its share (the rate divided by the
//!   instances last seen). Redis never makes a request wait longer than its
//!   call deadline.

use crate::cluster::Cluster;
use crate::config::Rate;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How long cells leased from the cluster may be spent, and the most of a
/// rate leased at once.
pub const LEASE: Duration = Duration::from_millis(100);

/// Milliseconds since this process first asked.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Cells of one key taken from the cluster in advance (cluster mode).
#[derive(Debug, Default)]
pub struct Lease {
    /// Cells left (may dip below zero when requests race for the last one).
    cells: AtomicI64,
    /// When the cells stop being spendable ([`now_ms`]).
    until_ms: AtomicU64,
    /// Cells to ask for next time.
    want: AtomicU32,
    /// Redis refused until then: refuse here without asking again.
    refused_until_ms: AtomicU64,
}

/// A limit key as bytes stable across instances (hashed before it reaches
/// Redis).
pub trait LimitKey: Hash + Eq + Clone {
    /// Appends the key's bytes to `out`.
    fn key_bytes(&self, out: &mut Vec<u8>);
}

impl LimitKey for Arc<str> {
    fn key_bytes(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

impl LimitKey for IpAddr {
    fn key_bytes(&self, out: &mut Vec<u8>) {
        match self {
            IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
        }
    }
}

impl LimitKey for (IpAddr, u64) {
    fn key_bytes(&self, out: &mut Vec<u8>) {
        self.0.key_bytes(out);
        out.extend_from_slice(&self.1.to_le_bytes());
    }
}

/// What [`Limiter::check`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Decided here: admitted, or refused with the wait.
    Done(Result<(), Duration>),
    /// Admitted here; the cluster decides ([`Limiter::check_cluster`]).
    AskCluster,
}

/// A limit shared with the cluster.
struct Shared {
    cluster: Arc<Cluster>,
    /// What distinguishes this limit's keys from another's in Redis.
    scope: String,
}

/// Checks between sweeps of idle keys.
const SWEEP_EVERY: u64 = 8192;

/// A keyed limiter for one configured rate.
pub struct Limiter<K: Hash + Eq + Clone> {
    inner: DefaultKeyedRateLimiter<K>,
    checks: AtomicU64,
    shared: OnceLock<Shared>,
    leases: DashMap<K, Arc<Lease>>,
    /// The rate it enforces.
    pub rate: Rate,
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for Limiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("rate", &self.rate).finish()
    }
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// A limiter allowing `rate.count` events per `rate.per`, in bursts of up to `rate.count`.
    pub fn new(rate: Rate) -> Limiter<K> {
        let burst = NonZeroU32::new(rate.count).unwrap_or(NonZeroU32::MIN);
        let period = rate.per / rate.count.max(1);
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(burst))
            .allow_burst(burst);
        Limiter {
            inner: RateLimiter::keyed(quota),
            checks: AtomicU64::new(0),
            shared: OnceLock::new(),
            leases: DashMap::new(),
            rate,
        }
    }

    /// Makes this a limit for the whole `cluster` (once; later calls do
    /// nothing). `scope` names the limit (its kind, or its route).
    pub fn share(&self, cluster: &Arc<Cluster>, scope: &str) {
        let _ = self.shared.set(Shared {
            cluster: Arc::clone(cluster),
            scope: scope.to_owned(),
        });
    }

    /// `Ok` when `key` may proceed, else how long until it may (this
    /// instance's view only; see [`Limiter::check`] for cluster mode).
    pub fn check_local(&self, key: &K) -> Result<(), Duration> {
        self.take(key, 1)
    }

    /// Decides what it can without Redis: not shared, this instance's
    /// full-rate limiter refusing, Redis unavailable (then this instance's
    /// share of the rate), a cell left in the key's lease, or a refusal from
    /// Redis still running are decided here; otherwise the cluster decides.
    pub fn check(&self, key: &K) -> Verdict {
        let Some(shared) = self.shared.get() else {
            return Verdict::Done(self.take(key, 1));
        };
        if !shared.cluster.is_up() {
            return Verdict::Done(self.take(key, shared.cluster.instances()));
        }
        if let Err(wait) = self.take(key, 1) {
            return Verdict::Done(Err(wait));
        }
        let now = now_ms();
        let Some(lease) = self.leases.get(key).map(|l| Arc::clone(&l)) else {
            return Verdict::AskCluster;
        };
        let refused = lease.refused_until_ms.load(Ordering::Acquire);
        if now < refused {
            return Verdict::Done(Err(Duration::from_millis(refused - now)));
        }
        if now < lease.until_ms.load(Ordering::Acquire)
            && lease.cells.fetch_sub(1, Ordering::AcqRel) > 0
        {
            return Verdict::Done(Ok(()));
        }
        Verdict::AskCluster
    }

    /// The cluster's decision after [`Verdict::AskCluster`]: one Redis call
    /// within its deadline that also leases cells for the next requests;
    /// when Redis fails, this instance's share.
    pub async fn check_cluster(&self, key: &K) -> Result<(), Duration>
    where
        K: LimitKey,
    {
        let Some(shared) = self.shared.get() else {
            return Ok(());
        };
        let lease = Arc::clone(&self.leases.entry(key.clone()).or_default());
        let now = now_ms();
        let want = lease.want.load(Ordering::Acquire).max(1);
        let next = if now < lease.until_ms.load(Ordering::Acquire) {
            // Spent before it expired: ask for more next time.
            want.saturating_mul(2).min(self.most_leased())
        } else if lease.cells.load(Ordering::Acquire) > 0 {
            // Expired unspent: ask for less.
            (want / 2).max(1)
        } else {
            want
        };
        let mut bytes = Vec::with_capacity(24);
        key.key_bytes(&mut bytes);
        match shared
            .cluster
            .rate_check(&shared.scope, &bytes, self.rate, want)
            .await
        {
            Some(Ok(granted)) => {
                // One cell is this request's.
                lease.cells.store(i64::from(granted) - 1, Ordering::Release);
                lease.until_ms.store(
                    now_ms() + u64::try_from(LEASE.as_millis()).unwrap_or(0),
                    Ordering::Release,
                );
                lease.want.store(next, Ordering::Release);
                Ok(())
            }
            Some(Err(wait)) => {
                let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                lease
                    .refused_until_ms
                    .store(now_ms().saturating_add(ms), Ordering::Release);
                lease.want.store(1, Ordering::Release);
                Err(wait)
            }
            // One cell was taken by `check` already.
            None => self.take(key, shared.cluster.instances().saturating_sub(1)),
        }
    }

    /// The most cells leased at once: [`LEASE`] of the rate (at least 1, at
    /// most the burst).
    fn most_leased(&self) -> u32 {
        let per_ms = self.rate.per.as_millis().max(1);
        let lease_ms = LEASE.as_millis();
        let most = u128::from(self.rate.count) * lease_ms / per_ms;
        u32::try_from(most)
            .unwrap_or(u32::MAX)
            .clamp(1, self.rate.count.max(1))
    }

    /// Takes `cells` of `key`'s allowance here (0: admitted).
    fn take(&self, key: &K, cells: u32) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.inner.retain_recent();
            self.inner.shrink_to_fit();
            let now = now_ms();
            self.leases.retain(|_, l| {
                now < l.until_ms.load(Ordering::Acquire)
                    || now < l.refused_until_ms.load(Ordering::Acquire)
            });
        }
        let Some(n) = NonZeroU32::new(cells) else {
            return Ok(());
        };
        let outcome = if n == NonZeroU32::MIN {
            self.inner.check_key(key)
        } else {
            match self.inner.check_key_n(key, n) {
                Ok(outcome) => outcome.map(|_| ()),
                // More instances than the burst: each admits one per share.
                Err(_) => {
                    return Err(self.rate.per * cells / self.rate.count.max(1));
                }
            }
        };
        outcome
            .map(|_| ())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// `Retry-After` seconds for a wait.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.as_secs() == 0))
}

/// The address a client is limited by: IPv4 as is, IPv6 by its /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let mut seg = v6.segments();
            seg[4..].fill(0);
            IpAddr::V6(seg.into())
        }
    }
}

/// The limiters of `[rate_limits]`.
#[derive(Debug, Default)]
pub struct RateLimiters {
    /// Per API key name.
    pub per_api_key: Option<Limiter<std::sync::Arc<str>>>,
    /// Per client address (/64 for IPv6).
    pub per_client_ip: Option<Limiter<IpAddr>>,
    /// Login attempts per (client address, hash of the login name).
    pub login: Option<Limiter<(IpAddr, u64)>>,
}

impl RateLimiters {
    /// Limiters for the configured rates.
    pub fn new(cfg: &crate::config::RateLimits) -> RateLimiters {
        RateLimiters {
            per_api_key: cfg.per_api_key.map(Limiter::new),
            per_client_ip: cfg.per_client_ip.map(Limiter::new),
            login: cfg.login.map(Limiter::new),
        }
    }
}

/// A keyed hash of a login name (case-insensitive), so names are not kept.
pub fn login_key(name: &str, salt: u64) -> u64 {
    use std::hash::Hasher;
    let mut stable = std::hash::DefaultHasher::new();
    stable.write_u64(salt);
    stable.write(name.trim().to_lowercase().as_bytes());
    stable.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refusal_with_wait() {
        let l = Limiter::new(Rate {
            count: 3,
            per: Duration::from_secs(60),
        });
        for _ in 0..3 {
            assert_eq!(l.check(&1u32), Verdict::Done(Ok(())));
        }
        let wait = l.check_local(&1u32).unwrap_err();
        assert!(
            wait > Duration::from_secs(10) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(l.check_local(&2u32).is_ok(), "keys are independent");
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn ipv6_is_limited_per_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(client_key(v4), v4);
    }

    #[test]
    fn login_keys_fold_case() {
        assert_eq!(
            login_key("Alice@Example.com", 1),
            login_key("alice@example.com ", 1)
        );
        assert_ne!(login_key("alice", 1), login_key("bob", 1));
    }
}
