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
