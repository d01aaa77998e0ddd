//! Homeservers' signing keys, for the requests a homeserver signs (today the unbind): fetched
//! with `GET /_matrix/key/v2/server` on the homeserver through the [`HomeserverClient`]
//! (server-name resolution, verified TLS, the IP filter, answers capped at 50 KiB) and kept in
//! memory per homeserver.
//!
//! An answer is used only if it names the homeserver asked (`server_name`) and carries that
//! homeserver's signature by one of the keys it lists (Sydent checks neither, so whoever could
//! answer in the homeserver's place could make up its keys). Of the answer, only `verify_keys`
//! count: `old_verify_keys` never authenticate a request. The keys are kept until the
//! answer's `valid_until_ts`, at most 24 hours; an answer without it serves the request that
//! fetched it only (as Sydent). A key whose `valid_until_ts` has passed is not used.
//!
//! A request naming a key id that the cached keys lack, or a key that has expired, makes the
//! node ask again, but not more than once every 30 seconds per homeserver: requests signed
//! with made-up key ids cannot make the node hammer a homeserver. (Without a usable cached
//! answer, e.g. after the homeserver could not be reached, every request asks: the next one
//! may succeed.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use super::{HomeserverClient, HomeserverError};
use crate::crypto::{verify_json, VerifyKey};
use crate::types::ServerName;

/// Key answers are read up to this size (Sydent's limit).
pub const KEY_ANSWER_LIMIT: usize = 50 * 1024;
/// Longest a key answer is kept, whatever its `valid_until_ts` says.
const MAX_CACHE_MS: i64 = 24 * 3600 * 1000;
/// Shortest time between two fetches of one homeserver's keys while an answer is cached.
const REFETCH_INTERVAL_MS: i64 = 30_000;
/// Homeservers whose answers are kept before the expired ones are dropped.
const MAX_CACHED_SERVERS: usize = 10_000;
/// Where the keys are asked for (the server-server spec's path).
const KEY_PATH: &str = "/_matrix/key/v2/server";

/// Why a homeserver's key answer could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyFetchError {
    #[error(transparent)]
    Homeserver(#[from] HomeserverError),
    #[error("{server} answered its key request with status {status}")]
    Status { server: String, status: u16 },
    #[error("{server}'s key answer is unusable: {why}")]
    Unusable { server: String, why: String },
}

/// Why no key of a homeserver could check its signature.
#[derive(Debug, thiserror::Error)]
pub enum ServerKeyError {
    #[error("{server} has no key {key_id}")]
    UnknownKey { server: String, key_id: String },
    #[error("{server}'s key {key_id} expired at {valid_until_ts}")]
    Expired {
        server: String,
        key_id: String,
        valid_until_ts: i64,
    },
    #[error(transparent)]
    Fetch(#[from] KeyFetchError),
}

/// A homeserver's keys as one answer gave them.
#[derive(Debug, Clone)]
struct KeySet {
    verify_keys: HashMap<String, VerifyKey>,
    /// The answer's `valid_until_ts` (None: it had none; usable now only).
    valid_until_ts: Option<i64>,
}

impl KeySet {
    fn key(&self, server: &str, key_id: &str, now_ms: i64) -> Result<VerifyKey, ServerKeyError> {
        let key = self
            .verify_keys
            .get(key_id)
            .ok_or_else(|| ServerKeyError::UnknownKey {
                server: server.to_string(),
                key_id: key_id.to_string(),
            })?;
        match self.valid_until_ts {
            Some(valid_until_ts) if valid_until_ts <= now_ms => Err(ServerKeyError::Expired {
                server: server.to_string(),
                key_id: key_id.to_string(),
                valid_until_ts,
            }),
            _ => Ok(*key),
        }
    }
}

/// A cached answer: its keys, until when they are kept, and when it was fetched.
#[derive(Debug, Clone)]
struct Cached {
    keys: KeySet,
    /// `valid_until_ts` capped at 24 hours after the fetch.
    kept_until_ms: i64,
    fetched_at_ms: i64,
}

impl Cached {
    /// The answer the cache gives without asking the homeserver, or None to ask it: the key
    /// if the cache holds it valid; an unknown or expired key only if the keys were fetched
    /// less than [`REFETCH_INTERVAL_MS`] ago.
    fn answer(
        &self,
        server: &str,
        key_id: &str,
        now_ms: i64,
    ) -> Option<Result<VerifyKey, ServerKeyError>> {
        let found = self.keys.key(server, key_id, now_ms);
        let fresh = found.is_ok() && self.kept_until_ms > now_ms;
        (fresh || now_ms - self.fetched_at_ms < REFETCH_INTERVAL_MS).then_some(found)
    }
}

/// The homeservers' keys: one per node, shared by the HTTP workers (`AppState`).
pub struct ServerKeys {
    client: Arc<HomeserverClient>,
    /// server name → its last usable answer that had a `valid_until_ts`. A mutex rather than
    /// an actor: it is held only to read or replace one entry, never across a fetch, and a
    /// message round trip would cost more than the lookup.
    cache: Mutex<HashMap<String, Cached>>,
}

impl ServerKeys {
    pub fn new(client: Arc<HomeserverClient>) -> Self {
        Self {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// `server`'s key `key_id`, valid at `now_ms`: from the cache, or fetched (see the module
    /// documentation for when).
    pub async fn verify_key(
        &self,
        server: &ServerName,
        key_id: &str,
        now_ms: i64,
    ) -> Result<VerifyKey, ServerKeyError> {
        let cached = self.lock().get(server.as_str()).cloned();
        if let Some(answer) = cached.and_then(|c| c.answer(server, key_id, now_ms)) {
            return answer;
        }
        let keys = self.fetch(server).await?;
        let found = keys.key(server, key_id, now_ms);
        if let Some(valid_until_ts) = keys.valid_until_ts {
            self.remember(
                server,
                Cached {
                    keys,
                    kept_until_ms: valid_until_ts.min(now_ms.saturating_add(MAX_CACHE_MS)),
                    fetched_at_ms: now_ms,
                },
                now_ms,
            );
        }
        found
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        // Poisoned only if an insert panicked: the map itself is whole.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, server: &ServerName, cached: Cached, now_ms: i64) {
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED_SERVERS {
            cache.retain(|_, c| {
                c.kept_until_ms > now_ms || now_ms - c.fetched_at_ms < REFETCH_INTERVAL_MS
            });
        }
        if cache.len() < MAX_CACHED_SERVERS || cache.contains_key(server.as_str()) {
            cache.insert(server.to_string(), cached);
        }
    }

    async fn fetch(&self, server: &ServerName) -> Result<KeySet, KeyFetchError> {
        let answer = self.client.get(server, KEY_PATH, KEY_ANSWER_LIMIT).await?;
        if answer.status != 200 {
            return Err(KeyFetchError::Status {
                server: server.to_string(),
                status: answer.status,
            });
        }
        parse_key_answer(&answer.body, server).map_err(|why| KeyFetchError::Unusable {
            server: server.to_string(),
            why,
        })
    }
}

/// The keys in `server`'s answer to `GET /_matrix/key/v2/server`, if it names `server` and
/// is signed by `server` with keys it lists (every such signature must verify, and there
/// must be one). Key ids of other algorithms, or keys that do not decode, are left out.
fn parse_key_answer(body: &[u8], server: &ServerName) -> Result<KeySet, String> {
    let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(body) else {
        return Err("not a JSON object".into());
    };
    match answer.get("server_name").and_then(Value::as_str) {
        Some(name) if name == server.as_str() => {}
        Some(name) => return Err(format!("it names the server '{name}'")),
        None => return Err("no server_name".into()),
    }
    let verify_keys: HashMap<String, VerifyKey> = answer
        .get("verify_keys")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter(|(key_id, _)| key_id.starts_with("ed25519:"))
        .filter_map(|(key_id, entry)| {
            let key = VerifyKey::from_base64(entry.get("key")?.as_str()?).ok()?;
            Some((key_id.clone(), key))
        })
        .collect();
    if verify_keys.is_empty() {
        return Err("no usable ed25519 key in verify_keys".into());
    }
    let signatures = answer
        .get("signatures")
        .and_then(|s| s.get(server.as_str()))
        .and_then(Value::as_object)
        .map(Map::keys)
        .into_iter()
        .flatten()
        .filter_map(|key_id| Some((key_id, verify_keys.get(key_id)?)))
        .collect::<Vec<_>>();
    if signatures.is_empty() {
        return Err("it is not signed by any of the keys it lists".into());
    }
    for (key_id, key) in signatures {
        verify_json(&answer, server, key_id, key)
            .map_err(|_| format!("its signature with {key_id} does not verify"))?;
    }
    Ok(KeySet {
        verify_keys,
        valid_until_ts: answer.get("valid_until_ts").and_then(Value::as_i64),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::crypto::{sign_json, NodeSigningKey};

    const NOW: i64 = 1_700_000_000_000;

    fn server() -> ServerName {
        ServerName::parse("hs.example").unwrap()
    }

    fn answer(signer: &str, key: &NodeSigningKey, listed: &NodeSigningKey) -> Map<String, Value> {
        let mut object = json!({
            "server_name": "hs.example",
            "valid_until_ts": NOW + 3_600_000,
            "verify_keys": {listed.key_id(): {"key": listed.verify_key().to_base64()}},
            "old_verify_keys": {},
        })
        .as_object()
        .unwrap()
        .clone();
        sign_json(&mut object, signer, key).unwrap();
        object
    }

    fn parse(object: &Map<String, Value>) -> Result<KeySet, String> {
        parse_key_answer(
            Value::Object(object.clone()).to_string().as_bytes(),
            &server(),
        )
    }

    #[test]
    fn a_self_signed_answer_gives_its_keys() {
        let key = NodeSigningKey::from_seed("a", [7; 32]);
        let keys = parse(&answer("hs.example", &key, &key)).unwrap();
        assert_eq!(keys.valid_until_ts, Some(NOW + 3_600_000));
        let found = keys.key("hs.example", "ed25519:a", NOW).unwrap();
        assert_eq!(found, key.verify_key());
        assert!(matches!(
            keys.key("hs.example", "ed25519:b", NOW),
            Err(ServerKeyError::UnknownKey { .. })
        ));
        assert!(matches!(
            keys.key("hs.example", "ed25519:a", NOW + 3_600_000),
            Err(ServerKeyError::Expired { .. })
        ));
    }

    #[test]
    fn the_cache_asks_again_for_unknown_or_expired_keys_at_most_every_30_s() {
        let key = NodeSigningKey::from_seed("a", [7; 32]);
        let cached = Cached {
            keys: parse(&answer("hs.example", &key, &key)).unwrap(),
            kept_until_ms: NOW + 3_600_000,
            fetched_at_ms: NOW,
        };
        let asks = |key_id: &str, at: i64| cached.answer("hs.example", key_id, at).is_none();
        // A known key is served until the answer's validity ends, then asked for.
        assert!(!asks("ed25519:a", NOW + 3_599_999));
        assert!(asks("ed25519:a", NOW + 3_600_000));
        // An unknown key: refused from the cache for 30 s after the fetch, then asked for.
        assert!(matches!(
            cached.answer("hs.example", "ed25519:b", NOW + 29_999),
            Some(Err(ServerKeyError::UnknownKey { .. }))
        ));
        assert!(asks("ed25519:b", NOW + REFETCH_INTERVAL_MS));
        // An answer that came already expired: refused for 30 s, then asked again.
        let stale = Cached {
            keys: KeySet {
                valid_until_ts: Some(NOW - 1),
                ..cached.keys.clone()
            },
            kept_until_ms: NOW - 1,
            fetched_at_ms: NOW,
        };
        assert!(matches!(
            stale.answer("hs.example", "ed25519:a", NOW + 1),
            Some(Err(ServerKeyError::Expired { .. }))
        ));
        assert!(stale
            .answer("hs.example", "ed25519:a", NOW + REFETCH_INTERVAL_MS)
            .is_none());
    }

    #[test]
    fn answers_not_signed_by_their_own_keys_are_refused() {
        let key = NodeSigningKey::from_seed("a", [7; 32]);
        let other = NodeSigningKey::from_seed("a", [8; 32]);
        // Signed with another key under the listed key id.
        let err = parse(&answer("hs.example", &other, &key)).unwrap_err();
        assert!(err.contains("does not verify"), "{err}");
        // Signed by someone else.
        let err = parse(&answer("evil.example", &key, &key)).unwrap_err();
        assert!(err.contains("not signed"), "{err}");
        // Altered after signing.
        let mut altered = answer("hs.example", &key, &key);
        altered.insert("valid_until_ts".into(), json!(NOW + 999_999_999));
        assert!(parse(&altered).unwrap_err().contains("does not verify"));
        // Naming another server.
        let mut object = answer("hs.example", &key, &key);
        object.insert("server_name".into(), json!("evil.example"));
        assert!(parse(&object).unwrap_err().contains("evil.example"));
        for body in ["", "[]", "{\"server_name\": \"hs.example\"}"] {
            assert!(parse_key_answer(body.as_bytes(), &server()).is_err());
        }
    }

    #[test]
    fn old_keys_and_other_algorithms_do_not_count() {
        let key = NodeSigningKey::from_seed("a", [7; 32]);
        let old = NodeSigningKey::from_seed("old", [9; 32]);
        let mut object = answer("hs.example", &key, &key);
        object.remove("signatures");
        object.insert(
            "old_verify_keys".into(),
            json!({old.key_id(): {"key": old.verify_key().to_base64(), "expired_ts": NOW}}),
        );
        object["verify_keys"]
            .as_object_mut()
            .unwrap()
            .insert("curve25519:x".into(), json!({"key": "AAAA"}));
        sign_json(&mut object, "hs.example", &key).unwrap();
        let keys = parse(&object).unwrap();
        assert_eq!(
            keys.verify_keys.keys().collect::<Vec<_>>(),
            ["ed25519:a"],
            "{keys:?}"
        );
        // Without valid_until_ts the answer is usable, but not cached (see verify_key).
        object.remove("valid_until_ts");
        object.remove("signatures");
        sign_json(&mut object, "hs.example", &key).unwrap();
        assert_eq!(parse(&object).unwrap().valid_until_ts, None);
    }
}
