//! A node whose database is lost, rebuilt from its peers with `rebuild-from-peers`.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::harness::{port_of, Mesh};
use super::{bind_many, origin_rows, wait_origin_rows, A, B, C};
use crate::harness::run_to_exit;
use crate::internal_bind::sqlite_rows;

const BOUND: usize = 10_000;

/// What node `i` answers to a v1 bulk lookup of `addresses` (emails), sorted.
async fn bulk(mesh: &Mesh, i: usize, addresses: &[String]) -> Vec<Value> {
    let mut answered = Vec::new();
    for chunk in addresses.chunks(2_500) {
        let threepids: Vec<Value> = chunk.iter().map(|a| json!(["email", a])).collect();
        let (status, body) = mesh.nodes[i]
            .node()
            .post(
                "/_matrix/identity/api/v1/bulk_lookup",
                &json!({ "threepids": threepids }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        answered.extend(body["threepids"].as_array().unwrap().iter().cloned());
    }
    answered.sort_by_key(|t| t.to_string());
    answered
}

/// The single v1 lookup of `address` on node `i`, as JSON text (signatures included).
async fn single(mesh: &Mesh, i: usize, address: &str) -> Value {
    let (status, body) = mesh.nodes[i]
        .node()
        .get(&format!(
            "/_matrix/identity/api/v1/lookup?medium=email&address={}",
            address.replace('@', "%40")
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Node `i` stops hard and its database goes (its config, with its key, stays).
fn lose_database(mesh: &mut Mesh, i: usize) {
    mesh.nodes[i].node.take().unwrap().kill();
    for suffix in ["", "-wal", "-shm"] {
        let mut path = mesh.nodes[i].db().into_os_string();
        path.push(suffix);
        let _ = std::fs::remove_file(path);
    }
    assert!(!mesh.nodes[i].db().exists());
}

/// The one integer `sql` selects (as text, in a column `v`).
fn sqlite_int(db: &std::path::Path, sql: &str) -> i64 {
    sqlite_rows(db, sql)[0].parse().unwrap()
}

/// Runs one SQL statement on a database file (a running node's too: WAL).
fn execute(db: &std::path::Path, sql: &str) {
    use diesel::prelude::*;
    let mut conn = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
    diesel::sql_query("PRAGMA busy_timeout = 10000")
        .execute(&mut conn)
        .unwrap();
    assert_eq!(
        diesel::sql_query(sql).execute(&mut conn).unwrap(),
        1,
        "{sql}"
    );
}

/// `id|address|mxid` of every binding in a node's local table.
fn local_bindings(db: &std::path::Path) -> BTreeSet<String> {
    sqlite_rows(
        db,
        "SELECT id || '|' || address || '|' || mxid AS v FROM local_threepid_associations \
         WHERE mxid IS NOT NULL",
    )
    .into_iter()
    .collect()
}

#[tokio::test]
async fn a_node_whose_database_is_lost_is_rebuilt_from_its_peers() {
    let mut mesh = Mesh::start(&["a.test", "b.test", "c.test"]).await;
    bind_many(&mesh, A, "r", BOUND).await;
    // Some of them unbound and bound again on A, one unbound by B (its tombstone removes A's
    // binding everywhere), bindings made on B and C; A's last write is an unbind, so the
    // peers have seen an id of A's that no binding holds.
    for n in 0..10 {
        mesh.unbind(A, &format!("r{n}@example.com"), &format!("@r{n}:a.test"))
            .await;
    }
    for n in 0..5 {
        mesh.bind(
            A,
            &format!("r{n}@example.com"),
            &format!("@again{n}:a.test"),
        )
        .await;
    }
    bind_many(&mesh, B, "b", 300).await;
    bind_many(&mesh, C, "c", 200).await;
    mesh.unbind(B, "r100@example.com", "@r100:a.test").await;
    mesh.unbind(A, "r9999@example.com", "@r9999:a.test").await;
    let own = BOUND - 10 + 5 - 2;
    for i in [B, C] {
        wait_origin_rows(&mesh, i, "a.test", own).await;
    }
    wait_origin_rows(&mesh, A, "b.test", 300).await;
    wait_origin_rows(&mesh, A, "c.test", 200).await;
    mesh.wait_lookup(&[A, B, C], "r100@example.com", None).await;

    let mut addresses: Vec<String> = (0..BOUND).map(|n| format!("r{n}@example.com")).collect();
    addresses.extend((0..300).map(|n| format!("b{n}@example.com")));
    addresses.extend((0..200).map(|n| format!("c{n}@example.com")));
    let before = bulk(&mesh, A, &addresses).await;
    assert_eq!(before.len(), own + 500);
    let samples = ["r0@example.com", "r42@example.com", "b7@example.com"];
    let mut singles = Vec::new();
    for address in samples {
        singles.push(single(&mesh, A, address).await);
    }
    // A's own table still holds the binding B unbound (every lookup drops it); the peers do not.
    let mut local_before = local_bindings(&mesh.nodes[A].db());
    assert_eq!(local_before.len(), own + 1);
    local_before.retain(|row| !row.contains("|r100@example.com|"));
    let last_id = sqlite_int(
        &mesh.nodes[A].db(),
        "SELECT CAST(MAX(id) AS TEXT) AS v FROM local_threepid_associations",
    );
    let received_by = |status: &Value| status["peers"]["a.test"]["received"].as_u64().unwrap();
    let b_received = received_by(&mesh.status(B).await);

    // The disk is lost: A stops hard and its database goes; its config (key) stays.
    let port = port_of(mesh.nodes[A].node().replication_addr.as_deref().unwrap());
    lose_database(&mut mesh, A);

    // A binding altered on every peer is refused (not signed with A's key): nothing written.
    let tamper = |from: &str, to: &str| {
        for i in [B, C] {
            execute(
                &mesh.nodes[i].db(),
                &format!(
                    "UPDATE global_threepid_associations SET sgAssoc = replace(sgAssoc, '{from}', \
                     '{to}') WHERE originServer = 'a.test' AND address = 'r42@example.com'"
                ),
            );
        }
    };
    tamper("@r42:a.test", "@evil:a.test");
    let config = mesh.nodes[A].config_path();
    let (code, out, err) = run_to_exit(
        &mesh.nodes[A].dir,
        &["--config", config.to_str().unwrap(), "rebuild-from-peers"],
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("reading a.test's bindings from")
            && err.contains("1 associations refused (ids 43)")
            && err.contains("nothing was restored"),
        "{err}"
    );
    assert!(local_bindings(&mesh.nodes[A].db()).is_empty());
    tamper("@evil:a.test", "@r42:a.test");

    let (code, out, err) = run_to_exit(
        &mesh.nodes[A].dir,
        &["--config", config.to_str().unwrap(), "rebuild-from-peers"],
    );
    assert_eq!(code, Some(0), "rebuild failed:\n{out}\n{err}");
    assert!(
        out.contains(&format!(
            "restored {own} of this node's bindings and {} in all",
            own + 500
        )),
        "{out}"
    );
    assert!(
        out.contains("a.test: ") && out.contains("b.test: 300 bindings read from b.test"),
        "{out}"
    );
    assert!(
        out.contains(&format!("b.test: pushes resume after id {last_id}")),
        "{out}"
    );
    // Every binding of A's back with its original id, and A's ids go on above its last one
    // (an unbind, which no binding holds).
    assert_eq!(local_bindings(&mesh.nodes[A].db()), local_before);
    let next_id = sqlite_int(
        &mesh.nodes[A].db(),
        "SELECT CAST(seq AS TEXT) AS v FROM sqlite_sequence WHERE name = 'local_threepid_associations'",
    );
    assert_eq!(next_id, last_id);
    // A second run refuses: the database is no longer empty.
    let (code, _, err) = run_to_exit(
        &mesh.nodes[A].dir,
        &["--config", config.to_str().unwrap(), "rebuild-from-peers"],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("already holds"), "{err}");

    mesh.restart_same_port(A, port);
    assert_eq!(
        bulk(&mesh, A, &addresses).await,
        before,
        "every lookup as before"
    );
    for (address, answer) in samples.iter().zip(&singles) {
        assert_eq!(&single(&mesh, A, address).await, answer, "{address}");
    }

    // A new bind on A reaches B and C with a new id; nothing was pushed again.
    mesh.bind(A, "after@example.com", "@after:a.test").await;
    mesh.wait_lookup(&[B, C], "after@example.com", Some("@after:a.test"))
        .await;
    for i in [B, C] {
        let (count, distinct) = origin_rows(&mesh.nodes[i].db(), "a.test");
        assert_eq!((count, distinct), (own + 1, own + 1), "node {i}");
    }
    let new_id = sqlite_rows(
        &mesh.nodes[B].db(),
        "SELECT CAST(originId AS TEXT) AS v FROM global_threepid_associations \
         WHERE address = 'after@example.com'",
    );
    assert_eq!(new_id, vec![(last_id + 1).to_string()]);
    assert_eq!(received_by(&mesh.status(B).await), b_received + 1);
    // And B's and C's new bindings reach A as before.
    mesh.bind(B, "fromb@example.com", "@fromb:b.test").await;
    mesh.wait_lookup(&[A], "fromb@example.com", Some("@fromb:b.test"))
        .await;
    let (count, distinct) = origin_rows(&mesh.nodes[A].db(), "b.test");
    assert_eq!((count, distinct), (301, 301));
}

/// A node that never bound anything is rebuilt with its peers' bindings only.
#[tokio::test]
async fn a_node_with_no_bindings_of_its_own_is_rebuilt_with_its_peers() {
    let mut mesh = Mesh::start(&["a.test", "b.test"]).await;
    mesh.bind(B, "onb@example.com", "@onb:b.test").await;
    mesh.wait_lookup(&[A], "onb@example.com", Some("@onb:b.test"))
        .await;
    let port = port_of(mesh.nodes[A].node().replication_addr.as_deref().unwrap());
    lose_database(&mut mesh, A);
    let config = mesh.nodes[A].config_path();
    let (code, out, err) = run_to_exit(
        &mesh.nodes[A].dir,
        &["--config", config.to_str().unwrap(), "rebuild-from-peers"],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("a.test: no bindings in the mesh"), "{out}");
    assert!(out.contains("b.test: pushes resume after id -1"), "{out}");
    assert!(
        out.contains("restored 0 of this node's bindings and 1 in all"),
        "{out}"
    );
    mesh.restart_same_port(A, port);
    assert_eq!(
        mesh.lookup(A, "onb@example.com").await.as_deref(),
        Some("@onb:b.test")
    );
    // A's first bind replicates as before.
    mesh.bind(A, "first@example.com", "@first:a.test").await;
    mesh.wait_lookup(&[B], "first@example.com", Some("@first:a.test"))
        .await;
}
