//! A database Sydent 2.x created (schema version 5) opens in place: its bindings are served
//! as they were signed, its pepper is kept, and Sydent's tables are untouched.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde_json::{json, Value};
use sydent_rs::crypto::{verify_json, VerifyKey};

use crate::harness::{base_config, vectors, TestNode};
use crate::internal_bind::sqlite_rows;

/// Sydent 2.6's schema as its own code leaves it (v0 .sql files, then migrations to v5).
const SYDENT_V5_SCHEMA: &str = r#"
CREATE TABLE local_threepid_associations (id integer primary key autoincrement, medium varchar(16) not null, address varchar(256) not null, mxid varchar(256), ts integer, notBefore bigint, notAfter bigint, lookup_hash varchar(256));
CREATE UNIQUE INDEX local_threepid_medium_address on local_threepid_associations(medium, address);
CREATE TABLE global_threepid_associations (id integer primary key autoincrement, medium varchar(16) not null, address varchar(256) not null, mxid varchar(256) not null, ts integer not null, notBefore bigint not null, notAfter integer not null, originServer varchar(255) not null, originId integer not null, sgAssoc text not null, lookup_hash varchar(256));
CREATE INDEX global_threepid_medium_address on global_threepid_associations (medium, address);
CREATE INDEX global_threepid_medium_lower_address on global_threepid_associations (medium, lower(address));
CREATE UNIQUE INDEX global_threepid_originServer_originId on global_threepid_associations (originServer, originId);
CREATE INDEX global_threepid_lookup_hash ON global_threepid_associations(lookup_hash);
CREATE TABLE threepid_validation_sessions (id integer primary key, medium varchar(16) not null, address varchar(256) not null, clientSecret varchar(32) not null, validated int default 0, mtime bigint not null);
CREATE INDEX threepid_validation_sessions_mtime ON threepid_validation_sessions(mtime);
CREATE TABLE threepid_token_auths (id integer primary key, validationSession integer not null, token varchar(32) not null, sendAttemptNumber integer not null, foreign key (validationSession) references threepid_validations(id));
CREATE TABLE invite_tokens (id integer primary key, medium varchar(16) not null, address varchar(256) not null, room_id varchar(256) not null, sender varchar(256) not null, token varchar(256) not null, received_ts bigint, sent_ts bigint);
CREATE INDEX invite_token_medium_address on invite_tokens(medium, address);
CREATE INDEX invite_token_token on invite_tokens(token);
CREATE TABLE ephemeral_public_keys (id integer primary key, public_key varchar(256) not null, verify_count bigint default 0, persistence_ts bigint);
CREATE UNIQUE INDEX ephemeral_public_keys_index on ephemeral_public_keys(public_key);
CREATE TABLE peers (id integer primary key, name varchar(255) not null, port integer default null, lastSentVersion integer, lastPokeSucceededAt integer, active integer not null default 0);
CREATE UNIQUE INDEX name on peers(name);
CREATE TABLE peer_pubkeys (id integer primary key, peername varchar(255) not null, alg varchar(16) not null, key text not null, foreign key (peername) references peers (peername));
CREATE UNIQUE INDEX peername_alg on peer_pubkeys(peername, alg);
CREATE TABLE hashing_metadata (id integer primary key, lookup_pepper varchar(256));
CREATE TABLE accounts(user_id TEXT NOT NULL PRIMARY KEY, created_ts BIGINT NOT NULL, consent_version TEXT);
CREATE TABLE tokens(token TEXT NOT NULL PRIMARY KEY, user_id TEXT NOT NULL);
CREATE TABLE accepted_terms_urls(user_id TEXT NOT NULL, url TEXT NOT NULL);
CREATE UNIQUE INDEX accepted_terms_urls_idx ON accepted_terms_urls (user_id, url);
PRAGMA user_version = 5;
"#;

/// `<dir>/sydent.db` with Sydent's schema and the pepper `matrixrocks` (the spec's test pepper),
/// and a connection to it for the test's own rows.
fn sydent_v5_db(dir: &std::path::Path) -> (std::path::PathBuf, SqliteConnection) {
    let db = dir.join("sydent.db");
    let mut conn = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
    conn.batch_execute(SYDENT_V5_SCHEMA).unwrap();
    conn.batch_execute(
        "INSERT INTO hashing_metadata (id, lookup_pepper) VALUES (0, 'matrixrocks');",
    )
    .unwrap();
    (db, conn)
}

fn insert_global(conn: &mut SqliteConnection, signed: &Value, origin: &str, origin_id: i64) {
    diesel::sql_query(
        "INSERT INTO global_threepid_associations (medium, address, mxid, ts, notBefore, notAfter, originServer, originId, sgAssoc, lookup_hash) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'x')",
    )
    .bind::<diesel::sql_types::Text, _>(signed["medium"].as_str().unwrap())
    .bind::<diesel::sql_types::Text, _>(signed["address"].as_str().unwrap())
    .bind::<diesel::sql_types::Text, _>(signed["mxid"].as_str().unwrap())
    .bind::<diesel::sql_types::BigInt, _>(signed["ts"].as_i64().unwrap())
    .bind::<diesel::sql_types::BigInt, _>(signed["not_before"].as_i64().unwrap())
    .bind::<diesel::sql_types::BigInt, _>(signed["not_after"].as_i64().unwrap())
    .bind::<diesel::sql_types::Text, _>(origin)
    .bind::<diesel::sql_types::BigInt, _>(origin_id)
    // Sydent stores json.dumps() of the dict: spaces after separators, keys unsorted.
    .bind::<diesel::sql_types::Text, _>(serde_json::to_string_pretty(signed).unwrap())
    .execute(conn)
    .unwrap();
}

#[tokio::test]
async fn sydent_database_is_served_in_place() {
    let v = vectors();
    let dir = tempfile::tempdir().unwrap();
    let (db, conn) = sydent_v5_db(dir.path());
    {
        let mut conn = conn; // closed at the end of the block, before the node opens the file
        conn.batch_execute(
            "INSERT INTO local_threepid_associations (medium, address, mxid, ts, notBefore, notAfter, lookup_hash)
               VALUES ('email', 'alice@example.com', '@alice:example.com', 1700000000000, 1700000000000, 4853600000000, 'h');
             INSERT INTO local_threepid_associations (medium, address, mxid, ts, notBefore, notAfter, lookup_hash)
               VALUES ('email', 'gone@example.com', NULL, 1700000000500, NULL, NULL, NULL);
             INSERT INTO peers (name, port, lastSentVersion, active) VALUES ('node2.test', 4434, 1, 1);
             INSERT INTO accounts (user_id, created_ts) VALUES ('@alice:example.com', 1);
             INSERT INTO ephemeral_public_keys (public_key, verify_count, persistence_ts)
               VALUES ('9TOmW_1kNXdfk1Zsr6fBq4DZ1K5LhO4b8gB3ac7Fh2E', 0, 1700000000000);",
        )
        .unwrap();
        let cases = v["signed_associations"].as_array().unwrap();
        insert_global(&mut conn, &cases[0]["signed"], "node1.test", 1);
        insert_global(&mut conn, &cases[1]["signed"], "node2.test", 7);
    }

    let seed = v["keys"]["node1.test"]["seed"].as_str().unwrap();
    let config = format!(
        "{}[crypto]\ned25519.signingkey = ed25519 0 {seed}\n",
        base_config(dir.path(), "node1.test")
    );
    let node = TestNode::start_with_config(dir.path(), &config);

    // Our own binding: exactly the association Sydent signed.
    let (_, alice) = node
        .get("/_matrix/identity/api/v1/lookup?medium=email&address=alice%40example.com")
        .await;
    assert_eq!(alice, v["signed_associations"][0]["signed"]);

    // A peer's binding: its signature kept, ours added, both verify.
    let (_, bob) = node
        .get("/_matrix/identity/api/v1/lookup?medium=msisdn&address=447700900123")
        .await;
    assert_eq!(bob["mxid"], "@bob:example.org");
    let bob = bob.as_object().unwrap();
    let key =
        |n: &str| VerifyKey::from_base64(v["keys"][n]["verify_key"].as_str().unwrap()).unwrap();
    verify_json(bob, "node2.test", "ed25519:0", &key("node2.test")).unwrap();
    verify_json(bob, "node1.test", "ed25519:0", &key("node1.test")).unwrap();

    let (_, bulk) = node
        .post(
            "/_matrix/identity/api/v1/bulk_lookup",
            &json!({"threepids": [["email", "alice@example.com"], ["msisdn", "447700900123"], ["email", "gone@example.com"]]}),
        )
        .await;
    assert_eq!(
        bulk,
        json!({"threepids": [["email", "alice@example.com", "@alice:example.com"], ["msisdn", "447700900123", "@bob:example.org"]]})
    );

    // An invite key Sydent issued is still valid; another is not.
    for (key, valid) in [
        ("9TOmW_1kNXdfk1Zsr6fBq4DZ1K5LhO4b8gB3ac7Fh2E", true),
        ("AAAAW_1kNXdfk1Zsr6fBq4DZ1K5LhO4b8gB3ac7Fh2E", false),
    ] {
        let (status, body) = node
            .get(&format!(
                "/_matrix/identity/v2/pubkey/ephemeral/isvalid?public_key={key}"
            ))
            .await;
        assert_eq!((status, body), (200, json!({ "valid": valid })));
    }

    // A new bind continues Sydent's id sequence and the pepper is Sydent's.
    let (status, _) = node
        .internal_post(
            "/_matrix/identity/internal/bind",
            &json!({"medium": "email", "address": "new@example.com", "mxid": "@new:example.com"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        sqlite_rows(&db, "SELECT lookup_pepper AS v FROM hashing_metadata"),
        ["matrixrocks"]
    );
    assert_eq!(
        sqlite_rows(&db, "SELECT lookup_hash AS v FROM local_threepid_associations WHERE address = 'new@example.com'"),
        [sydent_rs::crypto::lookup_hash("new@example.com", "email", "matrixrocks")]
    );
    assert_eq!(
        sqlite_rows(
            &db,
            "SELECT CAST(id AS TEXT) AS v FROM local_threepid_associations ORDER BY id"
        ),
        ["1", "2", "3"]
    );
    // Sydent's other data and its schema version are left as they were.
    assert_eq!(
        sqlite_rows(
            &db,
            "SELECT CAST(user_version AS TEXT) AS v FROM pragma_user_version"
        ),
        ["5"]
    );
    assert_eq!(
        sqlite_rows(&db, "SELECT name || ':' || lastSentVersion AS v FROM peers"),
        ["node2.test:1"]
    );
    assert_eq!(
        sqlite_rows(&db, "SELECT user_id AS v FROM accounts"),
        ["@alice:example.com"]
    );
}

#[tokio::test]
async fn sydent_database_from_before_hashing_is_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sydent.db");
    {
        let mut conn = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
        // Schema version 2: no lookup_hash columns, no hashing_metadata table yet.
        let v2 = SYDENT_V5_SCHEMA
            .replace(", lookup_hash varchar(256))", ")")
            .replace("CREATE INDEX global_threepid_lookup_hash ON global_threepid_associations(lookup_hash);", "")
            .replace("CREATE TABLE hashing_metadata (id integer primary key, lookup_pepper varchar(256));", "")
            .replace("PRAGMA user_version = 5;", "PRAGMA user_version = 2;");
        conn.batch_execute(&v2).unwrap();
        conn.batch_execute(
            "INSERT INTO global_threepid_associations (medium, address, mxid, ts, notBefore, notAfter, originServer, originId, sgAssoc)
               VALUES ('email', 'old@example.com', '@old:example.com', 1700000000000, 1700000000000, 4853600000000, 'node9.test', 3, '{\"mxid\": \"@old:example.com\"}');",
        )
        .unwrap();
    }
    let node = TestNode::start_with_config(dir.path(), &base_config(dir.path(), "node1.test"));
    let (_, bulk) = node
        .post(
            "/_matrix/identity/api/v1/bulk_lookup",
            &json!({"threepids": [["email", "old@example.com"]]}),
        )
        .await;
    assert_eq!(
        bulk,
        json!({"threepids": [["email", "old@example.com", "@old:example.com"]]})
    );
    let pepper = sqlite_rows(&db, "SELECT lookup_pepper AS v FROM hashing_metadata");
    assert_eq!(pepper.len(), 1);
    assert_eq!(
        sqlite_rows(
            &db,
            "SELECT lookup_hash AS v FROM global_threepid_associations"
        ),
        [sydent_rs::crypto::lookup_hash(
            "old@example.com",
            "email",
            &pepper[0]
        )]
    );
    assert_eq!(
        sqlite_rows(
            &db,
            "SELECT CAST(user_version AS TEXT) AS v FROM pragma_user_version"
        ),
        ["5"]
    );
}

/// A database from before Sydent casefolded emails (Sydent < 2.4, `casefold_db.py` never run):
/// the rows are casefolded when sydent-rs adopts it, so lookup, unbind and rebind all find them.
#[tokio::test]
async fn emails_stored_before_casefolding_are_casefolded_on_adoption() {
    use sydent_rs::association::ThreepidAssociation;
    use sydent_rs::crypto::NodeSigningKey;
    let v = vectors();
    let seed = v["keys"]["node1.test"]["seed"].as_str().unwrap();
    let key = NodeSigningKey::from_sydent_str(&format!("ed25519 0 {seed}")).unwrap();
    let peer_key = NodeSigningKey::generate();
    let signed = |address: &str, mxid: &str, ts: i64, origin: &str, key: &NodeSigningKey| {
        let assoc = ThreepidAssociation::binding("email", address, mxid, ts);
        Value::Object(assoc.signed(origin, key).unwrap())
    };
    let dir = tempfile::tempdir().unwrap();
    let (db, conn) = sydent_v5_db(dir.path());
    {
        let mut conn = conn; // closed at the end of the block, before the node opens the file
        conn.batch_execute(
            "INSERT INTO local_threepid_associations (id, medium, address, mxid, ts, notBefore, notAfter, lookup_hash) VALUES
               (1, 'email', 'Alice@Example.org', '@alice:node1.test', 1700000000000, 1700000000000, 4853600000000, 'h'),
               (2, 'email', 'BOB@example.org', '@bob-old:node1.test', 1700000000000, 1700000000000, 4853600000000, 'h'),
               (3, 'email', 'bob@example.org', '@bob-new:node1.test', 1700000001000, 1700000001000, 4853600001000, 'h');",
        )
        .unwrap();
        let rows = [
            (
                signed(
                    "Alice@Example.org",
                    "@alice:node1.test",
                    1700000000000,
                    "node1.test",
                    &key,
                ),
                "node1.test",
                1,
            ),
            (
                signed(
                    "BOB@example.org",
                    "@bob-old:node1.test",
                    1700000000000,
                    "node1.test",
                    &key,
                ),
                "node1.test",
                2,
            ),
            (
                signed(
                    "bob@example.org",
                    "@bob-new:node1.test",
                    1700000001000,
                    "node1.test",
                    &key,
                ),
                "node1.test",
                3,
            ),
            (
                signed(
                    "Carol@Example.org",
                    "@carol:node2.test",
                    1700000000000,
                    "node2.test",
                    &peer_key,
                ),
                "node2.test",
                5,
            ),
        ];
        for (assoc, origin, id) in &rows {
            insert_global(&mut conn, assoc, origin, *id);
        }
    }
    let config = format!(
        "{}[crypto]\ned25519.signingkey = ed25519 0 {seed}\n",
        base_config(dir.path(), "node1.test")
    );
    let mut node = TestNode::start_with_config(dir.path(), &config);
    let lookup = |address: &'static str| {
        let node = &node;
        async move {
            node.get(&format!(
                "/_matrix/identity/api/v1/lookup?medium=email&address={}",
                address.replace('@', "%40")
            ))
            .await
            .1
        }
    };

    // Our own row: casefolded, signed again with the casefolded address, hashed on it.
    let alice = lookup("alice@example.org").await;
    assert_eq!(alice["mxid"], "@alice:node1.test", "{alice}");
    assert_eq!(alice["address"], "alice@example.org", "{alice}");
    verify_json(
        alice.as_object().unwrap(),
        "node1.test",
        "ed25519:0",
        &key.verify_key(),
    )
    .unwrap();
    assert_eq!(
        sqlite_rows(
            &db,
            "SELECT lookup_hash AS v FROM global_threepid_associations WHERE originId = 1"
        ),
        [sydent_rs::crypto::lookup_hash(
            "alice@example.org",
            "email",
            "matrixrocks"
        )]
    );
    // Two rows for one casefolded address: the newer one stays, in both tables.
    assert_eq!(
        lookup("BOB@EXAMPLE.ORG").await["mxid"],
        "@bob-new:node1.test"
    );
    assert_eq!(
        sqlite_rows(&db, "SELECT address || ' ' || mxid AS v FROM local_threepid_associations WHERE id IN (2, 3)"),
        ["bob@example.org @bob-new:node1.test"]
    );
    assert_eq!(
        sqlite_rows(&db, "SELECT CAST(originId AS TEXT) AS v FROM global_threepid_associations WHERE address LIKE 'bob@%'"),
        ["3"]
    );
    // A peer's row: casefolded, its signature kept as the peer made it.
    let carol = lookup("carol@example.org").await;
    assert_eq!(carol["mxid"], "@carol:node2.test", "{carol}");
    verify_json(
        carol.as_object().unwrap(),
        "node2.test",
        "ed25519:0",
        &peer_key.verify_key(),
    )
    .unwrap();

    // The unbind that found nothing before: it writes the tombstone and removes the binding.
    node.internal_3pid("unbind", "Alice@Example.org", "@alice:node1.test")
        .await;
    assert_eq!(lookup("alice@example.org").await, json!({}));
    assert_eq!(
        sqlite_rows(&db, "SELECT COUNT(*) AS v FROM global_threepid_associations WHERE address = 'alice@example.org'"),
        ["0"]
    );
    assert_eq!(
        sqlite_rows(&db, "SELECT address || ' ' || COALESCE(mxid, 'tombstone') AS v FROM local_threepid_associations ORDER BY id DESC LIMIT 1"),
        ["alice@example.org tombstone"]
    );
    // A rebind replaces the casefolded row rather than adding a second one.
    node.internal_3pid("bind", "BOB@example.org", "@bob-3:node1.test")
        .await;
    assert_eq!(
        sqlite_rows(&db, "SELECT mxid AS v FROM local_threepid_associations WHERE address LIKE 'bob@%' OR address LIKE 'BOB@%'"),
        ["@bob-3:node1.test"]
    );

    // Done once, recorded; the replication marks were seeded from what the database held.
    assert!(node.stop().success());
    assert_eq!(
        sqlite_rows(&db, "SELECT name AS v FROM sydent_rs_upgrades"),
        ["casefold_emails"]
    );
    assert_eq!(
        sqlite_rows(&db, "SELECT origin_server || ':' || max_origin_id AS v FROM replication_origin_marks ORDER BY origin_server"),
        ["node1.test:3", "node2.test:5"]
    );
}
