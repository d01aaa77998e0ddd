-- sydent-rs: the persistent onbind delivery queue. Sydent keeps its retries in memory and
-- marks invite tokens sent before they are delivered, so a restart loses invites; here a
-- delivery is committed with the bind that causes it and removed only after the homeserver
-- answered 200. Sydent does not know these tables (a database handed back to it keeps
-- working: it never reads them).
--  onbind_deliveries        one POST of /_matrix/federation/v1/3pid/onbind to `destination`
--                           (the mxid's server) with `body` (the signed association with its
--                           invites); `gave_up_ts` set once the node stopped trying, with
--                           `last_error` saying why.
--  onbind_delivery_invites  the invite_tokens rows a delivery carries: an invite is delivered
--                           by one delivery only (rebinds and replicated bindings do not send
--                           it twice).
CREATE TABLE IF NOT EXISTS onbind_deliveries (
    id INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    mxid TEXT NOT NULL,
    body TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    gave_up_ts BIGINT,
    last_error TEXT
);

CREATE TABLE IF NOT EXISTS onbind_delivery_invites (
    invite_id BIGINT NOT NULL PRIMARY KEY,
    delivery_id BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS onbind_delivery_invites_delivery
    ON onbind_delivery_invites (delivery_id);
