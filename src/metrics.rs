//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! One [`Metrics`] lives for the whole process (it survives configuration
//! reloads). Labels never carry a key, a token or a query value: routes are
//! labelled by their configured path template.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::fmt::Write;
use std::sync::{Arc, OnceLock};

/// A route label: the configured path template, or a fixed name such as
/// `/login` or `unmatched`. Cheap to clone (shared). It also keeps the
/// route's latency histograms once first used, so recording a request does
/// not hash the label to find them again.
#[derive(Clone, Debug)]
pub struct RouteName(Arc<RouteLabel>);

#[derive(Debug)]
struct RouteLabel {
    name: Box<str>,
    latency: OnceLock<Histogram>,
    upstream: OnceLock<Histogram>,
    /// The request counters of status 200, by method (see [`MethodLabel`]).
    ok: [OnceLock<Counter>; METHODS],
}

impl RouteName {
    /// A label for `name`.
    pub fn new(name: &str) -> RouteName {
        RouteName(Arc::new(RouteLabel {
            name: name.into(),
            latency: OnceLock::new(),
            upstream: OnceLock::new(),
            ok: Default::default(),
        }))
    }

    /// A label for a fixed name.
    pub fn fixed(name: &'static str) -> RouteName {
        RouteName::new(name)
    }

    /// The label's text.
    pub fn as_str(&self) -> &str {
        &self.0.name
    }
}

impl PartialEq for RouteName {
    fn eq(&self, other: &RouteName) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for RouteName {}

impl std::hash::Hash for RouteName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name.hash(state);
    }
}

impl EncodeLabelValue for RouteName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0.name)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: RouteName,
    method: MethodLabel,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: RouteName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// HTTP method as a label (standard methods only; others are `OTHER`, so a
/// device cannot create label values at will).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct MethodLabel(&'static str);

/// How many method labels there are.
const METHODS: usize = 8;

impl MethodLabel {
    /// The label for `m`.
    pub fn of(m: &http::Method) -> MethodLabel {
        MethodLabel(Self::indexed(m).1)
    }

    /// The label's index (below [`METHODS`]) and text.
    fn indexed(m: &http::Method) -> (usize, &'static str) {
        use http::Method as M;
        match *m {
            M::GET => (0, "GET"),
            M::POST => (1, "POST"),
            M::PUT => (2, "PUT"),
            M::PATCH => (3, "PATCH"),
            M::DELETE => (4, "DELETE"),
            M::HEAD => (5, "HEAD"),
            M::OPTIONS => (6, "OPTIONS"),
            _ => (7, "OTHER"),
        }
    }
}

impl EncodeLabelValue for MethodLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0)
    }
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    upstream_latency: Family<RouteLabels, Histogram>,
    upstream_errors: Family<KindLabels, Counter>,
    rate_limited: Family<KindLabels, Counter>,
    /// Validation-service calls made (one per single-flight group).
    pub validation_calls: Counter,
    /// Session lookups answered from the cache.
    pub session_hits: Counter,
    /// Session lookups that needed the validation service.
    pub session_misses: Counter,
    /// Sessions cached (set when scraped).
    pub session_entries: Gauge,
    /// Device connections open now.
    pub open_connections: Gauge,
    /// Idle HTTP/1.1 device connections parked: only the socket held.
    pub parked_connections: Gauge,
    /// Bytes of backend answers read ahead of devices (set when scraped).
    pub response_buffer_bytes: Gauge,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// Cluster mode's metrics (exported only in cluster mode).
    pub cluster: crate::cluster::ClusterMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~65 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 19))
}

impl Metrics {
    /// A fresh set of metrics, registered under the `portcullis_` prefix.
    pub fn new() -> Arc<Metrics> {
        Metrics::with_cluster(false)
    }

    /// A fresh set of metrics; with `cluster`, cluster mode's too.
    pub fn with_cluster(cluster: bool) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("portcullis");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let upstream_latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let upstream_errors = Family::<KindLabels, Counter>::default();
        let rate_limited = Family::<KindLabels, Counter>::default();
        let m = Metrics {
            validation_calls: Counter::default(),
            session_hits: Counter::default(),
            session_misses: Counter::default(),
            session_entries: Gauge::default(),
            open_connections: Gauge::default(),
            parked_connections: Gauge::default(),
            response_buffer_bytes: Gauge::default(),
            access_log_dropped: Counter::default(),
            cluster: crate::cluster::ClusterMetrics::default(),
            requests: requests.clone(),
            latency: latency.clone(),
            upstream_latency: upstream_latency.clone(),
            upstream_errors: upstream_errors.clone(),
            rate_limited: rate_limited.clone(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by route, method and status",
            requests,
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head, by route",
            latency,
        );
        registry.register(
            "upstream_duration_seconds",
            "Time the backend took to answer, by route",
            upstream_latency,
        );
        registry.register(
            "upstream_errors",
            "Backend failures by kind (connect, timeout, protocol)",
            upstream_errors,
        );
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit, by limit",
            rate_limited,
        );
        registry.register(
            "validation_calls",
            "Calls to the token validation service",
            m.validation_calls.clone(),
        );
        registry.register(
            "session_cache_hits",
            "Session lookups answered from the cache",
            m.session_hits.clone(),
        );
        registry.register(
            "session_cache_misses",
            "Session lookups that needed validation",
            m.session_misses.clone(),
        );
        registry.register(
            "session_cache_entries",
            "Sessions cached",
            m.session_entries.clone(),
        );
        registry.register(
            "open_connections",
            "Device connections open",
            m.open_connections.clone(),
        );
        registry.register(
            "parked_connections",
            "Idle HTTP/1.1 device connections parked (only the socket held)",
            m.parked_connections.clone(),
        );
        registry.register(
            "response_buffer_bytes",
            "Bytes of backend answers read ahead of slow devices",
            m.response_buffer_bytes.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer fell behind",
            m.access_log_dropped.clone(),
        );
        if cluster {
            m.cluster.register(&mut registry);
        }
        Arc::new(Metrics { registry, ..m })
    }

    /// Records one answered request.
    pub fn request(&self, route: &RouteName, method: &http::Method, status: u16, seconds: f64) {
        let (index, name) = MethodLabel::indexed(method);
        let labels = || RequestLabels {
            route: route.clone(),
            method: MethodLabel(name),
            status,
        };
        match route.0.ok.get(index) {
            // The common series is kept by the label: no hashing per request.
            Some(ok) if status == 200 => {
                ok.get_or_init(|| self.requests.get_or_create(&labels()).clone())
                    .inc();
            }
            _ => {
                self.requests.get_or_create(&labels()).inc();
            }
        }
        route
            .0
            .latency
            .get_or_init(|| self.route_histogram(&self.latency, route))
            .observe(seconds);
    }

    /// The series of `family` for `route` (a handle sharing the series).
    fn route_histogram(
        &self,
        family: &Family<RouteLabels, Histogram>,
        route: &RouteName,
    ) -> Histogram {
        family
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .clone()
    }

    /// Records how long the backend took.
    pub fn upstream(&self, route: &RouteName, seconds: f64) {
        route
            .0
            .upstream
            .get_or_init(|| self.route_histogram(&self.upstream_latency, route))
            .observe(seconds);
    }

    /// Counts a backend failure (`connect`, `timeout`, `protocol`).
    pub fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Counts a request refused by the named rate limit.
    pub fn rate_limited(&self, kind: &'static str) {
        self.rate_limited.get_or_create(&KindLabels { kind }).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_metrics() {
        let m = Metrics::new();
        m.request(&RouteName::fixed("/api/x"), &http::Method::GET, 200, 0.001);
        m.upstream_error("connect");
        m.validation_calls.inc();
        let text = m.encode();
        assert!(
            text.contains(
                r#"portcullis_requests_total{route="/api/x",method="GET",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"portcullis_upstream_errors_total{kind="connect"} 1"#));
        assert!(text.contains("portcullis_validation_calls_total 1"));
        assert!(text.contains("portcullis_request_duration_seconds_bucket"));
    }

    #[test]
    fn labels_with_the_same_name_share_their_series() {
        let m = Metrics::new();
        // A reload builds new labels for the same routes.
        for label in [RouteName::new("/api/x"), RouteName::new("/api/x")] {
            for _ in 0..2 {
                m.request(&label, &http::Method::GET, 200, 0.001);
                m.upstream(&label, 0.001);
            }
        }
        let text = m.encode();
        assert!(
            text.contains(r#"portcullis_request_duration_seconds_count{route="/api/x"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"portcullis_requests_total{route="/api/x",method="GET",status="200"} 4"#
            ),
            "{text}"
        );
        m.request(&RouteName::new("/api/x"), &http::Method::GET, 404, 0.001);
        assert!(m
            .encode()
            .contains(r#"portcullis_requests_total{route="/api/x",method="GET",status="404"} 1"#));
        // Both histograms (request and upstream latency) counted all four.
        assert_eq!(
            text.matches(r#"_count{route="/api/x"} 4"#).count(),
            2,
            "{text}"
        );
    }
}
