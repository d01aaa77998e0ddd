-- sydent-rs: what a validation session needs beyond Sydent's two tables. Sydent does not
-- know this table (a database handed back to Sydent keeps working: it never reads it).
--  next_link       the URL given at requestToken, where the emailed link's page redirects
--                  on success (never taken from the clicked URL);
--  failed_attempts wrong tokens submitted so far (the session closes at a cap, so a 6-digit
--                  SMS code cannot be brute-forced, even across restarts).
CREATE TABLE IF NOT EXISTS validation_session_extras (
    session_id BIGINT NOT NULL PRIMARY KEY,
    next_link TEXT,
    failed_attempts INTEGER NOT NULL DEFAULT 0
);

-- Sydent reads and writes a session's token row by session; so do we.
CREATE INDEX IF NOT EXISTS threepid_token_auths_session
    ON threepid_token_auths (validationSession);
