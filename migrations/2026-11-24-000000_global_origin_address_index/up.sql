-- sydent-rs: find one origin's rows for one 3PID directly. Without it SQLite answers "rows of
-- origin O for address A with originId < N" through the (originServer, originId) index, which
-- walks every row of that origin: a bind cost grew with the table. Sydent ignores extra indexes.
CREATE INDEX IF NOT EXISTS global_threepid_medium_address_origin
    ON global_threepid_associations (medium, address, originServer, originId);
