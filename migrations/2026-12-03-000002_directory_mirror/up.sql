-- sydent-rs: what this node bound because the directory ([ldap]) said so: one row per 3PID
-- the directory mirror holds, with the Matrix ID it gave. A sync compares the directory with
-- these rows to find who left it (their bindings are then unbound). Sydent does not know this
-- table.
CREATE TABLE IF NOT EXISTS directory_mirror (
    medium TEXT NOT NULL,
    address TEXT NOT NULL,
    mxid TEXT NOT NULL,
    synced_ts BIGINT NOT NULL,
    PRIMARY KEY (medium, address)
);
