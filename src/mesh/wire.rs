//! Sydent's replication wire format, one set of types for the pusher and the receiver.
//!
//! `POST /_matrix/identity/replicate/v1/push` carries `{"sgAssocs": {"<originId>": <signed
//! association>, …}}`: the keys are the origin's local ids as decimal strings, the values the
//! associations as the origin signed them. They are kept as JSON values, verified against the
//! canonical JSON of their fields, and stored with every field and signature as received (the
//! text itself is written again, which a signature does not cover). A push that is applied is
//! answered `{"success": true}`; errors are `{"errcode", "error"}`, some with `failed_ids`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The body of a push. The receiver reads the associations as JSON values (`PushBody`, to
/// verify them); the pusher writes the signed JSON text it already holds, unparsed
/// (`PushBody<&RawValue>`).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PushBody<A = Value> {
    #[serde(rename = "sgAssocs")]
    pub sg_assocs: BTreeMap<String, A>,
}

/// The answer to an applied push.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PushAccepted {
    pub success: bool,
}

/// How far an origin has reached the node answering a [`HeldPage`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeldMark {
    pub origin_id: i64,
    pub ts: i64,
}

/// A page of `GET /_matrix/identity/replicate/v1/associations` (sydent-rs only): what a node
/// holds of one origin's bindings, for a peer rebuilding its database. Written with the stored
/// associations unparsed (`HeldPage<Box<RawValue>>`), read as JSON values to verify them.
#[derive(Debug, Serialize, Deserialize)]
pub struct HeldPage<A = Value> {
    pub origin: String,
    pub mark: Option<HeldMark>,
    #[serde(rename = "sgAssocs")]
    pub sg_assocs: BTreeMap<String, A>,
    /// The `after` of the next page; `None` on the last.
    pub next_after: Option<i64>,
}
