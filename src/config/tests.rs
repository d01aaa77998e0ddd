use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

fn load_text(text: &str) -> Result<(Loaded, tempfile::TempDir), ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sydent.conf");
    std::fs::write(&path, text).unwrap();
    Config::load(&path, &no_env).map(|l| (l, dir))
}

const KEY: &str = "ed25519 0 nEZPmUsRlnFs0fRIXTX1vjS6HP5gS6fEmrkYTvV0oNQ";

fn with_key(text: &str) -> String {
    format!("{text}\n[crypto]\ned25519.signingkey = {KEY}\n")
}

#[test]
fn missing_file_is_written_with_defaults_env_and_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/sydent.conf");
    let env = |name: &str| match name {
        "SYDENT_SERVER_NAME" => Some("id.example.org".to_string()),
        "SYDENT_DB_PATH" => Some("/data/x.db".to_string()),
        _ => None,
    };
    let loaded = Config::load(&path, &env).unwrap();
    assert!(loaded.created);
    assert_eq!(loaded.config.general.server_name, "id.example.org");
    assert_eq!(loaded.config.db.db_file, "/data/x.db");
    assert_eq!(
        loaded.config.general.pidfile_path,
        Some(PathBuf::from("sydent.pid"))
    );
    assert_eq!(loaded.config.http.clientapi_port, Some(8090));
    assert_eq!(loaded.config.http.internalapi_port, None);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("server.name = id.example.org\n"));
    assert!(text.contains(&loaded.config.crypto.signing_key.to_sydent_string()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Second load: same key, not re-created, env no longer matters once written.
    let again = Config::load(&path, &no_env).unwrap();
    assert!(!again.created);
    assert_eq!(again.config.general.server_name, "id.example.org");
    assert_eq!(
        again.config.crypto.signing_key.to_sydent_string(),
        loaded.config.crypto.signing_key.to_sydent_string()
    );
}

#[test]
fn a_file_without_a_key_gets_one_and_keeps_its_comments() {
    let text = "# my comment\n[general]\nserver.name = a.example\n\n[crypto]\n# keep me\ned25519.signingkey =\n";
    let (loaded, dir) = load_text(text).unwrap();
    let written = std::fs::read_to_string(dir.path().join("sydent.conf")).unwrap();
    let key = loaded.config.crypto.signing_key.to_sydent_string();
    assert_eq!(
        written,
        format!("# my comment\n[general]\nserver.name = a.example\n\n[crypto]\n# keep me\ned25519.signingkey = {key}\n")
    );
    // No [crypto] section at all: one is appended.
    let (loaded, dir) = load_text("[general]\nserver.name = b.example\n").unwrap();
    let written = std::fs::read_to_string(dir.path().join("sydent.conf")).unwrap();
    assert!(written.starts_with("[general]\nserver.name = b.example\n"));
    assert!(written.ends_with(&format!(
        "[crypto]\ned25519.signingkey = {}\n",
        loaded.config.crypto.signing_key.to_sydent_string()
    )));
}

#[test]
fn default_section_interpolation_and_case() {
    let text = with_key(
        "[DEFAULT]\nroot = /srv/id\nlog.level = debug\n\n[General]\nServer.Name = x.example\nlog.path = %(root)s/log.txt\n\
         terms.path = %(root)s/100%%.yaml\n\n[db]\ndb.file = %(root)s/sydent.db\n\n[email]\n\
         email.invite.subject = %(sender_display_name)s invited you\n",
    );
    let (loaded, _dir) = load_text(&text).unwrap();
    let c = loaded.config;
    assert_eq!(c.general.server_name, "x.example");
    assert_eq!(c.general.log_level, log::LevelFilter::Debug);
    assert_eq!(c.general.log_path, Some(PathBuf::from("/srv/id/log.txt")));
    assert_eq!(
        c.general.terms_path,
        Some(PathBuf::from("/srv/id/100%.yaml"))
    );
    assert_eq!(c.db.db_file, "/srv/id/sydent.db");
    assert_eq!(
        c.email.invite_subject,
        "%(sender_display_name)s invited you"
    );
    assert_eq!(
        loaded.warnings,
        vec!["config: unknown key [default] root (ignored)".to_string()]
    );
}

#[test]
fn booleans_ports_and_lists() {
    let text = with_key(
        "[general]\nserver.name = x.example\nenable_v1_access = no\nhomeserver_allow_list = HS.example, other.example\n\
         ip.blacklist = 10.0.0.0/8, fd00::/8\n\n[http]\ninternalapi.http.port = 0\nobey_x_forwarded_for = YES\n\n\
         [email]\nemail.third_party_invite_keyword_blocklist = Spam\n  STRASSE\n\n[sms]\noriginators.44 = long:447700,alpha:Corp\nsmsrule.1 = reject\n\n\
         [peer.other.example]\nbase_replication_url = https://other.example:4434\n",
    );
    let (loaded, _dir) = load_text(&text).unwrap();
    let c = loaded.config;
    assert!(!c.general.enable_v1_access);
    assert!(
        !c.general.enable_v1_associations,
        "forced off with v1 access"
    );
    assert_eq!(
        c.general.homeserver_allow_list,
        vec!["hs.example", "other.example"]
    );
    let blacklist: Vec<String> = c
        .general
        .ip_blacklist
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(blacklist, vec!["10.0.0.0/8", "fd00::/8"]);
    assert_eq!(c.http.internalapi_port, Some(0));
    assert!(c.http.obey_x_forwarded_for);
    assert_eq!(c.email.keyword_blocklist, vec!["spam", "strasse"]);
    assert_eq!(
        c.sms.originators["44"],
        vec![
            Originator {
                kind: OriginatorKind::Long,
                text: "447700".into()
            },
            Originator {
                kind: OriginatorKind::Alpha,
                text: "Corp".into()
            }
        ]
    );
    assert_eq!(c.sms.rules["1"], SmsRule::Reject);
    assert_eq!(
        c.peers,
        vec![PeerSection {
            name: "other.example".into(),
            base_replication_url: "https://other.example:4434".into()
        }]
    );
    assert!((c.sms.msisdn_ratelimit.rate_hz - 1.0 / 3600.0).abs() < 1e-12);
    assert_eq!(
        c.sms.api_url.as_str(),
        "https://smsc.openmarket.com/sms/v4/mt"
    );
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn invalid_values_name_the_key() {
    let cases = [
        (
            "[http]\nclientapi.http.port = 80a\n",
            "[http] clientapi.http.port: '80a' is not a port number",
        ),
        (
            "[http]\nclientapi.http.port = 70000\n",
            "[http] clientapi.http.port:",
        ),
        (
            "[general]\nenable_v1_access = maybe\n",
            "[general] enable_v1_access: 'maybe' is not true or false",
        ),
        ("[general]\nlog.level = LOUD\n", "[general] log.level:"),
        (
            "[general]\nhomeserver_allow_list = a.example\n",
            "[general] homeserver_allow_list:",
        ),
        (
            "[general]\nlog.path = %(nope)s\n",
            "[general] log.path: %(nope)s refers to a key that is not set",
        ),
        ("[general]\nlog.path = 100%\n", "[general] log.path:"),
        (
            "[general]\nip.blacklist = 10.0.0.0/33\n",
            "[general] ip.blacklist:",
        ),
        ("[email]\nemail.tlsmode = maybe\n", "[email] email.tlsmode:"),
        ("[sms]\noriginators.44 = fax:1\n", "[sms] originators.44:"),
        ("[sms]\noriginators.44 =\n", "[sms] originators.44:"),
        (
            "[sms]\nbodyTemplate = Code: {code}\n",
            "[sms] bodytemplate:",
        ),
        (
            "[sms]\nbodyTemplate = Code: {token\n",
            "[sms] bodytemplate:",
        ),
        ("[sms]\napi_url = ftp://smsc.example/mt\n", "[sms] api_url:"),
        ("[sms]\napi_url = smsc.example/mt\n", "[sms] api_url:"),
        (
            "[http]\nclientapi.http.bind_address = localhost\n",
            "[http] clientapi.http.bind_address:",
        ),
        ("[ldap]\nuri = http://dir.example\n", "[ldap] uri:"),
        (
            "[ldap]\nuri = ldaps://dir.example\nstartls = true\nbase = o=x\nid_attr = uid\nemail = mail\n",
            "[ldap] startls:",
        ),
        ("[ldap]\nuri = ldap://dir.example\nid_attr = uid\nemail = mail\n", "[ldap] base:"),
        ("[ldap]\nuri = ldap://dir.example\nbase = o=x\nemail = mail\n", "[ldap] id_attr:"),
        ("[ldap]\nuri = ldap://dir.example\nbase = o=x\nid_attr = uid\n", "[ldap] email:"),
        (
            "[ldap]\nuri = ldap://dir.example\nbase = o=x\nid_attr = uid\nemail = mail\nfilter = objectClass=person\n",
            "[ldap] filter:",
        ),
        (
            "[ldap]\nuri = ldap://dir.example\nbase = o=x\nid_attr = uid\nemail = mail\ntimeout = 0\n",
            "[ldap] timeout:",
        ),
        ("[proxy]\nidentity = vector.im\n", "[proxy] identity:"),
        (
            "[proxy]\nidentity = https://vector.im\nprecedence = random\n",
            "[proxy] precedence:",
        ),
        ("[proxy]\nidentity = https://vector.im\ntimeout = 0\n", "[proxy] timeout:"),
        ("[http]\nclientapi.http.port =\n", "[http] clientapi.http.port:"),
        ("[http]\nclientapi.https.port = 8443\n", "[http] clientapi.https.certfile:"),
        ("[http]\nclientapi.https.port = https\n", "[http] clientapi.https.port:"),
    ];
    for (body, expected) in cases {
        let text = with_key(&format!("[general]\nserver.name = x.example\n{body}"));
        let err = load_text(&text)
            .err()
            .unwrap_or_else(|| panic!("{body} should fail"));
        let msg = err.to_string();
        assert!(msg.starts_with(expected), "{body}: got {msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
    let err = load_text("[crypto]\ned25519.signingkey = ed25519 0 AAAA\n")
        .err()
        .unwrap();
    assert!(
        err.to_string().starts_with("[crypto] ed25519.signingkey:"),
        "{err}"
    );
}

#[test]
fn empty_server_name_falls_back_to_hostname_with_a_warning() {
    let (loaded, _dir) = load_text(&with_key("[general]\nserver.name =\n")).unwrap();
    assert!(!loaded.config.general.server_name.is_empty());
    assert!(loaded
        .warnings
        .iter()
        .any(|w| w.contains("[general] server.name is not set")));
}

#[test]
fn unknown_keys_and_sections_are_warnings() {
    let (loaded, _dir) = load_text(&with_key(
        "[general]\nserver.name = x.example\nserver.nmae = typo\n\n[metrics]\nport = 1\n",
    ))
    .unwrap();
    assert_eq!(
        loaded.warnings,
        vec![
            "config: unknown key [general] server.nmae (ignored)".to_string(),
            "config: unknown section [metrics] (ignored)".to_string()
        ]
    );
}

#[test]
fn peers_path_is_relative_to_the_config_file() {
    let (loaded, dir) = load_text(&with_key("[general]\nserver.name = x.example\n")).unwrap();
    assert_eq!(loaded.config.general.peers_path, dir.path().join("peers.d"));
}

#[test]
fn the_example_file_is_current_and_loads_cleanly() {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sydent.conf.example"))
            .unwrap();
    assert_eq!(
        example,
        example_text(),
        "regenerate sydent.conf.example from config::example_text()"
    );
    let (loaded, _dir) = load_text(&example).unwrap();
    assert!(
        loaded
            .warnings
            .iter()
            .all(|w| w.contains("server.name is not set")),
        "{:?}",
        loaded.warnings
    );
    for k in keys::KEYS {
        assert!(
            example.contains(&format!("\n{} =", k.name)),
            "{} missing",
            k.name
        );
    }
}

#[test]
fn the_forks_ldap_section_and_a_proxy_load() {
    // The slipeer/sydent fork's documented example, with our additions.
    let text = with_key(
        "[general]\nserver.name = x.example\n\
         [ldap]\nuri = ldap://dc.example.com:389\nstartls = true\nbase = dc=example,dc=com\n\
         email = mail, proxyAddresses\nmsisdn = telephoneNumber,mobile\nid_attr = sAMAccountName\n\
         hs_name = example.com\nbind_dn = cn=sydent,dc=example,dc=com\nbind_pw = secret\n\
         filter = (&(objectClass=user)(objectCategory=person))\ntimeout = 2.5\n\
         [proxy]\nidentity = https://vector.im/\nprecedence = local_first\n",
    );
    let (loaded, _dir) = load_text(&text).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let ldap = loaded.config.ldap.expect("[ldap] is on");
    assert_eq!(ldap.settings.uri, "ldap://dc.example.com:389");
    assert!(ldap.settings.starttls);
    assert_eq!(ldap.settings.email_attrs, ["mail", "proxyAddresses"]);
    assert_eq!(ldap.settings.msisdn_attrs, ["telephoneNumber", "mobile"]);
    assert_eq!(ldap.settings.id_attr, "sAMAccountName");
    assert_eq!(ldap.settings.hs_name.as_deref(), Some("example.com"));
    assert_eq!(ldap.settings.bind_pw.as_deref(), Some("secret"));
    assert_eq!(
        ldap.settings.filter.as_deref(),
        Some("(&(objectClass=user)(objectCategory=person))")
    );
    assert_eq!(
        ldap.settings.timeout,
        std::time::Duration::from_millis(2500)
    );
    assert_eq!(ldap.sync_interval, std::time::Duration::from_secs(300));
    assert!(ldap.live_lookup);
    let proxy = loaded.config.proxy.expect("[proxy] is on");
    assert_eq!(proxy.identity.as_str(), "https://vector.im/");
    assert_eq!(proxy.precedence, Precedence::LocalFirst);
    assert_eq!(proxy.access_token, None);
    assert_eq!(proxy.timeout, std::time::Duration::from_secs(3));

    // Without uri or identity both are off, whatever else the sections hold.
    let (loaded, _dir) = load_text(&with_key(
        "[ldap]\nbase = o=x\n[proxy]\nprecedence = local_first\n",
    ))
    .unwrap();
    assert!(loaded.config.ldap.is_none());
    assert!(loaded.config.proxy.is_none());
}
