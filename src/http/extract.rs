//! Request arguments, by Sydent's rules (`get_args`): GET takes the query string; POST takes a
//! JSON object body, except on v1 paths where a body that is not `application/json` (or the
//! JSON `null` some clients send) falls back to query-string and form arguments.
//! Bodies over the size limit are 413 `M_TOO_LARGE`; bodies that are not a JSON object are
//! 400 `M_BAD_JSON`.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, FromRequest, HttpRequest};
use serde_json::{Map, Value};

use super::error::ApiError;
use super::V1_PREFIX;

/// The arguments of one request, as a JSON object (query and form values are strings).
#[derive(Debug, Default)]
pub struct Args(pub Map<String, Value>);

impl Args {
    /// The named string arguments, or 400 `M_MISSING_PARAMS` naming every missing one, or
    /// 400 `M_INVALID_PARAM` for one that is not a string.
    pub fn strings<const N: usize>(&self, names: [&str; N]) -> Result<[&str; N], ApiError> {
        let missing: Vec<String> = names
            .iter()
            .filter(|n| self.0.get(**n).is_none_or(Value::is_null))
            .map(|n| n.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(ApiError::MissingParams(missing));
        }
        let mut out = [""; N];
        for (slot, name) in out.iter_mut().zip(names) {
            *slot = self.0[name]
                .as_str()
                .ok_or_else(|| ApiError::InvalidParam(format!("'{name}' must be a string")))?;
        }
        Ok(out)
    }

    /// A required argument of any JSON type.
    pub fn value(&self, name: &str) -> Result<&Value, ApiError> {
        self.0
            .get(name)
            .filter(|v| !v.is_null())
            .ok_or_else(|| ApiError::MissingParams(vec![name.to_owned()]))
    }
}

/// The client's address: the TCP peer, or, behind a proxy that `obey_x_forwarded_for` says
/// to trust, the last address in `X-Forwarded-For` (the one that proxy added; the ones before
/// it are whatever the client claimed). Sydent takes the header's whole value.
pub fn client_ip(req: &HttpRequest, obey_x_forwarded_for: bool) -> Option<String> {
    if obey_x_forwarded_for {
        let forwarded = req
            .headers()
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|v| !v.is_empty());
        if let Some(ip) = forwarded {
            return Some(ip.to_string());
        }
    }
    req.peer_addr().map(|a| a.ip().to_string())
}

fn query_args(query: &str) -> Map<String, Value> {
    let mut args = Map::new();
    let mut repeated = Vec::new();
    for (k, v) in form_pairs(query.as_bytes()) {
        if args.insert(k.clone(), Value::String(v)).is_some() {
            repeated.push(k);
        }
    }
    // Sydent (Twisted) ignores a parameter given more than once rather than pick one.
    for k in repeated {
        args.remove(&k);
    }
    args
}

fn form_pairs(bytes: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(bytes).unwrap_or_default()
}

fn parse_json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::BadJson(
            "Request body must be a JSON object".into(),
        )),
        Err(_) => Err(ApiError::BadJson("Malformed JSON".into())),
    }
}

/// A request body read as [`Args`] reads it (the size limit, 413 `M_TOO_LARGE`), for a handler
/// that parses it into a type of its own with [`parse_body`] rather than into a JSON tree (v2
/// lookups carry thousands of addresses).
pub struct RawBody(pub web::Bytes);

impl FromRequest for RawBody {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let body = read_body(req, payload);
        Box::pin(async move { body.await.map(RawBody) })
    }
}

fn read_body(
    req: &HttpRequest,
    payload: &mut Payload,
) -> impl Future<Output = Result<web::Bytes, ApiError>> {
    let body = web::Bytes::from_request(req, payload);
    async move {
        body.await.map_err(|e| {
            if e.as_response_error().status_code() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::BodyTooLarge
            } else {
                ApiError::BadJson(format!("Could not read the request body: {e}"))
            }
        })
    }
}

/// Parses a body that must be a JSON object into `T` (fields borrowed from `body` where they
/// can be): not an object, or not JSON, is 400 `M_BAD_JSON`; a field of the wrong type 400
/// `M_INVALID_PARAM` naming it.
pub fn parse_body<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::BadJson(
            "Request body must be a JSON object".into(),
        ));
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::InvalidParam(e.to_string()),
        _ => ApiError::BadJson("Malformed JSON".into()),
    })
}

impl FromRequest for Args {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let query = query_args(req.query_string());
        if !matches!(*req.method(), Method::POST | Method::PUT) {
            return Box::pin(async move { Ok(Args(query)) });
        }
        let legacy = req.path().starts_with(V1_PREFIX);
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            });
        let body = read_body(req, payload);
        Box::pin(async move {
            let body = body.await?;
            if legacy && !is_json {
                let mut args = query;
                args.extend(query_args(std::str::from_utf8(&body).unwrap_or("")));
                return Ok(Args(args));
            }
            if legacy && body.trim_ascii() == b"null" {
                return Ok(Args(query));
            }
            parse_json_object(&body).map(Args)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn missing_and_mistyped_arguments() {
        let args = Args(
            json!({"a": "x", "b": 3, "n": null})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(args.strings(["a"]).unwrap(), ["x"]);
        match args.strings(["a", "c", "n"]) {
            Err(ApiError::MissingParams(m)) => assert_eq!(m, ["c", "n"]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            args.strings(["b"]),
            Err(ApiError::InvalidParam(_))
        ));
    }

    #[test]
    fn repeated_query_parameters_are_dropped() {
        let args = query_args("a=1&b=2&a=3&c=%40x%3Ay");
        assert_eq!(Value::Object(args), json!({"b": "2", "c": "@x:y"}));
    }
}
