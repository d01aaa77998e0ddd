//! Third-party invites against a real SMTP server: store-invite (v1 and v2) mails every
//! variable Sydent gives invite templates; the answer lists the keys with validity URLs under
//! `client_http_base` for the API version called; the mailed sign URL trades the token and
//! the ephemeral key for a signature (as Element does it: `{mxid}` POSTed to the URL); and
//! every refusal stores nothing.

use base64::Engine;
use serde_json::{json, Value};

use crate::account::assert_error;
use crate::harness::client;
use crate::validation::{call, count, Rig};

const BASE: &str = "https://id.example.test";

/// A Jinja invite template that prints each variable Sydent provides on a line of its own.
const VARS_TEMPLATE: &str = "\
Subject: {{ subject_header_value|safe }}
To: {{ to|safe }}
From: {{ from|safe }}
Message-ID: {{ messageid|safe }}
Date: {{ date|safe }}

medium={{ medium|safe }}
address={{ address|safe }}
room_id={{ room_id|safe }}
sender={{ sender|safe }}
token={{ token|safe }}
ephemeral_private_key={{ ephemeral_private_key|safe }}
sender_display_name={{ sender_display_name|safe }}
bracketed_verified_sender={{ bracketed_verified_sender|safe }}
room_name={{ room_name|safe }}
bracketed_room_name={{ bracketed_room_name|safe }}
room_avatar_url={{ room_avatar_url|safe }}
sender_avatar_url={{ sender_avatar_url|safe }}
guest_user_id={{ guest_user_id|safe }}
guest_access_token={{ guest_access_token|safe }}
room_type={{ room_type|safe }}
room_alias={{ room_alias|safe }}
web_client_location={{ web_client_location|safe }}
sign_url={{ sign_url|safe }}
boundary={{ multipart_boundary|safe }}
";

/// `name=value` lines of a mail made from [`VARS_TEMPLATE`].
fn vars_of(mail: &str) -> std::collections::BTreeMap<String, String> {
    mail.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Decodes an RFC 2047 `=?utf-8?b?…?=` header value (possibly folded).
fn decode_header(value: &str) -> String {
    let bytes: Vec<u8> = value
        .split_whitespace()
        .flat_map(|word| {
            let inner = word
                .strip_prefix("=?utf-8?b?")
                .and_then(|w| w.strip_suffix("?="))
                .unwrap_or_else(|| panic!("not an encoded word: {word}"));
            base64::engine::general_purpose::STANDARD
                .decode(inner)
                .unwrap()
        })
        .collect();
    String::from_utf8(bytes).unwrap()
}

fn invite_rig(extra: &[(&str, &str)]) -> (Rig, tempfile::TempDir) {
    let templates = tempfile::tempdir().unwrap();
    let path = templates.path().join("vars.eml.j2");
    std::fs::write(&path, VARS_TEMPLATE).unwrap();
    let line = format!("email.invite_template = {}", path.display());
    let mut lines: Vec<(&str, &str)> = vec![("email", line.as_str())];
    lines.extend_from_slice(extra);
    (Rig::new(&lines), templates)
}

fn header_of<'a>(mail: &'a str, name: &str) -> &'a str {
    let start = mail
        .find(&format!("{name}: "))
        .unwrap_or_else(|| panic!("no {name} in {mail}"))
        + name.len()
        + 2;
    let rest = &mail[start..];
    // A folded header continues on lines starting with a space.
    let mut end = rest.find('\n').unwrap();
    while rest[end + 1..].starts_with(' ') {
        end += 1 + rest[end + 1..].find('\n').unwrap();
    }
    rest[..end].trim_end()
}

#[tokio::test]
async fn store_invite_mails_every_variable_and_the_sign_url_signs() {
    let _ = client();
    let (rig, _templates) = invite_rig(&[]);
    let node = &rig.node;
    let (token, alice) = rig.account().await;
    let long_room = "The Quarterly Planning Room For Everyone";
    let (status, body) = call(
        node,
        "/_matrix/identity/v2/store-invite",
        Some(&token),
        &json!({
            "medium": "email",
            "address": "Carol.Example@Example.ORG",
            "room_id": "!room:hs.example",
            "sender": alice,
            "sender_display_name": "Alice Wonderland-Smith the Third",
            "room_name": long_room,
            "room_alias": "#plans:hs.example",
            "room_type": "m.space",
            "org.matrix.web_client_location": "https://chat.example.org",
            "not_a_string": 42,
        }),
    )
    .await;
    assert_eq!(status, 200, "{body} {}", node.log_text());
    let invite_token = body["token"].as_str().unwrap().to_string();
    assert_eq!(invite_token.len(), 128);
    assert!(invite_token.bytes().all(|b| b.is_ascii_alphabetic()));
    assert_eq!(body["display_name"], "Car...@Exa...");
    let (_, key) = node.get("/_matrix/identity/v2/pubkey/ed25519:0").await;
    assert_eq!(body["public_key"], key["public_key"]);
    assert_eq!(body["public_keys"][0]["public_key"], key["public_key"]);
    assert_eq!(
        body["public_keys"][0]["key_validity_url"],
        format!("{BASE}/_matrix/identity/v2/pubkey/isvalid")
    );
    let ephemeral = body["public_keys"][1]["public_key"].as_str().unwrap();
    assert_eq!(
        body["public_keys"][1]["key_validity_url"],
        format!("{BASE}/_matrix/identity/v2/pubkey/ephemeral/isvalid")
    );
    // Both validity URLs answer for their keys.
    let (_, valid) = node
        .get(&format!(
            "/_matrix/identity/v2/pubkey/ephemeral/isvalid?public_key={ephemeral}"
        ))
        .await;
    assert_eq!(valid, json!({"valid": true}));

    let (mail, envelope) = rig.sink.received(1);
    assert_eq!(envelope["to"], json!(["carol.example@example.org"]));
    let vars = vars_of(&mail);
    assert_eq!(vars["medium"], "email");
    assert_eq!(vars["address"], "Carol.Example@Example.ORG");
    assert_eq!(vars["room_id"], "!room:hs.example");
    assert_eq!(vars["sender"], alice);
    assert_eq!(vars["token"], invite_token);
    assert_eq!(vars["sender_display_name"], "Alice Wonderland-Sm…");
    assert_eq!(vars["bracketed_verified_sender"], format!("({alice}) "));
    assert_eq!(vars["room_name"], "The Quarterly Planning Ro…");
    assert_eq!(vars["bracketed_room_name"], "(The Quarterly Planning Ro…) ");
    assert_eq!(vars["room_alias"], "#plans:hs.example");
    assert_eq!(vars["room_type"], "m.space");
    for empty in [
        "room_avatar_url",
        "sender_avatar_url",
        "guest_user_id",
        "guest_access_token",
    ] {
        assert_eq!(vars[empty], "", "{empty}");
    }
    assert_eq!(vars["web_client_location"], "https://chat.example.org");
    assert_eq!(vars["boundary"].len(), 32);
    let private_key = vars["ephemeral_private_key"].clone();
    assert_eq!(private_key.len(), 43);
    let sign_url = vars["sign_url"].clone();
    assert_eq!(
        sign_url,
        format!(
            "{BASE}/_matrix/identity/v2/sign-ed25519?token={invite_token}&private_key={private_key}"
        )
    );
    assert_eq!(header_of(&mail, "To"), "carol.example@example.org");
    let subject = header_of(&mail, "Subject");
    assert_eq!(
        decode_header(subject),
        "Alice Wonderland-Sm… has invited you to a space"
    );

    // The invite is in Sydent's tables, waiting.
    let mut db = rig.db();
    assert_eq!(
        count(
            &mut db,
            "SELECT COUNT(*) AS n FROM invite_tokens WHERE address = 'carol.example@example.org' \
             AND room_id = '!room:hs.example' AND sent_ts IS NULL AND received_ts IS NOT NULL"
        ),
        1
    );
    assert_eq!(
        count(
            &mut db,
            &format!(
                "SELECT COUNT(*) AS n FROM ephemeral_public_keys WHERE public_key = '{ephemeral}'"
            )
        ),
        1
    );

    // Element's way: POST {mxid} to the sign URL, which carries the token and the key.
    let path = sign_url.strip_prefix(BASE).unwrap();
    let (status, signed) = call(
        node,
        path,
        Some(&token),
        &json!({"mxid": "@carol:hs.example"}),
    )
    .await;
    assert_eq!(status, 200, "{signed}");
    assert_eq!(signed["mxid"], "@carol:hs.example");
    assert_eq!(signed["sender"], alice);
    assert_eq!(signed["token"], invite_token);
    // Signed by the ephemeral key, under this server's name and ed25519:0 (as Sydent).
    let signature = signed["signatures"]["id.test"]["ed25519:0"]
        .as_str()
        .unwrap();
    let mut content = signed.as_object().unwrap().clone();
    content.remove("signatures");
    let public = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(ephemeral)
        .unwrap();
    let key = ed25519_dalek::VerifyingKey::from_bytes(&public.try_into().unwrap()).unwrap();
    let sig_bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(signature)
        .unwrap();
    let canonical = sydent_rs::crypto::canonical_json(&Value::Object(content)).unwrap();
    key.verify_strict(
        &canonical,
        &ed25519_dalek::Signature::from_slice(&sig_bytes).unwrap(),
    )
    .expect("signed with the ephemeral key");

    // v1, with everything in the body; an unknown token is 404 M_UNRECOGNIZED.
    let (status, signed) = call(
        node,
        "/_matrix/identity/api/v1/sign-ed25519",
        None,
        &json!({"mxid": "@dan:hs.example", "token": invite_token, "private_key": private_key}),
    )
    .await;
    assert_eq!((status, &signed["mxid"]), (200, &json!("@dan:hs.example")));
    let (status, body) = call(
        node,
        "/_matrix/identity/api/v1/sign-ed25519",
        None,
        &json!({"mxid": "@dan:hs.example", "token": "nope", "private_key": private_key}),
    )
    .await;
    assert_error(status, &body, 404, "M_UNRECOGNIZED");
    let (status, body) = call(
        node,
        "/_matrix/identity/api/v1/sign-ed25519",
        None,
        &json!({"mxid": "@dan:hs.example", "token": invite_token, "private_key": "short"}),
    )
    .await;
    assert_error(status, &body, 400, "M_INVALID_PARAM");
}

#[tokio::test]
async fn store_invite_on_v1_links_to_v1_and_shows_no_verified_sender() {
    let _ = client();
    let (rig, _templates) = invite_rig(&[]);
    let (status, body) = call(
        &rig.node,
        "/_matrix/identity/api/v1/store-invite",
        None,
        &json!({"medium": "email", "address": "d@example.org", "room_id": "!r:hs", "sender": "@x:hs"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["public_keys"][1]["key_validity_url"],
        format!("{BASE}/_matrix/identity/api/v1/pubkey/ephemeral/isvalid")
    );
    assert_eq!(body["display_name"], "...@exa...");
    let (mail, _) = rig.sink.received(1);
    let vars = vars_of(&mail);
    assert_eq!(vars["bracketed_verified_sender"], "");
    assert_eq!(vars["bracketed_room_name"], "");
    assert_eq!(vars["sender_display_name"], "");
    assert!(vars["sign_url"].starts_with(&format!("{BASE}/_matrix/identity/api/v1/sign-ed25519?")));
    assert_eq!(
        decode_header(header_of(&mail, "Subject")),
        " has invited you to chat"
    );
}

#[tokio::test]
async fn refused_invites_store_nothing_and_send_nothing() {
    let _ = client();
    let (rig, _templates) = invite_rig(&[
        (
            "email",
            "email.third_party_invite_keyword_blocklist = casino\n  Lottery",
        ),
        (
            "email",
            "email.third_party_invite_room_blocklist = !banned:hs",
        ),
        (
            "email",
            "email.third_party_invite_homeserver_blocklist = spam.example",
        ),
    ]);
    let node = &rig.node;
    let (token, alice) = rig.account().await;
    let invite = |fields: Value| {
        let mut body = json!({"medium": "email", "address": "e@example.org", "room_id": "!r:hs", "sender": alice});
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let v2 = "/_matrix/identity/v2/store-invite";
    let v1 = "/_matrix/identity/api/v1/store-invite";

    let (status, body) = call(node, v2, Some(&token), &json!({"medium": "email"})).await;
    assert_error(status, &body, 400, "M_MISSING_PARAMS");
    for missing in ["address", "room_id", "sender"] {
        assert!(body["error"].as_str().unwrap().contains(missing), "{body}");
    }
    let (status, body) = call(
        node,
        v2,
        Some(&token),
        &invite(json!({"sender": "@bob:hs"})),
    )
    .await;
    assert_error(status, &body, 403, "M_UNAUTHORIZED");
    let (status, body) = call(node, v2, None, &invite(json!({}))).await;
    assert_error(status, &body, 401, "M_UNAUTHORIZED");
    let (status, body) = call(node, v1, None, &invite(json!({"room_id": "!banned:hs"}))).await;
    assert_error(status, &body, 403, "M_UNAUTHORIZED");
    let (status, body) = call(
        node,
        v1,
        None,
        &invite(json!({"sender": "@eve:spam.example"})),
    )
    .await;
    assert_error(status, &body, 403, "M_UNAUTHORIZED");
    // Keywords match any string argument, casefolded.
    let (status, body) = call(
        node,
        v1,
        None,
        &invite(json!({"room_name": "Win the LOTTERY now"})),
    )
    .await;
    assert_error(status, &body, 403, "M_UNAUTHORIZED");
    let (status, body) = call(
        node,
        v1,
        None,
        &invite(json!({"org.matrix.web_client_location": "https://casino.example"})),
    )
    .await;
    assert_error(status, &body, 403, "M_UNAUTHORIZED");
    let (status, body) = call(
        node,
        v1,
        None,
        &invite(json!({"medium": "msisdn", "address": "15551234567"})),
    )
    .await;
    assert_error(status, &body, 400, "M_UNRECOGNIZED");
    let (status, body) = call(node, v1, None, &invite(json!({"address": "not an email"}))).await;
    assert_error(status, &body, 400, "M_INVALID_EMAIL");
    // A bound address: its Matrix ID is given back (Sydent's answer, which Synapse relies on
    // not at all: it looks up first).
    node.internal_3pid("bind", "Bound@Example.org", "@bound:hs")
        .await;
    let (status, body) = call(
        node,
        v1,
        None,
        &invite(json!({"address": "bound@example.org"})),
    )
    .await;
    assert_error(status, &body, 400, "M_THREEPID_IN_USE");
    assert_eq!(body["mxid"], "@bound:hs");

    assert_eq!(rig.sink.count(), 0);
    let mut db = rig.db();
    assert_eq!(count(&mut db, "SELECT COUNT(*) AS n FROM invite_tokens"), 0);
    assert_eq!(
        count(&mut db, "SELECT COUNT(*) AS n FROM ephemeral_public_keys"),
        0
    );
}

#[tokio::test]
async fn an_invite_whose_mail_cannot_be_sent_is_withdrawn() {
    let _ = client();
    let (mut rig, _templates) = invite_rig(&[]);
    rig.sink.stop();
    let (status, body) = call(
        &rig.node,
        "/_matrix/identity/api/v1/store-invite",
        None,
        &json!({"medium": "email", "address": "f@example.org", "room_id": "!r:hs", "sender": "@x:hs"}),
    )
    .await;
    assert_error(status, &body, 400, "M_EMAIL_SEND_ERROR");
    let mut db = rig.db();
    assert_eq!(count(&mut db, "SELECT COUNT(*) AS n FROM invite_tokens"), 0);
}
