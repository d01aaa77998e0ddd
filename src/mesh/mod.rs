//! The mesh: who the peers are (`peers`) and the mutual TLS between them (`tls`). The actors
//! that push (`crate::actors::pusher`, `crate::actors::peers`) and the receiver
//! (`crate::http::replication`) build on these.

pub mod peers;
pub mod tls;
