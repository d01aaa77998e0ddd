//! Homeserver-signed unbinds end to end: a homeserver stand-in (real HTTPS, a real ed25519 key)
//! signs `3pid/unbind` as Synapse does; the node fetches its keys through the real homeserver
//! client (resolution, verified TLS, the IP filter), checks their own signature and the
//! request's, and unbinds. Forged, altered, misdirected and stale requests are refused and
//! change nothing; keys are fetched once; a homeserver that cannot be asked is a 500. In a
//! mesh, a binding made on one node is unbound on the other, and the tombstone comes back.

use serde_json::{json, Value};

use crate::account::{assert_error, get_authed, post_authed, register, start_node_with};
use crate::harness::matrix_hs::{now_ms, MatrixHomeserver, KEY_PATH};
use crate::harness::{client, TestNode};
use crate::internal_bind::sqlite_rows;
use crate::mesh::harness::{Mesh, TestCa};

const V1_UNBIND: &str = "/_matrix/identity/api/v1/3pid/unbind";
const V2_UNBIND: &str = "/_matrix/identity/v2/3pid/unbind";
/// The test node's `server.name`: what Synapse would be given as `id_server`.
const ID_SERVER: &str = "id.test";

/// A homeserver stand-in and a node that trusts its CA and may reach it on loopback.
struct Setup {
    hs: MatrixHomeserver,
    node: TestNode,
    _ca: TestCa,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let ca = TestCa::new("homeserver CA");
        let hs = MatrixHomeserver::start(&ca);
        let dir = tempfile::tempdir().unwrap();
        let node = start_node_with(dir.path(), &ca, true, None, "", &[]);
        Self {
            hs,
            node,
            _ca: ca,
            _dir: dir,
        }
    }

    /// A setup where `alice@example.org` is bound to the homeserver's `@alice`: it, her Matrix
    /// ID, and the body that unbinds it.
    async fn with_alice() -> (Self, String, Value) {
        let s = Self::new();
        let alice = s.hs.mxid("alice");
        s.node
            .internal_3pid("bind", "alice@example.org", &alice)
            .await;
        let body = s.body(&alice, "alice@example.org");
        (s, alice, body)
    }

    /// Nothing was unbound: `alice@example.org` is still bound to `alice`, no tombstone.
    async fn assert_alice_still_bound(&self, alice: &str) {
        assert_eq!(
            self.node.lookup_mxid("alice@example.org").await.as_deref(),
            Some(alice)
        );
        assert_eq!(self.tombstones(), Vec::<String>::new());
    }

    /// Unbinding alice with `body` is the 500 of a homeserver whose keys could not be had
    /// (Sydent's message, the cause being `<its server name><why>`), and changes nothing.
    async fn assert_cannot_authenticate(&self, alice: &str, body: &Value, why: &str) {
        let answer = self.signed_unbind(V2_UNBIND, body).await;
        let says = format!(
            "Unable to contact the Matrix homeserver to authenticate request ({}{why})",
            self.hs.server_name
        );
        assert_refused(&answer, 500, "M_UNKNOWN", &says);
        self.assert_alice_still_bound(alice).await;
    }

    /// A signed unbind through `path` that succeeds: `{}`, and v1 lookups find nothing.
    async fn assert_unbinds(&self, path: &str, body: &Value) {
        assert_eq!(self.signed_unbind(path, body).await, (200, json!({})));
        let address = body["threepid"]["address"].as_str().unwrap().to_lowercase();
        assert_eq!(self.node.lookup_mxid(&address).await, None);
    }

    /// The body Synapse sends to unbind `address` from `mxid`.
    fn body(&self, mxid: &str, address: &str) -> Value {
        json!({"mxid": mxid, "threepid": {"medium": "email", "address": address}})
    }

    /// POSTs `body` to `path` signed as Synapse signs it for this node.
    async fn signed_unbind(&self, path: &str, body: &Value) -> (u16, Value) {
        let header = self.hs.x_matrix("POST", path, ID_SERVER, body);
        post(&self.node, path, Some(&header), body).await
    }

    fn tombstones(&self) -> Vec<String> {
        sqlite_rows(
            &self.node.dir.join("sydent.db"),
            "SELECT address AS v FROM local_threepid_associations WHERE mxid IS NULL \
             ORDER BY address",
        )
    }
}

/// POST `body` to the node's `path` with this `Authorization` header, if any.
async fn post(
    node: &TestNode,
    path: &str,
    authorization: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut request = client()
        .post(format!("{}{path}", node.client_url))
        .json(body);
    if let Some(value) = authorization {
        request = request.header("Authorization", value);
    }
    let response = request.send().await.expect("client API answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON body"))
}

/// A refusal: its status, errcode, and a message containing `says`.
fn assert_refused(answer: &(u16, Value), status: u16, errcode: &str, says: &str) {
    assert_error(answer.0, &answer.1, status, errcode);
    let error = answer.1["error"].as_str().unwrap_or_default();
    assert!(error.contains(says), "{says:?} not in {}", answer.1);
}

#[tokio::test]
async fn a_synapse_signed_unbind_removes_the_binding_and_the_keys_are_fetched_once() {
    let (s, alice, body) = Setup::with_alice().await;
    let bob = s.hs.mxid("bob");
    s.node.internal_3pid("bind", "bob@example.org", &bob).await;

    // A v2 account, to see the v2 lookup too.
    let (status, registered) =
        register(&s.node, &s.hs.openid_token("carol"), &s.hs.server_name).await;
    assert_eq!(status, 200, "{registered}");
    let token = registered["token"].as_str().unwrap().to_string();
    let (_, details) = get_authed(
        &s.node,
        "/_matrix/identity/v2/hash_details",
        Some(&token),
        true,
    )
    .await;
    let v2_lookup_alice = || async {
        let body = json!({"algorithm": "none", "pepper": details["lookup_pepper"],
                          "addresses": ["alice@example.org email"]});
        post_authed(&s.node, "/_matrix/identity/v2/lookup", &token, &body).await
    };
    assert_eq!(
        v2_lookup_alice().await,
        (200, json!({"mappings": {"alice@example.org email": alice}}))
    );

    // What Synapse sends today (v2), then what older versions send (v1).
    s.assert_unbinds(V2_UNBIND, &body).await;
    assert_eq!(v2_lookup_alice().await, (200, json!({"mappings": {}})));

    s.assert_unbinds(V1_UNBIND, &s.body(&bob, "Bob@Example.org"))
        .await;
    // Unbinding again is not an error.
    s.assert_unbinds(V2_UNBIND, &body).await;

    // One key fetch, at the spec's path, for all three; the tombstones peers will receive.
    let fetches: Vec<String> =
        s.hs.requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/_matrix/key"))
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
    assert_eq!(fetches, [format!("GET {KEY_PATH}")]);
    assert_eq!(s.tombstones(), ["alice@example.org", "bob@example.org"]);
}

#[tokio::test]
async fn forged_altered_or_misdirected_unbinds_are_refused_and_change_nothing() {
    let (s, alice, body) = Setup::with_alice().await;
    let elsewhere = "@alice:other.example";
    s.node
        .internal_3pid("bind", "other@example.org", elsewhere)
        .await;
    let forger = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);

    // Signed with another key under the homeserver's key id (this fetches its keys).
    let forged =
        s.hs.x_matrix_signed_by(&forger, &s.hs.key_id, "POST", V2_UNBIND, ID_SERVER, &body);
    let answer = post(&s.node, V2_UNBIND, Some(&forged), &body).await;
    assert_refused(&answer, 401, "M_FORBIDDEN", "does not verify");
    assert_eq!(s.hs.key_fetches(), 1);

    // A key id the homeserver does not have: refused, and not asked for again within 30 s,
    // however many such requests come.
    for key_id in ["ed25519:forged", "ed25519:forged2"] {
        let header =
            s.hs.x_matrix_signed_by(&forger, key_id, "POST", V2_UNBIND, ID_SERVER, &body);
        let answer = post(&s.node, V2_UNBIND, Some(&header), &body).await;
        assert_refused(&answer, 401, "M_FORBIDDEN", &format!("has no key {key_id}"));
    }
    assert_eq!(s.hs.key_fetches(), 1);

    // The body altered after signing, or the signature of another path.
    let header = s.hs.x_matrix("POST", V2_UNBIND, ID_SERVER, &body);
    let mut altered = body.clone();
    altered["threepid"]["address"] = json!("ALICE@example.org");
    let answer = post(&s.node, V2_UNBIND, Some(&header), &altered).await;
    assert_refused(&answer, 401, "M_FORBIDDEN", "does not verify");
    let answer = post(&s.node, V1_UNBIND, Some(&header), &body).await;
    assert_refused(&answer, 401, "M_FORBIDDEN", "does not verify");

    // Meant for another identity server: said so by `destination`, or only signed so.
    let header = s.hs.x_matrix("POST", V2_UNBIND, "other-id.example", &body);
    let answer = post(&s.node, V2_UNBIND, Some(&header), &body).await;
    assert_refused(
        &answer,
        401,
        "M_FORBIDDEN",
        "'other-id.example', not this one ('id.test')",
    );
    let without_destination = header.replace(",destination=\"other-id.example\"", "");
    assert!(!without_destination.contains("destination"));
    let answer = post(&s.node, V2_UNBIND, Some(&without_destination), &body).await;
    assert_refused(&answer, 401, "M_FORBIDDEN", "does not verify");

    // A Matrix ID of another homeserver, correctly signed by this one.
    let theirs = s.body(elsewhere, "other@example.org");
    let answer = s.signed_unbind(V2_UNBIND, &theirs).await;
    assert_refused(
        &answer,
        403,
        "M_FORBIDDEN",
        "Origin server name does not match mxid",
    );

    // No signature, or not one this node can read.
    let answer = post(&s.node, V2_UNBIND, None, &body).await;
    assert_refused(&answer, 401, "M_FORBIDDEN", "Missing Authorization headers");
    let answer = post(&s.node, V2_UNBIND, Some("Bearer sometoken"), &body).await;
    assert_refused(&answer, 401, "M_FORBIDDEN", "Missing Authorization headers");
    let truncated = format!("X-Matrix origin={},key=\"ed25519:hs1\"", s.hs.server_name);
    let answer = post(&s.node, V2_UNBIND, Some(&truncated), &body).await;
    assert_refused(
        &answer,
        401,
        "M_FORBIDDEN",
        "origin, key and sig are required",
    );
    let bad_origin = "X-Matrix origin=\"not a server!\",key=\"ed25519:hs1\",sig=\"c2ln\"";
    let answer = post(&s.node, V2_UNBIND, Some(bad_origin), &body).await;
    assert_refused(
        &answer,
        400,
        "M_INVALID_PARAM",
        "not a valid origin server name",
    );

    // Missing fields are reported before anything is checked; half a session is no session.
    let answer = s
        .signed_unbind(V2_UNBIND, &json!({"threepid": body["threepid"]}))
        .await;
    assert_eq!(
        answer,
        (
            400,
            json!({"errcode": "M_MISSING_PARAMS", "error": "Missing parameters: mxid"})
        )
    );
    let mut half = body.clone();
    half["sid"] = json!("1");
    let answer = s.signed_unbind(V2_UNBIND, &half).await;
    assert_eq!(
        answer,
        (
            400,
            json!({"errcode": "M_MISSING_PARAMS", "error": "Missing parameters: client_secret"})
        )
    );

    // Nothing changed.
    s.assert_alice_still_bound(&alice).await;
    assert_eq!(
        s.node.lookup_mxid("other@example.org").await.as_deref(),
        Some(elsewhere)
    );
    assert_eq!(s.hs.key_fetches(), 1);
}

#[tokio::test]
async fn a_key_answer_not_signed_by_its_own_key_is_unusable() {
    let (s, alice, body) = Setup::with_alice().await;
    let bob = s.hs.mxid("bob");
    s.node.internal_3pid("bind", "bob@example.org", &bob).await;

    // Whoever answers in the homeserver's place cannot make up its keys (Sydent does not check).
    s.hs.set_key_answer_forged(true);
    let why = "'s key answer is unusable: its signature with ed25519:hs1 does not verify";
    s.assert_cannot_authenticate(&alice, &body, why).await;

    // The unusable answer was not kept: once the homeserver answers properly it works. An
    // answer without valid_until_ts serves its request only, so each unbind asks again.
    s.hs.set_key_answer_forged(false);
    s.hs.set_key_valid_until(None);
    s.assert_unbinds(V2_UNBIND, &body).await;
    s.assert_unbinds(V2_UNBIND, &s.body(&bob, "bob@example.org"))
        .await;
    assert_eq!(s.hs.key_fetches(), 3);
}

#[tokio::test]
async fn an_expired_key_is_refused() {
    let (s, alice, body) = Setup::with_alice().await;
    s.hs.set_key_valid_until(Some(now_ms() - 60_000));
    for _ in 0..2 {
        let answer = s.signed_unbind(V2_UNBIND, &body).await;
        assert_refused(&answer, 401, "M_FORBIDDEN", "key ed25519:hs1 expired at");
    }
    // Asked once: the second request came within 30 s of the first fetch.
    assert_eq!(s.hs.key_fetches(), 1);
    s.assert_alice_still_bound(&alice).await;
}

#[tokio::test]
async fn a_homeserver_that_cannot_be_asked_is_a_500_and_changes_nothing() {
    let (s, alice, body) = Setup::with_alice().await;
    s.hs.set_down(true);
    let why = " answered its key request with status 503";
    s.assert_cannot_authenticate(&alice, &body, why).await;

    // Back up: the next unbind asks again and succeeds.
    s.hs.set_down(false);
    s.assert_unbinds(V2_UNBIND, &body).await;
    assert_eq!(s.hs.key_fetches(), 2);
}

/// Sydent ignores an unbind on a node that did not make the binding; here the node that
/// receives it writes a tombstone newer than the binding, which removes it on every node.
#[tokio::test]
async fn mesh_a_signed_unbind_on_the_peer_of_the_origin_reaches_every_node() {
    const A: usize = 0;
    const B: usize = 1;
    let ca = TestCa::new("mesh and homeserver CA");
    let hs = MatrixHomeserver::start(&ca);
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = ca_dir.path().join("homeserver-ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let mesh = Mesh::start_with(
        &["a.test", "b.test"],
        ca,
        "ip.whitelist = 127.0.0.0/8, ::1/128\n",
        &[("SSL_CERT_FILE", ca_file.to_str().unwrap())],
    )
    .await;
    let alice = hs.mxid("alice");
    let signed = mesh.bind(A, "alice@example.org", &alice).await;
    mesh.wait_lookup(&[B], "alice@example.org", Some(&alice))
        .await;

    // Synapse was given b.test as the identity server.
    let body =
        json!({"mxid": alice, "threepid": {"medium": "email", "address": "alice@example.org"}});
    let header = hs.x_matrix("POST", V2_UNBIND, "b.test", &body);
    let answer = post(mesh.nodes[B].node(), V2_UNBIND, Some(&header), &body).await;
    assert_eq!(answer, (200, json!({})));
    assert_eq!(mesh.lookup(B, "alice@example.org").await, None);
    mesh.wait_lookup(&[A], "alice@example.org", None).await;

    // B's tombstone is newer than A's binding; A's global table no longer has the binding.
    let tombstone = sqlite_rows(
        &mesh.nodes[B].db(),
        "SELECT ts AS v FROM local_threepid_associations WHERE mxid IS NULL \
         AND address = 'alice@example.org'",
    );
    let tombstone_ts: i64 = tombstone[0].parse().unwrap();
    assert!(
        tombstone_ts > signed["ts"].as_i64().unwrap(),
        "{tombstone:?} {signed}"
    );
    for i in [A, B] {
        let rows = sqlite_rows(
            &mesh.nodes[i].db(),
            "SELECT originServer AS v FROM global_threepid_associations \
             WHERE address = 'alice@example.org'",
        );
        assert_eq!(rows, Vec::<String>::new(), "node {i}");
    }

    // The mesh goes on: a later bind on A wins over the tombstone on both nodes.
    let aaron = hs.mxid("aaron");
    mesh.bind(A, "alice@example.org", &aaron).await;
    mesh.wait_lookup(&[A, B], "alice@example.org", Some(&aaron))
        .await;
}
