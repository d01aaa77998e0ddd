//! Requests a homeserver signs (the unbind without a session): the
//! `Authorization: X-Matrix origin=…,key=…,sig=…,destination=…` header, and the check of its
//! signature with the origin's keys ([`crate::homeserver::ServerKeys`]).
//!
//! The signature covers `{"method", "uri", "origin", "destination_is", "content"}`: the
//! request's method, its path and query as received, the origin, this node's `server.name`
//! (what Synapse signs as `destination_is` is the `id_server` it was given: the two must be
//! the same) and the JSON body. Values may be quoted or not, parameter names are read in any
//! case, parameters beyond these are ignored; of several `Authorization` headers the `X-Matrix`
//! ones count, and one signature that verifies is enough.

use actix_web::HttpRequest;
use serde_json::{json, Value};

use super::AppState;
use crate::crypto::verify_json;
use crate::homeserver::keys::ServerKeyError;
use crate::types::ServerName;

#[derive(Debug, thiserror::Error)]
pub enum XMatrixError {
    #[error("Missing Authorization headers (X-Matrix)")]
    Missing,
    #[error("Malformed X-Matrix Authorization header: {0}")]
    Malformed(&'static str),
    #[error("'{0}' is not a valid origin server name")]
    InvalidOrigin(String),
    #[error(
        "The request is signed for the identity server '{destination}', not this one \
         ('{ours}')"
    )]
    WrongDestination { destination: String, ours: String },
    #[error("The signature from {origin} with key {key_id} does not verify")]
    BadSignature { origin: String, key_id: String },
    #[error(transparent)]
    Key(#[from] ServerKeyError),
}

/// One `X-Matrix` header's parameters.
#[derive(Debug, PartialEq, Eq)]
struct XMatrix {
    origin: String,
    key: String,
    sig: String,
    destination: Option<String>,
}

/// The origin of the homeserver-signed request `req` with JSON body `content`, once one of its
/// signatures verifies with that origin's keys.
pub async fn authenticate(
    req: &HttpRequest,
    state: &AppState,
    content: &Value,
) -> Result<ServerName, XMatrixError> {
    let headers = req
        .headers()
        .get_all(actix_web::http::header::AUTHORIZATION)
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (scheme, params) = v.trim_start().split_once(' ')?;
            scheme.eq_ignore_ascii_case("X-Matrix").then_some(params)
        })
        .map(parse_params)
        .collect::<Result<Vec<_>, _>>()?;
    let Some(first) = headers.first() else {
        return Err(XMatrixError::Missing);
    };
    if headers.iter().any(|h| h.origin != first.origin) {
        return Err(XMatrixError::Malformed(
            "the headers name different origins",
        ));
    }
    let origin = ServerName::parse(&first.origin)
        .map_err(|_| XMatrixError::InvalidOrigin(first.origin.clone()))?;
    let ours = &state.config.general.server_name;
    if let Some(destination) = headers
        .iter()
        .filter_map(|h| h.destination.as_deref())
        .find(|d| *d != ours.as_str())
    {
        return Err(XMatrixError::WrongDestination {
            destination: destination.to_string(),
            ours: ours.to_string(),
        });
    }
    let uri = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.path(), |p| p.as_str());
    let mut signed = json!({
        "method": req.method().as_str(),
        "uri": uri,
        "origin": origin.as_str(),
        "destination_is": ours.as_str(),
        "content": content,
    });
    let now_ms = (state.store_ctx.now_ms)();
    let mut refusal = None;
    for header in &headers {
        signed["signatures"] = json!({ origin.as_str(): { &header.key: &header.sig } });
        let outcome = match state
            .server_keys
            .verify_key(&origin, &header.key, now_ms)
            .await
        {
            Ok(key) => match signed
                .as_object()
                .map(|object| verify_json(object, &origin, &header.key, &key))
            {
                Some(Ok(())) => return Ok(origin),
                _ => XMatrixError::BadSignature {
                    origin: origin.to_string(),
                    key_id: header.key.clone(),
                },
            },
            Err(e) => e.into(),
        };
        refusal.get_or_insert(outcome);
    }
    Err(refusal.unwrap_or(XMatrixError::Missing))
}

/// The parameters after `X-Matrix `: `name=value` or `name="value"` (backslash escapes),
/// separated by commas, spaces allowed around them.
fn parse_params(text: &str) -> Result<XMatrix, XMatrixError> {
    let mut params: Vec<(String, String)> = Vec::new();
    let mut rest = text.trim_start_matches([' ', '\t', ',']);
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once('=')
            .ok_or(XMatrixError::Malformed("a parameter without a value"))?;
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() || name.contains([' ', '\t', ',', '"']) {
            return Err(XMatrixError::Malformed("a parameter without a name"));
        }
        let after = after.trim_start_matches([' ', '\t']);
        let (value, tail) = match after.strip_prefix('"') {
            Some(quoted) => unquote(quoted)?,
            None => {
                let (value, tail) = after.split_at(after.find(',').unwrap_or(after.len()));
                (value.trim_end().to_string(), tail)
            }
        };
        let tail = tail.trim_start_matches([' ', '\t']);
        if !(tail.is_empty() || tail.starts_with(',')) {
            return Err(XMatrixError::Malformed("text after a quoted value"));
        }
        if params.iter().any(|(n, _)| *n == name) {
            return Err(XMatrixError::Malformed("a parameter given twice"));
        }
        params.push((name, value));
        rest = tail.trim_start_matches([' ', '\t', ',']);
    }
    let mut take = |wanted: &str| {
        params
            .iter()
            .position(|(n, _)| n == wanted)
            .map(|i| params.swap_remove(i).1)
    };
    let (Some(origin), Some(key), Some(sig)) = (take("origin"), take("key"), take("sig")) else {
        return Err(XMatrixError::Malformed("origin, key and sig are required"));
    };
    if origin.is_empty() || key.is_empty() || sig.is_empty() {
        return Err(XMatrixError::Malformed("origin, key and sig are required"));
    }
    Ok(XMatrix {
        origin,
        key,
        sig,
        destination: take("destination"),
    })
}

/// A quoted value (its opening quote already read) and the text after its closing quote.
fn unquote(text: &str) -> Result<(String, &str), XMatrixError> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[i + 1..])),
            '\\' => value.push(
                chars
                    .next()
                    .ok_or(XMatrixError::Malformed("an unterminated quoted value"))?
                    .1,
            ),
            c => value.push(c),
        }
    }
    Err(XMatrixError::Malformed("an unterminated quoted value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(origin: &str, key: &str, sig: &str, destination: Option<&str>) -> XMatrix {
        XMatrix {
            origin: origin.into(),
            key: key.into(),
            sig: sig.into(),
            destination: destination.map(Into::into),
        }
    }

    #[test]
    fn synapses_forms_and_variants_parse() {
        let expected = params(
            "hs.example",
            "ed25519:a_AbCd",
            "c2ln+/x",
            Some("id.example"),
        );
        for text in [
            // Synapse today: quoted, no spaces.
            r#"origin="hs.example",key="ed25519:a_AbCd",sig="c2ln+/x",destination="id.example""#,
            // Older Synapse: origin unquoted.
            r#"origin=hs.example,key="ed25519:a_AbCd",sig="c2ln+/x",destination=id.example"#,
            // Spaces after commas and around '=', names in any case, extra parameters.
            r#"Origin = "hs.example", KEY="ed25519:a_AbCd",  sig=c2ln+/x , destination="id.example", extra="x, y""#,
            r#",origin="hs.example",key="ed25519:a_AbCd",sig="c2ln+/x",destination="id.\example","#,
        ] {
            assert_eq!(parse_params(text).unwrap(), expected, "{text}");
        }
        assert_eq!(
            parse_params(r#"origin=hs.example,key="ed25519:a",sig="s""#).unwrap(),
            params("hs.example", "ed25519:a", "s", None)
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        for text in [
            "",
            "origin=hs.example,key=ed25519:a",
            r#"origin="hs.example,key=ed25519:a,sig=s"#,
            r#"origin="hs.example"x,key=ed25519:a,sig=s"#,
            "origin=hs.example,key=ed25519:a,sig=s,origin=evil.example",
            "origin=hs.example,key=ed25519:a,sig=",
            "origin=hs.example,key,sig=s",
            "=x,origin=hs.example,key=ed25519:a,sig=s",
        ] {
            assert!(
                matches!(parse_params(text), Err(XMatrixError::Malformed(_))),
                "{text}"
            );
        }
    }
}
