//! v2 lookups end to end: a registered account asks `hash_details` (with the token in the query
//! string, as Synapse does), then looks up bindings made through the internal API by `sha256`
//! hash and by `none`; the newest binding wins; a wrong pepper, an unknown algorithm and too
//! many addresses are refused as the spec says; lookups while the index warms up read SQLite.

use serde_json::{json, Value};
use sydent_rs::crypto::lookup_hash;

use crate::account::{assert_error, get_authed, post_authed, register, start_node_with, Rig};
use crate::harness::TestNode;

async fn lookup(node: &TestNode, token: &str, body: &Value) -> (u16, Value) {
    post_authed(node, "/_matrix/identity/v2/lookup", token, body).await
}

#[tokio::test]
async fn hashed_and_plain_lookups_find_the_newest_binding() {
    let rig = Rig::new(None);
    let node = &rig.node;
    let (_, body) = register(node, "good", &rig.server).await;
    let token = body["token"].as_str().unwrap().to_string();

    let (status, details) = get_authed(
        node,
        "/_matrix/identity/v2/hash_details",
        Some(&token),
        true,
    )
    .await;
    assert_eq!(status, 200, "{details}");
    assert_eq!(details["algorithms"], json!(["none", "sha256"]));
    let pepper = details["lookup_pepper"].as_str().unwrap().to_string();
    assert!(pepper.len() >= 16, "{pepper}");

    node.internal_3pid("bind", "Alice@Example.org", "@alice:hs.example")
        .await;
    node.internal_3pid("bind", "bob@example.org", "@bob:hs.example")
        .await;
    let alice = lookup_hash("alice@example.org", "email", &pepper);
    let bob = lookup_hash("bob@example.org", "email", &pepper);
    let nobody = lookup_hash("nobody@example.org", "email", &pepper);
    let (status, body) = lookup(
        node,
        &token,
        &json!({"algorithm": "sha256", "pepper": pepper, "addresses": [alice, bob, nobody, "not a hash"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"mappings": {alice.clone(): "@alice:hs.example", bob.clone(): "@bob:hs.example"}})
    );

    // A rebind wins (Sydent would answer the alphabetically greatest Matrix ID, @alice).
    node.internal_3pid("bind", "alice@example.org", "@aaron:hs.example")
        .await;
    let (_, body) = lookup(
        node,
        &token,
        &json!({"algorithm": "sha256", "pepper": pepper, "addresses": [alice]}),
    )
    .await;
    assert_eq!(body["mappings"][&alice], "@aaron:hs.example");

    // algorithm none: "<address> <medium>", emails casefolded as on every path.
    let (status, body) = lookup(
        node,
        &token,
        &json!({"algorithm": "none", "pepper": pepper, "addresses": ["ALICE@example.org email", "bob@example.org email", "bob@example.org msisdn", "garbage"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"mappings": {"ALICE@example.org email": "@aaron:hs.example", "bob@example.org email": "@bob:hs.example"}})
    );

    // Refusals.
    let (status, body) = lookup(
        node,
        &token,
        &json!({"algorithm": "sha256", "pepper": "stale", "addresses": [alice]}),
    )
    .await;
    assert_error(status, &body, 400, "M_INVALID_PEPPER");
    assert_eq!(
        (body["algorithm"].as_str(), body["lookup_pepper"].as_str()),
        (Some("sha256"), Some(pepper.as_str()))
    );
    let (status, body) = lookup(
        node,
        &token,
        &json!({"algorithm": "md5", "pepper": pepper, "addresses": []}),
    )
    .await;
    assert_error(status, &body, 400, "M_INVALID_PARAM");
    let (status, body) = lookup(
        node,
        &token,
        &json!({"algorithm": "sha256", "pepper": pepper, "addresses": "not a list"}),
    )
    .await;
    assert_error(status, &body, 400, "M_INVALID_PARAM");
    let (status, body) = lookup(node, &token, &json!(["not", "an", "object"])).await;
    assert_error(status, &body, 400, "M_BAD_JSON");
    // An address asked twice is answered once.
    let (status, body) = lookup(
        node,
        &token,
        &json!({"algorithm": "sha256", "pepper": pepper, "addresses": [bob, bob]}),
    )
    .await;
    assert_eq!(
        (status, body),
        (200, json!({"mappings": {bob.clone(): "@bob:hs.example"}}))
    );
    let (status, body) = lookup(node, &token, &json!({"algorithm": "sha256"})).await;
    assert_error(status, &body, 400, "M_MISSING_PARAMS");
    assert_eq!(body["error"], "Missing parameters: addresses,pepper");
    let (status, body) = lookup(node, "wrong", &json!({})).await;
    assert_error(status, &body, 401, "M_UNKNOWN_TOKEN");

    // Logged out: the same lookup is refused at once.
    let (status, _) = post_authed(
        node,
        "/_matrix/identity/v2/account/logout",
        &token,
        &json!({}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = lookup(
        node,
        &token,
        &json!({"algorithm": "sha256", "pepper": pepper, "addresses": [bob]}),
    )
    .await;
    assert_error(status, &body, 401, "M_UNKNOWN_TOKEN");
}

#[tokio::test]
async fn too_many_addresses_and_lookups_while_the_index_warms_up() {
    let rig = Rig::new(None);
    let (_, body) = register(&rig.node, "good", &rig.server).await;
    let token = body["token"].as_str().unwrap().to_string();
    rig.node
        .internal_3pid("bind", "warm@example.org", "@warm:hs.example")
        .await;
    let (_, details) = get_authed(
        &rig.node,
        "/_matrix/identity/v2/hash_details",
        Some(&token),
        false,
    )
    .await;
    let pepper = details["lookup_pepper"].as_str().unwrap().to_string();
    let mut rig = rig;
    rig.node.stop();

    // Restarted with a small limit and an index held back for 10 s: answers come from SQLite.
    let node = start_node_with(
        rig.dir.path(),
        &rig.ca,
        true,
        None,
        "address_lookup_limit = 3\n",
        &[("SYDENT_RS_TEST_WARM_UP_DELAY_MS", "10000")],
    );
    let warm = lookup_hash("warm@example.org", "email", &pepper);
    let (status, body) = lookup(
        &node,
        &token,
        &json!({"algorithm": "sha256", "pepper": pepper, "addresses": [warm]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"mappings": {warm.clone(): "@warm:hs.example"}})
    );
    assert!(
        !node.log_text().contains("lookup index ready"),
        "the index was ready already; the test saw nothing of the warm-up"
    );
    let (status, body) = lookup(
        &node,
        &token,
        &json!({"algorithm": "sha256", "pepper": pepper, "addresses": ["a", "b", "c", "d"]}),
    )
    .await;
    assert_error(status, &body, 400, "M_TOO_LARGE");
}
