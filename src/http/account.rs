//! v2 accounts: `POST /account/register` (an OpenID token from the user's homeserver, checked
//! with that homeserver's `openid/userinfo`), `GET /account`, `POST /account/logout`, and
//! `POST /terms` (accepting the terms in force). [`Authed`] is the v2 authentication of every
//! endpoint that needs an account: `Authorization: Bearer <token>`, or the `access_token` query
//! parameter that older clients, and Synapse on `hash_details`, send. [`require_terms`] is the
//! terms gate; both read memory only.

use std::future::{ready, Ready};

use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::Args;
use super::{resource, AppState, V2_PREFIX};
use crate::accounts::{new_token, stored_token, Account, AccountWrite};
use crate::actors::store::WriteAccount;
use crate::types::{Mxid, ServerName};

/// `openid/userinfo` answers are read up to this size (Sydent's limit).
const USERINFO_LIMIT: usize = 5 * 1024;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(&format!("{V2_PREFIX}/account/register")).route(web::post().to(register)))
        .service(resource(&format!("{V2_PREFIX}/account")).route(web::get().to(account)))
        .service(resource(&format!("{V2_PREFIX}/account/logout")).route(web::post().to(logout)));
}

/// The account of a v2 request: 401 `M_UNAUTHORIZED` without a token, 401 `M_UNKNOWN_TOKEN`
/// for a token this node does not know.
pub struct Authed(pub Account);

impl FromRequest for Authed {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

pub(super) fn authenticate(req: &HttpRequest) -> Result<Authed, ApiError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::Internal("no app state".into()))?;
    let token = bearer_token(req)
        .or_else(|| query_token(req.query_string()))
        .ok_or(ApiError::NoToken)?;
    state
        .accounts
        .authenticate(&token)
        .map(Authed)
        .ok_or_else(|| ApiError::UnknownToken("Unrecognised access token".into()))
}

fn bearer_token(req: &HttpRequest) -> Option<String> {
    let value = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("Bearer")
        .then(|| token.trim().to_string())
        .filter(|t| !t.is_empty())
}

fn query_token(query: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// 403 `M_TERMS_NOT_SIGNED` until the account has accepted the terms in force (nothing is
/// gated when there are none).
pub fn require_terms(state: &AppState, account: &Account) -> Result<(), ApiError> {
    match state.terms.current().master_version() {
        Some(master) if account.consent_version.as_deref() != Some(master) => {
            Err(ApiError::TermsNotSigned)
        }
        _ => Ok(()),
    }
}

/// Commits an account write through the store (the single writer), then mirrors it in memory.
async fn write(state: &AppState, write: AccountWrite) -> Result<bool, ApiError> {
    let changed = state
        .store
        .send(WriteAccount(write.clone()))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    state.accounts.apply(&write);
    Ok(changed)
}

/// POST /v2/account/register
async fn register(state: web::Data<AppState>, args: Args) -> Result<HttpResponse, ApiError> {
    let [openid_token, server] = args.strings(["access_token", "matrix_server_name"])?;
    let server = server.to_ascii_lowercase();
    let allow_list = &state.config.general.homeserver_allow_list;
    if !allow_list.is_empty() && !allow_list.contains(&server) {
        return Err(ApiError::Forbidden(
            "This homeserver is not authorized to access this server.".into(),
        ));
    }
    ServerName::parse(&server).map_err(|_| {
        ApiError::InvalidParam(format!("'{server}' is not a valid matrix_server_name"))
    })?;
    let query = serde_urlencoded::to_string([("access_token", openid_token)])
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let answer = state
        .homeserver
        .get(
            &server,
            &format!("/_matrix/federation/v1/openid/userinfo?{query}"),
            USERINFO_LIMIT,
        )
        .await
        .map_err(|e| {
            ApiError::Homeserver(format!("Unable to contact the Matrix homeserver: {e}"))
        })?;
    let userinfo: Value = serde_json::from_slice(&answer.body).map_err(|_| {
        ApiError::Homeserver(format!(
            "The Matrix homeserver {server} returned invalid JSON"
        ))
    })?;
    let Some(sub) = userinfo.get("sub").and_then(Value::as_str) else {
        // The homeserver did not take the token (its 401 carries no `sub`).
        return Err(ApiError::UnknownToken(format!(
            "The Matrix homeserver {server} did not accept the OpenID token"
        )));
    };
    let mxid = Mxid::parse(sub).map_err(|_| {
        ApiError::Homeserver(format!(
            "The Matrix homeserver {server} returned an invalid MXID"
        ))
    })?;
    if mxid.server_name() != server {
        return Err(ApiError::Forbidden(format!(
            "The Matrix homeserver {server} returned a user ID of another homeserver"
        )));
    }
    let token = new_token();
    write(
        &state,
        AccountWrite::Register {
            user_id: mxid.to_string(),
            stored_token: stored_token(&token),
        },
    )
    .await?;
    Ok(HttpResponse::Ok().json(json!({ "token": token, "access_token": token })))
}

/// GET /v2/account
async fn account(
    state: web::Data<AppState>,
    Authed(account): Authed,
) -> Result<HttpResponse, ApiError> {
    require_terms(&state, &account)?;
    Ok(HttpResponse::Ok().json(json!({ "user_id": &*account.user_id })))
}

/// POST /v2/account/logout: that token only.
async fn logout(
    state: web::Data<AppState>,
    Authed(account): Authed,
) -> Result<HttpResponse, ApiError> {
    write(
        &state,
        AccountWrite::Logout {
            stored_token: account.stored_token,
        },
    )
    .await?;
    Ok(HttpResponse::Ok().json(json!({})))
}

/// POST /v2/terms: `{"user_accepts": [url, …]}`. Every URL must be one of the terms' URLs; once
/// the account has accepted a URL of every document (in any language, over any number of
/// calls) it consents to the terms' `master_version`.
pub(super) async fn accept_terms(
    state: web::Data<AppState>,
    Authed(account): Authed,
    args: Args,
) -> Result<HttpResponse, ApiError> {
    let urls: Vec<String> = match args.value("user_accepts")? {
        Value::String(url) => vec![url.clone()],
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| ApiError::InvalidParam("'user_accepts' must list URLs".into()))?,
        _ => {
            return Err(ApiError::InvalidParam(
                "'user_accepts' must list URLs".into(),
            ))
        }
    };
    let terms = state.terms.current();
    let unknown = terms.unknown_urls(&urls);
    if !unknown.is_empty() {
        return Err(ApiError::InvalidParam(format!(
            "Unrecognised URLs: {}",
            unknown.join(", ")
        )));
    }
    let mut accepted = state.accounts.accepted_urls(&account.user_id);
    accepted.extend(urls.iter().cloned());
    let consent_version = terms
        .master_version()
        .filter(|_| terms.all_accepted(accepted.iter().map(String::as_str)))
        .map(str::to_string);
    write(
        &state,
        AccountWrite::AcceptTerms {
            user_id: account.user_id.to_string(),
            urls,
            consent_version,
        },
    )
    .await?;
    Ok(HttpResponse::Ok().json(json!({})))
}
