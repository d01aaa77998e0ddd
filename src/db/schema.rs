//! Diesel's view of Sydent's tables (migrations/…_sydent_schema/up.sql), in the shape
//! `diesel print-schema` writes, except that every INTEGER column is `BigInt`: SQLite integers
//! are 64-bit and Sydent stores millisecond timestamps in columns declared `integer`.

diesel::table! {
    local_threepid_associations (id) {
        id -> BigInt,
        medium -> Text,
        address -> Text,
        mxid -> Nullable<Text>,
        ts -> Nullable<BigInt>,
        #[sql_name = "notBefore"]
        not_before -> Nullable<BigInt>,
        #[sql_name = "notAfter"]
        not_after -> Nullable<BigInt>,
        lookup_hash -> Nullable<Text>,
    }
}

diesel::table! {
    global_threepid_associations (id) {
        id -> BigInt,
        medium -> Text,
        address -> Text,
        mxid -> Text,
        ts -> BigInt,
        #[sql_name = "notBefore"]
        not_before -> BigInt,
        #[sql_name = "notAfter"]
        not_after -> BigInt,
        #[sql_name = "originServer"]
        origin_server -> Text,
        #[sql_name = "originId"]
        origin_id -> BigInt,
        #[sql_name = "sgAssoc"]
        sg_assoc -> Text,
        lookup_hash -> Nullable<Text>,
    }
}

diesel::table! {
    hashing_metadata (id) {
        id -> BigInt,
        lookup_pepper -> Nullable<Text>,
    }
}

diesel::table! {
    peers (id) {
        id -> BigInt,
        name -> Text,
        port -> Nullable<BigInt>,
        #[sql_name = "lastSentVersion"]
        last_sent_version -> Nullable<BigInt>,
        #[sql_name = "lastPokeSucceededAt"]
        last_poke_succeeded_at -> Nullable<BigInt>,
        active -> BigInt,
    }
}

diesel::table! {
    peer_pubkeys (id) {
        id -> BigInt,
        peername -> Text,
        alg -> Text,
        key -> Text,
    }
}

diesel::table! {
    ephemeral_public_keys (id) {
        id -> BigInt,
        public_key -> Text,
        verify_count -> Nullable<BigInt>,
        persistence_ts -> Nullable<BigInt>,
    }
}

diesel::table! {
    accounts (user_id) {
        user_id -> Text,
        created_ts -> BigInt,
        consent_version -> Nullable<Text>,
    }
}

diesel::table! {
    /// sydent-rs stores `sha256:<hex>` of each access token, never the token (Sydent stores
    /// them as they are; `crate::db::accounts::hash_stored_tokens` converts those at start).
    tokens (token) {
        token -> Text,
        user_id -> Text,
    }
}

diesel::table! {
    accepted_terms_urls (user_id, url) {
        user_id -> Text,
        url -> Text,
    }
}

diesel::table! {
    /// sydent-rs: per origin, the highest `originId` applied from its pushes.
    replication_origin_marks (origin_server) {
        origin_server -> Text,
        max_origin_id -> BigInt,
        max_origin_ts -> BigInt,
    }
}

diesel::table! {
    /// sydent-rs: one-time data upgrades already done.
    sydent_rs_upgrades (name) {
        name -> Text,
        done_ts -> BigInt,
    }
}

diesel::table! {
    threepid_validation_sessions (id) {
        id -> BigInt,
        medium -> Text,
        address -> Text,
        #[sql_name = "clientSecret"]
        client_secret -> Text,
        validated -> Nullable<BigInt>,
        mtime -> BigInt,
    }
}

diesel::table! {
    threepid_token_auths (id) {
        id -> BigInt,
        #[sql_name = "validationSession"]
        validation_session -> BigInt,
        token -> Text,
        #[sql_name = "sendAttemptNumber"]
        send_attempt_number -> BigInt,
    }
}

diesel::table! {
    /// sydent-rs: a validation session's `next_link` and wrong-token count.
    validation_session_extras (session_id) {
        session_id -> BigInt,
        next_link -> Nullable<Text>,
        failed_attempts -> BigInt,
    }
}

diesel::table! {
    invite_tokens (id) {
        id -> BigInt,
        medium -> Text,
        address -> Text,
        room_id -> Text,
        sender -> Text,
        token -> Text,
        /// Seconds, as Sydent.
        received_ts -> Nullable<BigInt>,
        /// Seconds: when the homeserver accepted the invite on bind.
        sent_ts -> Nullable<BigInt>,
    }
}

diesel::table! {
    /// sydent-rs: the persistent onbind queue (migrations/…_onbind_deliveries).
    onbind_deliveries (id) {
        id -> BigInt,
        destination -> Text,
        mxid -> Text,
        body -> Text,
        created_ts -> BigInt,
        gave_up_ts -> Nullable<BigInt>,
        last_error -> Nullable<Text>,
    }
}

diesel::table! {
    /// sydent-rs: which invites a queued onbind delivery carries.
    onbind_delivery_invites (invite_id) {
        invite_id -> BigInt,
        delivery_id -> BigInt,
    }
}

diesel::table! {
    /// sydent-rs: the 3PIDs this node bound from the directory (migrations/…_directory_mirror).
    directory_mirror (medium, address) {
        medium -> Text,
        address -> Text,
        mxid -> Text,
        synced_ts -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(peers, peer_pubkeys);
diesel::allow_tables_to_appear_in_same_query!(invite_tokens, onbind_delivery_invites);
