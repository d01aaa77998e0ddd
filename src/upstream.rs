//! The upstream identity server (`[proxy] identity`): lookups that neither the directory nor
//! this node's bindings answer are asked of it, one request per client request.
//!
//! - Many 3PIDs (v1 `bulk_lookup`, v2 lookups with algorithm `none`) go to the upstream's v1
//!   `bulk_lookup`; with `[proxy] access_token`, to its v2 `hash_details` + `lookup` with
//!   `sha256` instead, so addresses leave the node only hashed (the pepper is kept between
//!   requests and asked again when the upstream says it changed).
//! - One 3PID (v1 `lookup`) goes to the upstream's v1 `lookup`, and its signed association is
//!   returned as the upstream wrote it, signature intact. With an access token it is asked
//!   hashed first, and only an address the upstream holds (so knows already) is then sent to
//!   its v1 `lookup` for the signed association.
//!
//! The upstream is the operator's choice, so `http://` and loopback upstreams are allowed (the
//! IP filter guards names that clients supply, not this one). Every call has a connect and a
//! total timeout and a size cap on the answer; an upstream slow, down or answering garbage
//! costs a lookup only its own answers (logged, counted in the status), never an error.
//! Nothing it answers is kept beyond the request. Each forwarded request is logged at info
//! level with how many 3PIDs it carried, never which.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::ProxyConfig;
use crate::crypto::lookup_hash;
use crate::homeserver::{read_body_capped, tls_config, CappedReadError};
use crate::mesh::tls::describe_error;
use crate::types::{Medium, Mxid, Threepid};

/// A bulk answer is read up to this size (10,000 triples of long addresses fit).
const BULK_LIMIT: usize = 4 * 1024 * 1024;
/// A single signed association, or an error, is read up to this size.
const SINGLE_LIMIT: usize = 64 * 1024;
/// Connecting may take at most this much of the total timeout.
const MAX_CONNECT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// DNS, connection, TLS.
    #[error("cannot reach the upstream: {0}")]
    Unreachable(String),
    #[error("the upstream did not answer within {0} ms")]
    Timeout(u128),
    #[error("the upstream answered {status}{}", .errcode.as_ref().map(|e| format!(" {e}")).unwrap_or_default())]
    Status {
        status: u16,
        errcode: Option<String>,
    },
    #[error("the upstream's answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the upstream's answer to {endpoint} is not what that endpoint answers: {detail}")]
    BadAnswer {
        endpoint: &'static str,
        detail: String,
    },
    #[error("the upstream does not offer sha256 hashed lookups")]
    NoSha256,
}

/// v1 `bulk_lookup`'s request, as this node's own handler reads it.
#[derive(Serialize)]
pub struct BulkLookupRequest<'a> {
    pub threepids: Vec<(&'a str, &'a str)>,
}

/// v1 `bulk_lookup`'s answer, as this node's own handler writes it: `[medium, address, mxid]`.
#[derive(Serialize, Deserialize)]
pub struct BulkLookupAnswer {
    pub threepids: Vec<(String, String, String)>,
}

/// v2 `hash_details`' answer.
#[derive(Deserialize)]
struct HashDetails {
    algorithms: Vec<String>,
    lookup_pepper: String,
}

/// v2 `lookup`'s request.
#[derive(Serialize)]
struct HashedLookup<'a> {
    addresses: Vec<&'a str>,
    algorithm: &'static str,
    pepper: &'a str,
}

/// v2 `lookup`'s answer.
#[derive(Deserialize)]
struct Mappings {
    mappings: HashMap<String, String>,
}

/// An error answer: its errcode, and the new pepper of an `M_INVALID_PEPPER`.
#[derive(Deserialize)]
struct ErrorAnswer {
    errcode: Option<String>,
    lookup_pepper: Option<String>,
}

/// v1 `lookup`'s answer, the fields checked against what was asked.
#[derive(Deserialize)]
struct SignedAssociation {
    medium: String,
    address: String,
    mxid: String,
    signatures: serde_json::Map<String, serde_json::Value>,
}

/// What the internal status endpoint shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UpstreamStatus {
    pub url: String,
    /// Lookups go to the upstream hashed (an access token is set).
    pub hashed: bool,
    /// Requests forwarded (one per client request).
    pub requests: u64,
    pub failures: u64,
    /// 3PIDs those requests carried, and how many the upstream answered.
    pub threepids_forwarded: u64,
    pub threepids_answered: u64,
    pub last_request_ts: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_ts: Option<i64>,
}

#[derive(Default)]
struct LastSeen {
    request_ts: Option<i64>,
    error: Option<(String, i64)>,
    /// When a failure was last logged as a warning (once a minute at most).
    warned_ms: i64,
}

pub struct Upstream {
    /// The base URL, without a trailing `/`.
    base: String,
    access_token: Option<String>,
    timeout: Duration,
    client: reqwest::Client,
    requests: AtomicU64,
    failures: AtomicU64,
    forwarded: AtomicU64,
    answered: AtomicU64,
    /// The last request's time and the last error, for the status. A mutex, not an actor:
    /// held only to copy a few fields in or out, never across a request.
    last: Mutex<LastSeen>,
    /// The upstream's lookup pepper, once asked (hashed mode). A mutex for the same reason.
    pepper: Mutex<Option<String>>,
}

impl Upstream {
    /// The client for `[proxy]`: the system's trust roots (`SSL_CERT_FILE` / `SSL_CERT_DIR`
    /// honoured), no redirects, the timeouts of `[proxy] timeout`.
    pub fn new(config: &ProxyConfig) -> Result<Self, String> {
        crate::mesh::tls::install_default_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let tls = tls_config(true, roots).map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.timeout.min(MAX_CONNECT))
            .timeout(config.timeout)
            .user_agent(concat!("sydent-rs/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            base: config.identity.as_str().trim_end_matches('/').to_string(),
            access_token: config.access_token.clone(),
            timeout: config.timeout,
            client,
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            last: Mutex::default(),
            pepper: Mutex::default(),
        })
    }

    pub fn status(&self) -> UpstreamStatus {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        UpstreamStatus {
            url: self.base.clone(),
            hashed: self.access_token.is_some(),
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            threepids_forwarded: self.forwarded.load(Ordering::Relaxed),
            threepids_answered: self.answered.load(Ordering::Relaxed),
            last_request_ts: last.request_ts,
            last_error: last.error.as_ref().map(|(e, _)| e.clone()),
            last_error_ts: last.error.as_ref().map(|(_, ts)| *ts),
        }
    }

    /// The upstream's signed association of one normalised 3PID, as its text; `None` when it
    /// does not hold it, or cannot answer.
    pub async fn lookup(&self, medium: Medium, key: &str) -> Option<String> {
        let asked = [(medium, key.to_string())];
        let work = async {
            if self.access_token.is_some() && self.hashed(&asked).await?.is_empty() {
                return Ok(None);
            }
            self.lookup_signed(medium, key).await
        };
        let found = self.counted("lookup", 1, work, |found| usize::from(found.is_some()));
        found.await.flatten()
    }

    /// The upstream's Matrix IDs for normalised 3PIDs (those it holds).
    pub async fn lookup_many(
        &self,
        asked: &[(Medium, String)],
    ) -> HashMap<(Medium, String), String> {
        if asked.is_empty() {
            return HashMap::new();
        }
        let what = if self.access_token.is_some() {
            "hashed lookup"
        } else {
            "bulk_lookup"
        };
        let work = async {
            if self.access_token.is_some() {
                self.hashed(asked).await
            } else {
                self.bulk(asked).await
            }
        };
        self.counted(what, asked.len(), work, HashMap::len)
            .await
            .unwrap_or_default()
    }

    /// Runs one forwarded request within the timeout, counting and logging it.
    async fn counted<T>(
        &self,
        what: &str,
        threepids: usize,
        work: impl Future<Output = Result<T, UpstreamError>>,
        answered: impl Fn(&T) -> usize,
    ) -> Option<T> {
        let started = Instant::now();
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.forwarded
            .fetch_add(threepids as u64, Ordering::Relaxed);
        let now = crate::now_ms();
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .request_ts = Some(now);
        let result = match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout(self.timeout.as_millis())),
        };
        let ms = started.elapsed().as_millis();
        match result {
            Ok(found) => {
                let n = answered(&found);
                self.answered.fetch_add(n as u64, Ordering::Relaxed);
                log::info!(
                    "upstream: {what} of {threepids} 3PIDs forwarded, {n} answered, {ms} ms"
                );
                Some(found)
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                log::info!(
                    "upstream: {what} of {threepids} 3PIDs forwarded, failed after {ms} ms: {e}"
                );
                let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
                if now - last.warned_ms >= 60_000 {
                    last.warned_ms = now;
                    log::warn!(
                        "upstream {}: {e}; lookups answered without it (said once a minute at most)",
                        self.base
                    );
                }
                last.error = Some((e.to_string(), now));
                None
            }
        }
    }

    /// v1 `bulk_lookup`.
    async fn bulk(
        &self,
        asked: &[(Medium, String)],
    ) -> Result<HashMap<(Medium, String), String>, UpstreamError> {
        let request = BulkLookupRequest {
            threepids: asked
                .iter()
                .map(|(m, a)| (m.as_str(), a.as_str()))
                .collect(),
        };
        let url = format!("{}/_matrix/identity/api/v1/bulk_lookup", self.base);
        let body = self
            .call(self.client.post(url).json(&request), BULK_LIMIT)
            .await?;
        let answer: BulkLookupAnswer =
            serde_json::from_slice(&body).map_err(|e| UpstreamError::BadAnswer {
                endpoint: "bulk_lookup",
                detail: e.to_string(),
            })?;
        let wanted: std::collections::HashSet<&(Medium, String)> = asked.iter().collect();
        Ok(answer
            .threepids
            .into_iter()
            .filter_map(|(medium, address, mxid)| {
                // Only what was asked, with a valid Matrix ID; the address as this node keys it.
                let medium = Medium::parse(&medium)?;
                let key = (medium, Threepid::lookup_key(medium, &address).into_owned());
                (wanted.contains(&key) && Mxid::parse(&mxid).is_ok()).then_some((key, mxid))
            })
            .collect())
    }

    /// v2 `hash_details` (once) + `lookup` with sha256.
    async fn hashed(
        &self,
        asked: &[(Medium, String)],
    ) -> Result<HashMap<(Medium, String), String>, UpstreamError> {
        let cached = self
            .pepper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut pepper = match cached {
            Some(pepper) => pepper,
            None => self.hash_details().await?,
        };
        for attempt in 0..2 {
            let by_hash: HashMap<String, &(Medium, String)> = asked
                .iter()
                .map(|threepid| {
                    (
                        lookup_hash(&threepid.1, threepid.0.as_str(), &pepper),
                        threepid,
                    )
                })
                .collect();
            let request = HashedLookup {
                addresses: by_hash.keys().map(String::as_str).collect(),
                algorithm: "sha256",
                pepper: &pepper,
            };
            let url = format!("{}/_matrix/identity/v2/lookup", self.base);
            match self
                .call(
                    self.authed(self.client.post(url)).json(&request),
                    BULK_LIMIT,
                )
                .await
            {
                Ok(body) => {
                    let answer: Mappings =
                        serde_json::from_slice(&body).map_err(|e| UpstreamError::BadAnswer {
                            endpoint: "v2 lookup",
                            detail: e.to_string(),
                        })?;
                    return Ok(answer
                        .mappings
                        .into_iter()
                        .filter(|(_, mxid)| Mxid::parse(mxid).is_ok())
                        .filter_map(|(hash, mxid)| Some(((*by_hash.get(&hash)?).clone(), mxid)))
                        .collect());
                }
                // The pepper changed: ask again once, with the new one.
                Err(UpstreamError::Status { errcode, .. })
                    if attempt == 0 && errcode.as_deref() == Some("M_INVALID_PEPPER") =>
                {
                    pepper = self.hash_details().await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(UpstreamError::Status {
            status: 400,
            errcode: Some("M_INVALID_PEPPER".into()),
        })
    }

    /// The upstream's lookup pepper (and that it offers sha256), kept for the next requests.
    async fn hash_details(&self) -> Result<String, UpstreamError> {
        let url = format!("{}/_matrix/identity/v2/hash_details", self.base);
        let body = self
            .call(self.authed(self.client.get(url)), SINGLE_LIMIT)
            .await?;
        let details: HashDetails =
            serde_json::from_slice(&body).map_err(|e| UpstreamError::BadAnswer {
                endpoint: "hash_details",
                detail: e.to_string(),
            })?;
        if !details.algorithms.iter().any(|a| a == "sha256") {
            return Err(UpstreamError::NoSha256);
        }
        *self.pepper.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(details.lookup_pepper.clone());
        Ok(details.lookup_pepper)
    }

    /// v1 `lookup`: the signed association's text, checked to be the 3PID asked, bound.
    async fn lookup_signed(
        &self,
        medium: Medium,
        key: &str,
    ) -> Result<Option<String>, UpstreamError> {
        let bad = |detail: String| UpstreamError::BadAnswer {
            endpoint: "lookup",
            detail,
        };
        let url = reqwest::Url::parse_with_params(
            &format!("{}/_matrix/identity/api/v1/lookup", self.base),
            [("medium", medium.as_str()), ("address", key)],
        )
        .map_err(|e| bad(e.to_string()))?;
        let body = self.call(self.client.get(url), SINGLE_LIMIT).await?;
        let value: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        if value.as_object().is_some_and(|o| o.is_empty()) {
            return Ok(None);
        }
        let found: SignedAssociation =
            serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        let same = Medium::parse(&found.medium) == Some(medium)
            && Threepid::lookup_key(medium, &found.address) == key;
        if !same || Mxid::parse(&found.mxid).is_err() || found.signatures.is_empty() {
            return Err(bad("not a signed association of the 3PID asked".into()));
        }
        String::from_utf8(body)
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }

    fn failed(&self, e: &reqwest::Error) -> UpstreamError {
        if e.is_timeout() {
            UpstreamError::Timeout(self.timeout.as_millis())
        } else {
            UpstreamError::Unreachable(describe_error(e))
        }
    }

    fn authed(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.access_token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends `request`; the body of a 200, else the status and errcode as an error.
    async fn call(
        &self,
        request: reqwest::RequestBuilder,
        limit: usize,
    ) -> Result<Vec<u8>, UpstreamError> {
        let response = request.send().await.map_err(|e| self.failed(&e))?;
        let status = response.status().as_u16();
        let body = read_body_capped(response, limit)
            .await
            .map_err(|e| match e {
                CappedReadError::TooLarge => UpstreamError::TooLarge(limit),
                CappedReadError::Failed(e) => self.failed(&e),
            })?;
        if status != 200 {
            let error: Option<ErrorAnswer> = serde_json::from_slice(&body).ok();
            if let Some(pepper) = error.as_ref().and_then(|e| e.lookup_pepper.clone()) {
                *self.pepper.lock().unwrap_or_else(|e| e.into_inner()) = Some(pepper);
            }
            return Err(UpstreamError::Status {
                status,
                errcode: error.and_then(|e| e.errcode),
            });
        }
        Ok(body)
    }
}
