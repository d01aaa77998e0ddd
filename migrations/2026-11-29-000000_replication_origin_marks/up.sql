-- sydent-rs: per origin server, the highest originId (and the newest ts up to it) applied from
-- that origin's replication pushes. A pushed row at or below the mark is a re-send or a late,
-- reordered copy of something already applied or superseded, and is ignored: an older binding
-- can never come back after its tombstone. Sydent does not know this table; it is added to a
-- database Sydent made and seeded from what its global table holds.
CREATE TABLE IF NOT EXISTS replication_origin_marks (
    origin_server VARCHAR(255) NOT NULL PRIMARY KEY,
    max_origin_id BIGINT NOT NULL,
    max_origin_ts BIGINT NOT NULL
);

INSERT INTO replication_origin_marks (origin_server, max_origin_id, max_origin_ts)
SELECT g.originServer, g.originId, g.ts
FROM global_threepid_associations g
WHERE g.originId = (
    SELECT MAX(m.originId) FROM global_threepid_associations m
    WHERE m.originServer = g.originServer
);
