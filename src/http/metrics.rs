//! The HTTP side of the metrics: the middleware that counts every request of the client,
//! internal and replication APIs (by Sydent's servlet name and method) and times it (by
//! endpoint group), and `GET /metrics` on the metrics listener.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};

use crate::metrics::Metrics;

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
