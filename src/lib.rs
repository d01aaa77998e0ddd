//! sydent-rs: a Matrix identity server, drop-in for Sydent, whose nodes replicate signed
//! 3PID → Matrix ID bindings between each other over mutual TLS.
//!
//! Map of the crate:
//! - [`node`]: the start order (database → index → actors → HTTP servers) and the stop order;
//!   `main` and the tests both go through [`Node::start`].
//! - [`config`]: `sydent.conf` (Sydent's INI semantics), the table of known keys, typed sections.
//! - [`types`]: values validated at the edge (`Threepid`, `Mxid`, `ServerName`).
//! - [`crypto`]: canonical JSON, the signing key, sign/verify, lookup hashes (pure).
//! - [`association`]: the signed 3PID → Matrix ID association.
//! - [`db`]: SQLite (Sydent's schema, migrations, adopting a Sydent database), the queries.
//! - [`directory`]: the organisation's LDAP as a source of bindings: the client, the searches.
//! - [`actors`]: the owners of mutable state: the association store (single writer, group
//!   commit), the peer registry and one push queue per peer, the WAL checkpointer, the
//!   validation sessions, the persistent onbind delivery queue.
//! - [`lookup_index`]: every valid binding in memory, so lookups never touch SQLite.
//! - [`resolve`]: who a 3PID belongs to: the directory, the upstream, this node's bindings, in
//!   the operator's order, the same for every lookup path.
//! - [`upstream`]: the client for the upstream identity server (`[proxy]`).
//! - [`metrics`]: the Prometheus metrics (`prometheus_port`), lock-free on the request path.
//! - [`client_tls`]: the client API over HTTPS, its certificate re-read on SIGHUP.
//! - [`mesh`]: replication peers (peers.d), the mutual TLS, the push wire format, `new-mesh`.
//! - [`email`]: sending mail over SMTP (lettre, rustls).
//! - [`sms`]: sending texts through OpenMarket's v4 API (originators, `bodyTemplate`, IP filter).
//! - [`ratelimit`]: Sydent's keyed limiters (burst, then `rate_hz`), computed lazily from `now`.
//! - [`phone`]: phone numbers read as Sydent reads them (msisdn, INTERNATIONAL format), `smsrule.*`.
//! - [`homeserver`]: the client for homeservers: server-name resolution, verified TLS, IP filter.
//! - [`http`]: the client API, the internal API and the replication receiver.
//! - [`templates`]: the email and page templates (Sydent's brand folders, Jinja2 rules).
//! - [`invite`]: third-party invites: redaction, the signed invite blobs, the onbind body.
//! - [`terms`]: the terms of service (`terms.path`), loaded at start and on SIGHUP.
pub mod accounts;
pub mod actors;
pub mod association;
pub mod client_tls;
pub mod config;
pub mod crypto;
pub mod db;
pub mod directory;
pub mod email;
pub mod homeserver;
pub mod http;
pub mod invite;
pub mod lookup_index;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod phone;
pub mod ratelimit;
pub mod rebuild;
pub mod resolve;
pub mod sms;
pub mod templates;
pub mod terms;
pub mod types;
pub mod upstream;

/// Milliseconds since the Unix epoch, the unit of every Matrix and Sydent timestamp.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub use config::Config;
pub use node::{Listeners, Node};
