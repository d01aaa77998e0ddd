//! The one place where failures become HTTP answers: `{"errcode", "error"}` JSON with the
//! status the Matrix spec gives each errcode. Internal failures are logged here and answered
//! with a generic message.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::actors::store::StoreError;
use crate::types::InvalidValue;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404 `M_UNRECOGNIZED`: no such endpoint.
    #[error("Unrecognized request")]
    UnknownEndpoint,
    /// 405 `M_UNRECOGNIZED`: the endpoint exists, the method does not.
    #[error("Method not allowed")]
    MethodNotAllowed,
    /// 400 `M_BAD_JSON`.
    #[error("{0}")]
    BadJson(String),
    /// 400 `M_MISSING_PARAMS`, naming every missing parameter.
    #[error("Missing parameters: {}", .0.join(","))]
    MissingParams(Vec<String>),
    /// 400 `M_INVALID_PARAM`.
    #[error("{0}")]
    InvalidParam(String),
    /// 400 `M_TOO_LARGE`: a request asking for more than the configured limit.
    #[error("{0}")]
    TooMany(String),
    /// 413 `M_TOO_LARGE`: the body is over the size limit.
    #[error("Request body too large")]
    BodyTooLarge,
    /// 404 `M_NOT_FOUND`.
    #[error("{0}")]
    NotFound(String),
    /// 403 `M_UNKNOWN_PEER`: a replication push from a certificate naming no active peer.
    #[error("{0}")]
    UnknownPeer(String),
    /// 400 `M_VERIFICATION_FAILED` with the ids that failed (Sydent's replication answer).
    #[error("Verification failed for one or more associations")]
    VerificationFailed(Vec<String>),
    /// 400 `M_INVALID_PARAM` with `failed_ids`: pushed associations, correctly signed, that
    /// this node does not accept (the message says why: an invalid 3PID or Matrix ID, a `ts`
    /// too far ahead of this node's clock).
    #[error("{0}")]
    InvalidAssociations(String, Vec<String>),
    /// 409 `M_ORIGIN_IDS_RESTARTED`: a peer's ids started again below what was applied from it.
    #[error("{0}")]
    OriginIdsRestarted(String),
    /// 400 `M_INVALID_PEPPER` on a v2 lookup, with the algorithm and pepper to use.
    #[error("Unknown or invalid pepper - has it been rotated?")]
    InvalidPepper { lookup_pepper: String },
    /// 401 `M_UNAUTHORIZED`: no access token (v2).
    #[error("Unauthorized")]
    NoToken,
    /// 401 `M_FORBIDDEN`: a homeserver-signed request whose `X-Matrix` authorization is
    /// missing, malformed, for another identity server, or does not verify.
    #[error("{0}")]
    NotAuthenticated(String),
    /// 401 `M_UNKNOWN_TOKEN`: an access token this node does not know (or one the homeserver
    /// did not accept, at registration).
    #[error("{0}")]
    UnknownToken(String),
    /// 403 `M_TERMS_NOT_SIGNED`: the account has not accepted the terms in force.
    #[error("Terms not signed")]
    TermsNotSigned,
    /// 403 `M_UNAUTHORIZED`: e.g. a homeserver outside `homeserver_allow_list`.
    #[error("{0}")]
    Forbidden(String),
    /// 500 `M_UNKNOWN` whose message is sent: a homeserver could not be reached or answered
    /// nonsense (what Sydent answers too, with the same kind of message).
    #[error("{0}")]
    Homeserver(String),
    /// 404 `M_NO_VALID_SESSION`: no session with that sid and client secret.
    #[error("{0}")]
    NoValidSession(String),
    /// 400 `M_SESSION_EXPIRED`.
    #[error("{0}")]
    SessionExpired(String),
    /// 400 `M_SESSION_NOT_VALIDATED`.
    #[error("{0}")]
    SessionNotValidated(String),
    /// 400 `M_TOKEN_INCORRECT`.
    #[error("{0}")]
    TokenIncorrect(String),
    /// 400 `M_INVALID_EMAIL`.
    #[error("{0}")]
    InvalidEmail(String),
    /// 400 `M_INVALID_ADDRESS`: a phone number that does not parse.
    #[error("{0}")]
    InvalidAddress(String),
    /// 400 `M_DESTINATION_REJECTED`: SMS to that country are refused (`smsrule.<cc>`).
    #[error("{0}")]
    DestinationRejected(String),
    /// 400 `M_EMAIL_SEND_ERROR`: the SMTP server could not take the mail (cause logged).
    #[error("Failed to send email")]
    EmailSend(String),
    /// 400 `M_SEND_ERROR`: the SMS gateway could not take the message (cause logged).
    #[error("Failed to send SMS")]
    SmsSend(String),
    /// 429 `M_LIMIT_EXCEEDED` with `retry_after_ms`.
    #[error("{message}")]
    LimitExceeded {
        message: String,
        retry_after_ms: u64,
    },
    /// 403 `M_FORBIDDEN`: e.g. unbinding a 3PID other than the session's.
    #[error("{0}")]
    Refused(String),
    /// 400 `M_UNRECOGNIZED`: e.g. an invite to a medium other than email.
    #[error("{0}")]
    Unrecognized(String),
    /// 404 `M_UNRECOGNIZED`: e.g. an invite token this node does not hold.
    #[error("{0}")]
    UnrecognizedToken(String),
    /// 400 `M_THREEPID_IN_USE` with the Matrix ID the 3PID is bound to (Sydent's answer to an
    /// invite of a bound address).
    #[error("Binding already known")]
    ThreepidInUse { mxid: String },
    /// 500 `M_UNKNOWN`; the cause is logged, not sent.
    #[error("Internal server error")]
    Internal(String),
}

impl ApiError {
    pub fn errcode(&self) -> &'static str {
        match self {
            Self::UnknownEndpoint
            | Self::MethodNotAllowed
            | Self::Unrecognized(_)
            | Self::UnrecognizedToken(_) => "M_UNRECOGNIZED",
            Self::ThreepidInUse { .. } => "M_THREEPID_IN_USE",
            Self::BadJson(_) => "M_BAD_JSON",
            Self::MissingParams(_) => "M_MISSING_PARAMS",
            Self::InvalidParam(_) => "M_INVALID_PARAM",
            Self::TooMany(_) | Self::BodyTooLarge => "M_TOO_LARGE",
            Self::NotFound(_) => "M_NOT_FOUND",
            Self::UnknownPeer(_) => "M_UNKNOWN_PEER",
            Self::VerificationFailed(_) => "M_VERIFICATION_FAILED",
            Self::InvalidAssociations(..) => "M_INVALID_PARAM",
            Self::OriginIdsRestarted(_) => "M_ORIGIN_IDS_RESTARTED",
            Self::Internal(_) | Self::Homeserver(_) => "M_UNKNOWN",
            Self::NoToken | Self::Forbidden(_) => "M_UNAUTHORIZED",
            Self::UnknownToken(_) => "M_UNKNOWN_TOKEN",
            Self::TermsNotSigned => "M_TERMS_NOT_SIGNED",
            Self::InvalidPepper { .. } => "M_INVALID_PEPPER",
            Self::NoValidSession(_) => "M_NO_VALID_SESSION",
            Self::SessionExpired(_) => "M_SESSION_EXPIRED",
            Self::SessionNotValidated(_) => "M_SESSION_NOT_VALIDATED",
            Self::TokenIncorrect(_) => "M_TOKEN_INCORRECT",
            Self::InvalidEmail(_) => "M_INVALID_EMAIL",
            Self::InvalidAddress(_) => "M_INVALID_ADDRESS",
            Self::DestinationRejected(_) => "M_DESTINATION_REJECTED",
            Self::EmailSend(_) => "M_EMAIL_SEND_ERROR",
            Self::SmsSend(_) => "M_SEND_ERROR",
            Self::LimitExceeded { .. } => "M_LIMIT_EXCEEDED",
            Self::Refused(_) | Self::NotAuthenticated(_) => "M_FORBIDDEN",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::UnknownEndpoint
            | Self::NotFound(_)
            | Self::NoValidSession(_)
            | Self::UnrecognizedToken(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadJson(_)
            | Self::MissingParams(_)
            | Self::InvalidParam(_)
            | Self::TooMany(_)
            | Self::VerificationFailed(_)
            | Self::InvalidPepper { .. }
            | Self::InvalidAssociations(..)
            | Self::SessionExpired(_)
            | Self::SessionNotValidated(_)
            | Self::TokenIncorrect(_)
            | Self::InvalidEmail(_)
            | Self::InvalidAddress(_)
            | Self::DestinationRejected(_)
            | Self::EmailSend(_)
            | Self::SmsSend(_)
            | Self::Unrecognized(_)
            | Self::ThreepidInUse { .. } => StatusCode::BAD_REQUEST,
            Self::LimitExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Refused(_) => StatusCode::FORBIDDEN,
            Self::OriginIdsRestarted(_) => StatusCode::CONFLICT,
            Self::UnknownPeer(_) | Self::TermsNotSigned | Self::Forbidden(_) => {
                StatusCode::FORBIDDEN
            }
            Self::NoToken | Self::UnknownToken(_) | Self::NotAuthenticated(_) => {
                StatusCode::UNAUTHORIZED
            }
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Internal(_) | Self::Homeserver(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let Self::Internal(cause) = self {
            log::error!("internal error: {cause}");
        }
        if let Self::Homeserver(cause) = self {
            log::warn!("{cause}");
        }
        if let Self::EmailSend(cause) | Self::SmsSend(cause) = self {
            log::warn!("{cause}");
        }
        let mut body = json!({
            "errcode": self.errcode(),
            "error": self.to_string(),
        });
        if let Self::VerificationFailed(ids) | Self::InvalidAssociations(_, ids) = self {
            body["failed_ids"] = json!(ids);
        }
        if let Self::LimitExceeded { retry_after_ms, .. } = self {
            body["retry_after_ms"] = json!(retry_after_ms);
        }
        if let Self::ThreepidInUse { mxid } = self {
            body["mxid"] = json!(mxid);
        }
        if let Self::InvalidPepper { lookup_pepper } = self {
            body["algorithm"] = json!("sha256");
            body["lookup_pepper"] = json!(lookup_pepper);
        }
        HttpResponse::build(self.status_code()).json(body)
    }
}

impl From<InvalidValue> for ApiError {
    fn from(e: InvalidValue) -> Self {
        Self::InvalidParam(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::OriginIdsRestarted { .. } => Self::OriginIdsRestarted(e.to_string()),
            StoreError::Db(_) | StoreError::Sign(_) | StoreError::Stopped => {
                Self::Internal(e.to_string())
            }
        }
    }
}

impl From<super::x_matrix::XMatrixError> for ApiError {
    fn from(e: super::x_matrix::XMatrixError) -> Self {
        use super::x_matrix::XMatrixError;
        use crate::homeserver::keys::ServerKeyError;
        match e {
            XMatrixError::InvalidOrigin(_) => Self::InvalidParam(e.to_string()),
            XMatrixError::Key(ServerKeyError::Fetch(cause)) => Self::Homeserver(format!(
                "Unable to contact the Matrix homeserver to authenticate request ({cause})"
            )),
            XMatrixError::Missing
            | XMatrixError::Malformed(_)
            | XMatrixError::WrongDestination { .. }
            | XMatrixError::BadSignature { .. }
            | XMatrixError::Key(ServerKeyError::UnknownKey { .. })
            | XMatrixError::Key(ServerKeyError::Expired { .. }) => {
                Self::NotAuthenticated(e.to_string())
            }
        }
    }
}

impl From<crate::lookup_index::WarmUpError> for ApiError {
    fn from(e: crate::lookup_index::WarmUpError) -> Self {
        Self::Internal(format!("lookup while the index warms up: {e}"))
    }
}

impl From<crate::resolve::ResolveError> for ApiError {
    fn from(e: crate::resolve::ResolveError) -> Self {
        match e {
            crate::resolve::ResolveError::WarmUp(e) => e.into(),
            crate::resolve::ResolveError::Stored(e) => Self::Internal(e),
        }
    }
}

impl From<actix::MailboxError> for ApiError {
    fn from(e: actix::MailboxError) -> Self {
        Self::Internal(format!("association store unreachable: {e}"))
    }
}

impl From<crate::actors::sessions::SessionError> for ApiError {
    fn from(e: crate::actors::sessions::SessionError) -> Self {
        use crate::actors::sessions::SessionError;
        match e {
            SessionError::NoSession => Self::NoValidSession(e.to_string()),
            SessionError::Expired => Self::SessionExpired(e.to_string()),
            SessionError::NotValidated => Self::SessionNotValidated(e.to_string()),
            SessionError::TokenIncorrect { .. } => Self::TokenIncorrect(e.to_string()),
            SessionError::Store(e) => e.into(),
        }
    }
}
