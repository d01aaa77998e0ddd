//! Prometheus metrics (`[general] prometheus_port` and `prometheus_addr`, both needed, as
//! Sydent), served as `GET /metrics` in the OpenMetrics text format by the `prometheus-client`
//! crate's encoder.
//!
//! Sydent's own names are kept so existing dashboards keep working:
//! `sydent_http_received_requests_total{servlet,method}` (the servlet is Sydent's class name
//! for the endpoint) and `sydent_emails_sent_total`. Ours are named `sydent_rs_*`.
//!
//! Nothing here adds a lock to a request: every handle a request touches (its route's counter
//! per method, its endpoint group's latency histogram) is made at start and kept in an
//! immutable table; counting is an atomic add. Histograms are [`AtomicHistogram`]s (the
//! crate's own takes a mutex on every observation). What lives elsewhere (the lookup index's
//! size, each peer's push queue, the upstream's counters) is read when Prometheus scrapes,
//! by the collector in `http/metrics.rs` (it reads the actors' shared state; this module
//! stays below them, so the actors can count into it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Request latency buckets (seconds): lookups answer in tens of microseconds, a validation
/// mail takes a round trip to the SMTP server.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Replication lag buckets (seconds): from a bind's commit to the peer's acknowledgement.
pub const LAG_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
];

/// A histogram whose observations are atomic adds: a bucket count each, the count, the sum
/// (as `f64` bits, added by compare-and-swap).
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    bounds: &'static [f64],
    /// One per bound, then `+Inf`; not cumulative (the encoder adds them up).
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_bits: AtomicU64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self(Arc::new(HistogramInner {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }))
    }

    pub fn observe(&self, value: f64) {
        let inner = &self.0;
        let at = inner.bounds.partition_point(|bound| *bound < value);
        inner.buckets[at].fetch_add(1, Ordering::Relaxed);
        inner.count.fetch_add(1, Ordering::Relaxed);
        let _ = inner
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    pub fn observe_duration(&self, elapsed: Duration) {
        self.observe(elapsed.as_secs_f64());
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &self.0;
        // Per bucket, not cumulative: the encoder adds them up.
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(inner.buckets.iter())
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            f64::from_bits(inner.sum_bits.load(Ordering::Relaxed)),
            inner.count.load(Ordering::Relaxed),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    servlet: &'static str,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

/// The methods counted by name; any other is `other`.
const METHODS: [&str; 5] = ["GET", "POST", "OPTIONS", "PUT", "other"];

/// What one route counts: requests per method, and its group's latency.
#[derive(Clone)]
pub struct RouteMetrics {
    requests: [Counter; METHODS.len()],
    latency: AtomicHistogram,
}

impl RouteMetrics {
    /// Counts a request of `method` that took `elapsed`.
    pub fn record(&self, method: &actix_web::http::Method, elapsed: Duration) {
        let at = METHODS
            .iter()
            .position(|m| *m == method.as_str())
            .unwrap_or(METHODS.len() - 1);
        self.requests[at].inc();
        self.latency.observe_duration(elapsed);
    }
}

/// Every endpoint: its path, Sydent's servlet class name for it, and its latency group.
const ROUTES: &[(&str, &str, &str)] = &[
    ("/_matrix/identity/versions", "VersionsServlet", "status"),
    ("/_matrix/identity/api/v1", "CorsServlet", "status"),
    ("/_matrix/identity/v2", "CorsServlet", "status"),
    ("/_matrix/identity/api/v1/lookup", "LookupServlet", "lookup"),
    (
        "/_matrix/identity/api/v1/bulk_lookup",
        "BulkLookupServlet",
        "lookup",
    ),
    ("/_matrix/identity/v2/lookup", "LookupV2Servlet", "lookup"),
    (
        "/_matrix/identity/v2/hash_details",
        "HashDetailsServlet",
        "lookup",
    ),
    (
        "/_matrix/identity/api/v1/validate/email/requestToken",
        "EmailRequestCodeServlet",
        "validate",
    ),
    (
        "/_matrix/identity/v2/validate/email/requestToken",
        "EmailRequestCodeServlet",
        "validate",
    ),
    (
        "/_matrix/identity/api/v1/validate/email/submitToken",
        "EmailValidateCodeServlet",
        "validate",
    ),
    (
        "/_matrix/identity/v2/validate/email/submitToken",
        "EmailValidateCodeServlet",
        "validate",
    ),
    (
        "/_matrix/identity/api/v1/validate/msisdn/requestToken",
        "MsisdnRequestCodeServlet",
        "validate",
    ),
    (
        "/_matrix/identity/v2/validate/msisdn/requestToken",
        "MsisdnRequestCodeServlet",
        "validate",
    ),
    (
        "/_matrix/identity/api/v1/validate/msisdn/submitToken",
        "MsisdnValidateCodeServlet",
        "validate",
    ),
    (
        "/_matrix/identity/v2/validate/msisdn/submitToken",
        "MsisdnValidateCodeServlet",
        "validate",
    ),
    (
        "/_matrix/identity/api/v1/3pid/getValidated3pid",
        "GetValidated3pidServlet",
        "bind",
    ),
    (
        "/_matrix/identity/v2/3pid/getValidated3pid",
        "GetValidated3pidServlet",
        "bind",
    ),
    (
        "/_matrix/identity/api/v1/3pid/bind",
        "ThreePidBindServlet",
        "bind",
    ),
    (
        "/_matrix/identity/v2/3pid/bind",
        "ThreePidBindServlet",
        "bind",
    ),
    (
        "/_matrix/identity/api/v1/3pid/unbind",
        "ThreePidUnbindServlet",
        "bind",
    ),
    (
        "/_matrix/identity/v2/3pid/unbind",
        "ThreePidUnbindServlet",
        "bind",
    ),
    (
        "/_matrix/identity/api/v1/store-invite",
        "StoreInviteServlet",
        "invite",
    ),
    (
        "/_matrix/identity/v2/store-invite",
        "StoreInviteServlet",
        "invite",
    ),
    (
        "/_matrix/identity/api/v1/sign-ed25519",
        "BlindlySignStuffServlet",
        "invite",
    ),
    (
        "/_matrix/identity/v2/sign-ed25519",
        "BlindlySignStuffServlet",
        "invite",
    ),
    (
        "/_matrix/identity/api/v1/pubkey/ed25519:0",
        "Ed25519Servlet",
        "pubkey",
    ),
    (
        "/_matrix/identity/v2/pubkey/ed25519:0",
        "Ed25519Servlet",
        "pubkey",
    ),
    (
        "/_matrix/identity/api/v1/pubkey/isvalid",
        "PubkeyIsValidServlet",
        "pubkey",
    ),
    (
        "/_matrix/identity/v2/pubkey/isvalid",
        "PubkeyIsValidServlet",
        "pubkey",
    ),
    (
        "/_matrix/identity/api/v1/pubkey/ephemeral/isvalid",
        "EphemeralPubkeyIsValidServlet",
        "pubkey",
    ),
    (
        "/_matrix/identity/v2/pubkey/ephemeral/isvalid",
        "EphemeralPubkeyIsValidServlet",
        "pubkey",
    ),
    ("/_matrix/identity/v2/account", "AccountServlet", "account"),
    (
        "/_matrix/identity/v2/account/register",
        "RegisterServlet",
        "account",
    ),
    (
        "/_matrix/identity/v2/account/logout",
        "LogoutServlet",
        "account",
    ),
    ("/_matrix/identity/v2/terms", "TermsServlet", "account"),
    (
        "/_matrix/identity/internal/bind",
        "AuthenticatedBindThreePidServlet",
        "internal",
    ),
    (
        "/_matrix/identity/internal/unbind",
        "AuthenticatedUnbindThreePidServlet",
        "internal",
    ),
    (
        "/_matrix/identity/replicate/v1/push",
        "ReplicationPushServlet",
        "replication",
    ),
];

/// What a sender (mail, SMS) counts: every attempt, and the failures among them.
#[derive(Debug, Clone)]
pub struct SendCounters {
    pub sent: Counter,
    pub failed: Counter,
}

impl SendCounters {
    pub fn record(&self, ok: bool) {
        self.sent.inc();
        if !ok {
            self.failed.inc();
        }
    }
}

/// What the association store counts as it commits.
#[derive(Debug, Clone)]
pub struct WriteCounters {
    pub binds: Counter,
    pub unbinds: Counter,
}

/// The node's metrics: what requests and actors count, and what a scrape reads.
pub struct Metrics {
    registry: Registry,
    /// Path → index in `route_metrics`.
    routes: HashMap<&'static str, usize>,
    route_metrics: Vec<RouteMetrics>,
    pub emails: SendCounters,
    pub sms: SendCounters,
    pub writes: WriteCounters,
    replication_lag: Family<PeerLabels, AtomicHistogram>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// The metrics, with `sources` read at every scrape.
    pub fn new(sources: impl prometheus_client::collector::Collector) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<GroupLabels, AtomicHistogram>::new_with_constructor(|| {
            AtomicHistogram::new(&LATENCY_BUCKETS)
        });
        let route = |servlet: &'static str, group: &'static str| RouteMetrics {
            requests: METHODS.map(|method| {
                requests
                    .get_or_create(&RequestLabels { servlet, method })
                    .clone()
            }),
            latency: latency.get_or_create(&GroupLabels { group }).clone(),
        };
        let routes = ROUTES
            .iter()
            .enumerate()
            .map(|(i, (path, ..))| (*path, i))
            .collect();
        let mut route_metrics: Vec<RouteMetrics> = ROUTES
            .iter()
            .map(|(_, servlet, group)| route(servlet, group))
            .collect();
        route_metrics.push(route("UnknownEndpoint", "other"));
        registry.register(
            "sydent_http_received_requests",
            "Received requests",
            requests,
        );
        registry.register(
            "sydent_rs_http_request_duration_seconds",
            "Time to answer a request, by endpoint group",
            latency,
        );
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let emails_sent = counter(
            &mut registry,
            "sydent_emails_sent",
            "Number of emails we attempted to send",
        );
        let email_failures = counter(
            &mut registry,
            "sydent_rs_email_failures",
            "Emails the SMTP server did not take",
        );
        let sms_sent = counter(
            &mut registry,
            "sydent_rs_sms_sent",
            "Texts we attempted to send",
        );
        let sms_failures = counter(
            &mut registry,
            "sydent_rs_sms_failures",
            "Texts the SMS gateway did not take",
        );
        let binds = counter(
            &mut registry,
            "sydent_rs_binds",
            "Bindings made on this node",
        );
        let unbinds = counter(
            &mut registry,
            "sydent_rs_unbinds",
            "Unbindings made on this node",
        );
        let replication_lag = Family::<PeerLabels, AtomicHistogram>::new_with_constructor(|| {
            AtomicHistogram::new(&LAG_BUCKETS)
        });
        registry.register(
            "sydent_rs_replication_lag_seconds",
            "From a bind's commit to the peer's acknowledgement of it",
            replication_lag.clone(),
        );
        registry.register_collector(Box::new(sources));
        Self {
            registry,
            routes,
            route_metrics,
            emails: SendCounters {
                sent: emails_sent,
                failed: email_failures,
            },
            sms: SendCounters {
                sent: sms_sent,
                failed: sms_failures,
            },
            writes: WriteCounters { binds, unbinds },
            replication_lag,
        }
    }

    /// Which route a request to `path` counts in (see [`Self::route_metrics`]).
    pub fn route_of(&self, path: &str) -> usize {
        self.routes
            .get(path)
            .copied()
            .unwrap_or(self.route_metrics.len() - 1)
    }

    /// What the route numbered `route` counts (the last: requests to no known endpoint).
    pub fn route_metrics(&self, route: usize) -> &RouteMetrics {
        &self.route_metrics[route.min(self.route_metrics.len() - 1)]
    }

    /// The lag histogram of pushes to `peer` (made once per peer, kept by its pusher).
    pub fn replication_lag(&self, peer: &str) -> AtomicHistogram {
        self.replication_lag
            .get_or_create(&PeerLabels {
                peer: peer.to_string(),
            })
            .clone()
    }

    /// The whole exposition, OpenMetrics text.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// A gauge written at scrape time: `name`, `help`, one value per label set.
pub fn encode_gauges<S: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (S, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in values {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter read at scrape time (a total kept elsewhere).
pub fn encode_counters<S: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (S, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in values {
        prometheus_client::metrics::counter::ConstCounter::new(value)
            .encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_histogram_encodes_cumulative_buckets() {
        let histogram = AtomicHistogram::new(&[0.1, 1.0]);
        for value in [0.05, 0.1, 0.5, 3.0] {
            histogram.observe(value);
        }
        let mut registry = Registry::default();
        registry.register("h", "a histogram", histogram);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        for line in [
            "h_sum 3.65",
            "h_count 4",
            "h_bucket{le=\"0.1\"} 2",
            "h_bucket{le=\"1.0\"} 3",
            "h_bucket{le=\"+Inf\"} 4",
        ] {
            assert!(out.contains(line), "{line} in {out}");
        }
    }
}
