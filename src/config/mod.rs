//! `sydent.conf`: Sydent's INI config, parsed once into typed structs.
//!
//! Semantics follow Python's ConfigParser as Sydent uses it: a value comes from its section,
//! else from `[DEFAULT]`, else from the built-in default (which `SYDENT_*` environment
//! variables replace); keys are case-insensitive; `%(name)s` interpolates and `%%` is a
//! literal `%`. A missing file is written with every default and a new signing key; a file
//! without a key gets one written into it. Unknown keys are warnings; invalid values are a
//! [`ConfigError`] naming `[section] key`.

mod directory;
mod keys;
mod parse;
mod sms_body;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::crypto::NodeSigningKey;
use crate::types::ServerName;

pub use directory::{LdapConfig, LdapSettings, Precedence, ProxyConfig};
pub use keys::KeyDef;
use parse::{RawConfig, Reader};
pub use sms_body::{BodyTemplate, TemplateError as BodyTemplateError};

/// A config problem that stops startup: one line naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("[{section}] {key}: {message}")]
    Invalid {
        section: String,
        key: String,
        message: String,
    },
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(section: &str, key: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            section: section.into(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole config, typed.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    pub general: GeneralConfig,
    pub db: DbConfig,
    pub http: HttpConfig,
    pub email: EmailConfig,
    pub sms: SmsConfig,
    pub crypto: CryptoConfig,
    /// `[ldap]`, when its `uri` is set.
    pub ldap: Option<LdapConfig>,
    /// `[proxy]`, when its `identity` is set.
    pub proxy: Option<ProxyConfig>,
    /// Sydent's `[peer.NAME] base_replication_url` sections.
    pub peers: Vec<PeerSection>,
}

#[derive(Debug, Clone)]
pub struct GeneralConfig {
    pub server_name: ServerName,
    pub log_path: Option<PathBuf>,
    pub log_level: log::LevelFilter,
    pub pidfile_path: Option<PathBuf>,
    pub terms_path: Option<PathBuf>,
    pub address_lookup_limit: usize,
    pub templates_path: PathBuf,
    pub brand_default: String,
    pub prometheus_port: Option<u16>,
    pub prometheus_addr: Option<String>,
    pub sentry_dsn: Option<String>,
    pub enable_v1_access: bool,
    pub enable_v1_associations: bool,
    pub delete_tokens_on_bind: bool,
    /// Outbound requests may not reach these (empty: the built-in private ranges, see
    /// `crate::homeserver::IpFilter`).
    pub ip_blacklist: Vec<ipnet::IpNet>,
    pub ip_whitelist: Vec<ipnet::IpNet>,
    pub homeserver_allow_list: Vec<String>,
    /// The peers.d directory, resolved against the config file's directory.
    pub peers_path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct DbConfig {
    pub db_file: String,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub clientapi_bind_address: String,
    /// `None`: no plain HTTP (HTTPS only).
    pub clientapi_port: Option<u16>,
    /// The client API over HTTPS, when `clientapi.https.port` is set.
    pub clientapi_https: Option<ClientHttps>,
    /// 0: one per CPU core.
    pub clientapi_workers: usize,
    pub internalapi_bind_address: String,
    /// `None`: no internal API.
    pub internalapi_port: Option<u16>,
    pub replication_certfile: Option<PathBuf>,
    pub replication_keyfile: Option<PathBuf>,
    pub replication_cacert: Option<PathBuf>,
    pub replication_bind_address: String,
    pub replication_port: u16,
    /// Seconds a pushed association's `ts` may lie ahead of this node's clock.
    pub replication_max_clock_skew_secs: u64,
    pub obey_x_forwarded_for: bool,
    pub federation_verifycerts: bool,
    pub client_http_base: String,
    pub verify_response_template: Option<PathBuf>,
}

/// `clientapi.https.*`: the client API served over TLS by the node itself.
#[derive(Debug, Clone)]
pub struct ClientHttps {
    pub bind_address: String,
    pub port: u16,
    pub certfile: PathBuf,
    /// `None`: the key is in `certfile`.
    pub keyfile: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain SMTP (`0`).
    None,
    /// TLS from the first byte (`SSL` or `TLS`).
    Implicit,
    StartTls,
}

#[derive(Debug, Clone)]
pub struct EmailConfig {
    pub template: Option<PathBuf>,
    pub invite_template: Option<PathBuf>,
    pub from: String,
    pub subject: String,
    pub invite_subject: String,
    pub invite_subject_space: String,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub smtp_username: String,
    pub smtp_password: String,
    pub hostname: String,
    pub tls_mode: SmtpTls,
    pub default_web_client_location: String,
    pub username_obfuscate_characters: usize,
    pub domain_obfuscate_characters: usize,
    pub homeserver_blocklist: Vec<String>,
    pub room_blocklist: Vec<String>,
    /// Casefolded.
    pub keyword_blocklist: Vec<String>,
    pub sender_ratelimit: RateLimit,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub burst: u32,
    pub rate_hz: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginatorKind {
    Long,
    Short,
    Alpha,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Originator {
    pub kind: OriginatorKind,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmsRule {
    Allow,
    Reject,
}

#[derive(Debug, Clone)]
pub struct SmsConfig {
    /// Checked at load: only `{token}`, `{{` and `}}`.
    pub body_template: BodyTemplate,
    pub username: String,
    pub password: String,
    /// Where texts are POSTed (`http` or `https`).
    pub api_url: reqwest::Url,
    /// By country calling code, and `default`.
    pub originators: BTreeMap<String, Vec<Originator>>,
    pub rules: BTreeMap<String, SmsRule>,
    pub msisdn_ratelimit: RateLimit,
    pub country_ratelimit: RateLimit,
}

#[derive(Debug, Clone)]
pub struct CryptoConfig {
    pub signing_key: NodeSigningKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSection {
    pub name: String,
    pub base_replication_url: String,
}

/// The result of [`Config::load`].
pub struct Loaded {
    pub config: Config,
    /// Unknown keys and other non-fatal findings, to log once logging is up.
    pub warnings: Vec<String>,
    /// The file did not exist and was written.
    pub created: bool,
}

/// `sydent.conf.example`: every key with its built-in default.
pub fn example_text() -> String {
    keys::render(&|k| k.default.to_string())
}

/// A complete config file: every key with its default, except the `(section, key, value)`
/// given (for configs written by `sydent-rs new-mesh`).
pub fn text_with(values: &[(&str, &str, String)]) -> String {
    keys::render(&|k| {
        values
            .iter()
            .find(|(section, name, _)| *section == k.section && *name == k.name)
            .map_or_else(|| k.default.to_string(), |(_, _, value)| value.clone())
    })
}

impl Config {
    /// Reads `path`, writing it first (every default plus a new signing key) if it does not
    /// exist. `env` looks up environment variables (a parameter so tests need not touch the
    /// process environment).
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Loaded, ConfigError> {
        let file_error = |message: String| ConfigError::File {
            path: path.display().to_string(),
            message,
        };
        let mut created = false;
        let mut text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = NodeSigningKey::generate();
                let text = keys::render(&|k| {
                    if k.section == "crypto" && k.name == "ed25519.signingkey" {
                        return key.to_sydent_string();
                    }
                    default_value(k, env)
                });
                parse::write_private(path, &text)
                    .map_err(|e| file_error(format!("cannot create: {e}")))?;
                created = true;
                text
            }
            Err(e) => return Err(file_error(format!("cannot read: {e}"))),
        };
        let mut raw = RawConfig::parse(&text).map_err(file_error)?;
        if raw
            .value("crypto", "ed25519.signingkey")
            .is_none_or(|v| v.trim().is_empty())
        {
            // As Sydent: a config without a key gets one, saved into the file. Only that line
            // changes; the operator's comments and layout stay.
            let key = NodeSigningKey::generate();
            text = parse::with_signing_key(&text, &key.to_sydent_string());
            parse::write_private(path, &text)
                .map_err(|e| file_error(format!("cannot save the new signing key: {e}")))?;
            raw = RawConfig::parse(&text).map_err(file_error)?;
        }
        let mut warnings = raw.unknown_keys();
        let reader = Reader { raw: &raw, env };
        let config = Self::from_reader(path, &reader, &mut warnings)?;
        Ok(Loaded {
            config,
            warnings,
            created,
        })
    }

    fn from_reader(
        path: &Path,
        r: &Reader<'_>,
        warnings: &mut Vec<String>,
    ) -> Result<Self, ConfigError> {
        let general = general(path, r, warnings)?;
        let db = DbConfig {
            db_file: r.string("db", "db.file")?,
        };
        let http = http(r)?;
        let email = email(r)?;
        let sms = sms(r)?;
        let signing_key =
            NodeSigningKey::from_sydent_str(&r.string("crypto", "ed25519.signingkey")?)
                .map_err(|e| ConfigError::invalid("crypto", "ed25519.signingkey", e.to_string()))?;
        let mut peers = Vec::new();
        for section in r.raw.sections() {
            if let Some(name) = section.strip_prefix("peer.") {
                let url = r
                    .raw
                    .value(&section, "base_replication_url")
                    .unwrap_or_default();
                if url.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        &section,
                        "base_replication_url",
                        "missing",
                    ));
                }
                peers.push(PeerSection {
                    name: name.to_string(),
                    base_replication_url: url.trim().to_string(),
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            general,
            db,
            http,
            email,
            sms,
            crypto: CryptoConfig { signing_key },
            ldap: directory::ldap(r)?,
            proxy: directory::proxy(r)?,
            peers,
        })
    }
}

/// The built-in default, or the environment variable that replaces it.
fn default_value(k: &KeyDef, env: &dyn Fn(&str) -> Option<String>) -> String {
    k.env.and_then(env).unwrap_or_else(|| k.default.to_string())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn non_empty(value: String) -> Option<String> {
    let value = value.trim().to_string();
    (!value.is_empty()).then_some(value)
}

fn comma_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn line_list(value: &str) -> Vec<String> {
    value
        .lines()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn cidr_list(section: &str, key: &str, value: &str) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    comma_list(value)
        .iter()
        .map(|cidr| {
            // A bare address is a range of one, as in Sydent.
            let parsed = match cidr.parse::<IpAddr>() {
                Ok(ip) => Ok(ipnet::IpNet::from(ip)),
                Err(_) => cidr.parse::<ipnet::IpNet>(),
            };
            parsed.map(|net| net.trunc()).map_err(|_| {
                ConfigError::invalid(
                    section,
                    key,
                    format!("'{cidr}' is not an IP range (address/prefix length)"),
                )
            })
        })
        .collect()
}

fn log_level(value: &str) -> Option<log::LevelFilter> {
    use log::LevelFilter::*;
    Some(match value.trim().to_ascii_uppercase().as_str() {
        "DEBUG" => Debug,
        "INFO" => Info,
        "WARNING" | "WARN" => Warn,
        "ERROR" => Error,
        "CRITICAL" | "FATAL" => Error,
        "NOTSET" => Trace,
        "TRACE" => Trace,
        "OFF" => Off,
        _ => return None,
    })
}

fn general(
    path: &Path,
    r: &Reader<'_>,
    warnings: &mut Vec<String>,
) -> Result<GeneralConfig, ConfigError> {
    const S: &str = "general";
    let configured = r.string(S, "server.name")?.trim().to_string();
    let server_name = if configured.is_empty() {
        let host = hostname();
        warnings.push(format!(
            "[general] server.name is not set: using the hostname '{host}'. Set it: it is in every signature this node makes"
        ));
        ServerName::parse(&host).map_err(|e| {
            ConfigError::invalid(
                S,
                "server.name",
                format!("is not set, and the hostname: {e}"),
            )
        })?
    } else {
        ServerName::parse(&configured)
            .map_err(|e| ConfigError::invalid(S, "server.name", e.to_string()))?
    };
    let level_text = r.string(S, "log.level")?;
    let log_level = log_level(&level_text).ok_or_else(|| {
        ConfigError::invalid(
            S,
            "log.level",
            format!("'{level_text}' is not DEBUG, INFO, WARNING, ERROR or CRITICAL"),
        )
    })?;
    let enable_v1_access = r.boolean(S, "enable_v1_access")?;
    let homeserver_allow_list: Vec<String> = comma_list(&r.string(S, "homeserver_allow_list")?)
        .into_iter()
        .map(|s| s.to_lowercase())
        .collect();
    if !homeserver_allow_list.is_empty() && enable_v1_access {
        return Err(ConfigError::invalid(
            S,
            "homeserver_allow_list",
            "needs enable_v1_access = false (v1 routes would bypass the allow list)",
        ));
    }
    let peers_dir = PathBuf::from(r.string(S, "peers.path")?.trim());
    let peers_path = if peers_dir.is_relative() {
        path.parent().unwrap_or(Path::new("")).join(peers_dir)
    } else {
        peers_dir
    };
    let prometheus_port = match non_empty(r.string(S, "prometheus_port")?) {
        None => None,
        Some(_) => Some(r.port(S, "prometheus_port")?),
    };
    let address_lookup_limit = r.number::<usize>(S, "address_lookup_limit")?;
    if address_lookup_limit == 0 {
        return Err(ConfigError::invalid(
            S,
            "address_lookup_limit",
            "must be at least 1",
        ));
    }
    Ok(GeneralConfig {
        server_name,
        log_path: non_empty(r.string(S, "log.path")?).map(PathBuf::from),
        log_level,
        pidfile_path: non_empty(r.string(S, "pidfile.path")?).map(PathBuf::from),
        terms_path: non_empty(r.string(S, "terms.path")?).map(PathBuf::from),
        address_lookup_limit,
        templates_path: PathBuf::from(r.string(S, "templates.path")?.trim()),
        brand_default: r.string(S, "brand.default")?.trim().to_string(),
        prometheus_port,
        prometheus_addr: non_empty(r.string(S, "prometheus_addr")?),
        sentry_dsn: non_empty(r.string(S, "sentry_dsn")?),
        enable_v1_associations: enable_v1_access && r.boolean(S, "enable_v1_associations")?,
        enable_v1_access,
        delete_tokens_on_bind: r.boolean(S, "delete_tokens_on_bind")?,
        ip_blacklist: cidr_list(S, "ip.blacklist", &r.string(S, "ip.blacklist")?)?,
        ip_whitelist: cidr_list(S, "ip.whitelist", &r.string(S, "ip.whitelist")?)?,
        homeserver_allow_list,
        peers_path,
    })
}

fn http(r: &Reader<'_>) -> Result<HttpConfig, ConfigError> {
    const S: &str = "http";
    let address = |key: &str| -> Result<String, ConfigError> {
        let value = r.string(S, key)?.trim().to_string();
        let bare = value.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<IpAddr>().is_err() {
            return Err(ConfigError::invalid(
                S,
                key,
                format!("'{value}' is not an IP address"),
            ));
        }
        Ok(value)
    };
    let path = |key: &str| -> Result<Option<PathBuf>, ConfigError> {
        Ok(non_empty(r.string(S, key)?).map(PathBuf::from))
    };
    let optional_port = |key: &str| -> Result<Option<u16>, ConfigError> {
        match non_empty(r.string(S, key)?) {
            None => Ok(None),
            Some(_) => r.port(S, key).map(Some),
        }
    };
    let internalapi_port = optional_port("internalapi.http.port")?;
    let clientapi_port = optional_port("clientapi.http.port")?;
    let clientapi_https = match optional_port("clientapi.https.port")? {
        None => None,
        Some(port) => Some(ClientHttps {
            bind_address: address("clientapi.https.bind_address")?,
            port,
            certfile: path("clientapi.https.certfile")?.ok_or_else(|| {
                ConfigError::invalid(
                    S,
                    "clientapi.https.certfile",
                    "needed when clientapi.https.port is set",
                )
            })?,
            keyfile: path("clientapi.https.keyfile")?,
        }),
    };
    if clientapi_port.is_none() && clientapi_https.is_none() {
        return Err(ConfigError::invalid(
            S,
            "clientapi.http.port",
            "empty, and no clientapi.https.port either: the node would serve no client API",
        ));
    }
    Ok(HttpConfig {
        clientapi_bind_address: address("clientapi.http.bind_address")?,
        clientapi_port,
        clientapi_https,
        clientapi_workers: r.number::<usize>(S, "clientapi.http.workers")?,
        internalapi_bind_address: address("internalapi.http.bind_address")?,
        internalapi_port,
        replication_certfile: path("replication.https.certfile")?,
        replication_keyfile: path("replication.https.keyfile")?,
        replication_cacert: path("replication.https.cacert")?,
        replication_bind_address: address("replication.https.bind_address")?,
        replication_port: r.port(S, "replication.https.port")?,
        replication_max_clock_skew_secs: r.number::<u64>(S, "replication.max_clock_skew")?,
        obey_x_forwarded_for: r.boolean(S, "obey_x_forwarded_for")?,
        federation_verifycerts: r.boolean(S, "federation.verifycerts")?,
        client_http_base: r
            .string(S, "client_http_base")?
            .trim()
            .trim_end_matches('/')
            .to_string(),
        verify_response_template: path("verify_response_template")?,
    })
}

fn email(r: &Reader<'_>) -> Result<EmailConfig, ConfigError> {
    const S: &str = "email";
    let hostname = non_empty(r.string(S, "email.hostname")?).unwrap_or_else(hostname);
    let tls_text = r.string(S, "email.tlsmode")?;
    let tls_mode = match tls_text.trim().to_ascii_uppercase().as_str() {
        "" | "0" | "NONE" | "PLAIN" => SmtpTls::None,
        "SSL" | "TLS" => SmtpTls::Implicit,
        "STARTTLS" => SmtpTls::StartTls,
        other => {
            return Err(ConfigError::invalid(
                S,
                "email.tlsmode",
                format!("'{other}' is not 0, SSL, TLS or STARTTLS"),
            ))
        }
    };
    let from = r
        .string(S, "email.from")?
        .trim()
        .replace("{hostname}", &hostname);
    Ok(EmailConfig {
        template: non_empty(r.string(S, "email.template")?).map(PathBuf::from),
        invite_template: non_empty(r.string(S, "email.invite_template")?).map(PathBuf::from),
        from,
        subject: r.string(S, "email.subject")?,
        invite_subject: r.string(S, "email.invite.subject")?,
        invite_subject_space: r.string(S, "email.invite.subject_space")?,
        smtp_host: r.string(S, "email.smtphost")?.trim().to_string(),
        smtp_port: r.port(S, "email.smtpport")?,
        smtp_username: r.string(S, "email.smtpusername")?,
        smtp_password: r.string(S, "email.smtppassword")?,
        hostname,
        tls_mode,
        default_web_client_location: r
            .string(S, "email.default_web_client_location")?
            .trim()
            .to_string(),
        username_obfuscate_characters: r
            .number(S, "email.third_party_invite_username_obfuscate_characters")?,
        domain_obfuscate_characters: r
            .number(S, "email.third_party_invite_domain_obfuscate_characters")?,
        homeserver_blocklist: line_list(
            &r.string(S, "email.third_party_invite_homeserver_blocklist")?,
        ),
        room_blocklist: line_list(&r.string(S, "email.third_party_invite_room_blocklist")?),
        keyword_blocklist: line_list(&r.string(S, "email.third_party_invite_keyword_blocklist")?)
            .iter()
            .map(|k| caseless::default_case_fold_str(k))
            .collect(),
        sender_ratelimit: RateLimit {
            burst: r.number(S, "email.ratelimit_sender.burst")?,
            rate_hz: r.rate(S, "email.ratelimit_sender.rate_hz")?,
        },
    })
}

fn sms(r: &Reader<'_>) -> Result<SmsConfig, ConfigError> {
    const S: &str = "sms";
    let mut originators = BTreeMap::new();
    let mut rules = BTreeMap::new();
    for name in r.raw.keys_with_defaults(S) {
        if let Some(country) = name.strip_prefix("originators.") {
            let value = r.string(S, &name)?;
            let mut list = Vec::new();
            for item in comma_list(&value) {
                let (kind, text) = item.split_once(':').ok_or_else(|| {
                    ConfigError::invalid(S, &name, format!("'{item}' is not <type>:<text>"))
                })?;
                let kind = match kind.trim() {
                    "long" => OriginatorKind::Long,
                    "short" => OriginatorKind::Short,
                    "alpha" => OriginatorKind::Alpha,
                    other => {
                        return Err(ConfigError::invalid(
                            S,
                            &name,
                            format!("originator type '{other}' is not long, short or alpha"),
                        ))
                    }
                };
                list.push(Originator {
                    kind,
                    text: text.trim().to_string(),
                });
            }
            if list.is_empty() {
                return Err(ConfigError::invalid(S, &name, "no originator given"));
            }
            originators.insert(country.to_string(), list);
        } else if let Some(country) = name.strip_prefix("smsrule.") {
            let value = r.string(S, &name)?;
            let rule = match value.trim() {
                "allow" => SmsRule::Allow,
                "reject" => SmsRule::Reject,
                other => {
                    return Err(ConfigError::invalid(
                        S,
                        &name,
                        format!("'{other}' is not allow or reject"),
                    ))
                }
            };
            rules.insert(country.to_string(), rule);
        }
    }
    let body_template = BodyTemplate::parse(&r.string(S, "bodytemplate")?)
        .map_err(|e| ConfigError::invalid(S, "bodytemplate", e.to_string()))?;
    let api_url = r.string(S, "api_url")?;
    let api_url = reqwest::Url::parse(api_url.trim())
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
        .ok_or_else(|| {
            ConfigError::invalid(S, "api_url", format!("'{api_url}' is not an http(s) URL"))
        })?;
    Ok(SmsConfig {
        body_template,
        username: r.string(S, "username")?,
        password: r.string(S, "password")?,
        api_url,
        originators,
        rules,
        msisdn_ratelimit: RateLimit {
            burst: r.number(S, "msisdn.ratelimit.burst")?,
            rate_hz: r.rate(S, "msisdn.ratelimit.rate_hz")?,
        },
        country_ratelimit: RateLimit {
            burst: r.number(S, "country.ratelimit.burst")?,
            rate_hz: r.rate(S, "country.ratelimit.rate_hz")?,
        },
    })
}

#[cfg(test)]
mod tests;
