-- sydent-rs: one-time data upgrades that need code rather than SQL (src/db/casefold.rs), each
-- recorded here once done so it never runs twice.
CREATE TABLE IF NOT EXISTS sydent_rs_upgrades (
    name VARCHAR(64) NOT NULL PRIMARY KEY,
    done_ts BIGINT NOT NULL
);
