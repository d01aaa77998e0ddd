//! Phone validation sessions end to end, the SMS gateway being a recording HTTP server in the
//! test (a paid external API: the only stand-in allowed): requestToken → the text (the code
//! read out of what the gateway received) → submitToken → getValidated3pid → bind → lookup →
//! unbind → lookup empty, on v1 and v2; and the ways it can go wrong.

use std::time::Duration;

use serde_json::{json, Value};

use crate::account::{assert_error, get_authed};
use crate::harness::sms_gateway::{FakeSmsGateway, SmsRecorder};
use crate::harness::TestNode;
use crate::validation::{call, count, Rig};

/// A node whose texts go to a recording gateway, with `extra` config lines.
async fn rig(extra: &[(&'static str, &'static str)]) -> (Rig, SmsRecorder) {
    let (url, gateway) = FakeSmsGateway::start();
    let api_url: &'static str = Box::leak(format!("api_url = {url}").into_boxed_str());
    let mut lines = vec![
        ("sms", api_url),
        ("sms", "username = idserver"),
        ("sms", "password = hunter2"),
    ];
    lines.extend_from_slice(extra);
    (Rig::new(&lines), gateway)
}

/// The code in the `n`-th text the gateway received (from 1).
async fn code(gateway: &SmsRecorder, n: usize) -> (String, Value) {
    let requests = gateway.wait_for_requests(n, Duration::from_secs(10)).await;
    let body = requests[n - 1].json();
    let text = body["mobileTerminate"]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let code = text.strip_prefix("Your code is ").unwrap().to_string();
    assert_eq!(code.len(), 6, "{text}");
    assert!(code.bytes().all(|b| b.is_ascii_digit()), "{text}");
    (code, body)
}

async fn request_token(
    node: &TestNode,
    prefix: &str,
    auth: Option<&str>,
    number: &str,
    secret: &str,
    attempt: i64,
) -> (u16, Value) {
    call(
        node,
        &format!("{prefix}/validate/msisdn/requestToken"),
        auth,
        &json!({"phone_number": number, "country": "GB", "client_secret": secret,
                "send_attempt": attempt, "next_link": "https://client.example.test/ok"}),
    )
    .await
}

#[tokio::test]
async fn phone_flow_on_v1_and_v2() {
    let (rig, gateway) = rig(&[]).await;
    let node = &rig.node;
    let (token, alice) = rig.account().await;
    for (n, (prefix, auth, number, msisdn)) in [
        (
            "/_matrix/identity/api/v1",
            None,
            "07700 900750",
            "447700900750",
        ),
        (
            "/_matrix/identity/v2",
            Some(token.as_str()),
            "+44 7700 900751",
            "447700900751",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, body) = request_token(node, prefix, auth, number, "secret", 1).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["success"], true);
        assert_eq!(body["msisdn"], msisdn);
        assert_eq!(
            body["intl_fmt"],
            format!("+44 7700 {}", &msisdn[6..]),
            "{body}"
        );
        let sid = body["sid"].as_str().unwrap().to_string();
        let (code, sent) = code(&gateway, n + 1).await;
        assert_eq!(
            sent["mobileTerminate"]["destination"]["address"], msisdn,
            "{sent}"
        );
        let request = &gateway.requests()[n];
        // Basic idserver:hunter2
        assert_eq!(
            request.header("authorization"),
            Some("Basic aWRzZXJ2ZXI6aHVudGVyMg==")
        );

        if auth.is_none() {
            // v1: the GET link, redirected to the next_link given at requestToken.
            let response = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap()
                .get(format!(
                    "{}{prefix}/validate/msisdn/submitToken?sid={sid}&client_secret=secret&token={code}",
                    node.client_url
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 302);
            assert_eq!(
                response.headers()["location"].to_str().unwrap(),
                "https://client.example.test/ok"
            );
        } else {
            let (status, body) = call(
                node,
                &format!("{prefix}/validate/msisdn/submitToken"),
                auth,
                &json!({"sid": sid, "client_secret": "secret", "token": code}),
            )
            .await;
            assert_eq!((status, &body), (200, &json!({"success": true})));
        }
        let query = format!("{prefix}/3pid/getValidated3pid?sid={sid}&client_secret=secret");
        let (status, body) = match auth {
            Some(token) => get_authed(node, &query, Some(token), false).await,
            None => node.get(&query).await,
        };
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (&body["medium"], &body["address"]),
            (&json!("msisdn"), &json!(msisdn))
        );

        let mxid = auth.map_or("@bob:example.org".to_string(), |_| alice.clone());
        let (status, signed) = call(
            node,
            &format!("{prefix}/3pid/bind"),
            auth,
            &json!({"sid": sid, "client_secret": "secret", "mxid": mxid}),
        )
        .await;
        assert_eq!(status, 200, "{signed}");
        assert_eq!(
            (&signed["medium"], &signed["address"]),
            (&json!("msisdn"), &json!(msisdn))
        );
        let (_, found) = node
            .get(&format!(
                "/_matrix/identity/api/v1/lookup?medium=msisdn&address={msisdn}"
            ))
            .await;
        assert_eq!(found["mxid"], mxid);
        let (status, _) = node
            .post(
                &format!("{prefix}/3pid/unbind"),
                &json!({"sid": sid, "client_secret": "secret", "mxid": mxid,
                        "threepid": {"medium": "msisdn", "address": msisdn}}),
            )
            .await;
        assert_eq!(status, 200);
        let (_, found) = node
            .get(&format!(
                "/_matrix/identity/api/v1/lookup?medium=msisdn&address={msisdn}"
            ))
            .await;
        assert_eq!(found, json!({}));
    }
}

#[tokio::test]
async fn bad_numbers_rejected_countries_and_gateway_failures_leave_nothing() {
    let (rig, gateway) = rig(&[("sms", "smsrule.33 = reject")]).await;
    let node = &rig.node;
    let v1 = "/_matrix/identity/api/v1";
    let (status, body) = request_token(node, v1, None, "not a number", "s", 1).await;
    assert_error(status, &body, 400, "M_INVALID_ADDRESS");
    let (status, body) = call(
        node,
        &format!("{v1}/validate/msisdn/requestToken"),
        None,
        &json!({"phone_number": "0612345678", "country": "FR", "client_secret": "s", "send_attempt": 1}),
    )
    .await;
    assert_error(status, &body, 400, "M_DESTINATION_REJECTED");
    assert_eq!(gateway.connections(), 0);

    gateway.reply(400, &[], r#"{"error": "Invalid destination"}"#);
    let (status, body) = request_token(node, v1, None, "07700900752", "s", 1).await;
    assert_error(status, &body, 400, "M_SEND_ERROR");
    assert_eq!(gateway.requests().len(), 1);
    let mut db = rig.db();
    assert_eq!(
        count(
            &mut db,
            "SELECT COUNT(*) AS n FROM threepid_validation_sessions"
        ),
        0
    );
    // The gateway works again: the same request now makes the session and sends the code.
    gateway.reply(202, &[("Location", "/sms/v4/mt/ticket-1")], "");
    let (status, body) = request_token(node, v1, None, "07700900752", "s", 1).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        count(
            &mut db,
            "SELECT COUNT(*) AS n FROM threepid_validation_sessions"
        ),
        1
    );
}

#[tokio::test]
async fn the_code_cannot_be_guessed_and_numbers_are_limited() {
    let (rig, gateway) = rig(&[
        ("sms", "msisdn.ratelimit.burst = 2"),
        ("sms", "msisdn.ratelimit.rate_hz = 1/3600"),
    ])
    .await;
    let node = &rig.node;
    let v1 = "/_matrix/identity/api/v1";
    let (_, body) = request_token(node, v1, None, "07700900753", "a", 1).await;
    let sid = body["sid"].as_str().unwrap().to_string();
    let (code, _) = code(&gateway, 1).await;
    let submit = format!("{v1}/validate/msisdn/submitToken");
    let mut closed = false;
    for guess in (0..1_000_000)
        .filter(|g| format!("{g:06}") != code)
        .take(10)
    {
        let (status, body) = node
            .post(
                &submit,
                &json!({"sid": sid, "client_secret": "a", "token": format!("{guess:06}")}),
            )
            .await;
        assert_error(status, &body, 400, "M_TOKEN_INCORRECT");
        closed = body["error"].as_str().unwrap().contains("closed");
    }
    assert!(closed);
    let (status, body) = node
        .post(
            &submit,
            &json!({"sid": sid, "client_secret": "a", "token": code}),
        )
        .await;
    assert_error(status, &body, 404, "M_NO_VALID_SESSION");

    // A second text to the number is allowed (burst 2), a third is not, whatever the API
    // version or client secret.
    let (status, _) = request_token(node, v1, None, "07700900753", "b", 1).await;
    assert_eq!(status, 200);
    let (token, _) = rig.account().await;
    let (status, body) = request_token(
        node,
        "/_matrix/identity/v2",
        Some(&token),
        "07700900753",
        "c",
        1,
    )
    .await;
    assert_error(status, &body, 429, "M_LIMIT_EXCEEDED");
    assert!(
        body["retry_after_ms"].as_u64().unwrap() > 3_000_000,
        "{body}"
    );
    assert_eq!(gateway.requests().len(), 2);
}
