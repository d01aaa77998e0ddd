//! The actors that own the node's mutable state; everything else reaches them by typed
//! messages declared next to them.
//!
//! - [`store::AssociationStore`]: the single writer of the association tables (group commit),
//!   which keeps the in-memory lookup index coherent after each commit.
//! - [`peers::PeerRegistry`]: the active replication peers (peers.d, Sydent's peers table),
//!   one [`pusher::Pusher`] per peer.
//! - [`pusher::Pusher`]: a peer's push queue and cursor.
//! - [`outbox::Outbox`]: the newest local rows, read and signed once for every push queue, and
//!   the acknowledged cursors, saved together.
//! - [`checkpoint::Checkpointer`]: WAL checkpoints off the store's commit path.
//! - [`sessions::ValidationSessions`]: email and phone validation sessions.

pub mod checkpoint;
pub mod directory;
pub mod onbind;
pub mod outbox;
pub mod peers;
pub mod pusher;
pub mod sessions;
pub mod store;
