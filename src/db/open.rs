//! Opening the database: connection pragmas, the embedded migrations, bringing an older
//! Sydent database up to Sydent's schema version 5 first, and the lookup pepper.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use rand_core::{OsRng, RngCore};

use super::schema::hashing_metadata;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Characters of a generated lookup pepper.
const PEPPER_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// Sydent generates 5 characters (≈30 bits); a longer pepper costs nothing and is what the spec
/// asks for ("SHOULD be long enough"). Existing peppers are kept.
const PEPPER_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open database {path}: {source}")]
    Connect {
        path: String,
        source: diesel::ConnectionError,
    },
    #[error("database {path}: {source}")]
    Query {
        path: String,
        source: diesel::result::Error,
    },
    #[error("database {path}: migration failed: {message}")]
    Migration { path: String, message: String },
    #[error(
        "database {path} has Sydent schema version {version}, which predates Sydent 1.0; \
         open it once with Sydent 2.x to upgrade it, then start sydent-rs"
    )]
    TooOld { path: String, version: i32 },
}

#[derive(QueryableByName)]
struct UserVersion {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    user_version: i32,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Opens (creating if needed) the database at `path` (`:memory:` works), migrates it and makes
/// sure a lookup pepper exists. Returns the connection and the pepper.
pub fn open(path: &str) -> Result<(SqliteConnection, String), OpenError> {
    let query_err = |source| OpenError::Query {
        path: path.into(),
        source,
    };
    let mut conn = SqliteConnection::establish(path).map_err(|source| OpenError::Connect {
        path: path.into(),
        source,
    })?;
    // WAL: readers never wait for the writer. FULL: a commit is on disk (the WAL fsynced)
    // before the store answers, so an acknowledged bind survives a power cut and its id is
    // never handed out twice (peers that hold that id would ignore a reused one). Group commit
    // pays that one fsync per batch of writes, not per write.
    conn.batch_execute(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000; PRAGMA temp_store = MEMORY; \
         PRAGMA foreign_keys = OFF;",
    )
    .map_err(query_err)?;

    adopt_old_sydent_schema(&mut conn, path)?;
    conn.run_pending_migrations(MIGRATIONS)
        .map_err(|e| OpenError::Migration {
            path: path.into(),
            message: e.to_string(),
        })?;
    let pepper = ensure_pepper(&mut conn).map_err(query_err)?;
    Ok((conn, pepper))
}

/// The store's connection checkpoints the WAL itself only past this many pages (64 MiB); the
/// checkpointer actor does the bulk of it meanwhile on another connection.
pub const STORE_AUTOCHECKPOINT_PAGES: u32 = 16_384;

/// Hands the store's WAL checkpoints to a checkpointer (see `actors::checkpoint`): its own
/// connection then only checkpoints when the WAL is large, and the WAL file is truncated back
/// to 64 MiB when it resets.
pub fn defer_checkpoints(conn: &mut SqliteConnection) -> QueryResult<()> {
    conn.batch_execute(&format!(
        "PRAGMA wal_autocheckpoint = {STORE_AUTOCHECKPOINT_PAGES}; PRAGMA journal_size_limit = 67108864;"
    ))
}

/// A further connection to a database [`open`] has already prepared, for the actors that read
/// beside the store (replication push queues, the peer registry). Not for `:memory:`. NORMAL
/// is enough here: the only thing they write is a peer's cursor, and a cursor lost to a power
/// cut only makes that peer receive a batch again, which it skips.
pub fn connect(path: &str) -> Result<SqliteConnection, OpenError> {
    let mut conn = SqliteConnection::establish(path).map_err(|source| OpenError::Connect {
        path: path.into(),
        source,
    })?;
    conn.batch_execute("PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000;")
        .map_err(|source| OpenError::Query {
            path: path.into(),
            source,
        })?;
    Ok(conn)
}

/// `kept`, or a new [`connect`]ion when there is none: for the actors that keep a connection
/// between blocking jobs and open it again after a failure.
pub fn kept_or_connect(
    kept: Option<SqliteConnection>,
    path: &str,
) -> Result<SqliteConnection, OpenError> {
    match kept {
        Some(conn) => Ok(conn),
        None => connect(path),
    }
}

/// A read transaction on a connection of its own: everything read through it is the database
/// as it was when [`snapshot`] returned, whatever the store commits meanwhile (WAL).
pub struct Snapshot(SqliteConnection);

/// Takes a [`Snapshot`] of a database [`open`] has already prepared. Not for `:memory:`.
pub fn snapshot(path: &str) -> Result<Snapshot, OpenError> {
    let mut conn = connect(path)?;
    // A deferred transaction takes its snapshot at its first read.
    conn.batch_execute("BEGIN; SELECT count(*) FROM global_threepid_associations;")
        .map_err(|source| OpenError::Query {
            path: path.into(),
            source,
        })?;
    Ok(Snapshot(conn))
}

impl Snapshot {
    pub fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.0
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = self.0.batch_execute("COMMIT");
    }
}

/// Sydent numbers its schema in `PRAGMA user_version`. Version 5 is the schema our migration
/// creates; versions 2–4 lack columns or indexes that `CREATE … IF NOT EXISTS` cannot add, so
/// they are added here, as Sydent's own upgrade steps would.
fn adopt_old_sydent_schema(conn: &mut SqliteConnection, path: &str) -> Result<(), OpenError> {
    let query_err = |source| OpenError::Query {
        path: path.into(),
        source,
    };
    let version = diesel::sql_query("PRAGMA user_version")
        .get_result::<UserVersion>(conn)
        .map_err(query_err)?
        .user_version;
    let has_tables = diesel::sql_query(
        "SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name = 'local_threepid_associations'",
    )
    .get_result::<Count>(conn)
    .map_err(query_err)?
    .n
        > 0;
    if !has_tables || version >= 5 {
        return Ok(());
    }
    if version < 2 {
        return Err(OpenError::TooOld {
            path: path.into(),
            version,
        });
    }
    log::info!("upgrading Sydent database {path} from schema version {version} to 5");
    conn.transaction(|c| {
        if version < 3 {
            c.batch_execute(
                "ALTER TABLE local_threepid_associations ADD COLUMN lookup_hash varchar(256);
                 ALTER TABLE global_threepid_associations ADD COLUMN lookup_hash varchar(256);",
            )?;
        }
        c.batch_execute("PRAGMA user_version = 5")
    })
    .map_err(query_err)
}

/// Returns the lookup pepper, generating one on first start. Rows whose `lookup_hash` is
/// missing (a Sydent database from before hashing, or rows written by a tool) are hashed now.
fn ensure_pepper(conn: &mut SqliteConnection) -> QueryResult<String> {
    conn.transaction(|c| {
        let existing: Option<Option<String>> = hashing_metadata::table
            .select(hashing_metadata::lookup_pepper)
            .order(hashing_metadata::id)
            .load_iter(c)?
            .next()
            .transpose()?;
        let pepper = match existing.flatten().filter(|p| !p.is_empty()) {
            Some(p) => p,
            None => {
                let pepper = generate_pepper();
                diesel::replace_into(hashing_metadata::table)
                    .values((
                        hashing_metadata::id.eq(0),
                        hashing_metadata::lookup_pepper.eq(&pepper),
                    ))
                    .execute(c)?;
                pepper
            }
        };
        rehash_missing(c, &pepper)?;
        Ok(pepper)
    })
}

#[derive(QueryableByName)]
struct Unhashed {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    medium: String,
    #[diesel(sql_type = Text)]
    address: String,
}

fn rehash_missing(conn: &mut SqliteConnection, pepper: &str) -> QueryResult<()> {
    for table in [
        "local_threepid_associations",
        "global_threepid_associations",
    ] {
        let rows: Vec<Unhashed> = diesel::sql_query(format!(
            "SELECT id, medium, address FROM {table} WHERE lookup_hash IS NULL AND mxid IS NOT NULL"
        ))
        .load(conn)?;
        for row in rows {
            let hash = crate::crypto::lookup_hash(&row.address, &row.medium, pepper);
            diesel::sql_query(format!("UPDATE {table} SET lookup_hash = ? WHERE id = ?"))
                .bind::<Text, _>(hash)
                .bind::<BigInt, _>(row.id)
                .execute(conn)?;
        }
    }
    Ok(())
}

fn generate_pepper() -> String {
    let mut bytes = [0u8; PEPPER_LEN];
    OsRng.fill_bytes(&mut bytes);
    // 62 does not divide 256: the bias (≤ 1.6 %) does not matter for a pepper.
    bytes
        .iter()
        .map(|b| PEPPER_ALPHABET[*b as usize % PEPPER_ALPHABET.len()] as char)
        .collect()
}
