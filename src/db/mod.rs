//! The SQLite database: opening it (pragmas, migrations, adopting a database Sydent made),
//! the diesel schema, row types and the queries the actors run. Only the actors in
//! `crate::actors` call into this module; HTTP code never does.

mod open;
pub mod queries;
pub mod schema;

pub use open::{connect, defer_checkpoints, open, OpenError, STORE_AUTOCHECKPOINT_PAGES};
pub use queries::{GlobalRow, LocalRow};

/// Any failure of a query: the store logs it and the client sees a 500.
pub type DbError = diesel::result::Error;
