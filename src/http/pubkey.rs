//! Our public keys: the long-term signing key by id, and the validity checks homeservers call
//! for long-term and ephemeral (invite) keys.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::error::ApiError;
use super::extract::Args;
use super::{resource, AppState, V1_PREFIX, V2_PREFIX};
use crate::config::Config;

pub fn configure(cfg: &mut web::ServiceConfig, config: &Config) {
    let mut prefixes = vec![V2_PREFIX];
    if config.general.enable_v1_access {
        prefixes.push(V1_PREFIX);
    }
    for prefix in prefixes {
        cfg.service(resource(&format!("{prefix}/pubkey/isvalid")).route(web::get().to(is_valid)))
            .service(
                resource(&format!("{prefix}/pubkey/ephemeral/isvalid"))
                    .route(web::get().to(ephemeral_is_valid)),
            )
            .service(resource(&format!("{prefix}/pubkey/{{key_id}}")).route(web::get().to(pubkey)));
    }
}

/// GET /_matrix/identity/v2/pubkey/{keyId} (and v1): our key with that id, else 404 `M_NOT_FOUND`.
async fn pubkey(
    state: web::Data<AppState>,
    key_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let key = &state.config.crypto.signing_key;
    if *key_id != key.key_id() {
        return Err(ApiError::NotFound(format!(
            "The public key '{key_id}' was not found"
        )));
    }
    Ok(HttpResponse::Ok().json(json!({ "public_key": key.verify_key().to_base64() })))
}

/// GET /_matrix/identity/v2/pubkey/isvalid?public_key= (and v1): is this our long-term key?
/// Either base64 alphabet, padded or not, is accepted (the spec allows both).
async fn is_valid(state: web::Data<AppState>, args: Args) -> Result<HttpResponse, ApiError> {
    let [public_key] = args.strings(["public_key"])?;
    let ours = state.config.crypto.signing_key.verify_key();
    let valid = crate::crypto::VerifyKey::from_base64(public_key).is_ok_and(|k| k == ours);
    Ok(HttpResponse::Ok().json(json!({ "valid": valid })))
}

/// GET /_matrix/identity/v2/pubkey/ephemeral/isvalid?public_key= (and v1): is this an invite
/// key we issued (a row of `ephemeral_public_keys`, e.g. in a database Sydent made)?
async fn ephemeral_is_valid(
    state: web::Data<AppState>,
    args: Args,
) -> Result<HttpResponse, ApiError> {
    let [public_key] = args.strings(["public_key"])?;
    let valid = state
        .ephemeral_keys
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .contains(public_key);
    Ok(HttpResponse::Ok().json(json!({ "valid": valid })))
}
