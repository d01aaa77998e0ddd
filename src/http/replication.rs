//! Replication over HTTP: the receiver (`POST /_matrix/identity/replicate/v1/push` on the
//! mutual-TLS listener) and the status page on the internal API.
//!
//! The receiver identifies the pushing peer by its verified client certificate *before*
//! reading the body (a stranger is refused without costing the node memory), reads at most
//! [`MAX_PUSH_BYTES`], checks every signature in the batch with that peer's key and every
//! value as the internal API would (on a blocking thread when the push is large: it is CPU
//! work), refuses rows from too far in the future, and hands the whole batch to the
//! association store, which applies it all or nothing.

use std::any::Any;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix_web::dev::Extensions;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::{resource, AppState};
use crate::actors::peers::{ActivePeer, ActivePeers, Refusal};
use crate::actors::store::{ApplyReplicated, Replicated, StoreQueue};
use crate::crypto::{sign_json, verify_json_batch, NodeSigningKey};
use crate::mesh::peers::{Peer, PUSH_PATH};
use crate::mesh::tls::certificate_names;
use crate::mesh::wire::{PushAccepted, PushBody};
use crate::types::{Mxid, ServerName, Threepid};

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
}

pub fn configure_receiver(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(&format!("/{PUSH_PATH}")).route(web::post().to(push)));
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
    let checked_peer = peer.peer.clone();
    let rules = Rules {
        not_after: (state.now_ms)().saturating_add(state.max_clock_skew_ms),
        skew_secs: state.max_clock_skew_ms / 1000,
        own_name: state.own_name.clone(),
        signing_key: state.signing_key.clone(),
    };
    let items = if body.len() <= INLINE_VERIFY_BYTES {
        verify_batch(&checked_peer, &body, &rules)
    } else {
        web::block(move || verify_batch(&checked_peer, &body, &rules))
            .await
            .map_err(|e| ApiError::Internal(format!("verification thread: {e}")))?
    }
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

/// What a push is checked against besides the peer's key, and how it is countersigned.
struct Rules {
    /// Associations whose `ts` is after this are refused (the peer retries them once they are
    /// no longer in the future).
    not_after: i64,
    skew_secs: i64,
    own_name: ServerName,
    signing_key: NodeSigningKey,
}

/// Parses and verifies a push body from `peer`: every association, countersigned by this node
/// (once, here, rather than on every lookup), or an error naming the ones that failed. Sorted
/// by origin id.
fn verify_batch(peer: &Peer, body: &[u8], rules: &Rules) -> Result<Vec<Replicated>, ApiError> {
    let body: PushBody = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadJson(format!("Not a push body ({{\"sgAssocs\": {{…}}}}): {e}"))
    })?;
    let assocs = &body.sg_assocs;
    // Fields first, then every signature in one batch.
    type Parsed<'a> = (&'a String, Option<(&'a Map<String, Value>, Fields)>);
    let parsed: Vec<Parsed> = assocs
        .iter()
        .map(|(id, assoc)| (id, parse_one(id, assoc)))
        .collect();
    let objects: Vec<&Map<String, Value>> = parsed
        .iter()
        .filter_map(|(_, p)| p.as_ref().map(|(o, _)| *o))
        .collect();
    let mut verified = verify_json_batch(&objects, &peer.server_name, &peer.verify_key).into_iter();
    let mut checked = Vec::with_capacity(assocs.len());
    let mut failed = Vec::new();
    for (id, item) in parsed {
        match item {
            Some((object, fields)) if verified.next() == Some(true) => {
                checked.push((id, object, fields))
            }
            _ => failed.push(id.clone()),
        }
    }
    let sort_ids =
        |ids: &mut Vec<String>| ids.sort_by_key(|id| id.parse::<i64>().unwrap_or(i64::MAX));
    if !failed.is_empty() {
        sort_ids(&mut failed);
        log::warn!(
            "replication: rejected a batch of {} from {}: {} failed verification",
            assocs.len(),
            peer.server_name,
            failed.len()
        );
        return Err(ApiError::VerificationFailed(failed));
    }
    // Signed by the peer, but values this node would not accept from its own clients.
    let (mut items, mut invalid, mut future) =
        (Vec::with_capacity(checked.len()), Vec::new(), Vec::new());
    for (id, object, fields) in checked {
        match fields.validate() {
            Err(_) => invalid.push(id.clone()),
            Ok(item) if item.ts > rules.not_after => future.push(id.clone()),
            Ok(item) if item.mxid.is_none() => items.push(item),
            Ok(item) => {
                let mut object = object.clone();
                sign_json(&mut object, &rules.own_name, &rules.signing_key)
                    .map_err(|e| ApiError::Internal(format!("cannot countersign: {e}")))?;
                items.push(Replicated {
                    sg_assoc: Value::Object(object).to_string(),
                    ..item
                });
            }
        }
    }
    if !invalid.is_empty() {
        sort_ids(&mut invalid);
        return Err(ApiError::InvalidAssociations(
            "One or more associations hold an invalid medium, address or Matrix ID".into(),
            invalid,
        ));
    }
    if !future.is_empty() {
        sort_ids(&mut future);
        return Err(ApiError::InvalidAssociations(
            format!(
                "The ts of one or more associations is more than {} s ahead of this \
                 server's clock (check the clocks; they are accepted once they are not)",
                rules.skew_secs
            ),
            future,
        ));
    }
    items.sort_by_key(|item| item.origin_id);
    Ok(items)
}

/// An association's fields as pushed, before their values are checked.
struct Fields {
    origin_id: i64,
    medium: String,
    address: String,
    mxid: Option<String>,
    ts: i64,
    not_before: i64,
    not_after: i64,
    sg_assoc: String,
}

impl Fields {
    /// Checks the 3PID and Matrix ID as the internal API does, normalising the address.
    fn validate(self) -> Result<Replicated, crate::types::InvalidValue> {
        let threepid = Threepid::parse(&self.medium, &self.address)?;
        if let Some(mxid) = &self.mxid {
            Mxid::parse(mxid)?;
        }
        Ok(Replicated {
            origin_id: self.origin_id,
            medium: self.medium,
            address: threepid.address,
            mxid: self.mxid,
            ts: self.ts,
            not_before: self.not_before,
            not_after: self.not_after,
            sg_assoc: self.sg_assoc,
        })
    }
}

/// An association's fields, present and of the right types (their values and the signature
/// are checked by the caller).
fn parse_one<'a>(id: &str, assoc: &'a Value) -> Option<(&'a Map<String, Value>, Fields)> {
    let origin_id: i64 = id.parse().ok()?;
    let object: &Map<String, Value> = assoc.as_object()?;
    let medium = object.get("medium")?.as_str()?.to_string();
    let address = object.get("address")?.as_str()?.to_string();
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
    let fields = Fields {
        origin_id,
        medium,
        address,
        mxid,
        ts,
        not_before,
        not_after,
        sg_assoc: assoc.to_string(),
    };
    Some((object, fields))
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
