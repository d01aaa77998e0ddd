//! What a validated session is for: `3pid/getValidated3pid`, `3pid/bind` (the association
//! store binds it and signs the association, which replication then carries like any other)
//! and `3pid/unbind` with the session's `sid` and `client_secret`, or signed by the Matrix
//! ID's homeserver instead (what Synapse sends when a user removes a 3PID or deactivates). On
//! v1 and v2; v2 needs an account (and the terms) for getValidated3pid and bind, and binds
//! only the account's own Matrix ID; v1 bind is served while `enable_v1_associations` is on.

use actix_web::http::header::ContentType;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{parse_body, Args, RawBody};
use super::validate::{ask, caller, client_secret, sid, Version};
use super::{resource, x_matrix, AppState};
use crate::actors::sessions::{GetValidated, Validated};
use crate::actors::store::{Bind, Unbind};
use crate::types::{Mxid, Threepid};

pub fn configure(cfg: &mut web::ServiceConfig, v1: bool, v1_bind: bool) {
    for (version, prefix, v) in Version::served(v1) {
        cfg.service(
            resource(&format!("{prefix}/3pid/getValidated3pid"))
                .app_data(v.clone())
                .route(web::get().to(get_validated)),
        )
        .service(resource(&format!("{prefix}/3pid/unbind")).route(web::post().to(unbind)));
        if version == Version::V2 || v1_bind {
            cfg.service(
                resource(&format!("{prefix}/3pid/bind"))
                    .app_data(v)
                    .route(web::post().to(bind)),
            );
        }
    }
}

async fn validated(state: &AppState, sid: i64, client_secret: &str) -> Result<Validated, ApiError> {
    let message = GetValidated {
        sid,
        client_secret: client_secret.to_string(),
    };
    Ok(ask(state, message).await??)
}

/// GET /_matrix/identity/v2/3pid/getValidated3pid?sid=&client_secret= (and v1)
/// → `{"medium", "address", "validated_at"}`
async fn get_validated(
    req: HttpRequest,
    state: web::Data<AppState>,
    version: web::Data<Version>,
    args: Args,
) -> Result<HttpResponse, ApiError> {
    caller(&req, &state, **version)?;
    let secret = client_secret(&args)?;
    let sid = sid(&args)?;
    let session = validated(&state, sid, secret).await?;
    Ok(HttpResponse::Ok().json(json!({
        "medium": session.medium.as_str(),
        "address": session.address,
        "validated_at": session.validated_at,
    })))
}

/// POST /_matrix/identity/v2/3pid/bind `{sid, client_secret, mxid}` (and v1) → the signed
/// association.
async fn bind(
    req: HttpRequest,
    state: web::Data<AppState>,
    version: web::Data<Version>,
    args: Args,
) -> Result<HttpResponse, ApiError> {
    let user = match **version {
        Version::V2 => caller(&req, &state, Version::V2)?,
        Version::V1 => None,
    };
    let secret = client_secret(&args)?;
    let sid = sid(&args)?;
    let [mxid] = args.strings(["mxid"])?;
    let mxid = Mxid::parse(mxid)?;
    if user.is_some_and(|user| user != mxid.as_str()) {
        return Err(ApiError::Forbidden(
            "This user is prohibited from binding to the mxid".into(),
        ));
    }
    let session = validated(&state, sid, secret).await?;
    let threepid = Threepid::parse(session.medium.as_str(), &session.address)?;
    let signed = state
        .store_queue
        .bind(Bind::new(&state.store_ctx, &state.index, threepid, mxid)?)
        .await?;
    Ok(HttpResponse::Ok()
        .insert_header(ContentType::json())
        .body(signed.to_string()))
}

/// The body of an unbind.
#[derive(serde::Deserialize)]
struct UnbindRequest {
    mxid: Option<String>,
    threepid: Option<ThreepidField>,
    sid: Option<Value>,
    client_secret: Option<String>,
}

#[derive(serde::Deserialize)]
struct ThreepidField {
    medium: Option<String>,
    address: Option<String>,
}

/// POST /_matrix/identity/v2/3pid/unbind (and v1)
/// `{mxid, threepid: {medium, address}}` with either the `sid` and `client_secret` of a
/// session that validated that 3PID, or, without both, the homeserver's signature
/// (`Authorization: X-Matrix`, see `x_matrix.rs`) by the homeserver of `mxid` → `{}`, also
/// when the 3PID was not bound to that Matrix ID (unbind is idempotent).
async fn unbind(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: RawBody,
) -> Result<HttpResponse, ApiError> {
    let request: UnbindRequest = parse_body(&body.0)?;
    let threepid = request.threepid.as_ref();
    let mut missing = Vec::new();
    for (name, absent) in [
        ("mxid", request.mxid.is_none()),
        ("threepid", threepid.is_none()),
        (
            "threepid.medium",
            threepid.is_some_and(|t| t.medium.is_none()),
        ),
        (
            "threepid.address",
            threepid.is_some_and(|t| t.address.is_none()),
        ),
        // One of the two: a session was meant, the other is missing.
        (
            "sid",
            request.sid.is_none() && request.client_secret.is_some(),
        ),
        (
            "client_secret",
            request.client_secret.is_none() && request.sid.is_some(),
        ),
    ] {
        if absent {
            missing.push(name.to_string());
        }
    }
    let (
        Some(mxid),
        Some(ThreepidField {
            medium: Some(medium),
            address: Some(address),
        }),
    ) = (request.mxid, request.threepid)
    else {
        return Err(ApiError::MissingParams(missing));
    };
    if !missing.is_empty() {
        return Err(ApiError::MissingParams(missing));
    }
    let mxid = Mxid::parse(&mxid)?;
    let threepid = Threepid::parse(&medium, &address)?;
    match (request.sid, request.client_secret) {
        (Some(sid), Some(secret)) => {
            let mut args = Args::default();
            args.0.insert("sid".into(), sid);
            args.0.insert("client_secret".into(), Value::String(secret));
            let secret = client_secret(&args)?;
            let sid = super::validate::sid(&args)?;
            let session = validated(&state, sid, secret).await?;
            if Threepid::parse(session.medium.as_str(), &session.address)? != threepid {
                return Err(ApiError::Refused(
                    "The session does not match the 3PID to unbind".into(),
                ));
            }
        }
        // Neither (one alone was refused above): the homeserver must have signed it.
        _ => {
            let content: Value = serde_json::from_slice(&body.0)
                .map_err(|_| ApiError::BadJson("Malformed JSON".into()))?;
            let origin = x_matrix::authenticate(&req, &state, &content).await?;
            if mxid.server_name() != origin.as_str() {
                return Err(ApiError::Refused(
                    "Origin server name does not match mxid".into(),
                ));
            }
        }
    }
    state.store.send(Unbind { threepid, mxid }).await??;
    Ok(HttpResponse::Ok().json(json!({})))
}
