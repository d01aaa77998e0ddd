//! The one table of every key the node reads. Parsing, unknown-key warnings, the generated
//! first-start config and `sydent.conf.example` are all driven from it, so they cannot drift.

/// One config key: where it lives, its built-in default, and what it means.
pub struct KeyDef {
    pub section: &'static str,
    /// Lower-case, as ConfigParser stores it.
    pub name: &'static str,
    pub default: &'static str,
    /// An environment variable that replaces the default (Sydent's `SYDENT_*`).
    pub env: Option<&'static str>,
    /// Read without `%` interpolation (Python reads these with `raw=True`).
    pub raw: bool,
    pub doc: &'static str,
}

const fn key(
    section: &'static str,
    name: &'static str,
    default: &'static str,
    doc: &'static str,
) -> KeyDef {
    KeyDef {
        section,
        name,
        default,
        env: None,
        raw: false,
        doc,
    }
}

const fn env_key(
    section: &'static str,
    name: &'static str,
    default: &'static str,
    env: &'static str,
    doc: &'static str,
) -> KeyDef {
    KeyDef {
        section,
        name,
        default,
        env: Some(env),
        raw: false,
        doc,
    }
}

const fn raw_key(
    section: &'static str,
    name: &'static str,
    default: &'static str,
    doc: &'static str,
) -> KeyDef {
    KeyDef {
        section,
        name,
        default,
        env: None,
        raw: true,
        doc,
    }
}

/// The sections in the order they are written.
pub const SECTIONS: &[(&str, &str)] = &[
    (
        "general",
        "What this node is, where it logs, which APIs it serves.",
    ),
    (
        "db",
        "The SQLite database (Sydent's schema; an existing sydent.db opens in place).",
    ),
    (
        "http",
        "Listeners. The client API is public; the internal API (bind/unbind, replication status)\n\
         must only be reachable by your homeservers' admins; the replication listener requires a\n\
         client certificate from the mesh CA.",
    ),
    ("email", "Outgoing mail for validation and invites."),
    (
        "sms",
        "Outgoing SMS (OpenMarket). Per-country keys may be added:\n\
         originators.<country code> = long:<number>,short:<code>,alpha:<text>\n\
         smsrule.<country code> = allow | reject",
    ),
    (
        "ldap",
        "A directory (LDAP or Active Directory) as a source of bindings, the keys of the\n\
         slipeer/sydent fork: its people are mirrored as this node's bindings (replicated to the\n\
         mesh, found by v1 and v2 lookups). Off while uri is empty.",
    ),
    (
        "proxy",
        "An upstream identity server asked for what neither the directory nor this node's\n\
         bindings answer (v1 lookups and v2 lookups with algorithm none). Off while identity is\n\
         empty: addresses leave the node only when an operator sets it.",
    ),
    (
        "crypto",
        "The node's signing key. Generated on first start; keep it secret and backed up.",
    ),
];

/// Every key, in the order they are written.
pub const KEYS: &[KeyDef] = &[
    // [general]
    env_key(
        "general",
        "server.name",
        "",
        "SYDENT_SERVER_NAME",
        "Name in signatures, replication origin and peer certificates. Empty: the hostname (with a warning).",
    ),
    key("general", "log.path", "", "Log file; empty logs to stderr."),
    key(
        "general",
        "log.level",
        "INFO",
        "DEBUG, INFO, WARNING, ERROR or CRITICAL. RUST_LOG, when set, overrides it.",
    ),
    env_key(
        "general",
        "pidfile.path",
        "sydent.pid",
        "SYDENT_PID_FILE",
        "Written at start, removed at stop. Empty: no pidfile.",
    ),
    key("general", "terms.path", "", "Terms of service YAML; empty: no terms."),
    key(
        "general",
        "address_lookup_limit",
        "10000",
        "Most 3PIDs in one bulk_lookup or v2 lookup request.",
    ),
    key(
        "general",
        "templates.path",
        "res",
        "Directory of brand folders holding the email and page templates.",
    ),
    key("general", "brand.default", "matrix-org", "Brand used when a request names none."),
    key("general", "prometheus_port", "", "Metrics port; metrics are served when port and address are set."),
    key("general", "prometheus_addr", "", "Metrics bind address."),
    key("general", "sentry_dsn", "", "Sentry DSN (accepted for compatibility; not used)."),
    key(
        "general",
        "enable_v1_associations",
        "true",
        "Serve the deprecated v1 3pid/bind. Forced off when enable_v1_access is off.",
    ),
    key(
        "general",
        "delete_tokens_on_bind",
        "true",
        "Delete pending invite tokens once they are delivered on bind.",
    ),
    key(
        "general",
        "ip.blacklist",
        "",
        "Comma-separated CIDRs outbound requests may not reach; empty: the private ranges.",
    ),
    key("general", "ip.whitelist", "", "Comma-separated CIDRs excepted from ip.blacklist."),
    key(
        "general",
        "homeserver_allow_list",
        "",
        "Comma-separated homeservers allowed to register; needs enable_v1_access = false.",
    ),
    key(
        "general",
        "enable_v1_access",
        "true",
        "Serve the legacy /_matrix/identity/api/v1 routes.",
    ),
    key(
        "general",
        "peers.path",
        "peers.d",
        "sydent-rs: directory of replication peer files, relative to this config file.",
    ),
    // [db]
    env_key(
        "db",
        "db.file",
        "sydent.db",
        "SYDENT_DB_PATH",
        "SQLite database file; :memory: keeps everything in memory.",
    ),
    // [http]
    key("http", "clientapi.http.bind_address", "::", "Client API address."),
    key("http", "clientapi.http.port", "8090", "Client API port; empty: no plain HTTP (clientapi.https.port must then be set)."),
    key("http", "clientapi.https.bind_address", "::", "sydent-rs: client API address for HTTPS."),
    key("http", "clientapi.https.port", "", "sydent-rs: client API port for HTTPS (HTTP/1.1 and HTTP/2); empty: none."),
    key("http", "clientapi.https.certfile", "", "sydent-rs: PEM certificate chain for HTTPS (and its key, unless keyfile is set); re-read on SIGHUP."),
    key("http", "clientapi.https.keyfile", "", "sydent-rs: PEM private key for HTTPS, when it is not in certfile; re-read on SIGHUP."),
    key(
        "http",
        "clientapi.http.workers",
        "0",
        "sydent-rs: client API worker threads; 0 = one per CPU core.",
    ),
    env_key(
        "http",
        "internalapi.http.bind_address",
        "::1",
        "SYDENT_RS_INTERNALAPI_BIND_ADDRESS",
        "Internal API address.",
    ),
    env_key(
        "http",
        "internalapi.http.port",
        "",
        "SYDENT_RS_INTERNALAPI_PORT",
        "Internal API port; empty: no internal API.",
    ),
    key(
        "http",
        "replication.https.certfile",
        "",
        "PEM with this node's certificate (and its key, unless keyfile is set); empty: no replication.",
    ),
    key(
        "http",
        "replication.https.keyfile",
        "",
        "sydent-rs: PEM with the private key, when it is not in certfile.",
    ),
    key(
        "http",
        "replication.https.cacert",
        "",
        "The mesh CA that peer certificates must chain to; empty: the system roots (weaker).",
    ),
    key("http", "replication.https.bind_address", "::", "Replication listener address."),
    key("http", "replication.https.port", "4434", "Replication listener port."),
    key(
        "http",
        "replication.max_clock_skew",
        "600",
        "sydent-rs: seconds a pushed association's ts may lie ahead of this clock; pushes with later ones are refused until they are not.",
    ),
    key(
        "http",
        "obey_x_forwarded_for",
        "false",
        "Take the client address from X-Forwarded-For (behind a reverse proxy).",
    ),
    key(
        "http",
        "federation.verifycerts",
        "true",
        "Verify homeservers' TLS certificates.",
    ),
    key(
        "http",
        "client_http_base",
        "",
        "Public base URL of this server, used in links in emails.",
    ),
    key(
        "http",
        "verify_response_template",
        "",
        "Deprecated: a template path that overrides the brand's verify_response_template.html.",
    ),
    // [email]
    key("email", "email.template", "", "Deprecated: direct path of the validation template."),
    key("email", "email.invite_template", "", "Deprecated: direct path of the invite template."),
    key(
        "email",
        "email.from",
        "Sydent Validation <noreply@{hostname}>",
        "Sender; {hostname} is replaced by email.hostname.",
    ),
    key("email", "email.subject", "Your Validation Token", "Subject of validation mails."),
    raw_key(
        "email",
        "email.invite.subject",
        "%(sender_display_name)s has invited you to chat",
        "Subject of invite mails (read raw: %(name)s are invite fields).",
    ),
    raw_key(
        "email",
        "email.invite.subject_space",
        "%(sender_display_name)s has invited you to a space",
        "Subject of invites to a space.",
    ),
    key("email", "email.smtphost", "localhost", "SMTP server."),
    key("email", "email.smtpport", "25", "SMTP port."),
    key("email", "email.smtpusername", "", "SMTP login; empty: no login."),
    key("email", "email.smtppassword", "", "SMTP password."),
    key(
        "email",
        "email.hostname",
        "",
        "EHLO name and Message-ID domain; empty: this host's name.",
    ),
    key(
        "email",
        "email.tlsmode",
        "0",
        "0 (plain), SSL or TLS (implicit TLS), STARTTLS. Certificates are always verified.",
    ),
    key(
        "email",
        "email.default_web_client_location",
        "https://app.element.io",
        "Web client linked from invites.",
    ),
    key(
        "email",
        "email.third_party_invite_username_obfuscate_characters",
        "3",
        "Characters of the local part shown in redacted invite addresses.",
    ),
    key(
        "email",
        "email.third_party_invite_domain_obfuscate_characters",
        "3",
        "Characters of the domain shown in redacted invite addresses.",
    ),
    key(
        "email",
        "email.third_party_invite_homeserver_blocklist",
        "",
        "Homeservers (one per line) whose users may not send invites.",
    ),
    key(
        "email",
        "email.third_party_invite_room_blocklist",
        "",
        "Room ids (one per line) that may not send invites.",
    ),
    key(
        "email",
        "email.third_party_invite_keyword_blocklist",
        "",
        "Words (one per line) that block an invite mentioning them.",
    ),
    key("email", "email.ratelimit_sender.burst", "5", "Invite mails a sender may send at once."),
    key(
        "email",
        "email.ratelimit_sender.rate_hz",
        "1/300",
        "Then one per this many per second (a number or a fraction).",
    ),
    // [sms]
    key("sms", "bodytemplate", "Your code is {token}", "SMS text; {token} is the code."),
    key("sms", "username", "", "OpenMarket username."),
    key("sms", "password", "", "OpenMarket password."),
    key(
        "sms",
        "api_url",
        "https://smsc.openmarket.com/sms/v4/mt",
        "OpenMarket's v4 JSON send endpoint (Sydent's is fixed). ip.blacklist applies to it.",
    ),
    key("sms", "msisdn.ratelimit.burst", "5", "SMS one number may receive at once."),
    key("sms", "msisdn.ratelimit.rate_hz", "1/3600", "Then this many per second."),
    key("sms", "country.ratelimit.burst", "50", "SMS one country code may receive at once."),
    key("sms", "country.ratelimit.rate_hz", "1/60", "Then this many per second."),
    // [ldap]
    key(
        "ldap",
        "uri",
        "",
        "ldap://host:port or ldaps://host:port; empty: no directory.",
    ),
    key(
        "ldap",
        "startls",
        "false",
        "Upgrade an ldap:// connection with StartTLS before the bind (the certificate is verified).",
    ),
    key("ldap", "base", "", "Search base (searched as a subtree); needed with uri, as id_attr and email or msisdn."),
    key(
        "ldap",
        "email",
        "",
        "Attribute(s) holding email addresses (e.g. mail), comma-separated; any of them matches.",
    ),
    key(
        "ldap",
        "msisdn",
        "",
        "Attribute(s) holding phone numbers (e.g. telephoneNumber, mobile), comma-separated.",
    ),
    key("ldap", "id_attr", "", "Attribute holding the user id (e.g. uid, sAMAccountName)."),
    key(
        "ldap",
        "hs_name",
        "",
        "Matrix ID = @<id_attr value>:<hs_name>; empty: id_attr holds the whole Matrix ID.",
    ),
    key("ldap", "bind_dn", "", "Simple-bind DN; empty: anonymous."),
    key("ldap", "bind_pw", "", "Simple-bind password."),
    key(
        "ldap",
        "filter",
        "",
        "A complete parenthesised filter AND-ed into every search, e.g. (objectClass=person).",
    ),
    key(
        "ldap",
        "cacert",
        "",
        "CA certificate (PEM) for ldaps:// and StartTLS; empty: the system roots.",
    ),
    key("ldap", "timeout", "5", "Seconds an LDAP connection or search may take."),
    key(
        "ldap",
        "sync_interval",
        "300",
        "Seconds between two full syncs of the mirror (one at start).",
    ),
    key(
        "ldap",
        "live_lookup",
        "true",
        "Ask the directory at once for looked-up addresses the mirror does not hold (not hashed ones).",
    ),
    // [proxy]
    key(
        "proxy",
        "identity",
        "",
        "Base URL of the upstream identity server, e.g. https://vector.im; empty: none.",
    ),
    key(
        "proxy",
        "access_token",
        "",
        "A v2 account token at the upstream: then addresses are sent to it only hashed (v2 lookup).",
    ),
    key(
        "proxy",
        "precedence",
        "upstream_first",
        "upstream_first (the fork's: directory, upstream, this node's bindings) or local_first.",
    ),
    key(
        "proxy",
        "timeout",
        "3",
        "Seconds a request to the upstream may take in all (connecting: at most 1 of them).",
    ),
    // [crypto]
    key(
        "crypto",
        "ed25519.signingkey",
        "",
        "ed25519 0 <unpadded base64 seed>; empty: generated and written here at start.",
    ),
];

/// Key-name prefixes with free suffixes, per section.
pub const PREFIXES: &[(&str, &str)] = &[("sms", "originators."), ("sms", "smsrule.")];

pub fn find(section: &str, name: &str) -> Option<&'static KeyDef> {
    KEYS.iter().find(|k| k.section == section && k.name == name)
}

/// Whether `name` is a key this node reads in `section`. Keys in `[DEFAULT]` apply to every
/// section, so any known name is fine there.
pub fn is_known(section: &str, name: &str) -> bool {
    if section == "default" {
        return KEYS.iter().any(|k| k.name == name)
            || PREFIXES.iter().any(|(_, p)| name.starts_with(p));
    }
    if section.starts_with("peer.") {
        return name == "base_replication_url";
    }
    find(section, name).is_some()
        || PREFIXES
            .iter()
            .any(|(s, p)| *s == section && name.starts_with(p))
}

/// Renders a complete config file: every section and key with its comment and a value.
pub fn render(value: &dyn Fn(&KeyDef) -> String) -> String {
    let mut out = String::from(
        "# sydent.conf: the Sydent config format, read by sydent-rs.\n\
         # Every key the node reads is listed with its default. Values may use %(other_key)s\n\
         # interpolation (write %% for a literal %); keys in a [DEFAULT] section apply to every section.\n\
         # Replication peers are files in peers.path (see the README); Sydent's\n\
         # [peer.<server name>] sections with base_replication_url are read too.\n",
    );
    for (section, about) in SECTIONS {
        out.push('\n');
        for line in about.lines() {
            out.push_str("# ");
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&format!("[{section}]\n"));
        for k in KEYS.iter().filter(|k| k.section == *section) {
            out.push_str("# ");
            out.push_str(k.doc);
            if let Some(env) = k.env {
                out.push_str(&format!(" Default from ${env} when set."));
            }
            out.push('\n');
            let v = value(k);
            if v.is_empty() {
                out.push_str(&format!("{} =\n", k.name));
            } else {
                // Multi-line values continue on indented lines.
                out.push_str(&format!("{} = {}\n", k.name, v.replace('\n', "\n    ")));
            }
        }
    }
    out
}
