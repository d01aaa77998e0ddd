//! The actors that own the node's mutable state; everything else reaches them by typed
//! messages declared next to them.
//!
//! - [`store::AssociationStore`]: the single writer of the association tables (group commit),
//!   which keeps the in-memory lookup index coherent after each commit.

pub mod store;
