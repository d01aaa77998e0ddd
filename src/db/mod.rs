//! The SQLite database: opening it (pragmas, migrations, adopting a database Sydent made),
//! the diesel schema, row types, the queries the actors run, and the one-time casefolding of
//! emails Sydent stored before it casefolded them. The actors in `crate::actors` and the
//! lookup index (loading, and its reads while it warms up) call into this module; HTTP code
//! never does.

pub mod accounts;
pub mod casefold;
pub mod directory;
pub mod invites;
mod open;
pub mod pg;
pub mod queries;
pub mod rebuild;
pub mod schema;
pub mod sessions;

pub use open::{
    connect, defer_checkpoints, kept_or_connect, open, snapshot, OpenError, Snapshot,
    STORE_AUTOCHECKPOINT_PAGES,
};
pub use queries::{GlobalRow, LocalRow};

/// Any failure of a query: the store logs it and the client sees a 500.
pub type DbError = diesel::result::Error;
