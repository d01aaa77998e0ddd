//! v2 accounts end to end: a node registers users with an OpenID token checked against a
//! homeserver stand-in (real HTTPS, a test CA the node trusts through SSL_CERT_FILE, reached
//! through the real resolution code and IP filter), then authenticates them by Bearer header or
//! `access_token` query parameter, gates on the terms, and logs them out.

use std::path::Path;

use serde_json::{json, Value};

use crate::harness::{base_config, client, TestNode, BINARY};
use crate::homeserver::FakeHomeserver;
use crate::internal_bind::sqlite_rows;
use crate::mesh::harness::TestCa;

const TERMS: &str = "master_version: v1\ndocs:\n  tos:\n    version: '1.0'\n    langs:\n      en: {name: Terms, url: 'https://example.org/tos-en.html'}\n      fr: {name: Conditions, url: 'https://example.org/tos-fr.html'}\n  privacy:\n    version: '1.0'\n    langs:\n      en: {name: Privacy, url: 'https://example.org/privacy-en.html'}\n";

/// A node trusting `ca` for homeservers, with loopback whitelisted unless `whitelist` is false,
/// and `terms` when given.
fn start_node(dir: &Path, ca: &TestCa, whitelist: bool, terms: Option<&str>) -> TestNode {
    start_node_with(dir, ca, whitelist, terms, "", &[])
}

/// [`start_node`] with more `[general]` lines and environment variables.
pub fn start_node_with(
    dir: &Path,
    ca: &TestCa,
    whitelist: bool,
    terms: Option<&str>,
    more_general: &str,
    env: &[(&str, &str)],
) -> TestNode {
    let mut general = format!("[general]\n{more_general}");
    if whitelist {
        general.push_str("ip.whitelist = 127.0.0.0/8, ::1/128\n");
    }
    if let Some(terms) = terms {
        let path = dir.join("terms.yaml");
        std::fs::write(&path, terms).unwrap();
        general.push_str(&format!("terms.path = {}\n", path.display()));
    }
    let config = base_config(dir, "id.test").replacen("[general]\n", &general, 1);
    start_trusting(dir, &config, ca, env)
}

/// Starts a node with `config` that trusts `ca` (for homeservers), with environment `env`.
pub fn start_trusting(dir: &Path, config: &str, ca: &TestCa, env: &[(&str, &str)]) -> TestNode {
    let ca_file = dir.join("hs-ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let config_path = dir.join("sydent.conf");
    std::fs::write(&config_path, config).unwrap();
    TestNode::start_cmd(
        dir,
        &config_path,
        std::process::Command::new(BINARY)
            .arg("--config")
            .arg(&config_path)
            .env("SSL_CERT_FILE", &ca_file)
            .env_remove("SSL_CERT_DIR")
            .envs(env.iter().copied()),
    )
    .unwrap_or_else(|e| panic!("node did not start: {e}"))
}

/// A homeserver stand-in and a node that may reach it.
pub struct Rig {
    pub ca: TestCa,
    pub hs: FakeHomeserver,
    /// The stand-in's server name, `localhost:<port>`.
    pub server: String,
    pub dir: tempfile::TempDir,
    pub node: TestNode,
}

impl Rig {
    pub fn new(terms: Option<&str>) -> Self {
        let ca = TestCa::new("homeserver CA");
        let hs = FakeHomeserver::start(&ca, &["localhost"]);
        let server = format!("localhost:{}", hs.port);
        let dir = tempfile::tempdir().unwrap();
        let node = start_node(dir.path(), &ca, true, terms);
        Self {
            ca,
            hs,
            server,
            dir,
            node,
        }
    }
}

pub async fn register(node: &TestNode, openid: &str, server: &str) -> (u16, Value) {
    node.post(
        "/_matrix/identity/v2/account/register",
        &json!({"access_token": openid, "token_type": "Bearer", "matrix_server_name": server, "expires_in": 3600}),
    )
    .await
}

/// A v2 account on `node` for a user of `hs`: its token and the node's lookup pepper.
pub async fn account_and_pepper(
    node: &TestNode,
    hs: &crate::harness::matrix_hs::MatrixHomeserver,
) -> (String, String) {
    let (status, account) = register(node, &hs.openid_token("u"), &hs.server_name).await;
    assert_eq!(status, 200, "{account}");
    let token = account["token"].as_str().unwrap().to_string();
    let (status, details) = get_authed(
        node,
        "/_matrix/identity/v2/hash_details",
        Some(&token),
        false,
    )
    .await;
    assert_eq!(status, 200, "{details}");
    (
        token,
        details["lookup_pepper"].as_str().unwrap().to_string(),
    )
}

/// A v2 lookup of `addresses` with `algorithm` (asserting 200): its `mappings`.
pub async fn v2_lookup(
    node: &TestNode,
    (token, pepper): &(String, String),
    algorithm: &str,
    addresses: &[String],
) -> Value {
    let (status, found) = post_authed(
        node,
        "/_matrix/identity/v2/lookup",
        token,
        &json!({"algorithm": algorithm, "pepper": pepper, "addresses": addresses}),
    )
    .await;
    assert_eq!(status, 200, "{found}");
    found["mappings"].clone()
}

/// GET with `Authorization: Bearer <token>`, or the token in the query when `in_query`.
pub async fn get_authed(
    node: &TestNode,
    path: &str,
    token: Option<&str>,
    in_query: bool,
) -> (u16, Value) {
    let mut url = format!("{}{path}", node.client_url);
    let mut request = client().get(&url);
    if let Some(token) = token {
        if in_query {
            url.push_str(&format!("?access_token={token}"));
            request = client().get(&url);
        } else {
            request = request.bearer_auth(token);
        }
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

pub async fn post_authed(node: &TestNode, path: &str, token: &str, body: &Value) -> (u16, Value) {
    let response = client()
        .post(format!("{}{path}", node.client_url))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn logout(node: &TestNode, token: &str) -> (u16, Value) {
    post_authed(
        node,
        "/_matrix/identity/v2/account/logout",
        token,
        &json!({}),
    )
    .await
}

pub fn assert_error(status: u16, body: &Value, expected_status: u16, errcode: &str) {
    assert_eq!(
        (status, body["errcode"].as_str()),
        (expected_status, Some(errcode)),
        "{body}"
    );
}

#[tokio::test]
async fn register_authenticate_and_logout() {
    let rig = Rig::new(None);
    let (hs, server, node) = (&rig.hs, rig.server.clone(), &rig.node);

    let (status, body) = register(node, "good", &server).await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap().to_string();
    assert_eq!(body["access_token"], token.as_str());
    assert_eq!(token.len(), 64);
    // The node asked the homeserver under its name, as the spec resolves it.
    assert_eq!(hs.hosts.lock().unwrap().as_slice(), [server.as_str()]);

    let me = json!({"user_id": format!("@alice:{server}")});
    for in_query in [false, true] {
        let (status, body) =
            get_authed(node, "/_matrix/identity/v2/account", Some(&token), in_query).await;
        assert_eq!((status, body), (200, me.clone()));
    }
    let (status, body) = get_authed(node, "/_matrix/identity/v2/account", None, false).await;
    assert_error(status, &body, 401, "M_UNAUTHORIZED");
    let (status, body) =
        get_authed(node, "/_matrix/identity/v2/account", Some("nope"), false).await;
    assert_error(status, &body, 401, "M_UNKNOWN_TOKEN");

    // Stored hashed, never as it is.
    let stored = sqlite_rows(&node.dir.join("sydent.db"), "SELECT token AS v FROM tokens");
    assert_eq!(stored.len(), 1);
    assert!(
        stored[0].starts_with("sha256:") && !stored[0].contains(&token),
        "{stored:?}"
    );

    // A second registration is a second token; logging one out leaves the other.
    let (_, second) = register(node, "good", &server).await;
    let second = second["token"].as_str().unwrap().to_string();
    let (status, body) = logout(node, &token).await;
    assert_eq!((status, body), (200, json!({})));
    let (status, body) =
        get_authed(node, "/_matrix/identity/v2/account", Some(&token), false).await;
    assert_error(status, &body, 401, "M_UNKNOWN_TOKEN");
    let (status, _) = get_authed(node, "/_matrix/identity/v2/account", Some(&second), false).await;
    assert_eq!(status, 200);
    let (status, body) = logout(node, &token).await;
    assert_error(status, &body, 401, "M_UNKNOWN_TOKEN");
}

#[tokio::test]
async fn registrations_the_node_must_refuse() {
    let rig = Rig::new(None);
    let (hs, server, node) = (&rig.hs, rig.server.clone(), &rig.node);

    // The homeserver does not know the OpenID token.
    let (status, body) = register(node, "stale", &server).await;
    assert_error(status, &body, 401, "M_UNKNOWN_TOKEN");
    // The homeserver vouches for a user of another server.
    let (status, body) = register(node, "evil", &server).await;
    assert_error(status, &body, 403, "M_UNAUTHORIZED");
    let (status, body) = register(node, "good", "not a server name").await;
    assert_error(status, &body, 400, "M_INVALID_PARAM");
    let (status, body) = node
        .post(
            "/_matrix/identity/v2/account/register",
            &json!({"access_token": "good"}),
        )
        .await;
    assert_error(status, &body, 400, "M_MISSING_PARAMS");
    assert!(sqlite_rows(
        &node.dir.join("sydent.db"),
        "SELECT user_id AS v FROM accounts"
    )
    .is_empty());

    // Without the whitelist, a homeserver on a loopback address is never contacted (SSRF).
    let before = hs.hosts.lock().unwrap().len();
    let dir2 = tempfile::tempdir().unwrap();
    let guarded = start_node(dir2.path(), &rig.ca, false, None);
    let (status, body) = register(&guarded, "good", &server).await;
    assert_error(status, &body, 500, "M_UNKNOWN");
    assert!(
        body["error"].as_str().unwrap().contains("ip.blacklist"),
        "{body}"
    );
    assert_eq!(hs.hosts.lock().unwrap().len(), before);
}

#[tokio::test]
async fn homeservers_outside_the_allow_list_are_refused_without_being_asked() {
    let ca = TestCa::new("homeserver CA");
    let hs = FakeHomeserver::start(&ca, &["localhost"]);
    let server = format!("localhost:{}", hs.port);
    let dir = tempfile::tempdir().unwrap();
    let node = start_node_with(
        dir.path(),
        &ca,
        true,
        None,
        &format!("enable_v1_access = false\nhomeserver_allow_list = hs.example, {server}\n"),
        &[],
    );
    let (status, body) = register(&node, "good", "other.example").await;
    assert_error(status, &body, 403, "M_UNAUTHORIZED");
    assert!(hs.hosts.lock().unwrap().is_empty());
    // A listed one registers (the list is matched lowercased, as the name).
    let (status, body) = register(&node, "good", &server.to_uppercase()).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn terms_gate_the_account_until_every_document_is_accepted() {
    let mut rig = Rig::new(Some(TERMS));
    let (server, node) = (rig.server.clone(), &rig.node);
    let (_, body) = register(node, "good", &server).await;
    let token = body["token"].as_str().unwrap().to_string();
    let account = "/_matrix/identity/v2/account";
    let terms = "/_matrix/identity/v2/terms";

    let (status, body) = get_authed(node, account, Some(&token), false).await;
    assert_error(status, &body, 403, "M_TERMS_NOT_SIGNED");
    let (status, body) = get_authed(
        node,
        "/_matrix/identity/v2/hash_details",
        Some(&token),
        true,
    )
    .await;
    assert_error(status, &body, 403, "M_TERMS_NOT_SIGNED");
    let (status, body) = post_authed(
        node,
        terms,
        &token,
        &json!({"user_accepts": ["https://example.org/other.html"]}),
    )
    .await;
    assert_error(status, &body, 400, "M_INVALID_PARAM");
    // One document (in French), then the other: only then is the account let through.
    let (status, body) = post_authed(
        node,
        terms,
        &token,
        &json!({"user_accepts": ["https://example.org/tos-fr.html"]}),
    )
    .await;
    assert_eq!((status, body), (200, json!({})));
    let (status, _) = get_authed(node, account, Some(&token), false).await;
    assert_eq!(status, 403);
    let (status, _) = post_authed(
        node,
        terms,
        &token,
        &json!({"user_accepts": ["https://example.org/privacy-en.html"]}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = get_authed(node, account, Some(&token), false).await;
    assert_eq!(status, 200);

    // Consent and token survive a restart (read back from the database).
    rig.node.stop();
    let node = start_node(rig.dir.path(), &rig.ca, true, Some(TERMS));
    let (status, body) = get_authed(&node, account, Some(&token), false).await;
    assert_eq!(
        (status, body["user_id"].as_str()),
        (200, Some(format!("@alice:{server}").as_str()))
    );
}

#[tokio::test]
async fn plaintext_tokens_of_a_sydent_database_are_hashed_and_keep_working() {
    let ca = TestCa::new("homeserver CA");
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_node(dir.path(), &ca, true, None);
    node.stop();
    // What Sydent leaves behind: the token as it is.
    let db = dir.path().join("sydent.db");
    let sydent_token = "a".repeat(32) + &"B".repeat(32);
    {
        use diesel::prelude::*;
        let mut conn = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
        for sql in [
            "INSERT INTO accounts (user_id, created_ts) VALUES ('@bob:hs.example', 1)".to_string(),
            format!(
                "INSERT INTO tokens (token, user_id) VALUES ('{sydent_token}', '@bob:hs.example')"
            ),
        ] {
            diesel::sql_query(sql).execute(&mut conn).unwrap();
        }
    }
    let node = start_node(dir.path(), &ca, true, None);
    let (status, body) = get_authed(
        &node,
        "/_matrix/identity/v2/account",
        Some(&sydent_token),
        false,
    )
    .await;
    assert_eq!((status, body), (200, json!({"user_id": "@bob:hs.example"})));
    let stored = sqlite_rows(&db, "SELECT token AS v FROM tokens");
    assert_eq!(stored.len(), 1);
    assert!(stored[0].starts_with("sha256:"), "{stored:?}");
}
