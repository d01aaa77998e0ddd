//! The HTTP side of the metrics: the middleware that counts every request of the client,
//! internal and replication APIs (by Sydent's servlet name and method) and times it (by
//! endpoint group), `GET /metrics` on the metrics listener, and [`NodeSources`], what a
//! scrape reads from the rest of the node.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};

use crate::actors::pusher::PushStatus;
use crate::metrics::{encode_counters, encode_gauges, Metrics, PeerLabels};

/// Counts and times a request (an app with `web::Data<Metrics>`; without it, passes through).
pub async fn record(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let Some(metrics) = req.app_data::<web::Data<Metrics>>().cloned() else {
        return next.call(req).await;
    };
    let route = metrics.route_of(req.path());
    let method = req.method().clone();
    let started = Instant::now();
    let response = next.call(req).await;
    metrics
        .route_metrics(route)
        .record(&method, started.elapsed());
    response
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/metrics").route(web::get().to(exposition)));
}

/// GET /metrics: every metric, OpenMetrics text.
async fn exposition(metrics: web::Data<Metrics>) -> HttpResponse {
    match metrics.encode() {
        Ok(body) => HttpResponse::Ok()
            .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
            .body(body),
        Err(e) => {
            log::error!("metrics: cannot encode: {e}");
            HttpResponse::InternalServerError().finish()
        }
    }
}

/// What a scrape reads from the rest of the node: the lookup index's size, each peer's push
/// queue and what it pushed to us, the upstream's counters.
pub struct NodeSources {
    pub index: crate::lookup_index::SharedIndex,
    pub peers: Option<crate::actors::peers::ActivePeers>,
    pub upstream: Option<Arc<crate::upstream::Upstream>>,
}

impl std::fmt::Debug for NodeSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeSources")
    }
}

/// One value per peer, from its push status and what it pushed to us.
fn per_peer<T>(
    peers: &[(PeerLabels, PushStatus, u64)],
    f: &dyn Fn(&PushStatus, u64) -> T,
) -> Vec<(PeerLabels, T)> {
    peers
        .iter()
        .map(|(labels, status, received)| (labels.clone(), f(status, *received)))
        .collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OriginLabels {
    origin: &'static str,
}

impl prometheus_client::collector::Collector for NodeSources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some((local, replicated)) = self.index.read(|index| index.binding_counts()) {
            encode_gauges(
                &mut encoder,
                "sydent_rs_bindings",
                "Bindings in the lookup index, made here (local) or received (replicated)",
                [
                    (OriginLabels { origin: "local" }, local as f64),
                    (
                        OriginLabels {
                            origin: "replicated",
                        },
                        replicated as f64,
                    ),
                ],
            )?;
        }
        if let Some(peers) = &self.peers {
            let now = crate::now_ms();
            let peers: Vec<(PeerLabels, PushStatus, u64)> = peers
                .all()
                .into_iter()
                .map(|active| {
                    let status = active
                        .status
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone();
                    let received = active.inbound.received.load(Ordering::Relaxed);
                    let labels = PeerLabels {
                        peer: active.peer.server_name.to_string(),
                    };
                    (labels, status, received)
                })
                .collect();
            let each = |f: &dyn Fn(&PushStatus, u64) -> f64| per_peer(&peers, f);
            encode_gauges(
                &mut encoder,
                "sydent_rs_peer_backlog",
                "Local associations not yet acknowledged by the peer",
                each(&|s, _| s.backlog as f64),
            )?;
            encode_gauges(
                &mut encoder,
                "sydent_rs_peer_cursor",
                "The last local association id the peer acknowledged",
                each(&|s, _| s.cursor as f64),
            )?;
            encode_gauges(
                &mut encoder,
                "sydent_rs_peer_seconds_since_success",
                "Seconds since the last push the peer acknowledged (-1: none yet)",
                each(&|s, _| {
                    s.last_success_ts
                        .map_or(-1.0, |ts| (now - ts).max(0) as f64 / 1000.0)
                }),
            )?;
            let counts = |f: &dyn Fn(&PushStatus, u64) -> u64| per_peer(&peers, f);
            encode_counters(
                &mut encoder,
                "sydent_rs_peer_pushed",
                "Associations pushed to the peer and acknowledged",
                counts(&|s, _| s.pushed),
            )?;
            encode_counters(
                &mut encoder,
                "sydent_rs_peer_push_errors",
                "Pushes to the peer that failed",
                counts(&|s, _| s.errors),
            )?;
            encode_counters(
                &mut encoder,
                "sydent_rs_peer_received",
                "Associations the peer pushed to us and we accepted",
                counts(&|_, received| received),
            )?;
        }
        if let Some(upstream) = &self.upstream {
            let status = upstream.status();
            for (name, help, value) in [
                (
                    "sydent_rs_upstream_requests",
                    "Lookups forwarded to the upstream",
                    status.requests,
                ),
                (
                    "sydent_rs_upstream_failures",
                    "Forwarded lookups the upstream did not answer",
                    status.failures,
                ),
                (
                    "sydent_rs_upstream_threepids_forwarded",
                    "3PIDs forwarded to the upstream",
                    status.threepids_forwarded,
                ),
                (
                    "sydent_rs_upstream_threepids_answered",
                    "3PIDs the upstream answered",
                    status.threepids_answered,
                ),
            ] {
                encode_counters(
                    &mut encoder,
                    name,
                    help,
                    [(Vec::<(String, String)>::new(), value)],
                )?;
            }
        }
        Ok(())
    }
}
