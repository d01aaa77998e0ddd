//! The mesh: who the peers are (`peers`), the mutual TLS between them (`tls`), what they
//! send each other (`wire`) and how a batch of it is checked (`verify`). The actors
//! that push (`crate::actors::pusher`, `crate::actors::peers`) and the receiver
//! (`crate::http::replication`) build on these.

pub mod new_mesh;
pub mod peers;
pub mod tls;
pub mod verify;
pub mod wire;
