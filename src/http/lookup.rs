//! Lookups, answered from the in-memory index: legacy v1 `lookup` (one 3PID, the signed
//! association) and `bulk_lookup` (many 3PIDs, only the matches), and v2 `hash_details` and
//! `lookup` (by `sha256` hash or, with algorithm `none`, by `"<address> <medium>"`), which need
//! an account (and the terms, when there are terms).

use std::borrow::Cow;
use std::collections::BTreeSet;

use actix_web::http::header::ContentType;
use actix_web::{web, HttpResponse};
use serde_json::json;

use super::account::{require_terms, Authed};
use super::error::ApiError;
use super::extract::{parse_body, Args, RawBody};
use super::{resource, AppState, V1_PREFIX, V2_PREFIX};
use crate::crypto::decode_base64_32;
use crate::resolve::Scope;
use crate::types::{InvalidValue, Medium, Threepid};
use crate::upstream::BulkLookupAnswer;

pub fn configure_v1(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(&format!("{V1_PREFIX}/lookup")).route(web::get().to(lookup)))
        .service(resource(&format!("{V1_PREFIX}/bulk_lookup")).route(web::post().to(bulk_lookup)));
}

pub fn configure_v2(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(&format!("{V2_PREFIX}/hash_details")).route(web::get().to(hash_details)))
        .service(resource(&format!("{V2_PREFIX}/lookup")).route(web::post().to(lookup_v2)));
}

/// GET /_matrix/identity/v2/hash_details
async fn hash_details(
    state: web::Data<AppState>,
    Authed(account): Authed,
) -> Result<HttpResponse, ApiError> {
    require_terms(&state, &account)?;
    Ok(HttpResponse::Ok().json(json!({
        "algorithms": ["none", "sha256"],
        "lookup_pepper": state.store_ctx.pepper,
    })))
}

/// The body of a v2 lookup, its strings borrowed from the request where they have no escapes.
#[derive(serde::Deserialize)]
struct LookupRequest<'a> {
    #[serde(borrow, default)]
    addresses: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    algorithm: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pepper: Option<Cow<'a, str>>,
}

/// POST /_matrix/identity/v2/lookup `{"addresses", "algorithm", "pepper"}`
///
/// Answers `{"mappings": {<address as asked>: mxid}}` for the bound ones: the newest valid
/// binding of each 3PID (Sydent answers the alphabetically greatest Matrix ID). Parsed without
/// a JSON tree and answered without a map: a request may carry thousands of addresses.
async fn lookup_v2(
    state: web::Data<AppState>,
    Authed(account): Authed,
    RawBody(body): RawBody,
) -> Result<HttpResponse, ApiError> {
    require_terms(&state, &account)?;
    let request: LookupRequest = parse_body(&body)?;
    let (Some(addresses), Some(algorithm), Some(pepper)) =
        (&request.addresses, &request.algorithm, &request.pepper)
    else {
        let missing = [
            ("addresses", request.addresses.is_none()),
            ("algorithm", request.algorithm.is_none()),
            ("pepper", request.pepper.is_none()),
        ];
        return Err(ApiError::MissingParams(
            missing
                .iter()
                .filter(|(_, absent)| *absent)
                .map(|(name, _)| name.to_string())
                .collect(),
        ));
    };
    if algorithm != "sha256" && algorithm != "none" {
        return Err(ApiError::InvalidParam(format!(
            "algorithm '{algorithm}' is not supported: sha256 or none"
        )));
    }
    if **pepper != *state.store_ctx.pepper {
        return Err(ApiError::InvalidPepper {
            lookup_pepper: state.store_ctx.pepper.clone(),
        });
    }
    let limit = state.config.general.address_lookup_limit;
    if addresses.len() > limit {
        return Err(ApiError::TooMany(format!(
            "More than the maximum of {limit} addresses in one request"
        )));
    }
    // The positions in `addresses` that were looked up, and what each found.
    let (positions, mxids): (Vec<usize>, Vec<Option<String>>) = if algorithm == "sha256" {
        // A string that is no hash of ours matches nothing.
        let (positions, digests): (Vec<usize>, Vec<[u8; 32]>) = addresses
            .iter()
            .enumerate()
            .filter_map(|(i, hash)| Some((i, decode_base64_32(hash)?)))
            .unzip();
        (positions, state.resolver.resolve_hashed(digests).await?)
    } else {
        // "<address> <medium>"; the medium follows the last space.
        let (positions, queries): (Vec<usize>, Vec<(Medium, String)>) = addresses
            .iter()
            .enumerate()
            .filter_map(|(i, entry)| {
                let (address, medium) = entry.rsplit_once(' ')?;
                let medium = Medium::parse(medium)?;
                Some((
                    i,
                    (medium, Threepid::lookup_key(medium, address).into_owned()),
                ))
            })
            .unzip();
        (
            positions,
            state.resolver.resolve(queries, Scope::All).await?,
        )
    };
    let found: Vec<(usize, String)> = positions
        .into_iter()
        .zip(mxids)
        .filter_map(|(i, mxid)| Some((i, mxid?)))
        .collect();
    Ok(HttpResponse::Ok()
        .content_type(ContentType::json())
        .body(mappings_json(addresses, &found)))
}

/// `{"mappings": {...}}` written straight out; an address asked twice appears once.
fn mappings_json(addresses: &[Cow<'_, str>], found: &[(usize, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + found.len() * 80);
    out.extend_from_slice(b"{\"mappings\":{");
    let mut seen = std::collections::HashSet::with_capacity(found.len());
    for (i, mxid) in found {
        let address: &str = &addresses[*i];
        if !seen.insert(address) {
            continue;
        }
        if seen.len() > 1 {
            out.push(b',');
        }
        // Serialising a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, address);
        out.push(b':');
        let _ = serde_json::to_writer(&mut out, mxid);
    }
    out.extend_from_slice(b"}}");
    out
}

fn parse_medium(medium: &str) -> Result<Medium, ApiError> {
    Medium::parse(medium).ok_or_else(|| InvalidValue::Medium(medium.into()).into())
}

/// GET /_matrix/identity/api/v1/lookup?medium=&address=
///
/// The signed association of the first source that holds the 3PID (`crate::resolve`: the
/// directory, the upstream, this node's bindings): this node's binding as its origin signed
/// it, with our signature when its origin was another server; the upstream's as it signed
/// it; `{}` when no source holds it.
async fn lookup(state: web::Data<AppState>, args: Args) -> Result<HttpResponse, ApiError> {
    let [medium, address] = args.strings(["medium", "address"])?;
    let medium = parse_medium(medium)?;
    let key = Threepid::lookup_key(medium, address);
    let body = state
        .resolver
        .resolve_signed(medium, &key)
        .await?
        .unwrap_or_else(|| "{}".to_owned());
    Ok(HttpResponse::Ok()
        .content_type(ContentType::json())
        .body(body))
}

/// A bulk_lookup match: (medium, address as stored, mxid).
type Found = (Medium, String, String);

/// POST /_matrix/identity/api/v1/bulk_lookup `{"threepids": [[medium, address], ...]}`
///
/// Answers `{"threepids": [[medium, address, mxid], ...]}` for the bound ones only, with the
/// address as stored (normalised), each match once.
async fn bulk_lookup(state: web::Data<AppState>, args: Args) -> Result<HttpResponse, ApiError> {
    let threepids = args
        .value("threepids")?
        .as_array()
        .ok_or_else(|| ApiError::InvalidParam("threepids must be a list".into()))?;
    let limit = state.config.general.address_lookup_limit;
    if threepids.len() > limit {
        return Err(ApiError::TooMany(format!(
            "More than the maximum of {limit} 3PIDs in one request"
        )));
    }
    let mut queries = Vec::with_capacity(threepids.len());
    for entry in threepids {
        let pair = entry.as_array().filter(|p| p.len() == 2);
        let (Some(medium), Some(address)) = (
            pair.and_then(|p| p[0].as_str()),
            pair.and_then(|p| p[1].as_str()),
        ) else {
            return Err(ApiError::InvalidParam(
                "each entry of threepids must be a [medium, address] pair of strings".into(),
            ));
        };
        let medium = parse_medium(medium)?;
        queries.push((medium, Threepid::lookup_key(medium, address).into_owned()));
    }
    let mxids = state.resolver.resolve(queries.clone(), Scope::All).await?;
    // Each match once, in a stable order, with the address as this node keys it.
    let found: BTreeSet<Found> = queries
        .into_iter()
        .zip(mxids)
        .filter_map(|((medium, key), mxid)| Some((medium, key, mxid?)))
        .collect();
    let answer = BulkLookupAnswer {
        threepids: found
            .into_iter()
            .map(|(medium, address, mxid)| (medium.as_str().to_owned(), address, mxid))
            .collect(),
    };
    Ok(HttpResponse::Ok().json(answer))
}
