//! Third-party invites: `store-invite` (an email invite to a room, before the invitee has an
//! account: a token, an ephemeral key pair and a mail from the brand's `invite_template`) and
//! `sign-ed25519` (the invitee's client trades the token and the ephemeral private key from
//! the mail's link for a signed `{mxid, sender, token}`). On v1 and v2; v2 needs an account and
//! invites only as the account's own user. The invites are delivered to the invitee's
//! homeserver when the address is bound (`crate::actors::onbind`).

use std::collections::BTreeMap;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::extract::Args;
use super::validate::{brand_of, caller, send_mail, Version};
use super::{resource, AppState};
use crate::crypto::{decode_base64_32, random_string, sign_json, NodeSigningKey};
use crate::invite::{redact_email, InviteWrite, NewInvite};
use crate::templates::{encoded_header_value, percent_format, standard_email_vars, TemplateKind};
use crate::types::{casefold, Medium, Threepid};

/// Invite tokens: 128 ASCII letters, as Sydent's.
const TOKEN_LEN: usize = 128;
const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Sydent's limits on what an invite mail shows of the inviter's name and the room's.
const MAX_SENDER_NAME: usize = 20;
const MAX_ROOM_NAME: usize = 30;
/// The template variables Sydent sets to "" when the request does not give them.
const OPTIONAL_VARS: [&str; 9] = [
    "sender_display_name",
    "token",
    "room_name",
    "bracketed_room_name",
    "room_avatar_url",
    "sender_avatar_url",
    "guest_user_id",
    "guest_access_token",
    "room_type",
];

pub fn configure(cfg: &mut web::ServiceConfig, v1: bool) {
    for (_, prefix, version) in Version::served(v1) {
        cfg.service(
            resource(&format!("{prefix}/store-invite"))
                .app_data(version.clone())
                .route(web::post().to(store_invite)),
        )
        .service(
            resource(&format!("{prefix}/sign-ed25519"))
                .app_data(version)
                .route(web::post().to(sign_ed25519)),
        );
    }
}

/// POST /_matrix/identity/v2/store-invite `{medium, address, room_id, sender, …}` (and v1) →
/// `{token, public_keys, display_name, public_key}`. Checks in Sydent's order (its errors win
/// in the same cases): parameters, the sender (v2), the room and homeserver blocklists, the
/// sender's mail limit, an address already bound (400 `M_THREEPID_IN_USE` with its Matrix ID),
/// the medium and address, the keyword blocklist. Unlike Sydent, nothing is stored for an
/// invite that is refused, and an invite whose mail cannot be sent is withdrawn.
async fn store_invite(
    req: HttpRequest,
    state: web::Data<AppState>,
    version: web::Data<Version>,
    args: Args,
) -> Result<HttpResponse, ApiError> {
    let version = **version;
    let [medium, address, room_id, sender] =
        args.strings(["medium", "address", "room_id", "sender"])?;
    let user = caller(&req, &state, version)?;
    if version == Version::V2 && user.as_deref() != Some(sender) {
        return Err(ApiError::Forbidden("'sender' doesn't match".into()));
    }
    let email_config = &state.config.email;
    let sender_server = sender.split_once(':').map(|(_, server)| server);
    let Some(sender_server) = sender_server else {
        return Err(ApiError::InvalidParam(
            "'sender' must be a Matrix ID".into(),
        ));
    };
    if email_config.room_blocklist.iter().any(|r| r == room_id)
        || email_config
            .homeserver_blocklist
            .iter()
            .any(|h| h == sender_server)
    {
        return Err(ApiError::Forbidden("Invite not allowed".into()));
    }
    state
        .limits
        .email
        .check(sender, crate::now_ms())
        .map_err(|l| ApiError::LimitExceeded {
            message: "Too many invites sent: try again later".into(),
            retry_after_ms: l.retry_after_ms,
        })?;
    let parsed_medium = Medium::parse(medium);
    if let Some(medium) = parsed_medium {
        // Bound here, or known to the directory (asked live when the mirror does not hold
        // it yet); never asked of the upstream, as the fork.
        let key = crate::types::Threepid::lookup_key(medium, address).into_owned();
        let bound = state
            .resolver
            .resolve(vec![(medium, key)], crate::resolve::Scope::NoUpstream)
            .await?
            .pop()
            .flatten();
        if let Some(mxid) = bound {
            return Err(ApiError::ThreepidInUse { mxid });
        }
    }
    if parsed_medium != Some(Medium::Email) {
        return Err(ApiError::Unrecognized(format!(
            "Didn't understand medium '{medium}'"
        )));
    }
    let threepid = Threepid::parse(medium, address)
        .map_err(|_| ApiError::InvalidEmail("The email address provided is not valid".into()))?;
    let strings: BTreeMap<String, String> = args
        .0
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect();
    if let Some(keyword) = blocked_keyword(&email_config.keyword_blocklist, &strings) {
        log::info!("store-invite refused: an argument contains the blocked keyword '{keyword}'");
        return Err(ApiError::Forbidden("Invite not allowed".into()));
    }

    let token = random_string(LETTERS, TOKEN_LEN);
    let ephemeral = NodeSigningKey::generate();
    let public_key = ephemeral.verify_key().to_base64_urlsafe();
    let private_key = ephemeral.seed_base64_urlsafe();
    let invite = NewInvite {
        medium: threepid.medium.as_str().to_string(),
        address: threepid.address.clone(),
        room_id: room_id.to_string(),
        sender: sender.to_string(),
        token: token.clone(),
        public_key: public_key.clone(),
        received_ts: crate::now_ms() / 1000,
    };
    let base = state.config.http.client_http_base.trim_end_matches('/');
    let prefix = version.prefix();
    let vars = invite_vars(
        &state,
        version,
        strings,
        &token,
        &private_key,
        &format!(
            "{base}{prefix}/sign-ed25519?{}",
            serde_urlencoded::to_string([("token", &token), ("private_key", &private_key)])
                .map_err(|e| ApiError::Internal(e.to_string()))?
        ),
        &threepid.address,
    )?;
    let brand = state
        .templates
        .brand(brand_of(&req, &args).as_deref())
        .to_string();
    let message = state
        .templates
        .render_email(&brand, TemplateKind::Invite, &vars)
        .map_err(|e| ApiError::Internal(e.to_string()))?;

    // Stored before the mail goes out, so the link in it works as soon as it arrives.
    state
        .store_queue
        .write_invite(InviteWrite::Store(invite))
        .await?;
    state
        .ephemeral_keys
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(public_key.clone());
    if let Err(e) = send_mail(&state, &threepid.address, &message, "invite email").await {
        // No mail, no invite: nothing is left to deliver on a later bind.
        state
            .store_queue
            .write_invite(InviteWrite::Withdraw { token })
            .await?;
        return Err(e);
    }

    let long_term = state.config.crypto.signing_key.verify_key().to_base64();
    Ok(HttpResponse::Ok().json(json!({
        "token": token,
        "public_keys": [
            {
                "public_key": long_term,
                "key_validity_url": format!("{base}{prefix}/pubkey/isvalid"),
            },
            {
                "public_key": public_key,
                "key_validity_url": format!("{base}{prefix}/pubkey/ephemeral/isvalid"),
            },
        ],
        "display_name": redact_email(
            address,
            email_config.username_obfuscate_characters,
            email_config.domain_obfuscate_characters,
        ),
        // Deprecated, not in the spec; Synapse still reads it (and Sydent sends it).
        "public_key": long_term,
    })))
}

/// The first keyword of the blocklist that a string argument contains (casefolded; a web
/// client location is compared without its `http(s)://`).
fn blocked_keyword<'a>(keywords: &'a [String], args: &BTreeMap<String, String>) -> Option<&'a str> {
    if keywords.is_empty() {
        return None;
    }
    let values: Vec<String> = args
        .iter()
        .map(|(key, value)| {
            let value = if key == "org.matrix.web_client_location" {
                value
                    .strip_prefix("https://")
                    .or_else(|| value.strip_prefix("http://"))
                    .unwrap_or(value)
            } else {
                value
            };
            casefold(value)
        })
        .collect();
    keywords
        .iter()
        .find(|k| values.iter().any(|v| v.contains(k.as_str())))
        .map(String::as_str)
}

/// Every variable Sydent gives its invite templates: the string arguments, the token and
/// ephemeral private key, the shortened names and bracketed forms, the web client location,
/// the encoded subject; then ours, `sign_url` (the whole sign-ed25519 link, so a template need
/// not hard-code this server's address as Sydent's do); then the standard mail variables.
fn invite_vars(
    state: &AppState,
    version: Version,
    mut vars: BTreeMap<String, String>,
    token: &str,
    private_key: &str,
    sign_url: &str,
    to: &str,
) -> Result<BTreeMap<String, String>, ApiError> {
    let email = &state.config.email;
    for name in OPTIONAL_VARS {
        vars.entry(name.to_string()).or_default();
    }
    vars.insert("token".into(), token.to_string());
    vars.insert("ephemeral_private_key".into(), private_key.to_string());
    let sender_name = &vars["sender_display_name"];
    if sender_name.chars().count() > MAX_SENDER_NAME {
        let short: String = sender_name.chars().take(MAX_SENDER_NAME - 1).collect();
        vars.insert("sender_display_name".into(), format!("{short}…"));
    }
    let bracketed_sender = match version {
        Version::V2 => format!("({}) ", vars["sender"]),
        Version::V1 => String::new(),
    };
    vars.insert("bracketed_verified_sender".into(), bracketed_sender);
    let room_name = &vars["room_name"];
    if room_name.chars().count() > MAX_ROOM_NAME {
        let short: String = room_name.chars().take(25).collect();
        vars.insert("room_name".into(), format!("{short}…"));
    }
    if !vars["room_name"].is_empty() {
        let bracketed = format!("({}) ", vars["room_name"]);
        vars.insert("bracketed_room_name".into(), bracketed);
    }
    let web_client = vars
        .get("org.matrix.web_client_location")
        .cloned()
        .unwrap_or_else(|| email.default_web_client_location.clone());
    vars.insert("web_client_location".into(), web_client);
    vars.insert("sign_url".into(), sign_url.to_string());
    let subject = if vars["room_type"] == "m.space" {
        &email.invite_subject_space
    } else {
        &email.invite_subject
    };
    let subject = percent_format("email.invite.subject", subject, &vars)
        .map_err(|e| ApiError::Internal(format!("[email] invite subject: {e}")))?;
    vars.insert(
        "subject_header_value".into(),
        encoded_header_value(&subject, "Subject: ".len()),
    );
    vars.extend(standard_email_vars(
        &email.hostname,
        &email.from,
        to,
        crate::now_ms(),
    ));
    Ok(vars)
}

/// POST /_matrix/identity/v2/sign-ed25519 `{mxid, token, private_key}` (and v1) → `{mxid,
/// sender, token, signatures}`: signed with the invite's ephemeral key under this server's
/// name. `token` and `private_key` may also come in the query string: Element POSTs `{mxid}`
/// to the `signurl` of the invite link, which carries both.
async fn sign_ed25519(
    req: HttpRequest,
    state: web::Data<AppState>,
    version: web::Data<Version>,
    mut args: Args,
) -> Result<HttpResponse, ApiError> {
    caller(&req, &state, **version)?;
    let query: Vec<(String, String)> =
        serde_urlencoded::from_str(req.query_string()).unwrap_or_default();
    for (key, value) in query {
        if key == "token" || key == "private_key" {
            args.0.entry(key).or_insert(Value::String(value));
        }
    }
    let [mxid, token, private_key] = args.strings(["mxid", "token", "private_key"])?;
    let seed = decode_base64_32(private_key)
        .ok_or_else(|| ApiError::InvalidParam("'private_key' is not an ed25519 seed".into()))?;
    let sender = state
        .store_queue
        .invite_sender(token.to_string())
        .await?
        .ok_or_else(|| ApiError::UnrecognizedToken("Didn't recognize token".into()))?;
    let key = NodeSigningKey::from_seed("0", seed);
    let mut signed = Map::new();
    signed.insert("mxid".into(), json!(mxid));
    signed.insert("sender".into(), json!(sender));
    signed.insert("token".into(), json!(token));
    sign_json(&mut signed, &state.config.general.server_name, &key)
        .map_err(|e| ApiError::Internal(format!("signing an invite: {e}")))?;
    Ok(HttpResponse::Ok().json(Value::Object(signed)))
}
