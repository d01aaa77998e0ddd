//! The SMS sender against a real HTTP server standing in for OpenMarket (see
//! harness/sms_gateway.rs): the exact request Sydent would send (JSON body, Basic auth,
//! Content-Type), the originator chosen per country and by the digits of the number, the
//! gateway's error carried back, and a destination the IP filter refuses never contacted.

use serde_json::json;
use sydent_rs::config::Config;
use sydent_rs::sms::{SmsError, SmsSender};

use crate::harness::sms_gateway::{FakeSmsGateway, SmsRecorder, MT_PATH};

const KEY: &str = "ed25519 0 nEZPmUsRlnFs0fRIXTX1vjS6HP5gS6fEmrkYTvV0oNQ";

/// A config whose `[sms]` sends to `api_url`, with `general` and `sms` lines added.
fn config(api_url: &str, general: &str, sms: &str) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sydent.conf");
    let text = format!(
        "[general]\nserver.name = sms.test\n{general}\n\n\
         [sms]\napi_url = {api_url}\nusername = om-user\npassword = s3cret:x\n{sms}\n\n\
         [crypto]\ned25519.signingkey = {KEY}\n"
    );
    std::fs::write(&path, text).unwrap();
    let loaded = Config::load(&path, &|_| None).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    loaded.config
}

/// A sender to a fresh stand-in, loopback whitelisted.
fn sender(sms: &str) -> (SmsSender, SmsRecorder) {
    let (url, recorder) = FakeSmsGateway::start();
    let config = config(&url, "ip.whitelist = 127.0.0.1", sms);
    (SmsSender::new(&config).unwrap(), recorder)
}

#[tokio::test]
async fn a_text_reaches_the_gateway_as_openmarket_expects() {
    let (sender, gateway) = sender("bodyTemplate = Your {{Matrix}} code is {token}");
    let body = sender.body("123456");
    assert_eq!(body, "Your {Matrix} code is 123456");
    sender.send("447700900750", 44, &body).await.unwrap();

    let requests = gateway.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, MT_PATH);
    // base64("om-user:s3cret:x"), as Python's b64encode gives it.
    assert_eq!(
        request.header("authorization"),
        Some("Basic b20tdXNlcjpzM2NyZXQ6eA==")
    );
    assert_eq!(request.header("content-type"), Some("application/json"));
    // No originators configured: Sydent's alphanumeric "Matrix" (TON 5).
    assert_eq!(
        String::from_utf8(request.body.clone()).unwrap(),
        r#"{"mobileTerminate":{"message":{"content":"Your {Matrix} code is 123456","type":"text"},"destination":{"address":"447700900750"},"source":{"ton":5,"address":"Matrix"}}}"#
    );
    assert_eq!(gateway.connections(), 1);
}

#[tokio::test]
async fn originators_follow_the_country_then_the_default_and_the_digits() {
    let (sender, gateway) = sender(
        "originators.default = long:15550001, short:12345, alpha:Corp\n\
         originators.44 = alpha:UKCorp, long:447700900000",
    );
    // (msisdn, country code, the source expected): the index is the digit sum modulo the
    // list's length.
    let cases = [
        // 4+4+7+7+0+0+9+0+0+7+5+0 = 43 → 1 of 2.
        (
            "447700900750",
            44,
            json!({"ton": 1, "address": "447700900000"}),
        ),
        // 44 → 0 of 2.
        ("447700900751", 44, json!({"ton": 5, "address": "UKCorp"})),
        // No list for 1: the default. 1+6+5+0+2+5+3+0+0+0+0 = 22 → 1 of 3.
        ("16502530000", 1, json!({"ton": 3, "address": "12345"})),
        // 23 → 2 of 3.
        ("16502530001", 1, json!({"ton": 5, "address": "Corp"})),
        // 24 → 0 of 3.
        ("16502530002", 1, json!({"ton": 1, "address": "15550001"})),
    ];
    for (msisdn, country_code, _) in &cases {
        sender
            .send(msisdn, *country_code, "Your code is 000000")
            .await
            .unwrap();
    }
    let requests = gateway.requests();
    assert_eq!(requests.len(), cases.len());
    for (request, (msisdn, _, source)) in requests.iter().zip(&cases) {
        let body = request.json();
        assert_eq!(
            body["mobileTerminate"]["destination"],
            json!({"address": msisdn})
        );
        assert_eq!(body["mobileTerminate"]["source"], *source, "{msisdn}");
    }
    // The same number always hears from the same sender.
    sender.send("447700900750", 44, "again").await.unwrap();
    let again = gateway.requests().pop().unwrap().json();
    assert_eq!(
        again["mobileTerminate"]["source"],
        json!({"ton": 1, "address": "447700900000"})
    );
}

#[tokio::test]
async fn an_error_answer_becomes_an_sms_error_with_its_text() {
    let (sender, gateway) = sender("");
    gateway.reply(
        400,
        &[("X-Request-Id", "req-400")],
        r#"{"error": "Destination address is not valid"}"#,
    );
    let err = sender
        .send("447700900750", 44, "Your code is 123456")
        .await
        .unwrap_err();
    match &err {
        SmsError::Rejected {
            status,
            error,
            request_id,
        } => {
            assert_eq!(*status, 400);
            assert_eq!(error.as_deref(), Some("Destination address is not valid"));
            assert_eq!(request_id.as_deref(), Some("req-400"));
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("Destination address is not valid"));
    // The code never appears in what a caller would log.
    assert!(!err.to_string().contains("123456"));

    // An answer without JSON still fails, with no error text.
    gateway.reply(503, &[], "<html>down</html>");
    let err = sender.send("447700900750", 44, "x").await.unwrap_err();
    assert!(
        matches!(
            err,
            SmsError::Rejected {
                status: 503,
                error: None,
                request_id: None
            }
        ),
        "{err}"
    );

    // Any 2xx is success, with or without a ticket in Location.
    gateway.reply(200, &[], "");
    sender.send("447700900750", 44, "x").await.unwrap();
    assert_eq!(gateway.requests().len(), 3);
}

#[tokio::test]
async fn a_destination_the_ip_filter_refuses_is_never_contacted() {
    let (url, gateway) = FakeSmsGateway::start();
    let port = url
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches(MT_PATH);
    // The default blacklist covers loopback: an address literal, a name resolving to it, and
    // IPv6's loopback are all refused before any connection.
    for api_url in [
        url.clone(),
        format!("http://localhost:{port}{MT_PATH}"),
        format!("http://[::1]:{port}{MT_PATH}"),
        format!("http://[::ffff:127.0.0.1]:{port}{MT_PATH}"),
    ] {
        let sender = SmsSender::new(&config(&api_url, "", "")).unwrap();
        let err = sender.send("447700900750", 44, "x").await.unwrap_err();
        assert!(matches!(err, SmsError::Blocked(_)), "{api_url}: {err}");
    }
    // Whitelisting one address does not open the others.
    let sender = SmsSender::new(&config(
        &format!("http://[::1]:{port}{MT_PATH}"),
        "ip.whitelist = 127.0.0.1",
        "",
    ))
    .unwrap();
    let err = sender.send("447700900750", 44, "x").await.unwrap_err();
    assert!(matches!(err, SmsError::Blocked(_)), "{err}");
    assert_eq!(
        gateway.connections(),
        0,
        "a refused destination was contacted"
    );
    assert!(gateway.requests().is_empty());

    // With both loopbacks whitelisted, the name resolves and the text goes through.
    let api_url = format!("http://localhost:{port}{MT_PATH}");
    let sender = SmsSender::new(&config(&api_url, "ip.whitelist = 127.0.0.1, ::1", "")).unwrap();
    sender.send("447700900750", 44, "x").await.unwrap();
    assert_eq!(gateway.requests().len(), 1);
}
