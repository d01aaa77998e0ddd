//! The organisation's directory as a source of bindings (issue 17): people an LDAP server or
//! Active Directory already knows, found by their email or phone number, without binding each
//! address by hand.
//!
//! [`ldap`] is the client: `[ldap]`'s settings, the connection (plain, StartTLS before the bind,
//! or `ldaps://`, certificates always verified), the paged search of every person and the
//! batched search for a set of addresses, each value escaped as RFC 4515 asks. [`entries`]
//! turns what the directory returns into 3PID → Matrix ID bindings: addresses normalised as
//! this node stores them, the Matrix ID built and checked, and an address that two people
//! hold left out as ambiguous. The directory actor that mirrors these bindings into the
//! association store builds on both, and keeps [`view`] (what the directory says now, read by
//! every lookup path first) up to date.

pub mod entries;
pub mod ldap;
pub mod view;

pub use entries::{DirectoryBinding, DirectorySnapshot};
pub use ldap::{search_addresses, search_all, LdapClient, LdapConnection, LdapError, LdapSettings};
pub use view::DirectoryView;
