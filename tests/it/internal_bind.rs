//! The walk-through of the README: internal bind → v1 lookup → bulk_lookup → unbind, rebinds,
//! and that what the node signs verifies with the key it publishes.

use serde_json::{json, Value};
use sydent_rs::crypto::{verify_json, VerifyKey};

use crate::harness::{base_config, TestNode};

async fn node(server_name: &str) -> (tempfile::TempDir, TestNode) {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start_with_config(dir.path(), &base_config(dir.path(), server_name));
    (dir, node)
}

async fn published_key(node: &TestNode) -> VerifyKey {
    let (status, body) = node.get("/_matrix/identity/v2/pubkey/ed25519:0").await;
    assert_eq!(status, 200);
    VerifyKey::from_base64(body["public_key"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn bind_lookup_bulk_lookup_unbind() {
    let (_dir, node) = node("id.example.org").await;
    let key = published_key(&node).await;

    let (status, signed) = node
        .internal_post(
            "/_matrix/identity/internal/bind",
            &json!({"medium": "email", "address": "Alice@Example.ORG", "mxid": "@alice:example.org"}),
        )
        .await;
    assert_eq!(status, 200, "{signed}");
    assert_eq!(signed["medium"], "email");
    assert_eq!(signed["address"], "alice@example.org", "email casefolded");
    assert_eq!(signed["mxid"], "@alice:example.org");
    let ts = signed["ts"].as_i64().unwrap();
    assert_eq!(signed["not_before"].as_i64(), Some(ts));
    assert_eq!(
        signed["not_after"].as_i64(),
        Some(ts + 100 * 365 * 86_400_000)
    );
    verify_json(
        signed.as_object().unwrap(),
        "id.example.org",
        "ed25519:0",
        &key,
    )
    .expect("bind answer is signed");

    // v1 lookup finds it under any case of the address and returns the same signed object.
    let (status, found) = node
        .get("/_matrix/identity/api/v1/lookup?medium=email&address=ALICE%40example.org")
        .await;
    assert_eq!(status, 200);
    assert_eq!(found, signed);
    let (_, none) = node
        .get("/_matrix/identity/api/v1/lookup?medium=email&address=bob%40example.org")
        .await;
    assert_eq!(none, json!({}));

    node.internal_post(
        "/_matrix/identity/internal/bind",
        &json!({"medium": "msisdn", "address": "447700900123", "mxid": "@bob:example.org"}),
    )
    .await;
    let (status, bulk) = node
        .post(
            "/_matrix/identity/api/v1/bulk_lookup",
            &json!({"threepids": [["email", "alice@example.org"], ["msisdn", "447700900123"],
                                  ["email", "nobody@example.org"], ["email", "ALICE@example.org"]]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        bulk,
        json!({"threepids": [["email", "alice@example.org", "@alice:example.org"],
                             ["msisdn", "447700900123", "@bob:example.org"]]})
    );

    // Unbinding with the wrong mxid changes nothing; with the right one removes the binding.
    let (status, body) = node
        .internal_post(
            "/_matrix/identity/internal/unbind",
            &json!({"medium": "email", "address": "alice@example.org", "mxid": "@mallory:example.org"}),
        )
        .await;
    assert_eq!((status, body), (200, json!({})));
    let (_, still) = node
        .get("/_matrix/identity/api/v1/lookup?medium=email&address=alice%40example.org")
        .await;
    assert_eq!(still["mxid"], "@alice:example.org");

    let (status, body) = node
        .internal_post(
            "/_matrix/identity/internal/unbind",
            &json!({"medium": "email", "address": "ALICE@example.org", "mxid": "@alice:example.org"}),
        )
        .await;
    assert_eq!((status, body), (200, json!({})));
    let (_, gone) = node
        .get("/_matrix/identity/api/v1/lookup?medium=email&address=alice%40example.org")
        .await;
    assert_eq!(gone, json!({}));
    let (_, bulk) = node
        .post(
            "/_matrix/identity/api/v1/bulk_lookup",
            &json!({"threepids": [["email", "alice@example.org"]]}),
        )
        .await;
    assert_eq!(bulk, json!({"threepids": []}));

    // The tombstone a replication peer will receive is in the local table.
    let db = node.dir.join("sydent.db");
    let rows = sqlite_rows(
        &db,
        "SELECT coalesce(mxid, 'NULL') || '|' || ifnull(notBefore, 'NULL') AS v FROM local_threepid_associations \
         WHERE medium = 'email' AND address = 'alice@example.org'",
    );
    assert_eq!(rows, ["NULL|NULL"]);
    let global = sqlite_rows(
        &db,
        "SELECT mxid AS v FROM global_threepid_associations WHERE medium = 'email'",
    );
    assert!(
        global.is_empty(),
        "global rows of the unbound email remain: {global:?}"
    );
}

#[tokio::test]
async fn rebind_newest_wins_on_every_lookup_path() {
    let (_dir, node) = node("id.example.org").await;
    for mxid in [
        "@first:example.org",
        "@second:example.org",
        "@aaa:example.org",
    ] {
        let (status, _) = node
            .internal_post(
                "/_matrix/identity/internal/bind",
                &json!({"medium": "email", "address": "carol@example.org", "mxid": mxid}),
            )
            .await;
        assert_eq!(status, 200);
    }
    let (_, found) = node
        .get("/_matrix/identity/api/v1/lookup?medium=email&address=carol%40example.org")
        .await;
    assert_eq!(
        found["mxid"], "@aaa:example.org",
        "the newest binding, not the greatest mxid"
    );
    let (_, bulk) = node
        .post(
            "/_matrix/identity/api/v1/bulk_lookup",
            &json!({"threepids": [["email", "carol@example.org"]]}),
        )
        .await;
    assert_eq!(
        bulk,
        json!({"threepids": [["email", "carol@example.org", "@aaa:example.org"]]})
    );
    // One local row for the 3PID and one global row: the rebinds replaced, not accumulated.
    let db = node.dir.join("sydent.db");
    assert_eq!(
        sqlite_rows(
            &db,
            "SELECT mxid AS v FROM local_threepid_associations WHERE address = 'carol@example.org'"
        ),
        ["@aaa:example.org"]
    );
    assert_eq!(
        sqlite_rows(&db, "SELECT mxid AS v FROM global_threepid_associations WHERE address = 'carol@example.org'"),
        ["@aaa:example.org"]
    );
}

#[tokio::test]
async fn concurrent_binds_all_land() {
    let (_dir, node) = node("id.example.org").await;
    let client = crate::harness::client();
    let url = format!("{}/_matrix/identity/internal/bind", node.internal());
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"medium": "email", "address": format!("user{i}@example.org"), "mxid": format!("@u{i}:example.org")});
            let resp = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let threepids: Vec<Value> = (0..200)
        .map(|i| json!(["email", format!("user{i}@example.org")]))
        .collect();
    let (_, bulk) = node
        .post(
            "/_matrix/identity/api/v1/bulk_lookup",
            &json!({ "threepids": threepids }),
        )
        .await;
    assert_eq!(bulk["threepids"].as_array().unwrap().len(), 200);
    let n = sqlite_rows(
        &node.dir.join("sydent.db"),
        "SELECT count(*) AS v FROM local_threepid_associations",
    );
    assert_eq!(n, ["200"]);
}

#[tokio::test]
async fn v1_routes_disappear_when_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let config = base_config(dir.path(), "id.example.org")
        .replace("[general]\n", "[general]\nenable_v1_access = false\n");
    let node = TestNode::start_with_config(dir.path(), &config);
    let (status, body) = node
        .get("/_matrix/identity/api/v1/lookup?medium=email&address=a%40b.c")
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (404, Some("M_UNRECOGNIZED"))
    );
    let (status, _) = node.get("/_matrix/identity/api/v1").await;
    assert_eq!(status, 404);
    let (status, body) = node.get("/_matrix/identity/v2").await;
    assert_eq!((status, body), (200, json!({})));
}

/// Runs a query with SQLite through diesel; each row's single column `v` as text.
pub fn sqlite_rows(db: &std::path::Path, sql: &str) -> Vec<String> {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        v: String,
    }
    let mut conn = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
    diesel::sql_query(sql)
        .load::<Row>(&mut conn)
        .unwrap()
        .into_iter()
        .map(|r| r.v)
        .collect()
}

/// A store whose commit thread panics (the test-only fault hook) stops the node with exit
/// code 70 and a log line saying why, instead of serving lookups while failing every bind; a
/// restart, as a supervisor would do, serves what was acknowledged before.
#[tokio::test]
async fn a_store_that_cannot_commit_stops_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sydent.conf");
    std::fs::write(&config, base_config(dir.path(), "id.example.org")).unwrap();
    let mut cmd = std::process::Command::new(crate::harness::BINARY);
    cmd.arg("--config")
        .arg(&config)
        .env("SYDENT_RS_TEST_PANIC_ON_BIND", "boom@example.org");
    let mut node = TestNode::start_cmd(dir.path(), &config, &mut cmd).unwrap();
    node.internal_3pid("bind", "kept@example.org", "@kept:example.org")
        .await;

    let (status, body) = node
        .internal_post(
            "/_matrix/identity/internal/bind",
            &json!({"medium": "email", "address": "boom@example.org", "mxid": "@boom:example.org"}),
        )
        .await;
    assert_eq!(
        (status, &body["errcode"]),
        (500, &json!("M_UNKNOWN")),
        "{body}"
    );
    let exit =
        crate::harness::wait_with_deadline(node.child_mut(), std::time::Duration::from_secs(30));
    assert_eq!(exit.code(), Some(70), "{}", node.log_text());
    assert!(
        node.log_text()
            .contains("the association store cannot commit"),
        "{}",
        node.log_text()
    );

    let node = TestNode::start(dir.path(), &config).unwrap();
    let (_, kept) = node
        .get("/_matrix/identity/api/v1/lookup?medium=email&address=kept%40example.org")
        .await;
    assert_eq!(kept["mxid"], "@kept:example.org", "{kept}");
    let (_, boom) = node
        .get("/_matrix/identity/api/v1/lookup?medium=email&address=boom%40example.org")
        .await;
    assert_eq!(boom, json!({}));
}
