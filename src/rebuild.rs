//! A node rebuilt from its peers (`sydent-rs rebuild-from-peers`), after its database was lost:
//! it starts again from an empty database with its signing key, and reads back from the mesh
//! (over the same mutual TLS, `GET /_matrix/identity/replicate/v1/associations`) what the
//! peers hold.
//!
//! - Its own bindings: from the peer that had received the most of them (the highest mark),
//!   each verified with the node's own key and restored as a local row with its original id.
//!   New ids go on above the highest id any peer has seen, so that no id is given twice.
//! - Each peer's bindings: from the peer itself (every unbind applied), or, when it is down,
//!   from the peer that had received the most of them, verified with that peer's key and
//!   countersigned by this node, as a push would have been.
//! - The push cursors: each peer's is the highest of our ids it holds, so nothing it has is
//!   sent again; a peer that cannot be reached is sent everything, and skips what it has.
//!
//! Everything is written in one transaction, after every page was read and verified: a failed
//! rebuild leaves the database as it was. Peers that are not sydent-rs nodes (Sydent has no
//! such endpoint) are skipped with a warning.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::actors::peers::PeerSources;
use crate::config::Config;
use crate::crypto::{lookup_hash, VerifyKey};
use crate::db::queries::OriginMark;
use crate::db::rebuild::{OriginRows, Restore, RestoreError, Restored};
use crate::db::GlobalRow;
use crate::mesh::peers::Peer;
use crate::mesh::tls::{describe_error, MeshTls};
use crate::mesh::verify::{verify_assocs, Replicated, Rules};
use crate::mesh::wire::{HeldMark, HeldPage};
use crate::types::ServerName;

/// Rows asked for per page (the answering node's default).
const PAGE_ROWS: usize = 5_000;
/// The largest page read: 5,000 associations with the longest addresses and Matrix IDs and two
/// signatures are under 8 MB.
const MAX_PAGE_BYTES: usize = 16 * 1024 * 1024;
/// Pages verified at once (the verification is CPU work: one per core of a small machine).
const VERIFYING: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Restore(#[from] RestoreError),
    #[error("reading {origin}'s bindings from {peer}: {error}")]
    Read {
        origin: String,
        peer: String,
        error: String,
    },
}

/// What a rebuild did, line by line, for the admin.
#[derive(Debug, Default)]
pub struct Outcome {
    pub lines: Vec<String>,
    pub warnings: Vec<String>,
    /// This node's own bindings restored.
    pub own: usize,
    /// Every binding written (own and the peers').
    pub total: usize,
}

/// How a peer answered the first question (how far each origin reached it).
#[derive(Debug)]
enum Reach {
    /// Per origin, its mark there (`None`: it holds nothing of it).
    Marks(BTreeMap<String, Option<HeldMark>>),
    Skipped(String),
}

/// One origin to restore, and where from.
struct Source<'a> {
    origin: String,
    key: VerifyKey,
    peer: &'a Peer,
    mark: HeldMark,
}

/// Rebuilds the database of `config`'s node from its peers. The node must not be running.
pub async fn rebuild(config: &Config) -> Result<Outcome, RebuildError> {
    let started = Instant::now();
    let own_name = config.general.server_name.clone();
    let tls = MeshTls::load(&config.http)
        .map_err(|e| RebuildError::Setup(e.to_string()))?
        .ok_or_else(|| {
            RebuildError::Setup(
                "[http] replication.https.certfile is not set: this node has no mesh to \
                 rebuild from"
                    .into(),
            )
        })?;
    let client = tls
        .push_client()
        .map_err(|e| RebuildError::Setup(e.to_string()))?;
    let db_file = config.db.db_file.clone();
    let (mut conn, pepper) = blocking(move || {
        let (mut conn, pepper) = crate::db::open(&db_file).map_err(|e| e.to_string())?;
        match crate::db::rebuild::count_local(&mut conn).map_err(|e| e.to_string())? {
            0 => Ok((conn, pepper)),
            n => Err(RestoreError::NotEmpty(n).to_string()),
        }
    })
    .await
    .map_err(RebuildError::Setup)?;

    let sources = PeerSources {
        own_name: own_name.clone(),
        peers_dir: config.general.peers_path.clone(),
        sections: config.peers.clone(),
        db_file: config.db.db_file.clone(),
    };
    let (peers, problems) = tokio::task::spawn_blocking(move || sources.load())
        .await
        .map_err(|e| RebuildError::Setup(e.to_string()))?;
    let mut outcome = Outcome {
        warnings: problems,
        ..Outcome::default()
    };
    if peers.is_empty() {
        return Err(RebuildError::Setup(format!(
            "no replication peers (peers.d: {}): nothing to rebuild from",
            config.general.peers_path.display()
        )));
    }

    // How far every origin reached every peer.
    let mut origins: Vec<String> = vec![own_name.to_string()];
    origins.extend(peers.keys().cloned());
    let reaches = join_all(peers.values().map(|peer| reach(&client, peer, &origins))).await;
    let reaches: BTreeMap<&str, Reach> = peers.keys().map(String::as_str).zip(reaches).collect();
    let marks_of = |origin: &str| -> Vec<(&str, Option<HeldMark>)> {
        reaches
            .iter()
            .filter_map(|(name, reach)| match reach {
                Reach::Marks(marks) => Some((*name, marks.get(origin).copied().flatten())),
                Reach::Skipped(_) => None,
            })
            .collect()
    };
    let skipped: Vec<String> = reaches
        .iter()
        .filter_map(|(name, reach)| match reach {
            Reach::Skipped(why) => Some(format!("{name}: {why}")),
            Reach::Marks(_) => None,
        })
        .collect();
    if skipped.len() == reaches.len() {
        return Err(RebuildError::Setup(format!(
            "no peer could be read ({})",
            skipped.join("; ")
        )));
    }
    for why in skipped {
        outcome.warnings.push(format!("skipping peer {why}"));
    }

    // Where each origin's bindings come from: the origin itself when it answered, else the
    // peer it had reached furthest.
    let mut chosen = Vec::new();
    for origin in &origins {
        let own = origin == own_name.as_str();
        let from_itself = (!own)
            .then(|| {
                marks_of(origin)
                    .into_iter()
                    .find(|(name, _)| *name == origin.as_str())
            })
            .flatten();
        let best = from_itself.or_else(|| {
            marks_of(origin)
                .into_iter()
                .filter(|(_, mark)| mark.is_some())
                .max_by_key(|(_, mark)| mark.map(|m| m.origin_id))
        });
        let key = if own {
            config.crypto.signing_key.verify_key()
        } else {
            peers[origin].verify_key
        };
        match best {
            Some((peer, Some(mark))) => chosen.push(Source {
                origin: origin.clone(),
                key,
                peer: &peers[peer],
                mark,
            }),
            // Every peer that answered (the origin itself among them) holds none.
            Some((_, None)) => outcome
                .lines
                .push(format!("{origin}: no bindings in the mesh")),
            None if !marks_of(origin).is_empty() => outcome
                .lines
                .push(format!("{origin}: no bindings in the mesh")),
            None => outcome.warnings.push(format!(
                "{origin}'s bindings are not restored: neither it nor any peer holding them \
                 could be read (run rebuild-from-peers again, before starting the node, once \
                 one can)"
            )),
        }
    }

    // Read and verify every chosen origin's bindings, the origins side by side.
    let signing = (own_name.clone(), config.crypto.signing_key.clone());
    let read = join_all(chosen.iter().map(|source| {
        let countersign = (source.origin != own_name.as_str()).then(|| signing.clone());
        read_origin(&client, source, countersign, &pepper)
    }))
    .await;
    let mut plan = Restore {
        own: None,
        others: Vec::new(),
        cursors: Vec::new(),
        now_ms: crate::now_ms(),
    };
    for (source, rows) in chosen.iter().zip(read) {
        let rows = rows?;
        outcome.lines.push(format!(
            "{}: {} bindings read from {} (its ids up to {})",
            source.origin,
            rows.len(),
            source.peer.server_name,
            source.mark.origin_id
        ));
        let mut origin_rows = OriginRows {
            origin: source.origin.clone(),
            mark: OriginMark {
                origin_id: source.mark.origin_id,
                ts: source.mark.ts,
            },
            rows,
        };
        if source.origin == own_name.as_str() {
            // New ids go on above every id any peer has seen.
            let highest = marks_of(&source.origin)
                .into_iter()
                .filter_map(|(_, mark)| mark.map(|m| m.origin_id))
                .max()
                .unwrap_or(0);
            origin_rows.mark.origin_id = origin_rows.mark.origin_id.max(highest);
            plan.own = Some(origin_rows);
        } else {
            plan.others.push(origin_rows);
        }
    }
    // Each reachable sydent-rs peer resumes after the highest of our ids it holds.
    for (peer, mark) in marks_of(own_name.as_str()) {
        plan.cursors
            .push((peer.to_string(), mark.map_or(-1, |m| m.origin_id)));
    }

    let restored: Restored =
        blocking(move || crate::db::rebuild::restore(&mut conn, &plan).map_err(|e| e.to_string()))
            .await
            .map_err(RebuildError::Setup)?;
    outcome.own = restored.own;
    outcome.total = restored.own;
    for (origin, written) in restored.others {
        match written {
            Some(n) => outcome.total += n,
            None => outcome.warnings.push(format!(
                "{origin}: kept what this database already held (it had reached further)"
            )),
        }
    }
    for (peer, reach) in &reaches {
        if let Reach::Marks(marks) = reach {
            let cursor = marks
                .get(own_name.as_str())
                .copied()
                .flatten()
                .map_or(-1, |m| m.origin_id);
            outcome.lines.push(format!(
                "{peer}: pushes resume after id {cursor} (what it already holds)"
            ));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    outcome.lines.push(format!(
        "restored {} of this node's bindings and {} in all in {secs:.2} s ({:.0}/s)",
        outcome.own,
        outcome.total,
        outcome.total as f64 / secs.max(1e-9)
    ));
    Ok(outcome)
}

/// Asks `peer` how far each origin (itself included) reached it (`limit=0`).
async fn reach(client: &reqwest::Client, peer: &Peer, origins: &[String]) -> Reach {
    let mut marks = BTreeMap::new();
    for origin in origins {
        match fetch(client, peer, origin, 0, 0).await {
            Ok(page) => {
                marks.insert(origin.clone(), page.mark);
            }
            Err(why) => return Reach::Skipped(why),
        }
    }
    Reach::Marks(marks)
}

/// One page of what `peer` holds of `origin`'s bindings, its associations left unparsed.
async fn fetch(
    client: &reqwest::Client,
    peer: &Peer,
    origin: &str,
    after: i64,
    limit: usize,
) -> Result<HeldPage<Box<RawValue>>, String> {
    let query = serde_urlencoded::to_string([
        ("origin", origin.to_string()),
        ("after", after.to_string()),
        ("limit", limit.to_string()),
    ])
    .map_err(|e| e.to_string())?;
    let response = client
        .get(format!("{}?{query}", peer.held_url()))
        .send()
        .await
        .map_err(|e| format!("unreachable: {}", describe_error(&e)))?;
    let status = response.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err("not a sydent-rs node (no associations endpoint: a Sydent node?)".into());
    }
    let body = read_capped(response).await?;
    if !status.is_success() {
        return Err(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("not an associations page: {e}"))
}

async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading its answer: {}", describe_error(&e)))?
    {
        if body.len() + chunk.len() > MAX_PAGE_BYTES {
            return Err(format!("answered more than {MAX_PAGE_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Every binding of `source.origin` up to its mark, page by page, each page parsed and
/// verified on a blocking thread while the next ones are read ([`VERIFYING`] at once).
async fn read_origin(
    client: &reqwest::Client,
    source: &Source<'_>,
    countersign: Option<(ServerName, crate::crypto::NodeSigningKey)>,
    pepper: &str,
) -> Result<Vec<GlobalRow>, RebuildError> {
    let failed = |error: String| RebuildError::Read {
        origin: source.origin.clone(),
        peer: source.peer.server_name.to_string(),
        error,
    };
    let check = Arc::new(Check {
        origin: source.origin.clone(),
        key: source.key,
        mark: source.mark.origin_id,
        rules: Rules {
            not_after: i64::MAX,
            skew_secs: 0,
            only_origin_signatures: true,
            countersign,
        },
        pepper: pepper.to_string(),
    });
    let mut rows = Vec::new();
    let mut verifying: VecDeque<JoinHandle<Result<Vec<GlobalRow>, String>>> = VecDeque::new();
    let mut after = 0;
    loop {
        let page: HeldPage<Box<RawValue>> =
            fetch(client, source.peer, &source.origin, after, PAGE_ROWS)
                .await
                .map_err(failed)?;
        if page.origin != source.origin {
            return Err(failed(format!("answered for {}", page.origin)));
        }
        let next = page.next_after.filter(|next| *next < source.mark.origin_id);
        if verifying.len() >= VERIFYING {
            if let Some(oldest) = verifying.pop_front() {
                rows.extend(joined(oldest).await.map_err(failed)?);
            }
        }
        let check = Arc::clone(&check);
        verifying.push_back(tokio::task::spawn_blocking(move || check.page(page)));
        match next {
            Some(next) if next > after => after = next,
            _ => break,
        }
    }
    for handle in verifying {
        rows.extend(joined(handle).await.map_err(failed)?);
    }
    Ok(rows)
}

async fn joined<T>(handle: JoinHandle<Result<T, String>>) -> Result<T, String> {
    handle
        .await
        .map_err(|e| format!("verification thread: {e}"))?
}

/// How one page of an origin is checked.
struct Check {
    origin: String,
    key: VerifyKey,
    /// Rows above it arrived after the first question: they reach this node by push.
    mark: i64,
    rules: Rules,
    pepper: String,
}

impl Check {
    fn page(&self, page: HeldPage<Box<RawValue>>) -> Result<Vec<GlobalRow>, String> {
        let assocs = page
            .sg_assocs
            .into_iter()
            .map(|(id, raw)| Ok((id, serde_json::from_str(raw.get())?)))
            .collect::<Result<BTreeMap<String, Value>, serde_json::Error>>()
            .map_err(|e| format!("not an associations page: {e}"))?;
        let verified =
            verify_assocs(&self.origin, &self.key, &assocs, &self.rules).map_err(|e| match e {
                crate::mesh::verify::Refused::VerificationFailed(ids)
                | crate::mesh::verify::Refused::Invalid(ids) => format!(
                    "{} associations refused (ids {}{}): not signed by {} with the key this \
                     node has, or invalid",
                    ids.len(),
                    ids.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                    if ids.len() > 5 { ", …" } else { "" },
                    self.origin
                ),
                other => other.to_string(),
            })?;
        Ok(verified
            .into_iter()
            .filter(|r| r.origin_id <= self.mark)
            .filter_map(|r| self.row(r))
            .collect())
    }

    fn row(&self, r: Replicated) -> Option<GlobalRow> {
        let mxid = r.mxid?;
        Some(GlobalRow {
            lookup_hash: Some(lookup_hash(&r.address, &r.medium, &self.pepper)),
            medium: r.medium,
            address: r.address,
            mxid,
            ts: r.ts,
            not_before: r.not_before,
            not_after: r.not_after,
            origin_server: self.origin.clone(),
            origin_id: r.origin_id,
            sg_assoc: r.sg_assoc,
        })
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("database thread: {e}"))?
}
