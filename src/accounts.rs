//! v2 accounts in memory: which stored token belongs to whom, and who consented to which terms
//! version, so that authenticating a request and checking its terms never read the database.
//! Loaded once at start; the store's commit thread writes the tables, and the handlers update
//! this after it has committed (a logout takes effect before its answer is sent).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

use crate::db::accounts::AccountRows;

/// A write to the account tables, done by the association store's commit thread.
#[derive(Debug, Clone)]
pub enum AccountWrite {
    /// Create the account if needed and add a token (stored form).
    Register {
        user_id: String,
        stored_token: String,
    },
    Logout {
        stored_token: String,
    },
    AcceptTerms {
        user_id: String,
        urls: Vec<String>,
        consent_version: Option<String>,
    },
}

#[derive(Default)]
struct State {
    /// stored token → user id
    tokens: HashMap<String, Arc<str>>,
    /// user id → the terms version consented to
    consent: HashMap<Arc<str>, Option<String>>,
    /// user id → URLs accepted
    accepted: HashMap<Arc<str>, HashSet<String>>,
}

/// An authenticated request's account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub user_id: Arc<str>,
    /// The token's stored form (to log it out).
    pub stored_token: String,
    pub consent_version: Option<String>,
}

#[derive(Clone, Default)]
pub struct Accounts(Arc<RwLock<State>>);

impl Accounts {
    pub fn from_rows(rows: AccountRows) -> Self {
        let mut state = State::default();
        for (user_id, consent) in rows.accounts {
            state.consent.insert(user_id.into(), consent);
        }
        for (token, user_id) in rows.tokens {
            let user_id = state.intern(&user_id);
            state.tokens.insert(token, user_id);
        }
        for (user_id, url) in rows.accepted {
            let user_id = state.intern(&user_id);
            state.accepted.entry(user_id).or_default().insert(url);
        }
        Self(Arc::new(RwLock::new(state)))
    }

    /// The account of a token as the client sent it.
    pub fn authenticate(&self, token: &str) -> Option<Account> {
        let stored = stored_token(token);
        let state = self.0.read().expect("accounts lock");
        let user_id = state.tokens.get(&stored)?;
        Some(Account {
            user_id: Arc::clone(user_id),
            consent_version: state.consent.get(user_id).cloned().flatten(),
            stored_token: stored,
        })
    }

    /// The URLs `user_id` accepted so far.
    pub fn accepted_urls(&self, user_id: &str) -> HashSet<String> {
        let state = self.0.read().expect("accounts lock");
        state.accepted.get(user_id).cloned().unwrap_or_default()
    }

    /// Mirrors a committed write.
    pub fn apply(&self, write: &AccountWrite) {
        let mut state = self.0.write().expect("accounts lock");
        match write {
            AccountWrite::Register {
                user_id,
                stored_token,
            } => {
                let user_id = state.intern(user_id);
                state.consent.entry(Arc::clone(&user_id)).or_insert(None);
                state.tokens.insert(stored_token.clone(), user_id);
            }
            AccountWrite::Logout { stored_token } => {
                state.tokens.remove(stored_token);
            }
            AccountWrite::AcceptTerms {
                user_id,
                urls,
                consent_version,
            } => {
                let user_id = state.intern(user_id);
                state
                    .accepted
                    .entry(Arc::clone(&user_id))
                    .or_default()
                    .extend(urls.iter().cloned());
                if let Some(version) = consent_version {
                    state.consent.insert(user_id, Some(version.clone()));
                }
            }
        }
    }
}

impl State {
    fn intern(&mut self, user_id: &str) -> Arc<str> {
        match self.consent.get_key_value(user_id) {
            Some((key, _)) => Arc::clone(key),
            None => {
                let key: Arc<str> = user_id.into();
                self.consent.insert(Arc::clone(&key), None);
                key
            }
        }
    }
}

/// How a token is stored: `sha256:` and the hex SHA-256 of the token, never the token.
pub fn stored_token(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// A new access token: 64 random alphanumerics (as Sydent's).
pub fn new_token() -> String {
    crate::crypto::random_string(crate::crypto::ALPHANUMERIC, 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_stored_hashed() {
        let a = new_token();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, new_token());
        let stored = stored_token(&a);
        assert!(stored.starts_with("sha256:") && !stored.contains(&a));
    }

    #[test]
    fn the_cache_follows_writes() {
        let accounts = Accounts::from_rows(AccountRows {
            accounts: vec![("@old:hs".into(), Some("v1".into()))],
            tokens: vec![(stored_token("old-token"), "@old:hs".into())],
            accepted: vec![("@old:hs".into(), "https://x/tos".into())],
        });
        let old = accounts.authenticate("old-token").unwrap();
        assert_eq!(&*old.user_id, "@old:hs");
        assert_eq!(old.consent_version.as_deref(), Some("v1"));
        assert!(accounts.accepted_urls("@old:hs").contains("https://x/tos"));
        assert!(accounts.authenticate("other").is_none());

        let token = new_token();
        accounts.apply(&AccountWrite::Register {
            user_id: "@new:hs".into(),
            stored_token: stored_token(&token),
        });
        let new = accounts.authenticate(&token).unwrap();
        assert_eq!((&*new.user_id, new.consent_version), ("@new:hs", None));
        accounts.apply(&AccountWrite::AcceptTerms {
            user_id: "@new:hs".into(),
            urls: vec!["https://x/tos".into()],
            consent_version: Some("v2".into()),
        });
        assert_eq!(
            accounts
                .authenticate(&token)
                .unwrap()
                .consent_version
                .as_deref(),
            Some("v2")
        );
        accounts.apply(&AccountWrite::Logout {
            stored_token: stored_token(&token),
        });
        assert!(accounts.authenticate(&token).is_none());
        assert!(accounts.authenticate("old-token").is_some());
    }
}
