//! Checking a batch of signed associations from the mesh: a push a peer made to us
//! (`crate::http::replication`), or what a peer holds of an origin's bindings, read back when
//! a node is rebuilt from its peers (`crate::rebuild`). Every association is verified with
//! its origin's key (all of a batch at once), its values checked as the internal API checks
//! them, and it is countersigned by this node once, here, rather than on every lookup.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::crypto::{sign_json, verify_json_batch, NodeSigningKey, VerifyKey};
use crate::mesh::wire::PushBody;
use crate::types::{Mxid, ServerName, Threepid};

/// One association of an origin, verified against the origin's key.
#[derive(Debug, Clone)]
pub struct Replicated {
    /// The origin's local id for it (`originId`).
    pub origin_id: i64,
    pub medium: String,
    /// Casefolded if an email.
    pub address: String,
    /// `None`: a tombstone.
    pub mxid: Option<String>,
    pub ts: i64,
    pub not_before: i64,
    pub not_after: i64,
    /// The signed association, as it is stored (see [`Rules::countersign`]).
    pub sg_assoc: String,
}

/// Why a batch was refused, with the ids (as sent) of the associations at fault.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    BadJson(String),
    #[error("{} associations failed verification", .0.len())]
    VerificationFailed(Vec<String>),
    #[error("One or more associations hold an invalid medium, address or Matrix ID")]
    Invalid(Vec<String>),
    #[error(
        "The ts of one or more associations is more than {skew_secs} s ahead of this \
         server's clock (check the clocks; they are accepted once they are not)"
    )]
    Future { ids: Vec<String>, skew_secs: i64 },
    #[error("cannot countersign: {0}")]
    Sign(String),
}

/// What a batch is checked against besides the origin's key, and how it is stored.
pub struct Rules {
    /// Associations whose `ts` is after this are refused (a pusher retries them once they are
    /// no longer in the future); `i64::MAX`: no limit.
    pub not_after: i64,
    pub skew_secs: i64,
    /// Kept: only the origin's signatures (what a peer holds carries its countersignature,
    /// which is not ours to serve); otherwise every signature as received.
    pub only_origin_signatures: bool,
    /// This node's name and key, to countersign bindings with; `None` stores them as they
    /// are (this node's own bindings, read back from a peer).
    pub countersign: Option<(ServerName, NodeSigningKey)>,
}

/// Parses a push body and verifies its associations with [`verify_assocs`].
pub fn verify_batch(
    origin: &str,
    key: &VerifyKey,
    body: &[u8],
    rules: &Rules,
) -> Result<Vec<Replicated>, Refused> {
    let body: PushBody = serde_json::from_slice(body)
        .map_err(|e| Refused::BadJson(format!("Not a push body ({{\"sgAssocs\": {{…}}}}): {e}")))?;
    verify_assocs(origin, key, &body.sg_assocs, rules)
}

/// Verifies a batch of `origin`'s associations, keyed by origin id: every one of them, or an
/// error naming the ones that failed. Sorted by origin id.
pub fn verify_assocs(
    origin: &str,
    key: &VerifyKey,
    assocs: &BTreeMap<String, Value>,
    rules: &Rules,
) -> Result<Vec<Replicated>, Refused> {
    // Fields first, then every signature in one batch.
    type Parsed<'a> = (&'a String, Option<(&'a Map<String, Value>, Fields)>);
    let parsed: Vec<Parsed> = assocs
        .iter()
        .map(|(id, assoc)| (id, parse_one(id, assoc)))
        .collect();
    let objects: Vec<&Map<String, Value>> = parsed
        .iter()
        .filter_map(|(_, p)| p.as_ref().map(|(o, _)| *o))
        .collect();
    let mut verified = verify_json_batch(&objects, origin, key).into_iter();
    let mut checked = Vec::with_capacity(assocs.len());
    let mut failed = Vec::new();
    for (id, item) in parsed {
        match item {
            Some((object, fields)) if verified.next() == Some(true) => {
                checked.push((id, object, fields))
            }
            _ => failed.push(id.clone()),
        }
    }
    if !failed.is_empty() {
        sort_ids(&mut failed);
        log::warn!(
            "replication: rejected a batch of {} from {origin}: {} failed verification",
            assocs.len(),
            failed.len()
        );
        return Err(Refused::VerificationFailed(failed));
    }
    // Signed by the origin, but values this node would not accept from its own clients.
    let (mut items, mut invalid, mut future) =
        (Vec::with_capacity(checked.len()), Vec::new(), Vec::new());
    for (id, object, fields) in checked {
        match fields.validate() {
            Err(_) => invalid.push(id.clone()),
            Ok(item) if item.ts > rules.not_after => future.push(id.clone()),
            Ok(item) if item.mxid.is_none() => items.push(item),
            Ok(item) if !rules.only_origin_signatures && rules.countersign.is_none() => {
                items.push(item)
            }
            Ok(item) => {
                let mut object = object.clone();
                if rules.only_origin_signatures {
                    keep_signatures_of(&mut object, origin);
                }
                if let Some((own_name, own_key)) = &rules.countersign {
                    sign_json(&mut object, own_name, own_key)
                        .map_err(|e| Refused::Sign(e.to_string()))?;
                }
                items.push(Replicated {
                    sg_assoc: Value::Object(object).to_string(),
                    ..item
                });
            }
        }
    }
    if !invalid.is_empty() {
        sort_ids(&mut invalid);
        return Err(Refused::Invalid(invalid));
    }
    if !future.is_empty() {
        sort_ids(&mut future);
        return Err(Refused::Future {
            ids: future,
            skew_secs: rules.skew_secs,
        });
    }
    items.sort_by_key(|item| item.origin_id);
    Ok(items)
}

fn sort_ids(ids: &mut [String]) {
    ids.sort_by_key(|id| id.parse::<i64>().unwrap_or(i64::MAX));
}

/// Drops every signature but `origin`'s.
fn keep_signatures_of(object: &mut Map<String, Value>, origin: &str) {
    if let Some(Value::Object(signatures)) = object.get_mut("signatures") {
        signatures.retain(|name, _| name == origin);
    }
}

/// An association's fields as sent, before their values are checked.
struct Fields {
    origin_id: i64,
    medium: String,
    address: String,
    mxid: Option<String>,
    ts: i64,
    not_before: i64,
    not_after: i64,
    sg_assoc: String,
}

impl Fields {
    /// Checks the 3PID and Matrix ID as the internal API does, normalising the address.
    fn validate(self) -> Result<Replicated, crate::types::InvalidValue> {
        let threepid = Threepid::parse(&self.medium, &self.address)?;
        if let Some(mxid) = &self.mxid {
            Mxid::parse(mxid)?;
        }
        Ok(Replicated {
            origin_id: self.origin_id,
            medium: self.medium,
            address: threepid.address,
            mxid: self.mxid,
            ts: self.ts,
            not_before: self.not_before,
            not_after: self.not_after,
            sg_assoc: self.sg_assoc,
        })
    }
}

/// An association's fields, present and of the right types (their values and the signature
/// are checked by the caller).
fn parse_one<'a>(id: &str, assoc: &'a Value) -> Option<(&'a Map<String, Value>, Fields)> {
    let origin_id: i64 = id.parse().ok()?;
    let object: &Map<String, Value> = assoc.as_object()?;
    let medium = object.get("medium")?.as_str()?.to_string();
    let address = object.get("address")?.as_str()?.to_string();
    let int = |key: &str| object.get(key).and_then(Value::as_i64);
    let mxid = match object.get("mxid")? {
        Value::Null => None,
        Value::String(mxid) => Some(mxid.clone()),
        _ => return None,
    };
    let ts = int("ts")?;
    let (not_before, not_after) = match mxid {
        Some(_) => (int("not_before")?, int("not_after")?),
        None => (0, 0),
    };
    let fields = Fields {
        origin_id,
        medium,
        address,
        mxid,
        ts,
        not_before,
        not_after,
        sg_assoc: assoc.to_string(),
    };
    Some((object, fields))
}
