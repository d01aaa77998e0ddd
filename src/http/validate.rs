//! Proving ownership of an email address or phone number: `validate/email/requestToken` and
//! `validate/msisdn/requestToken` send a token (by mail, from the brand's template, or by SMS)
//! for a session of the validation-session actor; `submitToken` (POST by a client, or the GET
//! link a person clicks) validates it. On v1 (unauthenticated) and v2 (an account, and the
//! terms when there are terms).
//!
//! Where Sydent differs, the spec is followed: a repeated `send_attempt` sends nothing, the
//! emailed link points at the API version that was called, `next_link` is kept with the
//! session (only `http`/`https`) and never read from the clicked URL, failures are 400s with
//! the spec's errcodes, and requests over the limits are 429 `M_LIMIT_EXCEEDED` with
//! `retry_after_ms`. A token is never logged.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::account::{require_terms, Authed};
use super::error::ApiError;
use super::extract::{client_ip, Args};
use super::{resource, AppState, V1_PREFIX, V2_PREFIX};
use crate::actors::sessions::{RequestToken, Sent, SubmitToken, TokenRequest, ValidationSessions};
use crate::config::Config;
use crate::email::EmailError;
use crate::phone::{check_destination, PhoneError, PhoneNumber};
use crate::ratelimit::RateLimiter;
use crate::templates::{standard_email_vars, TemplateKind};
use crate::types::Medium;

/// The longest email address accepted (Sydent's limit).
const MAX_EMAIL_LEN: usize = 500;

pub fn configure(cfg: &mut web::ServiceConfig, v1: bool) {
    for (_, prefix, v) in Version::served(v1) {
        cfg.service(
            resource(&format!("{prefix}/validate/email/requestToken"))
                .app_data(v.clone())
                .route(web::post().to(email_request_token)),
        )
        .service(
            resource(&format!("{prefix}/validate/email/submitToken"))
                .app_data(v.clone())
                .route(web::post().to(submit_token_post))
                .route(web::get().to(submit_token_link)),
        )
        .service(
            resource(&format!("{prefix}/validate/msisdn/requestToken"))
                .app_data(v.clone())
                .route(web::post().to(msisdn_request_token)),
        )
        .service(
            resource(&format!("{prefix}/validate/msisdn/submitToken"))
                .app_data(v)
                .route(web::post().to(submit_token_post))
                .route(web::get().to(submit_token_link)),
        );
    }
}

/// The limits on sending tokens, each one bucket space for v1 and v2 together (Sydent keeps
/// the phone limits per API version, doubling them): mails per sender (a v2 account, or a
/// v1 client's address), texts per phone number and per country calling code.
pub struct ValidationLimits {
    pub email: RateLimiter,
    pub msisdn: RateLimiter,
    pub country: RateLimiter,
}

impl ValidationLimits {
    pub fn new(config: &Config) -> Self {
        Self {
            email: RateLimiter::new(config.email.sender_ratelimit),
            msisdn: RateLimiter::new(config.sms.msisdn_ratelimit),
            country: RateLimiter::new(config.sms.country_ratelimit),
        }
    }
}

fn phone_error(e: PhoneError) -> ApiError {
    match e {
        PhoneError::Invalid(message) => ApiError::InvalidAddress(message),
        PhoneError::DestinationRejected(_) => {
            ApiError::DestinationRejected("This destination has been rejected by the server".into())
        }
    }
}

/// Which API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// The versions served (v2, and v1 when `v1`), each with its path prefix and as the
    /// app data its handlers read.
    pub fn served(v1: bool) -> Vec<(Self, &'static str, web::Data<Self>)> {
        let mut versions = vec![Self::V2];
        if v1 {
            versions.push(Self::V1);
        }
        versions
            .into_iter()
            .map(|v| (v, v.prefix(), web::Data::new(v)))
            .collect()
    }

    pub fn prefix(self) -> &'static str {
        match self {
            Self::V1 => V1_PREFIX,
            Self::V2 => V2_PREFIX,
        }
    }
}

/// Who is asking: v2 needs an account that accepted the terms; v1 is anonymous. Answers the
/// key the email limiter counts by (the account, or the client's address).
pub(super) fn caller(
    req: &HttpRequest,
    state: &AppState,
    version: Version,
) -> Result<Option<String>, ApiError> {
    match version {
        Version::V2 => {
            let Authed(account) = super::account::authenticate(req)?;
            require_terms(state, &account)?;
            Ok(Some(account.user_id.to_string()))
        }
        Version::V1 => Ok(client_ip(req, state.config.http.obey_x_forwarded_for)),
    }
}

/// `client_secret`: 1 to 255 of `[0-9a-zA-Z.=_-]`, as the spec says.
pub(super) fn client_secret(args: &Args) -> Result<&str, ApiError> {
    let [secret] = args.strings(["client_secret"])?;
    let valid = (1..=255).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".=_-".contains(&b));
    if valid {
        Ok(secret)
    } else {
        Err(ApiError::InvalidParam(
            "Invalid client_secret provided".into(),
        ))
    }
}

/// `sid`: a decimal session id, as a string (the spec) or a number.
pub(super) fn sid(args: &Args) -> Result<i64, ApiError> {
    match args.value("sid")? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
    .ok_or_else(|| ApiError::InvalidParam("'sid' must be a session id".into()))
}

/// `send_attempt`: an integer, or a string holding one (Sydent accepts both).
fn send_attempt(args: &Args) -> Result<i64, ApiError> {
    match args.value("send_attempt")? {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
    .ok_or_else(|| ApiError::InvalidParam("'send_attempt' must be an integer".into()))
}

/// `next_link`, when given: an absolute `http` or `https` URL.
fn next_link(args: &Args) -> Result<Option<String>, ApiError> {
    let Some(value) = args.0.get("next_link").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let url = value
        .as_str()
        .and_then(|s| reqwest::Url::parse(s).ok())
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| ApiError::InvalidParam("'next_link' must be an http or https URL".into()))?;
    Ok(Some(url.to_string()))
}

/// An address SMTP can carry: `local@domain`, no display name, no spaces, at most 500
/// characters (Sydent's rule, with a real parser).
fn email_address(address: &str) -> Result<&str, ApiError> {
    let plain = !address.is_empty()
        && address.len() <= MAX_EMAIL_LEN
        && !address.chars().any(|c| c.is_whitespace() || c.is_control())
        && address.parse::<lettre::Address>().is_ok();
    if plain {
        Ok(address)
    } else {
        Err(ApiError::InvalidEmail(
            "The email address provided is not valid".into(),
        ))
    }
}

/// The brand a request asks for (`?brand=`, also as a body argument).
pub(super) fn brand_of(req: &HttpRequest, args: &Args) -> Option<String> {
    args.0
        .get("brand")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            serde_urlencoded::from_str::<Vec<(String, String)>>(req.query_string())
                .ok()?
                .into_iter()
                .find(|(k, _)| k == "brand")
                .map(|(_, v)| v)
        })
}

/// Asks the validation-session actor.
pub(super) async fn ask<M>(state: &AppState, message: M) -> Result<M::Result, ApiError>
where
    M: actix::Message + Send + 'static,
    M::Result: Send,
    ValidationSessions: actix::Handler<M>,
{
    state
        .sessions
        .send(message)
        .await
        .map_err(|e| ApiError::Internal(format!("validation sessions unreachable: {e}")))
}

/// Reports the outcome of a send to the actor; a delivered token is answered only once its
/// session is committed.
async fn sent(state: &AppState, sid: i64, delivered: bool) -> Result<(), ApiError> {
    Ok(ask(state, Sent { sid, delivered }).await??)
}

/// Runs `send` for a token the actor asked to send; should it fail, the session is put back
/// as it was before the request.
async fn deliver<F>(state: &AppState, sid: i64, send: F) -> Result<(), ApiError>
where
    F: std::future::Future<Output = Result<(), ApiError>>,
{
    match send.await {
        Ok(()) => sent(state, sid, true).await,
        Err(e) => {
            sent(state, sid, false).await?;
            Err(e)
        }
    }
}

/// POST /_matrix/identity/v2/validate/email/requestToken (and v1)
/// `{email, client_secret, send_attempt, next_link?}` → `{"sid"}`
async fn email_request_token(
    req: HttpRequest,
    state: web::Data<AppState>,
    version: web::Data<Version>,
    args: Args,
) -> Result<HttpResponse, ApiError> {
    let version = **version;
    let limiter_key = caller(&req, &state, version)?;
    let secret = client_secret(&args)?;
    let [email] = args.strings(["email"])?;
    let attempt = send_attempt(&args)?;
    let next_link = next_link(&args)?;
    let email = email_address(email)?;
    let request = RequestToken {
        medium: Medium::Email,
        address: email.to_string(),
        client_secret: secret.to_string(),
        send_attempt: attempt,
        next_link,
    };
    let (sid, token) = match ask(&state, request).await? {
        TokenRequest::Done { sid } => return Ok(sid_answer(sid)),
        TokenRequest::Send { sid, token } => (sid, token),
    };
    let brand = state
        .templates
        .brand(brand_of(&req, &args).as_deref())
        .to_string();
    let send = async {
        if let Some(key) = &limiter_key {
            state
                .limits
                .email
                .check(key, crate::now_ms())
                .map_err(|l| ApiError::LimitExceeded {
                    message: "Too many emails requested: try again later".into(),
                    retry_after_ms: l.retry_after_ms,
                })?;
        }
        let link = format!(
            "{}{}/validate/email/submitToken?{}",
            state.config.http.client_http_base.trim_end_matches('/'),
            version.prefix(),
            serde_urlencoded::to_string([
                ("token", token.as_str()),
                ("client_secret", secret),
                ("sid", &sid.to_string()),
            ])
            .map_err(|e| ApiError::Internal(e.to_string()))?,
        );
        let email_config = &state.config.email;
        let mut vars = std::collections::BTreeMap::new();
        vars.insert("link".into(), link);
        vars.insert("token".into(), token.clone());
        vars.insert(
            "ipaddress".into(),
            client_ip(&req, state.config.http.obey_x_forwarded_for)
                .unwrap_or_else(|| "an unknown location".into()),
        );
        // The standard variables last: a request argument cannot override them (as Sydent).
        vars.extend(standard_email_vars(
            &email_config.hostname,
            &email_config.from,
            email,
            crate::now_ms(),
        ));
        let message = state
            .templates
            .render_email(&brand, TemplateKind::Verification, &vars)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        send_mail(
            &state,
            email,
            &message,
            &format!("validation email for session {sid}"),
        )
        .await
    };
    deliver(&state, sid, send).await?;
    Ok(sid_answer(sid))
}

/// Sends `message` to `to`: an address the mail server refuses is 400 `M_INVALID_EMAIL`, a
/// failure to send 400 `M_EMAIL_SEND_ERROR` (logged with `what`).
pub(super) async fn send_mail(
    state: &AppState,
    to: &str,
    message: &str,
    what: &str,
) -> Result<(), ApiError> {
    state
        .mailer
        .send(to, message.as_bytes())
        .await
        .map_err(|e| match e {
            EmailError::InvalidAddress(_) => {
                ApiError::InvalidEmail("The email address provided is not valid".into())
            }
            EmailError::Send(cause) => ApiError::EmailSend(format!("{what}: {cause}")),
        })
}

fn sid_answer(sid: i64) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "sid": sid.to_string() }))
}

/// POST /_matrix/identity/v2/validate/msisdn/requestToken (and v1)
/// `{phone_number, country, client_secret, send_attempt, next_link?}` →
/// `{"sid", "msisdn", "intl_fmt", "success": true}`
async fn msisdn_request_token(
    req: HttpRequest,
    state: web::Data<AppState>,
    version: web::Data<Version>,
    args: Args,
) -> Result<HttpResponse, ApiError> {
    caller(&req, &state, **version)?;
    let secret = client_secret(&args)?;
    let [phone_number, country] = args.strings(["phone_number", "country"])?;
    let attempt = send_attempt(&args)?;
    let next_link = next_link(&args)?;
    let phone = PhoneNumber::parse(phone_number, country).map_err(phone_error)?;
    check_destination(&state.config.sms, phone.country_code).map_err(phone_error)?;
    let answer = |sid: i64| {
        HttpResponse::Ok().json(json!({
            "success": true,
            "sid": sid.to_string(),
            "msisdn": phone.msisdn,
            "intl_fmt": phone.intl_fmt,
        }))
    };
    let request = RequestToken {
        medium: Medium::Msisdn,
        address: phone.msisdn.clone(),
        client_secret: secret.to_string(),
        send_attempt: attempt,
        next_link,
    };
    let (sid, token) = match ask(&state, request).await? {
        TokenRequest::Done { sid } => return Ok(answer(sid)),
        TokenRequest::Send { sid, token } => (sid, token),
    };
    let send = async {
        let now = crate::now_ms();
        let limited = |message: &str, retry_after_ms| ApiError::LimitExceeded {
            message: message.into(),
            retry_after_ms,
        };
        state
            .limits
            .msisdn
            .check(&phone.msisdn, now)
            .map_err(|l| limited("Limit exceeded for this number", l.retry_after_ms))?;
        state
            .limits
            .country
            .check(&phone.country_code.to_string(), now)
            .map_err(|l| limited("Limit exceeded for this country", l.retry_after_ms))?;
        let body = state.sms.body(&token);
        state
            .sms
            .send(&phone.msisdn, phone.country_code, &body)
            .await
            .map_err(|e| ApiError::SmsSend(format!("SMS for session {sid}: {e}")))
    };
    deliver(&state, sid, send).await?;
    Ok(answer(sid))
}

/// POST /_matrix/identity/v2/validate/{email,msisdn}/submitToken (and v1)
/// `{sid, client_secret, token}` → `{"success": true}`
async fn submit_token_post(
    req: HttpRequest,
    state: web::Data<AppState>,
    version: web::Data<Version>,
    args: Args,
) -> Result<HttpResponse, ApiError> {
    caller(&req, &state, **version)?;
    let secret = client_secret(&args)?;
    let sid = sid(&args)?;
    let [token] = args.strings(["token"])?;
    submit(&state, sid, secret, token).await?;
    Ok(HttpResponse::Ok().json(json!({ "success": true })))
}

async fn submit(
    state: &AppState,
    sid: i64,
    client_secret: &str,
    token: &str,
) -> Result<Option<String>, ApiError> {
    let message = SubmitToken {
        sid,
        client_secret: client_secret.to_string(),
        token: token.to_string(),
    };
    Ok(ask(state, message).await??)
}

/// GET /_matrix/identity/v2/validate/{email,msisdn}/submitToken?sid=&client_secret=&token=
/// (and v1): the link a person follows. A page from the brand's
/// `verify_response_template.html`, or on success a redirect to the session's `next_link`.
async fn submit_token_link(
    req: HttpRequest,
    state: web::Data<AppState>,
    args: Args,
) -> HttpResponse {
    let outcome = async {
        let secret = client_secret(&args)?;
        let sid = sid(&args)?;
        let [token] = args.strings(["token"])?;
        submit(&state, sid, secret, token).await
    }
    .await;
    let (status, message) = match outcome {
        Ok(Some(next_link)) => {
            return HttpResponse::Found()
                .insert_header((header::LOCATION, next_link))
                .finish()
        }
        Ok(None) => (
            actix_web::http::StatusCode::OK,
            "Verification successful: you can return to your Matrix client.",
        ),
        Err(e) => {
            if let ApiError::Internal(_) = e {
                log::error!("submitToken link: {e}");
            }
            (
                actix_web::http::StatusCode::BAD_REQUEST,
                "Verification failed: the link is wrong or has expired. Ask your Matrix client for a new one.",
            )
        }
    };
    let brand = state
        .templates
        .brand(brand_of(&req, &args).as_deref())
        .to_string();
    match state.templates.render_verify_response(&brand, message) {
        Ok(page) => HttpResponse::build(status)
            .content_type("text/html; charset=utf-8")
            .body(page),
        Err(e) => {
            log::error!("submitToken page: {e}");
            HttpResponse::build(status)
                .content_type("text/plain; charset=utf-8")
                .body(message)
        }
    }
}
