//! Replication over HTTP: the receiver (`POST /_matrix/identity/replicate/v1/push` on the
//! mutual-TLS listener) and the status page on the internal API.
//!
//! The receiver identifies the pushing peer by its verified client certificate *before*
//! reading the body (a stranger is refused without costing the node memory), reads at most
//! [`MAX_PUSH_BYTES`], checks every signature in the batch with that peer's key and every
//! value as the internal API would (on a blocking thread when the push is large: it is CPU
//! work), refuses rows from too far in the future, and hands the whole batch to the
//! association store, which applies it all or nothing.
//!
//! `GET /_matrix/identity/replicate/v1/associations` on the same listener answers a peer
//! rebuilding its database (`crate::rebuild`) with what this node holds of an origin.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix_web::dev::Extensions;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use serde_json::value::RawValue;
use serde_json::{json, Map};

use super::error::ApiError;
use super::extract::Args;
use super::{resource, AppState};
use crate::actors::peers::{ActivePeer, ActivePeers, HeldReader, Refusal};
use crate::actors::store::{ApplyReplicated, StoreQueue};
use crate::crypto::NodeSigningKey;
use crate::mesh::peers::{HELD_PATH, PUSH_PATH};
use crate::mesh::tls::certificate_names;
use crate::mesh::verify::{verify_batch, Refused, Rules};
use crate::mesh::wire::{HeldMark, HeldPage, PushAccepted};
use crate::types::ServerName;

/// Largest push body read. Our batches of 1,000 are ~350 KB (~800 KB with the longest
/// addresses and Matrix IDs); Sydent's are 100 associations. Nothing a peer really sends
/// comes near it, and a push is only read once its sender is known to be a peer.
pub const MAX_PUSH_BYTES: usize = 2 * 1024 * 1024;

/// A push body up to this size (a few associations, ~400 bytes each) is verified on the
/// listener's own thread: well under a millisecond of work, which handing to a blocking thread
/// and back makes later by two thread wake-ups (measured: under load, with 20 nodes, that
/// doubled the replication lag). Larger ones (a peer catching up) go to a blocking thread.
const INLINE_VERIFY_BYTES: usize = 4096;

/// Connections the replication listener holds at once: each peer needs one or two (its push
/// queue and its hello); the rest wait in the accept backlog.
pub const MAX_CONNECTIONS: usize = 64;

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
    /// Where verified pushes are queued for the store's next commit.
    pub store: StoreQueue,
    /// `[http] replication.max_clock_skew`, in milliseconds.
    pub max_clock_skew_ms: i64,
    /// This node's clock (a parameter so tests of the skew rule can fix time).
    pub now_ms: fn() -> i64,
    /// This node's name and key: received bindings are countersigned once, on arrival.
    pub own_name: ServerName,
    pub signing_key: NodeSigningKey,
    /// What a peer rebuilding its database reads back from us.
    pub held: HeldReader,
}

pub fn configure_receiver(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(&format!("/{PUSH_PATH}")).route(web::post().to(push)))
        .service(resource(&format!("/{HELD_PATH}")).route(web::get().to(held)));
}

pub fn configure_status(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/_matrix/identity/internal/replication").route(web::get().to(status)))
        .service(resource("/_matrix/identity/internal/status").route(web::get().to(status_page)));
}

/// The live mesh status page: one HTML page, no external assets, that reads the JSON below
/// once a second (this node and every peer: state, backlog, last success and error, what the
/// peer pushed to us).
const STATUS_PAGE: &str = include_str!("mesh_status.html");

/// GET /_matrix/identity/internal/status: the live mesh status page.
async fn status_page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        // Everything is inline: nothing else may load (nor frame it).
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; frame-ancestors 'none'",
        ))
        .body(STATUS_PAGE)
}

/// The active peer a connection's client certificate names, or 403 `M_UNKNOWN_PEER`.
fn pushing_peer(req: &HttpRequest, peers: &ActivePeers) -> Result<ActivePeer, ApiError> {
    let names = req
        .conn_data::<PeerIdentity>()
        .map(|p| p.0.clone())
        .unwrap_or_default();
    names.iter().find_map(|n| peers.get(n)).ok_or_else(|| {
        log::warn!(
            "replication: refused a push from a certificate naming {names:?}: not an active peer"
        );
        ApiError::UnknownPeer(format!(
            "This peer is not known to this server: {}",
            names.first().map(String::as_str).unwrap_or("(no name)")
        ))
    })
}

/// POST /_matrix/identity/replicate/v1/push `{"sgAssocs": {...}}` (replication listener only)
///
/// From an active peer (by its client certificate, checked before the body is read): every
/// association verified with that peer's key, then applied all or nothing. 200
/// `{"success": true}`; 403 `M_UNKNOWN_PEER`; 413 `M_TOO_LARGE`; 400 `M_VERIFICATION_FAILED`
/// or `M_INVALID_PARAM` with `failed_ids`; 400 `M_BAD_JSON`; 409 `M_ORIGIN_IDS_RESTARTED`.
async fn push(
    req: HttpRequest,
    state: web::Data<ReplicationState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let peer = pushing_peer(&req, &state.peers)?;
    if req
        .get_header::<actix_web::http::header::ContentLength>()
        .is_some_and(|len| len.0 > MAX_PUSH_BYTES)
    {
        return Err(ApiError::BodyTooLarge);
    }
    let body = payload
        .to_bytes_limited(MAX_PUSH_BYTES)
        .await
        .map_err(|_| ApiError::BodyTooLarge)?
        .map_err(|e| ApiError::BadJson(format!("cannot read the push body: {e}")))?;
    let inbound = Arc::clone(&peer.inbound);
    let result = receive(&state, &peer, body).await;
    match &result {
        Ok(count) => {
            inbound.received.fetch_add(*count as u64, Ordering::Relaxed);
            inbound
                .last_received_ts
                .store((state.now_ms)(), Ordering::Relaxed);
            inbound.set_refusal(None);
        }
        Err(e) => inbound.set_refusal(Some(Refusal {
            ts: (state.now_ms)(),
            errcode: e.errcode(),
            error: e.to_string(),
        })),
    }
    // The peer is up: if our pusher to it is backing off, retry now.
    peer.wake.notify_one();
    result.map(|_| HttpResponse::Ok().json(PushAccepted { success: true }))
}

/// Verifies and applies one push body from `peer`; answers how many associations it held.
async fn receive(
    state: &ReplicationState,
    peer: &ActivePeer,
    body: web::Bytes,
) -> Result<usize, ApiError> {
    let origin = peer.peer.server_name.clone();
    let key = peer.peer.verify_key;
    let rules = Rules {
        not_after: (state.now_ms)().saturating_add(state.max_clock_skew_ms),
        skew_secs: state.max_clock_skew_ms / 1000,
        only_origin_signatures: false,
        countersign: Some((state.own_name.clone(), state.signing_key.clone())),
    };
    let items = if body.len() <= INLINE_VERIFY_BYTES {
        verify_batch(&origin, &key, &body, &rules)
    } else {
        let origin = origin.clone();
        web::block(move || verify_batch(&origin, &key, &body, &rules))
            .await
            .map_err(|e| ApiError::Internal(format!("verification thread: {e}")))?
    }
    .map_err(refusal)
    .inspect_err(|e| log::warn!("replication: refused a push from {origin}: {e}"))?;
    let count = items.len();
    if count > 0 {
        let new = state
            .store
            .apply_replicated(ApplyReplicated {
                origin: origin.clone(),
                items,
            })
            .await
            .inspect_err(|e| log::error!("replication: refused a push from {origin}: {e}"))?;
        log::debug!("replication: {count} associations from {origin}, {new} new");
    }
    Ok(count)
}

/// Rows a page of [`held`] answers unless asked for fewer (~2 MB).
pub const HELD_PAGE_ROWS: usize = 5_000;
/// The most rows a page of [`held`] answers.
pub const HELD_MAX_ROWS: usize = 10_000;

/// GET /_matrix/identity/replicate/v1/associations?origin=&after=&limit= (replication
/// listener only; sydent-rs's own)
///
/// What this node holds of `origin`'s bindings (default: the calling peer's), for a peer
/// rebuilding its database from the mesh: `{"origin", "mark": {"origin_id", "ts"} | null,
/// "sgAssocs": {"<originId>": <signed association>, …}, "next_after": <id> | null}`, the
/// bindings after origin id `after` (default 0), at most `limit` (default
/// [`HELD_PAGE_ROWS`], at most [`HELD_MAX_ROWS`]; 0: only the mark) in id order. `mark` is
/// how far the origin has reached this node (for this node itself, its newest local id);
/// `next_after` is the `after` of the next page, `null` on the last. Only an active peer
/// (by its client certificate) may ask: 403 `M_UNKNOWN_PEER` otherwise. Everything it can
/// read it was, or will be, pushed anyway.
async fn held(
    req: HttpRequest,
    state: web::Data<ReplicationState>,
    args: Args,
) -> Result<HttpResponse, ApiError> {
    let peer = pushing_peer(&req, &state.peers)?;
    let int_arg = |name: &str, default: i64| -> Result<i64, ApiError> {
        match args.0.get(name) {
            None => Ok(default),
            Some(value) => value
                .as_str()
                .and_then(|v| v.parse::<i64>().ok())
                .ok_or_else(|| ApiError::InvalidParam(format!("'{name}' must be an integer"))),
        }
    };
    let origin = match args.0.get("origin") {
        None => peer.peer.server_name.clone(),
        Some(value) => value
            .as_str()
            .and_then(|v| ServerName::parse(v).ok())
            .ok_or_else(|| ApiError::InvalidParam("'origin' must be a server name".into()))?,
    };
    let after = int_arg("after", 0)?;
    let limit = int_arg("limit", HELD_PAGE_ROWS as i64)?;
    let limit = usize::try_from(limit)
        .ok()
        .filter(|l| *l <= HELD_MAX_ROWS)
        .ok_or_else(|| {
            ApiError::InvalidParam(format!("'limit' must be between 0 and {HELD_MAX_ROWS}"))
        })?;
    let held = state
        .held
        .read(origin.clone(), after, limit)
        .await
        .map_err(ApiError::Internal)?;
    log::info!(
        "replication: {} read {} of {origin}'s bindings after {after} from us",
        peer.peer.server_name,
        held.rows.len()
    );
    let next_after = (limit > 0 && held.rows.len() == limit)
        .then(|| held.rows.last().map(|(id, _)| *id))
        .flatten();
    let mut sg_assocs = BTreeMap::new();
    for (id, text) in held.rows {
        let raw = RawValue::from_string(text)
            .map_err(|e| ApiError::Internal(format!("a stored association: {e}")))?;
        sg_assocs.insert(id.to_string(), raw);
    }
    Ok(HttpResponse::Ok().json(HeldPage {
        origin: origin.to_string(),
        mark: held.mark.map(|m| HeldMark {
            origin_id: m.origin_id,
            ts: m.ts,
        }),
        sg_assocs,
        next_after,
    }))
}

/// A refused batch as the pusher sees it.
fn refusal(refused: Refused) -> ApiError {
    let message = refused.to_string();
    match refused {
        Refused::BadJson(e) => ApiError::BadJson(e),
        Refused::VerificationFailed(ids) => ApiError::VerificationFailed(ids),
        Refused::Invalid(ids) | Refused::Future { ids, .. } => {
            ApiError::InvalidAssociations(message, ids)
        }
        Refused::Sign(_) => ApiError::Internal(message),
    }
}

/// GET /_matrix/identity/internal/replication: per peer, where it is and what is pending.
async fn status(state: web::Data<AppState>) -> HttpResponse {
    let local_id = *state.local_id.borrow();
    let Some(peers) = &state.replication else {
        return HttpResponse::Ok().json(json!({
            "enabled": false,
            "reason": "[http] replication.https.certfile is not set",
            "server_name": state.config.general.server_name.as_str(),
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
        // Why the peer's last push was refused, until one is accepted again.
        entry["last_refused"] = json!(active.inbound.refusal());
        out.insert(active.peer.server_name.to_string(), entry);
    }
    HttpResponse::Ok().json(json!({
        "enabled": true,
        "server_name": state.config.general.server_name.as_str(),
        "local_id": local_id,
        "peers": out,
    }))
}
