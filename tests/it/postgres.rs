//! PostgreSQL as a node's database (issue 19, being built): the connection to a real server
//! (a throw-away cluster, `harness::postgres`), over TLS by rustls with the server's
//! certificate checked, the password from the URI, a file or PGPASSWORD, and the lock that
//! keeps a database to one node.

use sydent_rs::db::pg::{lock_database, PgTarget};

use crate::harness::postgres::{Postgres, PASSWORD};
use crate::harness::TestCa;

/// Whether the session `client` is on runs over TLS (the server's own view).
async fn over_tls(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn connects_over_verified_tls_and_keeps_a_database_to_one_node() {
    crate::harness::client(); // installs the rustls provider
    let pg = Postgres::start();
    pg.create_db("identity");
    let ca = pg.ca_file.display().to_string();

    // verify-full with the server's CA: a TLS session, as the server sees it.
    let uri = format!(
        "{}?sslmode=verify-full&sslrootcert={ca}",
        pg.uri("identity", true)
    );
    let target = PgTarget::parse(&uri, None, None).unwrap();
    assert!(!target.shown.contains(PASSWORD), "{}", target.shown);
    let first = target.connect().await.unwrap();
    assert!(over_tls(&first).await);

    // The password from a file, or from PGPASSWORD, when the URI has none.
    let bare = format!(
        "{}?sslmode=require&sslrootcert={ca}",
        pg.uri("identity", false)
    );
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("pw");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let from_file = PgTarget::parse(&bare, Some(&file), None).unwrap();
    assert!(over_tls(&from_file.connect().await.unwrap()).await);
    let from_env = PgTarget::parse(&bare, None, Some(PASSWORD.into())).unwrap();
    from_env.connect().await.unwrap();

    // Refusals say why: a wrong password, a server certificate from another CA, no TLS.
    let wrong = PgTarget::parse(&bare, None, Some("not-it".into())).unwrap();
    let e = wrong.connect().await.unwrap_err().to_string();
    assert!(e.contains("password authentication failed"), "{e}");
    let other_ca = root.path().join("other-ca.pem");
    std::fs::write(&other_ca, TestCa::new("another CA").cert_pem).unwrap();
    let impostor = PgTarget::parse(
        &format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            pg.uri("identity", true),
            other_ca.display()
        ),
        None,
        None,
    )
    .unwrap();
    let e = impostor.connect().await.unwrap_err().to_string();
    assert!(e.contains("certificate"), "{e}");
    let plain = PgTarget::parse(
        &format!("{}?sslmode=disable", pg.uri("identity", true)),
        None,
        None,
    )
    .unwrap();
    let e = plain.connect().await.unwrap_err().to_string();
    assert!(
        e.contains("pg_hba.conf rejects") && e.contains("no encryption"),
        "{e}"
    );

    // One node per database: the first takes the lock; a second is refused while the first
    // session lives, and takes it once that session is gone.
    lock_database(&first, &target.shown).await.unwrap();
    let second = target.connect().await.unwrap();
    let e = lock_database(&second, &target.shown)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("is in use by another node"), "{e}");
    drop(first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lock_database(&second, &target.shown).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the lock outlived its session"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Another database on the same server is another node's: advisory locks are scoped to
    // their database.
    pg.create_db("other");
    let other = PgTarget::parse(
        &format!("{}?sslmode=require&sslrootcert={ca}", pg.uri("other", true)),
        None,
        None,
    )
    .unwrap();
    lock_database(&other.connect().await.unwrap(), &other.shown)
        .await
        .unwrap();
}
