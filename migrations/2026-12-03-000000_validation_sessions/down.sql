DROP INDEX IF EXISTS threepid_token_auths_session;
DROP TABLE IF EXISTS validation_session_extras;
