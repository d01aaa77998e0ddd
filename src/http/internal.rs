//! Sydent's internal API, for trusted tools on the operator's network (no authentication;
//! it listens on `::1` by default): bind and unbind without a validation session.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::error::ApiError;
use super::extract::Args;
use super::{resource, AppState};
use crate::actors::store::{Bind, Unbind};
use crate::types::{Mxid, Threepid};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/_matrix/identity/internal/bind").route(web::post().to(bind)))
        .service(resource("/_matrix/identity/internal/unbind").route(web::post().to(unbind)))
        .service(resource("/_matrix/identity/internal/onbind").route(web::get().to(onbind)))
        .service(resource("/_matrix/identity/internal/directory").route(web::get().to(directory)))
        .service(
            resource("/_matrix/identity/internal/directory/sync")
                .route(web::post().to(directory_sync)),
        )
        .service(resource("/_matrix/identity/internal/upstream").route(web::get().to(upstream)));
}

/// GET /_matrix/identity/internal/upstream: the upstream identity server (`{"enabled": false}`
/// without `[proxy]`): its URL, whether lookups go to it hashed, requests forwarded, failures,
/// 3PIDs forwarded and answered, last request, last error.
async fn upstream(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let Some(upstream) = state.resolver.upstream() else {
        return Ok(HttpResponse::Ok().json(json!({"enabled": false})));
    };
    let mut body =
        serde_json::to_value(upstream.status()).map_err(|e| ApiError::Internal(e.to_string()))?;
    body["enabled"] = json!(true);
    Ok(HttpResponse::Ok().json(body))
}

/// GET /_matrix/identity/internal/directory: the directory mirror (`{"enabled": false}` without
/// `[ldap]`): last sync, entries mirrored, what the last sync bound and unbound, ambiguous and
/// skipped entries, last error, next sync.
async fn directory(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let Some(directory) = &state.directory else {
        return Ok(HttpResponse::Ok().json(json!({"enabled": false})));
    };
    let status = directory
        .send(crate::actors::directory::GetStatus)
        .await
        .map_err(|e| ApiError::Internal(format!("directory unreachable: {e}")))?;
    let mut body = serde_json::to_value(status).map_err(|e| ApiError::Internal(e.to_string()))?;
    body["enabled"] = json!(true);
    Ok(HttpResponse::Ok().json(body))
}

/// POST /_matrix/identity/internal/directory/sync: sync the mirror now (the answer comes at
/// once; the status shows when it is done).
async fn directory_sync(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let Some(directory) = &state.directory else {
        return Err(ApiError::NotFound("[ldap] is not set".into()));
    };
    directory.do_send(crate::actors::directory::SyncNow);
    Ok(HttpResponse::Ok().json(json!({})))
}

/// GET /_matrix/identity/internal/onbind: the onbind delivery queue (per homeserver: queued,
/// in flight, state, last error, next attempt), deliveries made and given up on.
async fn onbind(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let status = state
        .onbind
        .send(crate::actors::onbind::GetStatus)
        .await
        .map_err(|e| ApiError::Internal(format!("onbind queue unreachable: {e}")))?;
    Ok(HttpResponse::Ok().json(status))
}

fn parse(args: &Args) -> Result<(Threepid, Mxid), ApiError> {
    let [medium, address, mxid] = args.strings(["medium", "address", "mxid"])?;
    Ok((Threepid::parse(medium, address)?, Mxid::parse(mxid)?))
}

/// POST /_matrix/identity/internal/bind `{medium, address, mxid}` → the signed association.
async fn bind(state: web::Data<AppState>, args: Args) -> Result<HttpResponse, ApiError> {
    let (threepid, mxid) = parse(&args)?;
    let signed = state
        .store_queue
        .bind(Bind::new(&state.store_ctx, &state.index, threepid, mxid)?)
        .await?;
    Ok(HttpResponse::Ok()
        .insert_header(actix_web::http::header::ContentType::json())
        .body(signed.to_string()))
}

/// POST /_matrix/identity/internal/unbind `{medium, address, mxid}` → `{}`, also when the 3PID
/// was not bound to that mxid here.
async fn unbind(state: web::Data<AppState>, args: Args) -> Result<HttpResponse, ApiError> {
    let (threepid, mxid) = parse(&args)?;
    state.store.send(Unbind { threepid, mxid }).await??;
    Ok(HttpResponse::Ok().json(json!({})))
}
