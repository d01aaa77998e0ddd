//! Who a 3PID belongs to: the one order every lookup path asks its sources in.
//!
//! 1. **The directory** (`[ldap]`): what the mirror holds ([`DirectoryView`]: it wins over any
//!    other binding of the 3PID on this node, whatever their ages), then, with `live_lookup`,
//!    one search for the rest of the request.
//! 2. **The upstream** (`[proxy] identity`), for what the directory did not answer.
//! 3. **This node's bindings**, local and replicated (the lookup index).
//!
//! `[proxy] precedence = local_first` swaps 2 and 3: the upstream is asked only for what
//! neither the directory nor this node answers. Hashed (sha256) v2 lookups read the directory
//! view and the index only: a hash cannot be searched in LDAP nor forwarded. `store-invite`
//! asks the directory and this node, never the upstream (as the fork).
//!
//! Without `[ldap]` and `[proxy]`, a lookup is one read of the index, as it always was.

use std::collections::HashMap;
use std::sync::Arc;

use crate::actors::directory::LiveLookup;
use crate::actors::store::StoreContext;
use crate::association::ThreepidAssociation;
use crate::config::Precedence;
use crate::crypto::sign_json;
use crate::directory::DirectoryView;
use crate::lookup_index::{SharedIndex, WarmUpError};
use crate::types::Medium;
use crate::upstream::Upstream;

/// A 3PID as lookups key it: its medium and normalised address.
pub type Key = (Medium, String);

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    WarmUp(#[from] WarmUpError),
    /// A stored association that cannot be answered (not JSON, cannot be countersigned).
    #[error("{0}")]
    Stored(String),
}

/// The directory part of the chain.
#[derive(Clone)]
pub struct Directory {
    pub view: DirectoryView,
    /// `None` when `live_lookup` is off.
    pub live: Option<LiveLookup>,
}

pub struct Resolver {
    index: SharedIndex,
    store_ctx: Arc<StoreContext>,
    directory: Option<Directory>,
    upstream: Option<Arc<Upstream>>,
    precedence: Precedence,
}

/// Whether the upstream may be asked.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every source (lookups).
    All,
    /// The directory and this node only (`store-invite`).
    NoUpstream,
}

impl Resolver {
    pub fn new(
        index: SharedIndex,
        store_ctx: Arc<StoreContext>,
        directory: Option<Directory>,
        upstream: Option<Arc<Upstream>>,
        precedence: Precedence,
    ) -> Self {
        Self {
            index,
            store_ctx,
            directory,
            upstream,
            precedence,
        }
    }

    pub fn upstream(&self) -> Option<&Arc<Upstream>> {
        self.upstream.as_ref()
    }

    /// The Matrix ID of each of `asked` (normalised 3PIDs), in order; `None` where no source
    /// answers.
    pub async fn resolve(
        &self,
        asked: Vec<Key>,
        scope: Scope,
    ) -> Result<Vec<Option<String>>, ResolveError> {
        let upstream = self.upstream.as_deref().filter(|_| scope == Scope::All);
        if self.directory.is_none() && upstream.is_none() {
            return Ok(self.local(asked).await?);
        }
        let mut answers: Vec<Option<String>> = vec![None; asked.len()];
        // 1. The directory: the mirror, then one live search for the rest.
        if let Some(directory) = &self.directory {
            {
                let view = directory.view.read();
                for (answer, (medium, key)) in answers.iter_mut().zip(&asked) {
                    *answer = view
                        .get_hashed(&directory.view.digest(*medium, key))
                        .map(|mxid| mxid.to_string());
                }
            }
            if let Some(live) = &directory.live {
                let misses = missing(&asked, &answers);
                let found: HashMap<Key, String> = live
                    .find(&misses)
                    .await
                    .into_iter()
                    .map(|(medium, key, mxid, _)| ((medium, key), mxid))
                    .collect();
                fill(&asked, &mut answers, &found);
            }
        }
        // 2 and 3, in the operator's order.
        let upstream_first = self.precedence == Precedence::UpstreamFirst;
        if let (Some(upstream), true) = (upstream, upstream_first) {
            let found = upstream.lookup_many(&missing(&asked, &answers)).await;
            fill(&asked, &mut answers, &found);
        }
        let rest = missing(&asked, &answers);
        if !rest.is_empty() {
            let mxids = self.local(rest.clone()).await?;
            let local: HashMap<Key, String> = rest
                .into_iter()
                .zip(mxids)
                .filter_map(|(key, mxid)| Some((key, mxid?)))
                .collect();
            fill(&asked, &mut answers, &local);
        }
        if let (Some(upstream), false) = (upstream, upstream_first) {
            let found = upstream.lookup_many(&missing(&asked, &answers)).await;
            fill(&asked, &mut answers, &found);
        }
        Ok(answers)
    }

    /// The Matrix ID of each 3PID whose v2 lookup hash is in `digests`, in order: the
    /// directory's, else this node's bindings'.
    pub async fn resolve_hashed(
        &self,
        digests: Vec<[u8; 32]>,
    ) -> Result<Vec<Option<String>>, ResolveError> {
        let now = crate::now_ms();
        let mut answers = self
            .index
            .lookup_hashed(digests.clone(), move |index, digests| {
                digests
                    .iter()
                    .map(|d| index.get_hashed(d, now).map(|b| b.mxid().to_owned()))
                    .collect::<Vec<_>>()
            })
            .await?;
        if let Some(directory) = &self.directory {
            let view = directory.view.read();
            for (answer, digest) in answers.iter_mut().zip(&digests) {
                if let Some(mxid) = view.get_hashed(digest) {
                    *answer = Some(mxid.to_string());
                }
            }
        }
        Ok(answers)
    }

    /// The signed association a v1 `lookup` answers for one normalised 3PID, as JSON text:
    /// the directory's (this node's binding of it, or one signed now when a newer binding
    /// hides it), the upstream's as it signed it, or this node's binding's (with this node's
    /// countersignature when another server made it).
    pub async fn resolve_signed(
        &self,
        medium: Medium,
        key: &str,
    ) -> Result<Option<String>, ResolveError> {
        if let Some(directory) = &self.directory {
            if let Some(mxid) = directory.view.get(medium, key) {
                let local = self.local_signed(medium, key).await?;
                return match local {
                    Some((found, signed)) if found == *mxid => Ok(Some(signed)),
                    _ => self.sign_now(medium, key, &mxid).map(Some),
                };
            }
            if let Some(live) = &directory.live {
                let asked = [(medium, key.to_string())];
                if let Some((.., signed)) = live.find(&asked).await.into_iter().next() {
                    return Ok(Some(signed.to_string()));
                }
            }
        }
        let upstream = self.upstream.as_deref();
        if let (Some(upstream), Precedence::UpstreamFirst) = (upstream, self.precedence) {
            if let Some(signed) = upstream.lookup(medium, key).await {
                return Ok(Some(signed));
            }
        }
        if let Some((_, signed)) = self.local_signed(medium, key).await? {
            return Ok(Some(signed));
        }
        match (upstream, self.precedence) {
            (Some(upstream), Precedence::LocalFirst) => Ok(upstream.lookup(medium, key).await),
            _ => Ok(None),
        }
    }

    /// This node's bindings of `asked`.
    async fn local(&self, asked: Vec<Key>) -> Result<Vec<Option<String>>, WarmUpError> {
        let now = crate::now_ms();
        self.index
            .lookup(asked, move |index, asked| {
                asked
                    .iter()
                    .map(|(medium, key)| index.get(*medium, key, now).map(|b| b.mxid().to_owned()))
                    .collect()
            })
            .await
    }

    /// This node's binding of one 3PID: its Matrix ID and signed association.
    async fn local_signed(
        &self,
        medium: Medium,
        key: &str,
    ) -> Result<Option<(String, String)>, ResolveError> {
        let now = crate::now_ms();
        let found = self
            .index
            .lookup(vec![(medium, key.to_owned())], move |index, asked| {
                index.get(medium, &asked[0].1, now).map(|b| {
                    (
                        b.mxid().to_owned(),
                        b.needs_countersignature(),
                        b.signed_json(),
                    )
                })
            })
            .await?;
        match found {
            None => Ok(None),
            Some((mxid, false, signed)) => Ok(Some((mxid, signed))),
            Some((mxid, true, signed)) => Ok(Some((mxid, self.countersign(&signed)?))),
        }
    }

    /// Adds this node's signature to a peer's signed association unless it already carries
    /// one (as Sydent does: a client trusting this server can then verify the answer).
    fn countersign(&self, signed: &str) -> Result<String, ResolveError> {
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(signed)
                .map_err(|e| ResolveError::Stored(format!("stored sgAssoc is not JSON: {e}")))?;
        let server_name = self.store_ctx.server_name.as_str();
        if object
            .get("signatures")
            .and_then(|s| s.get(server_name))
            .is_none()
        {
            sign_json(&mut object, server_name, &self.store_ctx.signing_key)
                .map_err(|e| ResolveError::Stored(format!("cannot countersign: {e}")))?;
        }
        Ok(serde_json::Value::Object(object).to_string())
    }

    /// An association of the directory's answer signed now by this node (a newer binding
    /// hides the mirror's own until the next sync binds it again).
    fn sign_now(&self, medium: Medium, key: &str, mxid: &str) -> Result<String, ResolveError> {
        let ctx = &self.store_ctx;
        let association = ThreepidAssociation::binding(medium.as_str(), key, mxid, (ctx.now_ms)());
        association
            .signed_text(ctx.server_name.as_str(), &ctx.signing_key)
            .map(|(text, _)| text)
            .map_err(|e| ResolveError::Stored(format!("cannot sign: {e}")))
    }
}

/// The 3PIDs of `asked` that no source has answered yet.
fn missing(asked: &[Key], answers: &[Option<String>]) -> Vec<Key> {
    asked
        .iter()
        .zip(answers)
        .filter(|(_, answer)| answer.is_none())
        .map(|(key, _)| key.clone())
        .collect()
}

/// Answers the still unanswered 3PIDs of `asked` that `found` holds.
fn fill(asked: &[Key], answers: &mut [Option<String>], found: &HashMap<Key, String>) {
    if found.is_empty() {
        return;
    }
    for (answer, key) in answers.iter_mut().zip(asked) {
        if answer.is_none() {
            *answer = found.get(key).cloned();
        }
    }
}
