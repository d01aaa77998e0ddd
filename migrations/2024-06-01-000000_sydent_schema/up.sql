-- Sydent's schema as of its user_version 5 (Sydent 2.x), table for table and column for
-- column, so operators' SQL and tools keep working and a database Sydent created adopts in
-- place: every statement is IF NOT EXISTS, and on such a database this migration only records
-- itself. src/db/open.rs brings an older Sydent database (user_version 2..4) up to 5 first.

CREATE TABLE IF NOT EXISTS local_threepid_associations (
    id integer primary key autoincrement,
    medium varchar(16) not null,
    address varchar(256) not null,
    mxid varchar(256),
    ts integer,
    notBefore bigint,
    notAfter bigint,
    lookup_hash varchar(256)
);
CREATE UNIQUE INDEX IF NOT EXISTS local_threepid_medium_address
    ON local_threepid_associations (medium, address);

CREATE TABLE IF NOT EXISTS global_threepid_associations (
    id integer primary key autoincrement,
    medium varchar(16) not null,
    address varchar(256) not null,
    mxid varchar(256) not null,
    ts integer not null,
    notBefore bigint not null,
    notAfter integer not null,
    originServer varchar(255) not null,
    originId integer not null,
    sgAssoc text not null,
    lookup_hash varchar(256)
);
CREATE INDEX IF NOT EXISTS global_threepid_medium_address
    ON global_threepid_associations (medium, address);
CREATE INDEX IF NOT EXISTS global_threepid_medium_lower_address
    ON global_threepid_associations (medium, lower(address));
CREATE UNIQUE INDEX IF NOT EXISTS global_threepid_originServer_originId
    ON global_threepid_associations (originServer, originId);
DROP INDEX IF EXISTS lookup_hash_medium;
CREATE INDEX IF NOT EXISTS global_threepid_lookup_hash
    ON global_threepid_associations (lookup_hash);

CREATE TABLE IF NOT EXISTS threepid_validation_sessions (
    id integer primary key,
    medium varchar(16) not null,
    address varchar(256) not null,
    clientSecret varchar(32) not null,
    validated int default 0,
    mtime bigint not null
);
CREATE INDEX IF NOT EXISTS threepid_validation_sessions_mtime
    ON threepid_validation_sessions (mtime);

CREATE TABLE IF NOT EXISTS threepid_token_auths (
    id integer primary key,
    validationSession integer not null,
    token varchar(32) not null,
    sendAttemptNumber integer not null,
    foreign key (validationSession) references threepid_validations(id)
);

CREATE TABLE IF NOT EXISTS invite_tokens (
    id integer primary key,
    medium varchar(16) not null,
    address varchar(256) not null,
    room_id varchar(256) not null,
    sender varchar(256) not null,
    token varchar(256) not null,
    received_ts bigint,
    sent_ts bigint
);
CREATE INDEX IF NOT EXISTS invite_token_medium_address ON invite_tokens (medium, address);
CREATE INDEX IF NOT EXISTS invite_token_token ON invite_tokens (token);

CREATE TABLE IF NOT EXISTS ephemeral_public_keys (
    id integer primary key,
    public_key varchar(256) not null,
    verify_count bigint default 0,
    persistence_ts bigint
);
CREATE UNIQUE INDEX IF NOT EXISTS ephemeral_public_keys_index ON ephemeral_public_keys (public_key);

CREATE TABLE IF NOT EXISTS peers (
    id integer primary key,
    name varchar(255) not null,
    port integer default null,
    lastSentVersion integer,
    lastPokeSucceededAt integer,
    active integer not null default 0
);
CREATE UNIQUE INDEX IF NOT EXISTS name ON peers (name);

CREATE TABLE IF NOT EXISTS peer_pubkeys (
    id integer primary key,
    peername varchar(255) not null,
    alg varchar(16) not null,
    key text not null,
    foreign key (peername) references peers (name)
);
CREATE UNIQUE INDEX IF NOT EXISTS peername_alg ON peer_pubkeys (peername, alg);

CREATE TABLE IF NOT EXISTS hashing_metadata (
    id integer primary key,
    lookup_pepper varchar(256)
);

CREATE TABLE IF NOT EXISTS accounts (
    user_id TEXT NOT NULL PRIMARY KEY,
    created_ts BIGINT NOT NULL,
    consent_version TEXT
);
CREATE TABLE IF NOT EXISTS tokens (
    token TEXT NOT NULL PRIMARY KEY,
    user_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS accepted_terms_urls (
    user_id TEXT NOT NULL,
    url TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS accepted_terms_urls_idx ON accepted_terms_urls (user_id, url);

PRAGMA user_version = 5;
