//! The validation-session actor: the one owner of email and phone validation sessions
//! (Sydent's `threepid_validation_sessions` and `threepid_token_auths`), all of them in
//! memory, each change written through the association store's queue in the order it was
//! decided.
//!
//! A requestToken asks [`RequestToken`]: a session is found or created for (medium, address,
//! client secret) and the actor answers whether a token must be sent. Sending happens on the
//! requesting handler's task, never here; the handler then reports [`Sent`], and only a sent
//! token makes a session (or a new `send_attempt`) durable: an SMTP or SMS failure leaves
//! nothing behind. [`SubmitToken`] validates (tokens compared in constant time, at most
//! [`MAX_WRONG_TOKENS`] wrong ones per session, after which the session is closed), and
//! [`GetValidated`] is what getValidated3pid, bind and unbind ask. A session is valid
//! [`SESSION_LIFETIME_MS`] from its last modification (creation, a send, validation), as the
//! spec says (Sydent counts from the last requestToken only), and is swept from memory and
//! the database [`SESSION_RETENTION_MS`] after it.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;

use super::store::{StoreError, StoreQueue};
use crate::crypto::{random_below, random_string, secrets_equal, ALPHANUMERIC, DIGITS};
use crate::db::sessions::{SessionRow, SessionWrite};
use crate::types::Medium;

/// How long a session can be validated and used after its last modification.
pub const SESSION_LIFETIME_MS: i64 = 24 * 3600 * 1000;
/// How long after its last modification an expired session is still known (answering
/// `M_SESSION_EXPIRED` rather than `M_NO_VALID_SESSION`) before it is swept.
pub const SESSION_RETENTION_MS: i64 = 2 * SESSION_LIFETIME_MS;
/// Wrong tokens a session takes before it is closed: with the per-number SMS limits, a
/// 6-digit code cannot be guessed (Sydent has no limit at all).
pub const MAX_WRONG_TOKENS: i64 = 10;
/// How often expired sessions are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    /// No session with that sid, or not with that client secret (the same answer, so a sid
    /// cannot be probed).
    #[error("No valid session was found matching that sid and client secret")]
    NoSession,
    #[error("This validation session has expired: call requestToken again")]
    Expired,
    #[error("This validation session has not yet been completed")]
    NotValidated,
    /// A wrong token; `closed` when it was the last one the session takes.
    #[error("{}", if *.closed { "The token is incorrect, and too many incorrect tokens were submitted: this session is closed, request a new token" } else { "The token is incorrect" })]
    TokenIncorrect { closed: bool },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Sent by the requestToken handlers once the request is valid (address normalised as the
/// medium requires, `next_link` checked). Answers what to do.
#[derive(Message, Debug)]
#[rtype(result = "TokenRequest")]
pub struct RequestToken {
    pub medium: Medium,
    pub address: String,
    pub client_secret: String,
    pub send_attempt: i64,
    pub next_link: Option<String>,
}

/// What a requestToken must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRequest {
    /// Send `token` for session `sid`, then report [`Sent`].
    Send { sid: i64, token: String },
    /// Nothing to send (this `send_attempt` was sent already, or is being sent): answer `sid`.
    Done { sid: i64 },
}

/// Sent by a requestToken handler after it tried to send the token [`TokenRequest::Send`]
/// gave it. When `delivered`, answers once the session is committed; otherwise the session
/// is put back as it was before the request (or forgotten, if the request created it).
#[derive(Message, Debug)]
#[rtype(result = "Result<(), StoreError>")]
pub struct Sent {
    pub sid: i64,
    pub delivered: bool,
}

/// Sent by the submitToken handlers (POST, and the GET link). Answers the session's
/// `next_link` once the validation is committed.
#[derive(Message, Debug)]
#[rtype(result = "Result<Option<String>, SessionError>")]
pub struct SubmitToken {
    pub sid: i64,
    pub client_secret: String,
    pub token: String,
}

/// Sent by getValidated3pid, bind and unbind: the validated 3PID of a live session.
#[derive(Message, Debug)]
#[rtype(result = "Result<Validated, SessionError>")]
pub struct GetValidated {
    pub sid: i64,
    pub client_secret: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    pub medium: Medium,
    /// As the client gave it at requestToken.
    pub address: String,
    /// When it was validated (ms).
    pub validated_at: i64,
}

/// A session in memory: its stored form, plus what a send in flight would undo.
struct Session {
    row: SessionRow,
    medium: Medium,
    /// Committed at least once.
    stored: bool,
    /// A send is in flight; on failure the session goes back to this (send_attempt, mtime,
    /// next_link).
    sending: Option<(i64, i64, Option<String>)>,
}

type Key = (Medium, String, String);

pub struct ValidationSessions {
    sessions: HashMap<i64, Session>,
    by_key: HashMap<Key, i64>,
    store: StoreQueue,
    now_ms: fn() -> i64,
}

impl ValidationSessions {
    /// From the sessions stored (`load_since(now - SESSION_RETENTION_MS)`); rows of an unknown
    /// medium are ignored.
    pub fn new(rows: Vec<SessionRow>, store: StoreQueue, now_ms: fn() -> i64) -> Self {
        let mut actor = Self {
            sessions: HashMap::with_capacity(rows.len()),
            by_key: HashMap::with_capacity(rows.len()),
            store,
            now_ms,
        };
        for row in rows {
            let Some(medium) = Medium::parse(&row.medium) else {
                continue;
            };
            actor.by_key.insert(
                (medium, row.address.clone(), row.client_secret.clone()),
                row.sid,
            );
            actor.sessions.insert(
                row.sid,
                Session {
                    row,
                    medium,
                    stored: true,
                    sending: None,
                },
            );
        }
        actor
    }

    fn new_sid(&self) -> i64 {
        loop {
            let sid = i64::from(random_below(i32::MAX as u32));
            if !self.sessions.contains_key(&sid) {
                return sid;
            }
        }
    }

    fn save(&self, sid: i64) -> impl std::future::Future<Output = Result<(), StoreError>> {
        let row = self.sessions.get(&sid).map(|s| s.row.clone());
        let write = row.map(|row| self.store.write_session(SessionWrite::Save(row)));
        async move {
            match write {
                Some(write) => write.await,
                None => Ok(()),
            }
        }
    }

    fn forget(&mut self, sid: i64) -> Option<Session> {
        let session = self.sessions.remove(&sid)?;
        self.by_key.remove(&(
            session.medium,
            session.row.address.clone(),
            session.row.client_secret.clone(),
        ));
        Some(session)
    }

    /// The session `sid` if `client_secret` is its secret.
    fn find(&self, sid: i64, client_secret: &str) -> Result<&Session, SessionError> {
        self.sessions
            .get(&sid)
            .filter(|s| secrets_equal(&s.row.client_secret, client_secret))
            .ok_or(SessionError::NoSession)
    }

    fn sweep(&mut self) {
        let cutoff = (self.now_ms)() - SESSION_RETENTION_MS;
        let old: Vec<i64> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.row.mtime < cutoff && s.sending.is_none())
            .map(|(sid, _)| *sid)
            .collect();
        for sid in &old {
            self.forget(*sid);
        }
        if !old.is_empty() {
            log::debug!("validation sessions: swept {} expired", old.len());
        }
        let done = self
            .store
            .write_session(SessionWrite::DeleteOlderThan(cutoff));
        actix::spawn(async move {
            if let Err(e) = done.await {
                log::warn!("validation sessions: sweeping the database failed: {e}");
            }
        });
    }
}

fn expired(row: &SessionRow, now: i64) -> bool {
    row.mtime.saturating_add(SESSION_LIFETIME_MS) < now
}

impl Actor for ValidationSessions {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.sweep();
        ctx.run_interval(SWEEP_EVERY, |actor, _| actor.sweep());
    }
}

impl Handler<RequestToken> for ValidationSessions {
    type Result = MessageResult<RequestToken>;

    fn handle(&mut self, msg: RequestToken, _: &mut Self::Context) -> Self::Result {
        let now = (self.now_ms)();
        let key = (msg.medium, msg.address, msg.client_secret);
        if let Some(session) = self
            .by_key
            .get(&key)
            .and_then(|sid| self.sessions.get_mut(sid))
        {
            let sid = session.row.sid;
            // A repeated (or lower) attempt sends nothing, as the spec says; so does one made
            // while a send is in flight (it carries the same token).
            if msg.send_attempt <= session.row.send_attempt || session.sending.is_some() {
                return MessageResult(TokenRequest::Done { sid });
            }
            let row = &mut session.row;
            session.sending = Some((row.send_attempt, row.mtime, row.next_link.clone()));
            row.send_attempt = msg.send_attempt;
            row.mtime = now;
            if msg.next_link.is_some() {
                row.next_link = msg.next_link;
            }
            return MessageResult(TokenRequest::Send {
                sid,
                token: row.token.clone(),
            });
        }
        let sid = self.new_sid();
        let token = match msg.medium {
            Medium::Email => random_string(ALPHANUMERIC, 32),
            Medium::Msisdn => random_string(DIGITS, 6),
        };
        let (medium, address, client_secret) = key;
        self.by_key
            .insert((medium, address.clone(), client_secret.clone()), sid);
        self.sessions.insert(
            sid,
            Session {
                row: SessionRow {
                    sid,
                    medium: medium.as_str().to_string(),
                    address,
                    client_secret,
                    validated: false,
                    mtime: now,
                    token: token.clone(),
                    send_attempt: msg.send_attempt,
                    next_link: msg.next_link,
                    failed_attempts: 0,
                },
                medium,
                stored: false,
                sending: Some((-1, now, None)),
            },
        );
        MessageResult(TokenRequest::Send { sid, token })
    }
}

impl Handler<Sent> for ValidationSessions {
    type Result = ResponseFuture<Result<(), StoreError>>;

    fn handle(&mut self, msg: Sent, _: &mut Self::Context) -> Self::Result {
        let Some(session) = self.sessions.get_mut(&msg.sid) else {
            return Box::pin(async { Ok(()) });
        };
        let Some((attempt, mtime, next_link)) = session.sending.take() else {
            return Box::pin(async { Ok(()) });
        };
        if msg.delivered {
            session.stored = true;
            return Box::pin(self.save(msg.sid));
        }
        if session.stored {
            session.row.send_attempt = attempt;
            session.row.mtime = mtime;
            session.row.next_link = next_link;
        } else {
            self.forget(msg.sid);
        }
        Box::pin(async { Ok(()) })
    }
}

impl Handler<SubmitToken> for ValidationSessions {
    type Result = ResponseFuture<Result<Option<String>, SessionError>>;

    fn handle(&mut self, msg: SubmitToken, _: &mut Self::Context) -> Self::Result {
        let now = (self.now_ms)();
        let session = match self.find(msg.sid, &msg.client_secret) {
            Ok(_) => self.sessions.get_mut(&msg.sid).expect("found above"),
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        if expired(&session.row, now) {
            return Box::pin(async { Err(SessionError::Expired) });
        }
        let stored = session.stored;
        if secrets_equal(&session.row.token, &msg.token) {
            let next_link = session.row.next_link.clone();
            if session.row.validated {
                return Box::pin(async move { Ok(next_link) });
            }
            session.row.validated = true;
            session.row.mtime = now;
            // A session whose first send is still in flight is saved, validated, by [`Sent`].
            let saved = stored.then(|| {
                self.store.write_session(SessionWrite::Validated {
                    sid: msg.sid,
                    mtime: now,
                })
            });
            return Box::pin(async move {
                if let Some(saved) = saved {
                    saved.await?;
                }
                Ok(next_link)
            });
        }
        session.row.failed_attempts += 1;
        let closed = session.row.failed_attempts >= MAX_WRONG_TOKENS;
        if closed {
            self.forget(msg.sid);
            if stored {
                // Queued now; nobody waits for the commit of a failure.
                drop(
                    self.store
                        .write_session(SessionWrite::Delete(vec![msg.sid])),
                );
            }
        } else if stored {
            drop(self.save(msg.sid));
        }
        Box::pin(async move { Err(SessionError::TokenIncorrect { closed }) })
    }
}

impl Handler<GetValidated> for ValidationSessions {
    type Result = Result<Validated, SessionError>;

    fn handle(&mut self, msg: GetValidated, _: &mut Self::Context) -> Self::Result {
        let session = self.find(msg.sid, &msg.client_secret)?;
        if expired(&session.row, (self.now_ms)()) {
            return Err(SessionError::Expired);
        }
        if !session.row.validated {
            return Err(SessionError::NotValidated);
        }
        Ok(Validated {
            medium: session.medium,
            address: session.row.address.clone(),
            validated_at: session.row.mtime,
        })
    }
}
