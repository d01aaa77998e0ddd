//! The templates render as Sydent renders them. Sydent's own brand folders (`res/` of its
//! 2.6.1 source distribution, unpacked by `tests/sydent/sdist.sh`) go through
//! `sydent_rs::templates` and through Jinja2 configured as Sydent configures it
//! (`Environment(loader=FileSystemLoader(root), autoescape=True)`), or Python's `%` for the
//! legacy files, and the bytes must be equal. Our own `res/matrix-org` templates must put each
//! variable where a reader expects it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::json;
use sydent_rs::templates::{standard_email_vars, TemplateKind, TemplatePaths, Templates};

use crate::harness::set_up;
use crate::sydent_interop::sydent_python;

/// Sydent 2.6.1's `res/` folder (downloaded once per test process).
pub(crate) fn sydent_res() -> &'static Path {
    static RES: OnceLock<PathBuf> = OnceLock::new();
    RES.get_or_init(|| {
        set_up(
            "tests/sydent/sdist.sh",
            &[sydent_python().as_os_str()],
            "Sydent's source distribution could not be downloaded",
        )
    })
}

fn our_res() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("res")
}

/// Renders every job in one Python process, as Sydent's `sendEmail` does: a `.j2` name through
/// its Jinja2 environment; a legacy file by `%` with `_forhtml` (html.escape) and `_forurl`
/// (urllib quote) for every variable but `multipart_boundary`.
const PYTHON_RENDER: &str = r#"
import html, json, sys, urllib.parse
from jinja2 import Environment, FileSystemLoader
out = []
for job in json.load(sys.stdin):
    subs = dict(job["vars"])
    if "name" in job:
        env = Environment(loader=FileSystemLoader(job["root"]), autoescape=True)
        out.append(env.get_template(job["name"]).render(subs))
    else:
        boundary = subs.pop("multipart_boundary")
        all_subs = {}
        for k, v in subs.items():
            all_subs[k] = v
            all_subs[k + "_forhtml"] = html.escape(v)
            all_subs[k + "_forurl"] = urllib.parse.quote(v)
        all_subs["multipart_boundary"] = boundary
        with open(job["path"], encoding="utf-8") as f:
            out.append(f.read() % all_subs)
json.dump(out, sys.stdout)
"#;

/// What Python renders for `jobs` (`{root, name, vars}` for Jinja2, `{path, vars}` for legacy).
fn python_render(jobs: &[serde_json::Value]) -> Vec<String> {
    let mut child = Command::new(sydent_python())
        .args(["-c", PYTHON_RENDER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python starts");
    serde_json::to_writer(child.stdin.take().unwrap(), jobs).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the Python renderer failed");
    serde_json::from_slice(&out.stdout).expect("a JSON list of renderings")
}

fn assert_same_bytes(what: &str, ours: &str, python: &str) {
    if ours == python {
        return;
    }
    let at = ours
        .bytes()
        .zip(python.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    let window = |s: &str| {
        let bytes = &s.as_bytes()[at.saturating_sub(80)..(at + 80).min(s.len())];
        String::from_utf8_lossy(bytes).into_owned()
    };
    panic!(
        "{what}: sydent-rs and Python differ at byte {at} (lengths {} and {}):\n\
         sydent-rs: {:?}\npython:    {:?}",
        ours.len(),
        python.len(),
        window(ours),
        window(python)
    );
}

/// Values that tell the escapings apart: `'`, `"`, `<`, `&`, `/`, `~`, `%`, spaces, non-ASCII.
const NASTY: &str = r#"Zoë O'Brien & "Co" <b>/~x 100% €"#;

fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every variable Sydent fills for a validation email (emailvalidator.py, emailutils.py).
fn verification_vars() -> BTreeMap<String, String> {
    let mut vars = strings(&[
        ("ipaddress", "2001:db8::1 <\"proxy\"> & 'co'"),
        (
            "link",
            "https://id.example.org/_matrix/identity/api/v1/validate/email/submitToken?\
             token=aBc123&client_secret=s3cr%2Ft&sid=1234&nextLink=https%3A%2F%2Fa.example%2F%3Fx%3D'1'",
        ),
        ("token", "aBcDeFgHiJkLmNoPqRsTuVwXyZ012345"),
    ]);
    vars.extend(standard_email_vars(
        "id.example.org",
        "Zoë's \"Identity\" <noreply@id.example.org>",
        "o'brien+tag&x/~y@ex-ample.org",
        1_796_294_474_999,
    ));
    vars
}

/// Every variable Sydent fills for an invite (store_invite_servlet.py): the request's string
/// arguments, the defaults, the bracketed forms, the web client and the subject.
fn invite_vars(room_type: &str) -> BTreeMap<String, String> {
    let mut vars = strings(&[
        ("medium", "email"),
        ("address", "o'brien+tag&x/~y@ex-ample.org"),
        ("room_id", "!room/id~x:matrix.example.org"),
        ("sender", "@zoë:matrix.example.org"),
        ("room_alias", "#caf\u{e9} & <bar>:matrix.example.org"),
        ("room_avatar_url", "mxc://matrix.example.org/a b?c=d&e"),
        ("room_join_rules", "public"),
        ("room_name", "Café \"Bar\" <&> 'x'"),
        ("sender_display_name", NASTY),
        ("sender_avatar_url", "mxc://matrix.example.org/avatar"),
        ("room_type", room_type),
        (
            "org.matrix.web_client_location",
            "https://app.example.org/we b",
        ),
        ("guest_user_id", "@guest/1:matrix.example.org"),
        ("guest_access_token", "guest token+/="),
        ("token", "tOkEn0123456789/+=~"),
        ("ephemeral_private_key", "abc-DEF_ghi"),
        ("bracketed_room_name", "(Café \"Bar\" <&> 'x') "),
        ("bracketed_verified_sender", "(@zoë:matrix.example.org) "),
        ("web_client_location", "https://app.example.org/we b"),
        (
            "subject_header_value",
            "=?utf8?q?Zo=C3=AB_has_invited_you_to_chat?=",
        ),
    ]);
    vars.extend(standard_email_vars(
        "id.example.org",
        "Identity <noreply@id.example.org>",
        "o'brien+tag&x/~y@ex-ample.org",
        1_796_294_474_999,
    ));
    vars
}

fn load(root: &Path) -> Templates {
    Templates::load(&TemplatePaths {
        root: root.to_path_buf(),
        default_brand: "matrix-org".into(),
        verification: None,
        invite: None,
        verify_response: None,
    })
    .expect("the templates load")
}

/// The emails of a brand folder, each with the variables Sydent gives it.
fn cases() -> Vec<(TemplateKind, &'static str, BTreeMap<String, String>)> {
    let mut migration = strings(&[("mxid", "@o'brien&<x>:ex-ample.org")]);
    migration.extend(standard_email_vars("h", "f@h", "t@h", 0));
    vec![
        (TemplateKind::Verification, "", verification_vars()),
        (TemplateKind::Invite, "room", invite_vars("")),
        (TemplateKind::Invite, "space", invite_vars("m.space")),
        (TemplateKind::Migration, "", migration),
    ]
}

#[test]
fn sydent_brands_render_byte_identically_to_jinja2() {
    let res = sydent_res();
    let templates = load(res);
    let mut jobs = Vec::new();
    let mut ours = Vec::new();
    for brand in ["matrix-org", "vector-im"] {
        assert_eq!(templates.brand(Some(brand)), brand);
        for (kind, label, vars) in cases() {
            let name = format!("{brand}/{}.j2", kind.file_name());
            assert!(res.join(&name).is_file(), "{name} is in Sydent's sdist");
            jobs.push(json!({"root": res, "name": name, "vars": vars}));
            let rendered = templates.render_email(brand, kind, &vars).unwrap();
            ours.push((format!("{name} {label}").trim_end().to_string(), rendered));
        }
    }
    let python = python_render(&jobs);
    assert_eq!(python.len(), ours.len());
    for ((what, ours), python) in ours.iter().zip(&python) {
        assert_same_bytes(what, ours, python);
    }
    // The values did go in, escaped both ways (a template that printed nothing would match).
    let invite = &ours[1].1;
    assert!(
        invite.contains("Zo%C3%AB%20O%27Brien%20%26%20%22Co%22%20%3Cb%3E/~x%20100%25%20%E2%82%AC")
    );
    assert!(invite.contains("Zoë O&#39;Brien &amp; &#34;Co&#34; &lt;b&gt;/~x 100% €"));
}

#[test]
fn sydent_legacy_templates_render_as_python_percent_formatting() {
    let res = sydent_res();
    let mut jobs = Vec::new();
    let mut ours = Vec::new();
    for brand in ["matrix-org", "vector-im"] {
        // The deprecated direct paths, without .j2: the legacy files, whatever the brand.
        let verification = res.join(brand).join("verification_template.eml");
        let invite = res.join(brand).join("invite_template.eml");
        let templates = Templates::load(&TemplatePaths {
            root: res.to_path_buf(),
            default_brand: "matrix-org".into(),
            verification: Some(verification.clone()),
            invite: Some(invite.clone()),
            verify_response: Some(res.join(brand).join("verify_response_template.html")),
        })
        .unwrap();
        for (kind, path, vars) in [
            (
                TemplateKind::Verification,
                &verification,
                verification_vars(),
            ),
            (TemplateKind::Invite, &invite, invite_vars("m.space")),
        ] {
            jobs.push(json!({"path": path, "vars": vars}));
            let rendered = templates.render_email("vector-im", kind, &vars).unwrap();
            ours.push((path.display().to_string(), rendered));
        }
        let page = templates
            .render_verify_response(brand, "Verification successful! & <done>")
            .unwrap();
        assert!(page.contains("<p>Verification successful! & <done></p>"));
    }
    let python = python_render(&jobs);
    for ((what, ours), python) in ours.iter().zip(&python) {
        assert_same_bytes(what, ours, python);
    }
}

#[test]
fn our_templates_render_as_jinja2_would_and_carry_the_variables() {
    let root = our_res();
    let templates = load(&root);
    let mut jobs = Vec::new();
    let mut ours = Vec::new();
    let mut with_sign_url = invite_vars("");
    with_sign_url.insert(
        "sign_url".into(),
        "https://id.example.org/_matrix/identity/api/v1/sign-ed25519?token=t0k&private_key=k-y_"
            .into(),
    );
    let mut all = cases();
    all.push((TemplateKind::Invite, "signurl", with_sign_url));
    for (kind, label, vars) in &all {
        let name = format!("matrix-org/{}.j2", kind.file_name());
        jobs.push(json!({"root": root, "name": name, "vars": vars}));
        let rendered = templates.render_email("matrix-org", *kind, vars).unwrap();
        ours.push((format!("{name} {label}").trim_end().to_string(), rendered));
    }
    let python = python_render(&jobs);
    for ((what, ours), python) in ours.iter().zip(&python) {
        assert_same_bytes(what, ours, python);
    }

    let (verification, room, space, migration, signed) =
        (&ours[0].1, &ours[1].1, &ours[2].1, &ours[3].1, &ours[4].1);
    let v = &all[0].2;
    assert!(verification.starts_with(&format!(
        "Date: Thu, 03 Dec 2026 10:41:14 -0000\nFrom: {}\nTo: {}\nMessage-ID: {}\n",
        v["from"], v["to"], v["messageid"]
    )));
    // The link as it is in the text part, HTML-escaped in the href.
    assert!(verification.contains(&format!("\n{}\n", v["link"])));
    assert!(verification.contains(&format!(
        "href=\"{}\"",
        v["link"].replace('&', "&amp;").replace('\'', "&#39;")
    )));
    assert!(verification.contains("the code is aBcDeFgHiJkLmNoPqRsTuVwXyZ012345"));
    assert!(verification.contains("2001:db8::1 &lt;&#34;proxy&#34;&gt; &amp; &#39;co&#39;"));
    assert_eq!(
        verification
            .matches(&format!("--{}", v["multipart_boundary"]))
            .count(),
        3
    );

    assert!(room.contains("\nSubject: =?utf8?q?Zo=C3=AB_has_invited_you_to_chat?=\n"));
    assert!(room.contains("join a Matrix room") && space.contains("join a Matrix space"));
    let join = "https://app.example.org/we b/#/room/%21room/id~x%3Amatrix.example.org\
                ?email=o%27brien%2Btag%26x/~y%40ex-ample.org&room_name=";
    assert!(room.contains(join), "{room}");
    assert!(room.contains(&join.replace('&', "&amp;")));
    assert!(room.contains("&inviter_name=Zo%C3%AB%20O%27Brien%20%26%20%22Co%22"));
    assert!(!room.contains("signurl"));
    assert!(signed.contains(
        "&signurl=https%3A//id.example.org/_matrix/identity/api/v1/sign-ed25519%3Ftoken%3Dt0k%26private_key%3Dk-y_&"
    ));
    assert!(room.contains(NASTY) && room.contains("Zoë O&#39;Brien &amp; &#34;Co&#34; &lt;b&gt;"));

    assert!(migration.contains(
        "\nSubject: Your email address is no longer linked to @o'brien&<x>:ex-ample.org\n"
    ));
    assert!(migration.contains("the Matrix account @o'brien&<x>:ex-ample.org\n"));
    assert!(migration.contains("<code>@o&#39;brien&amp;&lt;x&gt;:ex-ample.org</code>"));

    let page = templates
        .render_verify_response("matrix-org", "Verification successful!")
        .unwrap();
    assert!(page.contains("<p>Verification successful!</p>"));
}
