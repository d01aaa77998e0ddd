//! Replication over HTTP: the receiver (`POST /_matrix/identity/replicate/v1/push` on the
//! mutual-TLS listener) and the status page on the internal API.
//!
//! The receiver identifies the pushing peer by its verified client certificate, checks every
//! signature in the batch with that peer's key (on a blocking thread: it is CPU work), and
//! hands the whole batch to the association store, which applies it all or nothing.

use std::any::Any;
use std::sync::atomic::Ordering;

use actix_web::dev::{Extensions, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::{ErrorHandlerResponse, ErrorHandlers};
use actix_web::ResponseError;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::{resource, AppState};
use crate::actors::peers::ActivePeers;
use crate::actors::store::{ApplyReplicated, AssociationStore, Replicated};
use crate::crypto::verify_json_batch;
use crate::mesh::peers::{Peer, PUSH_PATH};
use crate::mesh::tls::certificate_names;
use crate::mesh::wire::{PushAccepted, PushBody};

/// Largest push accepted: far above our own batches, room for other implementations'.
pub const MAX_PUSH_BYTES: usize = 32 * 1024 * 1024;

/// The names the client certificate of a connection proves, set in `on_connect`.
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub Vec<String>);

/// `HttpServer::on_connect` for the replication listener: records the client certificate's
/// names (the handshake has already verified the chain).
pub fn on_connect(conn: &dyn Any, ext: &mut Extensions) {
    type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
    if let Some(tls) = conn.downcast_ref::<Tls>() {
        let (_, session) = tls.get_ref();
        let names = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| certificate_names(leaf))
            .unwrap_or_default();
        ext.insert(PeerIdentity(names));
    }
}

/// What the replication listener's handlers reach.
pub struct ReplicationState {
    pub peers: ActivePeers,
    pub store: actix::Addr<AssociationStore>,
}

/// actix's own answers on the replication listener (a body over [`MAX_PUSH_BYTES`]) as spec
/// JSON like every other error.
pub fn json_errors<B: 'static>() -> ErrorHandlers<B> {
    ErrorHandlers::new().handler(StatusCode::PAYLOAD_TOO_LARGE, |res: ServiceResponse<B>| {
        let (req, _) = res.into_parts();
        let res = ApiError::BodyTooLarge.error_response();
        Ok(ErrorHandlerResponse::Response(
            ServiceResponse::new(req, res).map_into_right_body(),
        ))
    })
}

pub fn configure_receiver(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(&format!("/{PUSH_PATH}")).route(web::post().to(push)));
}

pub fn configure_status(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/_matrix/identity/internal/replication").route(web::get().to(status)));
}

/// POST /_matrix/identity/replicate/v1/push `{"sgAssocs": {...}}` (replication listener only)
///
/// From an active peer (by its client certificate): every association verified with that
/// peer's key, then applied all or nothing. 200 `{"success": true}`; 403 `M_UNKNOWN_PEER`;
/// 400 `M_VERIFICATION_FAILED` with `failed_ids`; 400 `M_BAD_JSON`.
async fn push(
    req: HttpRequest,
    state: web::Data<ReplicationState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let names = req
        .conn_data::<PeerIdentity>()
        .map(|p| p.0.clone())
        .unwrap_or_default();
    let Some(peer) = names.iter().find_map(|n| state.peers.get(n)) else {
        log::warn!(
            "replication: refused a push from a certificate naming {names:?}: not an active peer"
        );
        return Err(ApiError::UnknownPeer(format!(
            "This peer is not known to this server: {}",
            names.first().map(String::as_str).unwrap_or("(no name)")
        )));
    };
    let origin = peer.peer.server_name.clone();
    let wake = std::sync::Arc::clone(&peer.wake);
    let inbound = std::sync::Arc::clone(&peer.inbound);
    let items = web::block(move || verify_batch(&peer.peer, &body))
        .await
        .map_err(|e| ApiError::Internal(format!("verification thread: {e}")))??;
    let count = items.len();
    if count > 0 {
        let new = state
            .store
            .send(ApplyReplicated {
                origin: origin.clone(),
                items,
            })
            .await??;
        log::debug!("replication: {count} associations from {origin}, {new} new");
    }
    inbound.received.fetch_add(count as u64, Ordering::Relaxed);
    inbound
        .last_received_ts
        .store(crate::now_ms(), Ordering::Relaxed);
    // The peer is up: if our pusher to it is backing off, retry now.
    wake.notify_one();
    Ok(HttpResponse::Ok().json(PushAccepted { success: true }))
}

/// Parses and verifies a push body from `peer`: every association or an error naming the
/// ones that failed. Sorted by origin id.
fn verify_batch(peer: &Peer, body: &[u8]) -> Result<Vec<Replicated>, ApiError> {
    let body: PushBody = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadJson(format!("Not a push body ({{\"sgAssocs\": {{…}}}}): {e}"))
    })?;
    let assocs = &body.sg_assocs;
    // Fields first, then every signature in one batch.
    type Parsed<'a> = (&'a String, Option<(&'a Map<String, Value>, Replicated)>);
    let parsed: Vec<Parsed> = assocs
        .iter()
        .map(|(id, assoc)| (id, parse_one(id, assoc)))
        .collect();
    let objects: Vec<&Map<String, Value>> = parsed
        .iter()
        .filter_map(|(_, p)| p.as_ref().map(|(o, _)| *o))
        .collect();
    let mut verified = verify_json_batch(&objects, &peer.server_name, &peer.verify_key).into_iter();
    let mut items = Vec::with_capacity(assocs.len());
    let mut failed = Vec::new();
    for (id, item) in parsed {
        match item {
            Some((_, item)) if verified.next() == Some(true) => items.push(item),
            _ => failed.push(id.clone()),
        }
    }
    if !failed.is_empty() {
        failed.sort_by_key(|id| id.parse::<i64>().unwrap_or(i64::MAX));
        log::warn!(
            "replication: rejected a batch of {} from {}: {} failed verification",
            assocs.len(),
            peer.server_name,
            failed.len()
        );
        return Err(ApiError::VerificationFailed(failed));
    }
    items.sort_by_key(|item| item.origin_id);
    Ok(items)
}

/// An association's fields, checked (its signature is checked by the caller).
fn parse_one<'a>(id: &str, assoc: &'a Value) -> Option<(&'a Map<String, Value>, Replicated)> {
    let origin_id: i64 = id.parse().ok()?;
    let object: &Map<String, Value> = assoc.as_object()?;
    let medium = object.get("medium")?.as_str()?.to_string();
    let address = object.get("address")?.as_str()?;
    let address = if medium == "email" {
        caseless::default_case_fold_str(address)
    } else {
        address.to_string()
    };
    let int = |key: &str| object.get(key).and_then(Value::as_i64);
    let mxid = match object.get("mxid")? {
        Value::Null => None,
        Value::String(mxid) => Some(mxid.clone()),
        _ => return None,
    };
    let ts = int("ts")?;
    let (not_before, not_after) = match mxid {
        Some(_) => (int("not_before")?, int("not_after")?),
        None => (0, 0),
    };
    let item = Replicated {
        origin_id,
        medium,
        address,
        mxid,
        ts,
        not_before,
        not_after,
        sg_assoc: assoc.to_string(),
    };
    Some((object, item))
}

/// GET /_matrix/identity/internal/replication: per peer, where it is and what is pending.
async fn status(state: web::Data<AppState>) -> HttpResponse {
    let local_id = *state.local_id.borrow();
    let Some(peers) = &state.replication else {
        return HttpResponse::Ok().json(json!({
            "enabled": false,
            "reason": "[http] replication.https.certfile is not set",
            "local_id": local_id,
            "peers": {},
        }));
    };
    let mut out = Map::new();
    for active in peers.all() {
        let status = active
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut entry = serde_json::to_value(&status).unwrap_or_default();
        entry["url"] = json!(active.peer.push_url());
        entry["source"] = json!(active.peer.source.to_string());
        let last_received = active.inbound.last_received_ts.load(Ordering::Relaxed);
        entry["received"] = json!(active.inbound.received.load(Ordering::Relaxed));
        entry["last_received_ts"] = json!((last_received > 0).then_some(last_received));
        out.insert(active.peer.server_name.clone(), entry);
    }
    HttpResponse::Ok().json(json!({
        "enabled": true,
        "local_id": local_id,
        "peers": out,
    }))
}
