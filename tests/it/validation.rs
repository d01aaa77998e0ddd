//! Email validation sessions end to end, against a real SMTP server: requestToken → the mail
//! (token and link read out of the received message) → submitToken (POST, or GET on the
//! emailed link, redirected to next_link) → getValidated3pid → bind → lookup → unbind →
//! lookup empty, on v1 and v2; and every way it can go wrong, each with its spec error and
//! nothing left behind.

use std::path::Path;
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use serde_json::{json, Value};

use crate::account::{assert_error, post_authed, register};
use crate::harness::smtp::Sink;
use crate::harness::{base_config, client, TestNode, BINARY};
use crate::homeserver::FakeHomeserver;
use crate::mesh::harness::TestCa;

const BASE: &str = "https://id.example.test";
const NEXT: &str = "https://client.example.test/done?x=1";

/// A node sending mail to `sink` (or to `smtp_port`), trusting `ca` for homeservers.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub sink: Sink,
    pub node: TestNode,
    pub hs: FakeHomeserver,
}

/// The config of a node whose mail goes to `smtp_port`; `extra` lines are added to their
/// sections (`[general]`, `[http]`, `[email]`).
pub fn validation_config(dir: &Path, smtp_port: u16, extra: &[(&str, &str)]) -> String {
    let section = |name: &str| {
        extra
            .iter()
            .filter(|(s, _)| *s == name)
            .map(|(_, line)| format!("{line}\n"))
            .collect::<String>()
    };
    let config = base_config(dir, "id.test")
        .replacen(
            "[general]\n",
            &format!(
                "[general]\nip.whitelist = 127.0.0.0/8, ::1/128\ntemplates.path = {}/res\n{}",
                env!("CARGO_MANIFEST_DIR"),
                section("general")
            ),
            1,
        )
        .replacen(
            "[http]\n",
            &format!("[http]\nclient_http_base = {BASE}\n{}", section("http")),
            1,
        );
    format!(
        "{config}[email]\nemail.smtphost = 127.0.0.1\nemail.smtpport = {smtp_port}\n\
         email.hostname = id.test\nemail.from = Identity Test <noreply@id.test>\n{}\
         [sms]\n{}",
        section("email"),
        section("sms"),
    )
}

pub fn start(dir: &Path, config: &str, ca: &TestCa) -> TestNode {
    crate::account::start_trusting(dir, config, ca, &[])
}

impl Rig {
    pub fn new(extra: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::start(dir.path(), "plain", None);
        let ca = TestCa::new("homeserver CA");
        let hs = FakeHomeserver::start(&ca, &["localhost"]);
        let node = start(
            dir.path(),
            &validation_config(dir.path(), sink.port, extra),
            &ca,
        );
        Self {
            dir,
            sink,
            node,
            hs,
        }
    }

    /// A v2 account (`@alice:localhost:<port>`) and its token.
    pub async fn account(&self) -> (String, String) {
        let server = format!("localhost:{}", self.hs.port);
        let (status, body) = register(&self.node, "good", &server).await;
        assert_eq!(status, 200, "{body}");
        (
            body["token"].as_str().unwrap().to_string(),
            format!("@alice:{server}"),
        )
    }

    pub fn db(&self) -> SqliteConnection {
        let db = self.dir.path().join("sydent.db");
        SqliteConnection::establish(db.to_str().unwrap()).unwrap()
    }
}

/// POST to a v1 path, or to a v2 path with `token`.
pub async fn call(node: &TestNode, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    match token {
        Some(token) => post_authed(node, path, token, body).await,
        None => node.post(path, body).await,
    }
}

/// The token and the link of a validation mail.
pub fn token_and_link(mail: &str) -> (String, String) {
    let link = mail
        .split(|c: char| c.is_whitespace() || c == '"' || c == '<' || c == '>')
        .find(|w| w.starts_with(BASE) && w.contains("submitToken"))
        .unwrap_or_else(|| panic!("no link in {mail}"))
        .replace("&amp;", "&");
    let query = link.split_once('?').unwrap().1;
    let token = serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == "token")
        .unwrap()
        .1;
    (token, link)
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

pub fn count(conn: &mut SqliteConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(conn).unwrap().n
}

/// GET a path of the node without following redirects: (status, Location, body).
async fn get_raw(node: &TestNode, path_and_query: &str) -> (u16, Option<String>, String) {
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = no_redirects
        .get(format!("{}{path_and_query}", node.client_url))
        .send()
        .await
        .unwrap();
    let location = response
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    (
        response.status().as_u16(),
        location,
        response.text().await.unwrap(),
    )
}

#[tokio::test]
async fn email_flow_on_v1_and_v2() {
    let _ = client();
    let rig = Rig::new(&[]);
    let node = &rig.node;
    let (token, alice) = rig.account().await;
    for (n, (prefix, auth)) in [
        ("/_matrix/identity/api/v1", None),
        ("/_matrix/identity/v2", Some(token.as_str())),
    ]
    .into_iter()
    .enumerate()
    {
        let address = format!("Flow{n}@Example.org");
        let secret = format!("secret-{n}");
        let (status, body) = call(
            node,
            &format!("{prefix}/validate/email/requestToken"),
            auth,
            &json!({"email": address, "client_secret": secret, "send_attempt": 1, "next_link": NEXT}),
        )
        .await;
        assert_eq!(status, 200, "{body} {}", node.log_text());
        let sid = body["sid"].as_str().expect("sid is a string").to_string();
        let (mail, envelope) = rig.sink.received(n + 1);
        assert_eq!(envelope["to"], json!([address]));
        assert_eq!(envelope["from"], "noreply@id.test");
        let (mail_token, link) = token_and_link(&mail);
        assert_eq!(mail_token.len(), 32, "{mail}");
        // The link is for the API version that was called, under client_http_base.
        assert!(
            link.starts_with(&format!("{BASE}{prefix}/validate/email/submitToken?")),
            "{link}"
        );
        assert!(link.contains(&format!("sid={sid}")), "{link}");
        assert!(mail.contains(&mail_token));

        // Not validated yet: no bind.
        let mxid = auth.map_or("@bob:example.org".to_string(), |_| alice.clone());
        let bind = json!({"sid": sid, "client_secret": secret, "mxid": mxid});
        let (status, body) = call(node, &format!("{prefix}/3pid/bind"), auth, &bind).await;
        assert_error(status, &body, 400, "M_SESSION_NOT_VALIDATED");

        if auth.is_none() {
            // v1: validated by POST.
            let (status, body) = call(
                node,
                &format!("{prefix}/validate/email/submitToken"),
                auth,
                &json!({"sid": sid, "client_secret": secret, "token": mail_token}),
            )
            .await;
            assert_eq!((status, &body), (200, &json!({"success": true})));
        } else {
            // v2: by the person following the emailed link, redirected to next_link.
            let path = link.strip_prefix(BASE).unwrap();
            let (status, location, _) = get_raw(node, path).await;
            assert_eq!((status, location.as_deref()), (302, Some(NEXT)));
            // A next_link in the clicked URL is not followed; the stored one is.
            let (status, location, _) =
                get_raw(node, &format!("{path}&nextLink=https://evil.example/")).await;
            assert_eq!((status, location.as_deref()), (302, Some(NEXT)));
        }

        let (status, body) = if let Some(token) = auth {
            crate::account::get_authed(
                node,
                &format!("{prefix}/3pid/getValidated3pid?sid={sid}&client_secret={secret}"),
                Some(token),
                false,
            )
            .await
        } else {
            node.get(&format!(
                "{prefix}/3pid/getValidated3pid?sid={sid}&client_secret={secret}"
            ))
            .await
        };
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["medium"], "email");
        assert_eq!(body["address"], address);
        let validated_at = body["validated_at"].as_i64().unwrap();
        assert!((sydent_rs::now_ms() - validated_at).abs() < 60_000);

        let (status, signed) = call(node, &format!("{prefix}/3pid/bind"), auth, &bind).await;
        assert_eq!(status, 200, "{signed}");
        // The bind answer is the signed association of the casefolded address.
        assert_eq!(signed["medium"], "email");
        assert_eq!(signed["address"], address.to_lowercase());
        assert_eq!(signed["mxid"], mxid);
        assert!(signed["signatures"]["id.test"]["ed25519:0"].is_string());
        assert_eq!(
            node.lookup_mxid(&address.to_lowercase()).await.as_deref(),
            Some(mxid.as_str())
        );

        // Unbinding another 3PID with this session is refused.
        let unbind = |addr: &str| {
            json!({"sid": sid, "client_secret": secret, "mxid": mxid,
                   "threepid": {"medium": "email", "address": addr}})
        };
        let (status, body) = node
            .post(
                &format!("{prefix}/3pid/unbind"),
                &unbind("other@example.org"),
            )
            .await;
        assert_error(status, &body, 403, "M_FORBIDDEN");
        assert!(node.lookup_mxid(&address.to_lowercase()).await.is_some());
        let (status, body) = node
            .post(&format!("{prefix}/3pid/unbind"), &unbind(&address))
            .await;
        assert_eq!((status, &body), (200, &json!({})));
        assert_eq!(node.lookup_mxid(&address.to_lowercase()).await, None);
    }
    assert_eq!(rig.sink.count(), 2);
}

#[tokio::test]
async fn a_repeated_send_attempt_sends_nothing_and_a_higher_one_the_same_token() {
    let rig = Rig::new(&[]);
    let node = &rig.node;
    let path = "/_matrix/identity/api/v1/validate/email/requestToken";
    let ask = |attempt: Value| json!({"email": "again@example.org", "client_secret": "s1", "send_attempt": attempt});
    let (_, first) = node.post(path, &ask(json!(1))).await;
    let (mail, _) = rig.sink.received(1);
    for attempt in [json!(1), json!("1"), json!(0)] {
        let (status, again) = node.post(path, &ask(attempt)).await;
        assert_eq!((status, &again["sid"]), (200, &first["sid"]));
    }
    // Give a wrongly sent mail the time to arrive before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rig.sink.count(), 1);
    let (status, again) = node.post(path, &ask(json!(2))).await;
    assert_eq!((status, &again["sid"]), (200, &first["sid"]));
    let (second, _) = rig.sink.received(2);
    assert_eq!(token_and_link(&mail).0, token_and_link(&second).0);
    // One session, its attempt recorded against it (Sydent records it against another row).
    let mut db = rig.db();
    assert_eq!(
        count(
            &mut db,
            "SELECT COUNT(*) AS n FROM threepid_validation_sessions"
        ),
        1
    );
    assert_eq!(
        count(
            &mut db,
            "SELECT sendAttemptNumber AS n FROM threepid_token_auths"
        ),
        2
    );
}

#[tokio::test]
async fn wrong_secrets_tokens_and_arguments_get_their_errors_and_leave_nothing() {
    let rig = Rig::new(&[]);
    let node = &rig.node;
    let v1 = "/_matrix/identity/api/v1";
    let request = format!("{v1}/validate/email/requestToken");
    for (body, errcode) in [
        (
            json!({"email": "not an email", "client_secret": "s", "send_attempt": 1}),
            "M_INVALID_EMAIL",
        ),
        (
            json!({"email": "Name <a@example.org>", "client_secret": "s", "send_attempt": 1}),
            "M_INVALID_EMAIL",
        ),
        (
            json!({"email": "a@example.org", "client_secret": "bad secret!", "send_attempt": 1}),
            "M_INVALID_PARAM",
        ),
        (
            json!({"email": "a@example.org", "client_secret": "s", "send_attempt": "one"}),
            "M_INVALID_PARAM",
        ),
        (
            json!({"email": "a@example.org", "client_secret": "s", "send_attempt": 1, "next_link": "javascript:alert(1)"}),
            "M_INVALID_PARAM",
        ),
        (
            json!({"email": "a@example.org", "send_attempt": 1}),
            "M_MISSING_PARAMS",
        ),
    ] {
        let (status, answer) = node.post(&request, &body).await;
        assert_error(status, &answer, 400, errcode);
    }
    let mut db = rig.db();
    assert_eq!(
        count(
            &mut db,
            "SELECT COUNT(*) AS n FROM threepid_validation_sessions"
        ),
        0
    );

    let (_, body) = node
        .post(
            &request,
            &json!({"email": "b@example.org", "client_secret": "s", "send_attempt": 1}),
        )
        .await;
    let sid = body["sid"].as_str().unwrap().to_string();
    let (mail, _) = rig.sink.received(1);
    let (token, _) = token_and_link(&mail);
    let submit = format!("{v1}/validate/email/submitToken");
    let (status, body) = node
        .post(
            &submit,
            &json!({"sid": sid, "client_secret": "other", "token": token}),
        )
        .await;
    assert_error(status, &body, 404, "M_NO_VALID_SESSION");
    let (status, body) = node
        .post(
            &submit,
            &json!({"sid": "12", "client_secret": "s", "token": token}),
        )
        .await;
    assert_error(status, &body, 404, "M_NO_VALID_SESSION");
    // Wrong tokens: nine are told so, the tenth closes the session for good.
    for n in 1..=10 {
        let (status, body) = node
            .post(
                &submit,
                &json!({"sid": sid, "client_secret": "s", "token": format!("wrong{n}")}),
            )
            .await;
        assert_error(status, &body, 400, "M_TOKEN_INCORRECT");
        assert_eq!(
            body["error"].as_str().unwrap().contains("closed"),
            n == 10,
            "{body}"
        );
    }
    let (status, body) = node
        .post(
            &submit,
            &json!({"sid": sid, "client_secret": "s", "token": token}),
        )
        .await;
    assert_error(status, &body, 404, "M_NO_VALID_SESSION");
    // The GET link says so on a page, without a redirect.
    let (status, location, page) = get_raw(
        node,
        &format!("{submit}?sid={sid}&client_secret=s&token={token}"),
    )
    .await;
    assert_eq!((status, location), (400, None));
    assert!(page.contains("failed"), "{page}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        count(
            &mut db,
            "SELECT COUNT(*) AS n FROM threepid_validation_sessions"
        ),
        0
    );
}

#[tokio::test]
async fn v2_needs_an_account_and_binds_only_its_own_mxid() {
    let rig = Rig::new(&[]);
    let node = &rig.node;
    let v2 = "/_matrix/identity/v2";
    let ask = json!({"email": "c@example.org", "client_secret": "s", "send_attempt": 1});
    let (status, body) = node
        .post(&format!("{v2}/validate/email/requestToken"), &ask)
        .await;
    assert_error(status, &body, 401, "M_UNAUTHORIZED");
    let (token, _alice) = rig.account().await;
    let (_, body) = call(
        node,
        &format!("{v2}/validate/email/requestToken"),
        Some(&token),
        &ask,
    )
    .await;
    let sid = body["sid"].as_str().unwrap().to_string();
    let (mail, _) = rig.sink.received(1);
    let (mail_token, _) = token_and_link(&mail);
    let (status, _) = call(
        node,
        &format!("{v2}/validate/email/submitToken"),
        Some(&token),
        &json!({"sid": sid, "client_secret": "s", "token": mail_token}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = call(
        node,
        &format!("{v2}/3pid/bind"),
        Some(&token),
        &json!({"sid": sid, "client_secret": "s", "mxid": "@mallory:example.org"}),
    )
    .await;
    assert_error(status, &body, 403, "M_UNAUTHORIZED");
    assert_eq!(node.lookup_mxid("c@example.org").await, None);
}

#[tokio::test]
async fn smtp_down_is_a_send_error_and_leaves_no_session() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("unused");
    let closed_port = crate::harness::free_port();
    let node = start(
        dir.path(),
        &validation_config(dir.path(), closed_port, &[]),
        &ca,
    );
    let (status, body) = node
        .post(
            "/_matrix/identity/api/v1/validate/email/requestToken",
            &json!({"email": "d@example.org", "client_secret": "s", "send_attempt": 1}),
        )
        .await;
    assert_error(status, &body, 400, "M_EMAIL_SEND_ERROR");
    let db = dir.path().join("sydent.db");
    let mut db = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
    assert_eq!(
        count(
            &mut db,
            "SELECT COUNT(*) AS n FROM threepid_validation_sessions"
        ),
        0
    );
    assert_eq!(
        count(&mut db, "SELECT COUNT(*) AS n FROM threepid_token_auths"),
        0
    );
}

#[tokio::test]
async fn the_sender_limit_answers_429_with_retry_after() {
    let rig = Rig::new(&[
        ("email", "email.ratelimit_sender.burst = 2"),
        ("email", "email.ratelimit_sender.rate_hz = 1/600"),
    ]);
    let node = &rig.node;
    let path = "/_matrix/identity/api/v1/validate/email/requestToken";
    for n in 0..2 {
        let (status, body) = node
            .post(
                path,
                &json!({"email": format!("r{n}@example.org"), "client_secret": "s", "send_attempt": 1}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = node
        .post(
            path,
            &json!({"email": "r2@example.org", "client_secret": "s", "send_attempt": 1}),
        )
        .await;
    assert_error(status, &body, 429, "M_LIMIT_EXCEEDED");
    let retry = body["retry_after_ms"].as_u64().unwrap();
    assert!(retry > 500_000 && retry <= 600_000, "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rig.sink.count(), 2);
    let mut db = rig.db();
    assert_eq!(
        count(
            &mut db,
            "SELECT COUNT(*) AS n FROM threepid_validation_sessions"
        ),
        2
    );
}

#[tokio::test]
async fn sessions_survive_a_restart_expire_and_sydent_ones_complete() {
    let mut rig = Rig::new(&[]);
    let v1 = "/_matrix/identity/api/v1";
    let (_, body) = rig
        .node
        .post(
            &format!("{v1}/validate/email/requestToken"),
            &json!({"email": "e@example.org", "client_secret": "s", "send_attempt": 1}),
        )
        .await;
    let sid: i64 = body["sid"].as_str().unwrap().parse().unwrap();
    let (mail, _) = rig.sink.received(1);
    let (token, _) = token_and_link(&mail);
    let (_, body) = rig
        .node
        .post(
            &format!("{v1}/validate/email/requestToken"),
            &json!({"email": "old@example.org", "client_secret": "s", "send_attempt": 1}),
        )
        .await;
    let old_sid: i64 = body["sid"].as_str().unwrap().parse().unwrap();
    let (old_mail, _) = rig.sink.received(2);
    let (old_token, _) = token_and_link(&old_mail);
    assert_eq!(rig.node.stop().code(), Some(0));

    let mut db = rig.db();
    // Sydent's token table names a table that does not exist in its foreign key; SQLite, as
    // Sydent runs it, does not enforce foreign keys (diesel turns them on).
    diesel::sql_query("PRAGMA foreign_keys = OFF")
        .execute(&mut db)
        .unwrap();
    // One session aged past its lifetime, and one a Sydent made (its send attempt left at -1).
    let day = 24 * 3600 * 1000;
    diesel::sql_query(format!(
        "UPDATE threepid_validation_sessions SET mtime = mtime - {} WHERE id = {old_sid}",
        day + 60_000
    ))
    .execute(&mut db)
    .unwrap();
    diesel::sql_query(format!(
        "INSERT INTO threepid_validation_sessions (id, medium, address, clientSecret, validated, mtime) \
         VALUES (777, 'email', 'sydent@example.org', 'sydentsecret', 0, {})",
        sydent_rs::now_ms() - 3_600_000
    ))
    .execute(&mut db)
    .unwrap();
    diesel::sql_query(
        "INSERT INTO threepid_token_auths (validationSession, token, sendAttemptNumber) \
         VALUES (777, 'SydentToken0123456789abcdefABCDE', -1)",
    )
    .execute(&mut db)
    .unwrap();
    // And one three days old: swept when the node starts.
    diesel::sql_query(format!(
        "INSERT INTO threepid_validation_sessions (id, medium, address, clientSecret, validated, mtime) \
         VALUES (888, 'email', 'stale@example.org', 's', 1, {})",
        sydent_rs::now_ms() - 3 * day
    ))
    .execute(&mut db)
    .unwrap();
    diesel::sql_query(
        "INSERT INTO threepid_token_auths (validationSession, token, sendAttemptNumber) \
         VALUES (888, 'StaleToken', 1)",
    )
    .execute(&mut db)
    .unwrap();
    drop(db);

    let config_path = rig.node.config_path.clone();
    rig.node = TestNode::start_cmd(
        rig.dir.path(),
        &config_path,
        std::process::Command::new(BINARY)
            .arg("--config")
            .arg(&config_path),
    )
    .unwrap();
    let node = &rig.node;
    let (status, body) = node
        .get(&format!(
            "{v1}/3pid/getValidated3pid?sid=888&client_secret=s"
        ))
        .await;
    assert_error(status, &body, 404, "M_NO_VALID_SESSION");
    let mut db = rig.db();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while count(
        &mut db,
        "SELECT COUNT(*) AS n FROM threepid_token_auths WHERE validationSession = 888",
    ) > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the stale session was not swept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count(
            &mut db,
            "SELECT COUNT(*) AS n FROM threepid_validation_sessions WHERE id = 888"
        ),
        0
    );
    let submit = format!("{v1}/validate/email/submitToken");
    let (status, body) = node
        .post(
            &submit,
            &json!({"sid": sid.to_string(), "client_secret": "s", "token": token}),
        )
        .await;
    assert_eq!((status, &body), (200, &json!({"success": true})));
    let (status, body) = node
        .post(
            &submit,
            &json!({"sid": old_sid.to_string(), "client_secret": "s", "token": old_token}),
        )
        .await;
    assert_error(status, &body, 400, "M_SESSION_EXPIRED");
    let (status, body) = node
        .post(
            &submit,
            &json!({"sid": "777", "client_secret": "sydentsecret", "token": "SydentToken0123456789abcdefABCDE"}),
        )
        .await;
    assert_eq!((status, &body), (200, &json!({"success": true})), "{body}");
    let (status, signed) = node
        .post(
            &format!("{v1}/3pid/bind"),
            &json!({"sid": "777", "client_secret": "sydentsecret", "mxid": "@sy:example.org"}),
        )
        .await;
    assert_eq!(status, 200, "{signed}");
    assert_eq!(
        node.lookup_mxid("sydent@example.org").await.as_deref(),
        Some("@sy:example.org")
    );
}

/// A mail with what is random in it (date, message id, boundary, token, sid) replaced by
/// placeholders.
fn normalised(mail: &str, sid: &str) -> String {
    let (token, _) = token_and_link(mail);
    let boundary = mail
        .split("boundary=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no boundary in {mail}"))
        .to_string();
    mail.lines()
        .filter(|l| !l.starts_with("Date: ") && !l.starts_with("Message-ID: "))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(&token, "TOKEN")
        .replace(&boundary, "BOUNDARY")
        .replace(&format!("sid={sid}"), "sid=SID")
}

/// The same requestToken, with Sydent's own vector-im templates, to a real Sydent 2.6.1 and
/// to this node: the two mails are the same but for what is random in them.
#[tokio::test]
async fn the_same_request_gets_the_same_mail_as_from_sydent() {
    use std::io::{BufRead, BufReader};
    let res = crate::templates::sydent_res();
    let dir = tempfile::tempdir().unwrap();
    let sydent_sink = Sink::start(dir.path(), "plain", None);
    let sydent_dir = dir.path().join("sydent");
    std::fs::create_dir_all(&sydent_dir).unwrap();
    let set = |kv: String| ["--set".to_string(), kv];
    let mut sydent = std::process::Command::new(crate::sydent_interop::sydent_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sydent/run_sydent.py"
        ))
        .args([
            "--dir",
            sydent_dir.to_str().unwrap(),
            "--server-name",
            "id.test",
        ])
        .args(["--client-port", "0"])
        .args(set(format!("general:templates.path={}", res.display())))
        .args(set("email:email.smtphost=127.0.0.1".into()))
        .args(set(format!("email:email.smtpport={}", sydent_sink.port)))
        .args(set("email:email.hostname=id.test".into()))
        .args(set(
            "email:email.from=Identity Test <noreply@id.test>".into()
        ))
        .args(set(format!("http:client_http_base={BASE}")))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    /// Kills Sydent when the test ends, also when an assertion fails.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = sydent.stdout.take().unwrap();
    let _sydent = Killed(sydent);
    let mut ready = String::new();
    let mut lines = BufReader::new(stdout).lines();
    while !ready.starts_with("SYDENT READY") {
        ready = lines.next().expect("Sydent started").unwrap();
    }
    let sydent_url = ready
        .split_whitespace()
        .find_map(|f| f.strip_prefix("client="))
        .unwrap()
        .to_string();

    let sink = Sink::start(&dir.path().join("ours"), "plain", None);
    let ours_dir = dir.path().join("node");
    std::fs::create_dir_all(&ours_dir).unwrap();
    let templates = format!("templates.path = {}", res.display());
    let config = validation_config(&ours_dir, sink.port, &[("general", templates.as_str())]);
    let node = start(&ours_dir, &config, &TestCa::new("unused"));

    let path = "/_matrix/identity/api/v1/validate/email/requestToken?brand=vector-im";
    let body = json!({"email": "same@example.org", "client_secret": "s3cret", "send_attempt": 1});
    let mut mails = Vec::new();
    for (url, sink) in [
        (sydent_url.as_str(), &sydent_sink),
        (node.client_url.as_str(), &sink),
    ] {
        let answer: Value = client()
            .post(format!("{url}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let sid = answer["sid"].as_str().unwrap_or_else(|| {
            let log = std::fs::read_to_string(sydent_dir.join("sydent.log")).unwrap_or_default();
            panic!("{url}: {answer}\nSydent's log:\n{log}")
        });
        let (mail, _) = sink.received(1);
        mails.push(normalised(&mail, sid));
    }
    assert!(mails[0].contains("Element"), "{}", mails[0]);
    // Sydent sends the template's bare LF line ends, so smtplib's dot-stuffing (a `.` at the
    // start of a line doubled) is never undone by the server, which unstuffs only after CRLF:
    // its CSS arrives as `..header`. Ours arrives as written.
    assert!(mails[0].contains("\n..header {"));
    assert!(mails[1].contains("\n.header {") && !mails[1].contains("\n..header"));
    assert_eq!(mails[0].replace("\n..", "\n."), mails[1]);
}
