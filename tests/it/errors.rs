//! Bad input gets a spec errcode as JSON, never a 500 or a panic; CORS on every client route.

use serde_json::{json, Value};

use crate::harness::{base_config, client, TestNode};

fn start() -> (tempfile::TempDir, TestNode) {
    let dir = tempfile::tempdir().unwrap();
    let config = base_config(dir.path(), "id.example.org")
        .replace("[general]\n", "[general]\naddress_lookup_limit = 3\n");
    let node = TestNode::start_with_config(dir.path(), &config);
    (dir, node)
}

async fn raw(req: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = req.send().await.expect("answers");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text:?}"));
    (status, headers, body)
}

fn errcode(body: &Value) -> &str {
    body["errcode"]
        .as_str()
        .unwrap_or_else(|| panic!("no errcode in {body}"))
}

#[tokio::test]
async fn client_api_errors_are_spec_json() {
    let (_dir, node) = start();
    let c = client();
    let url = |p: &str| format!("{}{p}", node.client_url);

    let (s, _, b) = raw(c.get(url("/_matrix/identity/v2/nope"))).await;
    assert_eq!((s, errcode(&b)), (404, "M_UNRECOGNIZED"));
    let (s, _, b) = raw(c.get(url("/no/such/thing"))).await;
    assert_eq!((s, errcode(&b)), (404, "M_UNRECOGNIZED"));
    let (s, _, b) = raw(c.delete(url("/_matrix/identity/versions"))).await;
    assert_eq!((s, errcode(&b)), (405, "M_UNRECOGNIZED"));
    let (s, _, b) = raw(c.get(url("/_matrix/identity/api/v1/bulk_lookup"))).await;
    assert_eq!((s, errcode(&b)), (405, "M_UNRECOGNIZED"));

    let bulk = url("/_matrix/identity/api/v1/bulk_lookup");
    let json_post = |body: &'static str| {
        c.post(&bulk)
            .header("Content-Type", "application/json")
            .body(body)
    };
    let (s, _, b) = raw(json_post("{not json")).await;
    assert_eq!((s, errcode(&b)), (400, "M_BAD_JSON"));
    let (s, _, b) = raw(json_post("[1, 2]")).await;
    assert_eq!((s, errcode(&b)), (400, "M_BAD_JSON"));
    let (s, _, b) = raw(json_post("{}")).await;
    assert_eq!((s, errcode(&b)), (400, "M_MISSING_PARAMS"));
    assert!(b["error"].as_str().unwrap().contains("threepids"));
    let (s, _, b) = raw(json_post(r#"{"threepids": "email"}"#)).await;
    assert_eq!((s, errcode(&b)), (400, "M_INVALID_PARAM"));
    let (s, _, b) = raw(json_post(r#"{"threepids": [["email"]]}"#)).await;
    assert_eq!((s, errcode(&b)), (400, "M_INVALID_PARAM"));
    let (s, _, b) = raw(json_post(r#"{"threepids": [["fax", "1"]]}"#)).await;
    assert_eq!((s, errcode(&b)), (400, "M_INVALID_PARAM"));
    let four = json!({"threepids": [["email","a@b.c"],["email","b@b.c"],["email","c@b.c"],["email","d@b.c"]]});
    let (s, _, b) = raw(c.post(&bulk).json(&four)).await;
    assert_eq!((s, errcode(&b)), (400, "M_TOO_LARGE"));

    let huge = format!(
        "{{\"threepids\": [], \"pad\": \"{}\"}}",
        "x".repeat(600 * 1024)
    );
    let (s, _, b) = raw(c
        .post(&bulk)
        .header("Content-Type", "application/json")
        .body(huge))
    .await;
    assert_eq!((s, errcode(&b)), (413, "M_TOO_LARGE"));

    let (s, _, b) = raw(c.get(url("/_matrix/identity/api/v1/lookup?medium=email"))).await;
    assert_eq!((s, errcode(&b)), (400, "M_MISSING_PARAMS"));
    assert_eq!(b["error"], "Missing parameters: address");
    let (s, _, b) = raw(c.get(url("/_matrix/identity/v2/pubkey/ed25519:1"))).await;
    assert_eq!((s, errcode(&b)), (404, "M_NOT_FOUND"));
    let (s, _, b) = raw(c.get(url("/_matrix/identity/v2/pubkey/isvalid"))).await;
    assert_eq!((s, errcode(&b)), (400, "M_MISSING_PARAMS"));
}

#[tokio::test]
async fn internal_api_rejects_bad_binds() {
    let (_dir, node) = start();
    let bind = "/_matrix/identity/internal/bind";
    for (body, code) in [
        (
            json!({"medium": "email", "address": "a@b.c"}),
            "M_MISSING_PARAMS",
        ),
        (
            json!({"medium": "fax", "address": "1", "mxid": "@a:b.c"}),
            "M_INVALID_PARAM",
        ),
        (
            json!({"medium": "email", "address": "not an email", "mxid": "@a:b.c"}),
            "M_INVALID_PARAM",
        ),
        (
            json!({"medium": "email", "address": "a@b.c", "mxid": "alice"}),
            "M_INVALID_PARAM",
        ),
        (
            json!({"medium": "email", "address": "a@b.c", "mxid": 5}),
            "M_INVALID_PARAM",
        ),
        (
            json!({"medium": "msisdn", "address": "call me", "mxid": "@a:b.c"}),
            "M_INVALID_PARAM",
        ),
    ] {
        let (status, answer) = node.internal_post(bind, &body).await;
        assert_eq!((status, errcode(&answer)), (400, code), "{body}");
    }
    let c = client();
    let (s, _, b) = raw(c.post(format!("{}{bind}", node.internal())).body("nope")).await;
    assert_eq!((s, errcode(&b)), (400, "M_BAD_JSON"));
    let (s, _, b) = raw(c.get(format!("{}{bind}", node.internal()))).await;
    assert_eq!((s, errcode(&b)), (405, "M_UNRECOGNIZED"));
    // Nothing of the refused binds was written.
    let n = crate::internal_bind::sqlite_rows(
        &node.dir.join("sydent.db"),
        "SELECT count(*) AS v FROM local_threepid_associations",
    );
    assert_eq!(n, ["0"]);
}

#[tokio::test]
async fn cors_on_every_client_route_and_preflight() {
    let (_dir, node) = start();
    let c = client();
    for (method, path) in [
        (reqwest::Method::GET, "/_matrix/identity/versions"),
        (reqwest::Method::OPTIONS, "/_matrix/identity/versions"),
        (
            reqwest::Method::OPTIONS,
            "/_matrix/identity/api/v1/bulk_lookup",
        ),
        (
            reqwest::Method::GET,
            "/_matrix/identity/v2/pubkey/ed25519:0",
        ),
        (reqwest::Method::GET, "/_matrix/identity/nope"),
    ] {
        let resp = c
            .request(method.clone(), format!("{}{path}", node.client_url))
            .send()
            .await
            .unwrap();
        let h = resp.headers();
        assert_eq!(h["access-control-allow-origin"], "*", "{method} {path}");
        let allowed = h["access-control-allow-headers"].to_str().unwrap();
        assert!(
            allowed.contains("Authorization") && allowed.contains("Content-Type"),
            "{allowed}"
        );
        assert!(h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST"));
        if method == reqwest::Method::OPTIONS {
            assert_eq!(resp.status(), 200, "preflight of {path}");
        }
    }
}

#[tokio::test]
async fn discovery_endpoints() {
    let (_dir, node) = start();
    let (s, b) = node.get("/_matrix/identity/versions").await;
    assert_eq!(s, 200);
    assert!(b["versions"].as_array().unwrap().contains(&json!("v1.5")));
    assert_eq!(node.get("/_matrix/identity/v2").await, (200, json!({})));
    assert_eq!(node.get("/_matrix/identity/api/v1").await, (200, json!({})));
    let (_, key) = node.get("/_matrix/identity/api/v1/pubkey/ed25519:0").await;
    let k = key["public_key"].as_str().unwrap().to_owned();
    let n = &node;
    let valid = |q: String| async move { n.get(&q).await.1["valid"].clone() };
    let enc = |s: &str| s.replace('+', "%2B").replace('/', "%2F");
    assert_eq!(
        valid(format!(
            "/_matrix/identity/v2/pubkey/isvalid?public_key={}",
            enc(&k)
        ))
        .await,
        json!(true)
    );
    let urlsafe = k.replace('+', "-").replace('/', "_");
    assert_eq!(
        valid(format!(
            "/_matrix/identity/v2/pubkey/isvalid?public_key={urlsafe}"
        ))
        .await,
        json!(true)
    );
    assert_eq!(
        valid("/_matrix/identity/v2/pubkey/isvalid?public_key=iojj3XQJ8ZX9UtstPLpdcspnCb8dlBIb83SIAbQPb1w".into()).await,
        json!(false)
    );
}
