//! The integration tests: one binary (STYLE.md: each tests/*.rs would link the whole tree
//! again). Every test boots real `sydent-rs` processes on loopback ports the OS picks, talks
//! real HTTP to them and reads real SQLite files.

mod harness;

pub mod account;
mod config_start;
mod directory;
mod email;
mod errors;
pub mod homeserver;
mod https;
mod internal_bind;
mod invites;
mod ldap;
mod lookup_v2;
mod mesh;
mod metrics;
mod onbind;
mod postgres;
mod sms;
mod status_page;
mod sydent_db;
mod sydent_interop;
mod templates;
mod terms;
mod unbind_signed;
mod upstream;
mod validation;
mod validation_sms;
mod vectors;
