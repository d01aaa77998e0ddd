//! API discovery: `/versions` and the empty status objects of the v2 and v1 roots.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::{resource, V1_PREFIX, V2_PREFIX};
use crate::config::Config;

/// The spec versions we answer to, as Sydent 2.6 lists them.
const SPEC_VERSIONS: &[&str] = &[
    "r0.1.0", "r0.2.0", "r0.2.1", "r0.3.0", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5",
];

pub fn configure(cfg: &mut web::ServiceConfig, config: &Config) {
    cfg.service(resource("/_matrix/identity/versions").route(web::get().to(versions)))
        .service(resource(V2_PREFIX).route(web::get().to(empty)));
    if config.general.enable_v1_access {
        cfg.service(resource(V1_PREFIX).route(web::get().to(empty)));
    }
}

/// GET /_matrix/identity/versions
async fn versions() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "versions": SPEC_VERSIONS }))
}

/// GET /_matrix/identity/v2 and /_matrix/identity/api/v1: "this is an identity server".
async fn empty() -> HttpResponse {
    HttpResponse::Ok().json(json!({}))
}
