//! The LDAP client against a real OpenLDAP (harness/slapd.rs), called directly (no node):
//! the full paged search and the batched address search as a directory of people answers
//! them (casefolded emails, msisdn digits from `+1 555-123-4567`, an address two people share
//! left out, an id that makes no Matrix ID skipped), filter-injection probes, StartTLS and
//! ldaps with the right and a wrong CA, a wrong password, and a server that is down or
//! silent.

use std::time::{Duration, Instant};

use sydent_rs::directory::{
    search_addresses, search_all, DirectoryBinding, LdapClient, LdapError, LdapSettings,
};
use sydent_rs::types::Medium;

use crate::harness::slapd::{person, Slapd, ADMIN_DN, ADMIN_PW, PEOPLE};
use crate::harness::TestCa;

/// Generous: the CI machine runs many tests at once on two cores.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The directory every test starts from.
fn people() -> String {
    [
        person(
            "Alice",
            &[
                "uid: alice",
                "mail: Alice@Example.ORG",
                "telephoneNumber: +1 555-123-4567",
            ],
        ),
        person(
            "Bob",
            &[
                "uid: bob",
                "mail: bob@example.org",
                "mail: shared@example.org",
                "telephoneNumber: +44 7700 900123",
            ],
        ),
        // Shares an address with Bob: ambiguous.
        person("Carol", &["uid: carol", "mail: shared@example.org"]),
        // `@dave:evil:example.org` is no Matrix ID: skipped.
        person("Dave", &["uid: dave:evil", "mail: dave@example.org"]),
        // An upper-case uid and a number stored without `+`.
        person(
            "Erin",
            &[
                "uid: Erin",
                "mail: erin@example.org",
                "telephoneNumber: 15550001111",
            ],
        ),
        // A `*` in a real address, to show the escaped star still matches itself.
        person("Star", &["uid: star", "mail: star*@example.org"]),
        // Neither mail nor phone: not a binding at all.
        person("Frank", &["uid: frank"]),
    ]
    .concat()
}

fn start() -> (tempfile::TempDir, Slapd) {
    let dir = tempfile::tempdir().unwrap();
    let slapd = Slapd::start(dir.path());
    slapd.add(&people());
    (dir, slapd)
}

/// The settings of a node reading `slapd` as its admin, over plain LDAP.
fn settings(slapd: &Slapd) -> LdapSettings {
    LdapSettings {
        uri: slapd.uri(),
        starttls: false,
        base: PEOPLE.into(),
        email_attrs: vec!["mail".into()],
        msisdn_attrs: vec!["telephoneNumber".into()],
        id_attr: "uid".into(),
        hs_name: Some("example.org".into()),
        bind_dn: Some(ADMIN_DN.into()),
        bind_pw: Some(ADMIN_PW.into()),
        filter: Some("(objectClass=inetOrgPerson)".into()),
        cacert: None,
        timeout: TIMEOUT,
    }
}

fn dn(cn: &str) -> String {
    format!("cn={cn},{PEOPLE}")
}

#[tokio::test]
async fn the_full_search_gives_every_usable_binding_and_reports_the_rest() {
    let (_dir, slapd) = start();
    let snapshot = search_all(&settings(&slapd)).await.unwrap();
    assert_eq!(
        snapshot.bindings,
        vec![
            DirectoryBinding::new(Medium::Email, "alice@example.org", "@alice:example.org"),
            DirectoryBinding::new(Medium::Email, "bob@example.org", "@bob:example.org"),
            DirectoryBinding::new(Medium::Email, "erin@example.org", "@erin:example.org"),
            DirectoryBinding::new(Medium::Email, "star*@example.org", "@star:example.org"),
            DirectoryBinding::new(Medium::Msisdn, "15550001111", "@erin:example.org"),
            DirectoryBinding::new(Medium::Msisdn, "15551234567", "@alice:example.org"),
            DirectoryBinding::new(Medium::Msisdn, "447700900123", "@bob:example.org"),
        ]
    );
    assert_eq!(
        snapshot.ambiguous,
        vec![(
            Medium::Email,
            "shared@example.org".to_owned(),
            vec![dn("Bob"), dn("Carol")]
        )]
    );
    assert_eq!(snapshot.skipped, 1, "Dave's uid makes no Matrix ID");
}

#[tokio::test]
async fn a_directory_larger_than_its_answer_limit_is_read_page_by_page() {
    let (_dir, slapd) = start();
    let many: String = (0..1200)
        .map(|i| {
            person(
                &format!("p{i}"),
                &[&format!("uid: p{i}"), &format!("mail: p{i}@example.org")],
            )
        })
        .collect();
    slapd.add(&many);
    // Anonymous: slapd answers at most 500 entries per search, but pages may go on.
    let mut settings = settings(&slapd);
    settings.bind_dn = None;
    settings.bind_pw = None;
    let before = slapd.searches();
    let snapshot = search_all(&settings).await.unwrap();
    assert_eq!(snapshot.bindings.len(), 1200 + 7);
    assert!(
        slapd.searches() - before >= 3,
        "1207 entries in pages of 500"
    );
}

#[tokio::test]
async fn a_batch_of_addresses_is_answered_by_one_search() {
    let (_dir, slapd) = start();
    let client = LdapClient::new(settings(&slapd)).unwrap();
    let mut connection = client.connect().await.unwrap();
    let before = slapd.searches();
    let mut found = connection
        .search_addresses(&[
            (Medium::Email, "ALICE@example.org".into()),
            (Medium::Email, "bob@example.org".into()),
            (Medium::Email, "shared@example.org".into()),
            (Medium::Email, "dave@example.org".into()),
            (Medium::Email, "nobody@example.org".into()),
            // Stored as `+1 555-123-4567` and as `15550001111`.
            (Medium::Msisdn, "15551234567".into()),
            (Medium::Msisdn, "15550001111".into()),
            (Medium::Msisdn, "19999999999".into()),
        ])
        .await
        .unwrap();
    assert_eq!(slapd.searches() - before, 1);
    found.sort();
    // Only what was asked (Bob's phone came back with his entry, but was not asked); not
    // the shared address, nor Dave's (no Matrix ID).
    assert_eq!(
        found,
        vec![
            DirectoryBinding::new(Medium::Email, "alice@example.org", "@alice:example.org"),
            DirectoryBinding::new(Medium::Email, "bob@example.org", "@bob:example.org"),
            DirectoryBinding::new(Medium::Msisdn, "15550001111", "@erin:example.org"),
            DirectoryBinding::new(Medium::Msisdn, "15551234567", "@alice:example.org"),
        ]
    );
    assert!(connection.search_addresses(&[]).await.unwrap().is_empty());
    assert_eq!(
        slapd.searches() - before,
        1,
        "nothing to ask, nothing asked"
    );
    connection.close().await;
}

#[tokio::test]
async fn filter_injection_probes_find_nothing() {
    let (_dir, slapd) = start();
    let settings = settings(&slapd);
    let probes = [
        "*",
        "a*",
        "*@example.org",
        "st*@example.org",
        "x)(uid=*",
        "x)(|(uid=*)",
        "*)(objectClass=*",
        "\\",
        "\\2a",
        "\0",
        "alice@example.org\0",
    ];
    for probe in probes {
        for medium in [Medium::Email, Medium::Msisdn] {
            let found = search_addresses(&settings, &[(medium, probe.into())])
                .await
                .unwrap_or_else(|e| panic!("{probe:?}: {e}"));
            assert!(found.is_empty(), "{medium} {probe:?} found {found:?}");
        }
    }
    // The escaped star still matches a star: the value reached slapd whole.
    let found = search_addresses(&settings, &[(Medium::Email, "star*@example.org".into())])
        .await
        .unwrap();
    assert_eq!(
        found,
        vec![DirectoryBinding::new(
            Medium::Email,
            "star*@example.org",
            "@star:example.org"
        )]
    );
}

#[tokio::test]
async fn starttls_with_the_right_ca_comes_before_the_bind() {
    let (_dir, slapd) = start();
    let mut settings = settings(&slapd);
    settings.starttls = true;
    settings.cacert = Some(slapd.ca_file.clone());
    let snapshot = search_all(&settings).await.unwrap();
    assert_eq!(snapshot.bindings.len(), 7);
    // The connection's first operation was StartTLS; the bind came after it.
    let log = slapd.log();
    let starttls = log
        .lines()
        .find(|l| l.contains("EXT oid=1.3.6.1.4.1.1466.20037"))
        .expect("slapd saw StartTLS");
    let conn = starttls
        .split_whitespace()
        .find(|w| w.starts_with("conn="))
        .unwrap();
    assert!(starttls.contains(&format!("{conn} op=0 ")), "{starttls}");
    assert!(
        log.contains(&format!("{conn} op=1 BIND dn=\"{ADMIN_DN}\"")),
        "{log}"
    );

    settings.uri = slapd.ldaps_uri();
    settings.starttls = false;
    assert_eq!(search_all(&settings).await.unwrap().bindings.len(), 7);
}

#[tokio::test]
async fn a_certificate_another_ca_signed_is_refused_before_the_bind() {
    let (dir, slapd) = start();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, TestCa::new("someone else").cert_pem).unwrap();
    let binds = slapd.binds();
    for (uri, starttls) in [(slapd.uri(), true), (slapd.ldaps_uri(), false)] {
        let mut settings = settings(&slapd);
        settings.uri = uri.clone();
        settings.starttls = starttls;
        settings.cacert = Some(other.clone());
        match search_all(&settings).await {
            Err(e @ LdapError::Tls { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("TLS") && text.contains("certificate"),
                    "{text}"
                );
                assert!(text.contains("[ldap] cacert"), "{text}");
            }
            other => panic!("{uri}: {other:?}"),
        }
    }
    assert_eq!(slapd.binds(), binds, "the password never left");
}

#[tokio::test]
async fn a_wrong_password_is_a_clear_bind_error() {
    let (_dir, slapd) = start();
    let mut settings = settings(&slapd);
    settings.bind_pw = Some("not-the-password".into());
    let e = search_all(&settings).await.unwrap_err();
    assert!(matches!(e, LdapError::Bind { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("refused the bind as cn=admin"), "{text}");
    assert!(text.contains("wrong bind_dn or bind_pw"), "{text}");
    assert!(!text.contains("not-the-password"), "{text}");
}

#[tokio::test]
async fn a_directory_that_is_down_is_a_connect_error_and_back_once_restarted() {
    let (_dir, mut slapd) = start();
    let settings = settings(&slapd);
    slapd.stop();
    let started = Instant::now();
    let e = search_all(&settings).await.unwrap_err();
    assert!(matches!(e, LdapError::Connect { .. }), "{e:?}");
    assert!(started.elapsed() < TIMEOUT, "{:?}", started.elapsed());
    assert!(e.to_string().contains("cannot connect"), "{e}");

    slapd.restart();
    assert_eq!(search_all(&settings).await.unwrap().bindings.len(), 7);
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    // Connections are accepted (the kernel's backlog) but nothing ever answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cacert = dir.path().join("ca.pem");
    std::fs::write(&cacert, TestCa::new("silent").cert_pem).unwrap();
    let timeout = Duration::from_millis(500);
    for (starttls, stage) in [(false, "bind"), (true, "StartTLS")] {
        let settings = LdapSettings {
            uri: format!("ldap://127.0.0.1:{port}"),
            starttls,
            base: PEOPLE.into(),
            email_attrs: vec!["mail".into()],
            msisdn_attrs: vec![],
            id_attr: "uid".into(),
            hs_name: None,
            bind_dn: None,
            bind_pw: None,
            filter: None,
            cacert: Some(cacert.clone()),
            timeout,
        };
        let started = Instant::now();
        let e = search_all(&settings).await.unwrap_err();
        assert!(
            matches!(e, LdapError::Timeout { stage: s, .. } if s == stage),
            "{e:?}"
        );
        let waited = started.elapsed();
        assert!(waited >= timeout, "gave up after {waited:?}");
        assert!(waited < timeout + Duration::from_secs(5), "{waited:?}");
    }
}
