//! Sending texts (msisdn validation codes) through OpenMarket's v4 JSON API, as Sydent sends
//! them: a `POST` to `[sms] api_url` with HTTP Basic `username:password` and the body
//!
//! ```json
//! {"mobileTerminate": {"message": {"content": "<text>", "type": "text"},
//!                      "destination": {"address": "<msisdn without +>"},
//!                      "source": {"ton": 1, "address": "<originator>"}}}
//! ```
//!
//! The originator comes from `originators.<country code>`, else `originators.default`, else
//! the alphanumeric sender `Matrix`; within a list, the sum of the msisdn's digits picks one, so
//! a number always hears from the same sender. Any 2xx is success (OpenMarket documents 202);
//! its ticket id (the last segment of `Location`) and `X-Request-Id` are logged at debug. Any
//! other status is an [`SmsError::Rejected`] carrying the answer's `error`.
//!
//! The text comes from `bodyTemplate`, where `{token}` is the code (Python's `str.format` with
//! that one field, so `{{` and `}}` are braces; any other field is refused when the config
//! loads). Neither the code nor the text is ever logged.
//!
//! As Sydent's SMS client, this one goes through the outbound IP filter (`ip.blacklist` /
//! `ip.whitelist`, applied after DNS and to address literals), follows no redirects, and has a
//! connect timeout, a total timeout and a cap on the answer it reads.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use serde::Serialize;

use crate::config::{BodyTemplate, Config, Originator, OriginatorKind};
use crate::homeserver::{
    read_body_capped, refused_address, tls_config, FilteredResolver, IpFilter,
};
use crate::mesh::tls::describe_error;

/// Sydent's connect timeout for the SMS gateway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The whole exchange, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// An error answer is read up to this size (only its `error` field is of interest).
const ANSWER_LIMIT: usize = 64 * 1024;
/// The sender when no `originators.*` applies.
const DEFAULT_ORIGINATOR: (OriginatorKind, &str) = (OriginatorKind::Alpha, "Matrix");

#[derive(Debug, thiserror::Error)]
pub enum SmsError {
    /// `api_url`'s host is (or resolves to) an address `ip.blacklist` refuses.
    #[error("{0} resolves to an address this node may not contact (ip.blacklist)")]
    Blocked(String),
    /// No answer: DNS, connection, TLS or timeout.
    #[error("cannot reach the SMS gateway: {0}")]
    Unreachable(String),
    /// A status other than 2xx, with the answer's `error` if it had one.
    #[error(
        "the SMS gateway answered {status} (request id {}){}",
        .request_id.as_deref().unwrap_or("none"),
        .error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
    )]
    Rejected {
        status: u16,
        error: Option<String>,
        request_id: Option<String>,
    },
}

/// The sender of a text to `msisdn`: the list for `country_code`, else `default`, else
/// [`DEFAULT_ORIGINATOR`]; in the list, the one at (sum of the msisdn's digits) mod (length).
pub fn choose_originator<'a>(
    originators: &'a BTreeMap<String, Vec<Originator>>,
    msisdn: &str,
    country_code: u16,
) -> (OriginatorKind, &'a str) {
    let list = originators
        .get(&country_code.to_string())
        .or_else(|| originators.get("default"))
        .filter(|list| !list.is_empty());
    let Some(list) = list else {
        return DEFAULT_ORIGINATOR;
    };
    let digit_sum: u32 = msisdn.chars().filter_map(|c| c.to_digit(10)).sum();
    let chosen = &list[digit_sum as usize % list.len()];
    (chosen.kind, &chosen.text)
}

/// OpenMarket's "type of number" for an originator.
fn ton(kind: OriginatorKind) -> u8 {
    match kind {
        OriginatorKind::Long => 1,
        OriginatorKind::Short => 3,
        OriginatorKind::Alpha => 5,
    }
}

/// The request body of OpenMarket's v4 `mt` endpoint.
#[derive(Serialize)]
struct SendSms<'a> {
    #[serde(rename = "mobileTerminate")]
    mobile_terminate: MobileTerminate<'a>,
}

#[derive(Serialize)]
struct MobileTerminate<'a> {
    message: Message<'a>,
    destination: Address<'a>,
    source: Source<'a>,
}

#[derive(Serialize)]
struct Message<'a> {
    content: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct Address<'a> {
    address: &'a str,
}

#[derive(Serialize)]
struct Source<'a> {
    ton: u8,
    address: &'a str,
}

/// The configured gateway, one client shared by every sender (connections pooled).
pub struct SmsSender {
    client: reqwest::Client,
    url: reqwest::Url,
    filter: Arc<IpFilter>,
    username: String,
    password: String,
    originators: BTreeMap<String, Vec<Originator>>,
    template: BodyTemplate,
    /// Sends and failures, counted once the metrics are on ([`Self::count_in`]).
    counters: std::sync::OnceLock<crate::metrics::SendCounters>,
}

impl SmsSender {
    /// The sender `[sms]` describes, through `[general] ip.blacklist` / `ip.whitelist`,
    /// trusting the system's roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` honoured).
    pub fn new(config: &Config) -> Result<Self, String> {
        crate::mesh::tls::install_default_provider();
        let sms = &config.sms;
        let filter = Arc::new(IpFilter::new(
            &config.general.ip_blacklist,
            &config.general.ip_whitelist,
        ));
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let tls = tls_config(true, roots).map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .dns_resolver(Arc::new(FilteredResolver::new(Arc::clone(&filter))))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("sydent-rs/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            counters: std::sync::OnceLock::new(),
            client,
            url: sms.api_url.clone(),
            filter,
            username: sms.username.clone(),
            password: sms.password.clone(),
            originators: sms.originators.clone(),
            template: sms.body_template.clone(),
        })
    }

    /// The text that carries `token`, from `bodyTemplate`.
    pub fn body(&self, token: &str) -> String {
        self.template.render(token)
    }

    /// Who a text to `msisdn` comes from.
    pub fn originator(&self, msisdn: &str, country_code: u16) -> (OriginatorKind, &str) {
        choose_originator(&self.originators, msisdn, country_code)
    }

    /// Sends `body` to `msisdn` (E.164 without `+`; `country_code` picks the originator).
    /// Counts every send in `counters` from now on.
    pub fn count_in(&self, counters: crate::metrics::SendCounters) {
        let _ = self.counters.set(counters);
    }

    /// Sends `body` to `msisdn`, counted when the metrics are on.
    pub async fn send(&self, msisdn: &str, country_code: u16, body: &str) -> Result<(), SmsError> {
        let sent = self.send_once(msisdn, country_code, body).await;
        if let Some(counters) = self.counters.get() {
            counters.record(sent.is_ok());
        }
        sent
    }

    async fn send_once(&self, msisdn: &str, country_code: u16, body: &str) -> Result<(), SmsError> {
        let host = self.url.host_str().unwrap_or_default();
        // Address literals never reach the filtering resolver: judged here.
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            if !self.filter.allows(ip) {
                return Err(SmsError::Blocked(host.to_string()));
            }
        }
        let (kind, originator) = self.originator(msisdn, country_code);
        let request = SendSms {
            mobile_terminate: MobileTerminate {
                message: Message {
                    content: body,
                    kind: "text",
                },
                destination: Address { address: msisdn },
                source: Source {
                    ton: ton(kind),
                    address: originator,
                },
            },
        };
        let json = serde_json::to_vec(&request).expect("a struct of strings serializes");
        let response = self
            .client
            .post(self.url.clone())
            .basic_auth(&self.username, Some(&self.password))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json)
            .send()
            .await
            .map_err(|e| {
                if refused_address(&e) {
                    SmsError::Blocked(host.to_string())
                } else {
                    SmsError::Unreachable(describe_error(&e))
                }
            })?;
        let status = response.status();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let request_id = header("x-request-id");
        if status.is_success() {
            // As Sydent: the ticket is whatever follows the last '/' of Location.
            let location = header("location");
            let ticket = location
                .as_deref()
                .and_then(|l| l.rsplit_once('/'))
                .map(|(_, ticket)| ticket);
            let request_id = request_id.as_deref().unwrap_or("none");
            match ticket {
                Some(ticket) => {
                    log::debug!("SMS accepted ({status}): ticket {ticket}, request id {request_id}")
                }
                None => log::warn!(
                    "SMS accepted ({status}) without a ticket in Location, request id {request_id}"
                ),
            }
            return Ok(());
        }
        let error = read_body_capped(response, ANSWER_LIMIT)
            .await
            .ok()
            .and_then(|body| serde_json::from_slice::<serde_json::Value>(&body).ok())
            .and_then(|answer| {
                answer.get("error").map(|e| match e {
                    serde_json::Value::String(text) => text.clone(),
                    other => other.to_string(),
                })
            });
        Err(SmsError::Rejected {
            status: status.as_u16(),
            error,
            request_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn originators(
        entries: &[(&str, &[(OriginatorKind, &str)])],
    ) -> BTreeMap<String, Vec<Originator>> {
        entries
            .iter()
            .map(|(country, list)| {
                let list = list
                    .iter()
                    .map(|(kind, text)| Originator {
                        kind: *kind,
                        text: (*text).to_string(),
                    })
                    .collect();
                ((*country).to_string(), list)
            })
            .collect()
    }

    #[test]
    fn originators_by_country_then_default_then_matrix() {
        use OriginatorKind::*;
        let none = originators(&[]);
        assert_eq!(
            choose_originator(&none, "447700900750", 44),
            (Alpha, "Matrix")
        );
        let table = originators(&[
            (
                "default",
                &[(Long, "15550001"), (Short, "12345"), (Alpha, "Corp")],
            ),
            ("44", &[(Alpha, "UKCorp"), (Long, "447700900000")]),
        ]);
        // 4+4+7+7+0+0+9+0+0+7+5+0 = 43: odd → the second of two.
        assert_eq!(
            choose_originator(&table, "447700900750", 44),
            (Long, "447700900000")
        );
        assert_eq!(
            choose_originator(&table, "447700900751", 44),
            (Alpha, "UKCorp")
        );
        // 1+6+5+0+2+5+3+0+0+0+0 = 22; 22 mod 3 = 1.
        assert_eq!(
            choose_originator(&table, "16502530000", 1),
            (Short, "12345")
        );
        assert_eq!(choose_originator(&table, "16502530001", 1), (Alpha, "Corp"));
        assert_eq!(
            choose_originator(&table, "16502530002", 1),
            (Long, "15550001")
        );
    }

    #[test]
    fn tons_are_openmarkets() {
        assert_eq!(ton(OriginatorKind::Long), 1);
        assert_eq!(ton(OriginatorKind::Short), 3);
        assert_eq!(ton(OriginatorKind::Alpha), 5);
    }

    #[test]
    fn the_request_body_is_openmarkets_shape() {
        let request = SendSms {
            mobile_terminate: MobileTerminate {
                message: Message {
                    content: "Your code is 123456",
                    kind: "text",
                },
                destination: Address {
                    address: "447700900750",
                },
                source: Source {
                    ton: 5,
                    address: "Matrix",
                },
            },
        };
        assert_eq!(
            serde_json::to_string(&request).unwrap(),
            r#"{"mobileTerminate":{"message":{"content":"Your code is 123456","type":"text"},"destination":{"address":"447700900750"},"source":{"ton":5,"address":"Matrix"}}}"#
        );
    }

    #[test]
    fn rejections_say_what_the_gateway_said() {
        let e = SmsError::Rejected {
            status: 400,
            error: Some("bad destination".into()),
            request_id: Some("r-1".into()),
        };
        assert_eq!(
            e.to_string(),
            "the SMS gateway answered 400 (request id r-1): bad destination"
        );
        let e = SmsError::Rejected {
            status: 503,
            error: None,
            request_id: None,
        };
        assert_eq!(
            e.to_string(),
            "the SMS gateway answered 503 (request id none)"
        );
    }
}
