//! sydent-rs: a Matrix identity server, drop-in for Sydent, whose nodes replicate signed
//! 3PID → Matrix ID bindings between each other over mutual TLS.
//!
//! Map of the crate:
//! - [`config`]: `sydent.conf` (Sydent's INI semantics), the table of known keys, typed sections.
//! - [`crypto`]: canonical JSON, the signing key, sign/verify, lookup hashes (pure).
pub mod actors;
pub mod association;
pub mod config;
pub mod crypto;
pub mod db;
pub mod http;
pub mod lookup_index;
pub mod mesh;
pub mod types;

/// Milliseconds since the Unix epoch, the unit of every Matrix and Sydent timestamp.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
pub mod node;

pub use config::Config;
pub use node::{Listeners, Node};
