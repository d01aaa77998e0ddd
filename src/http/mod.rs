//! The HTTP side: the client API (Matrix Identity Service API plus Sydent's legacy v1) and
//! the internal API (Sydent's unauthenticated bind/unbind), each a `configure` function shared
//! by `Node` and the tests.
//!
//! - `error.rs`: `ApiError`, the only mapping from failures to errcodes.
//! - `extract.rs`: request arguments by Sydent's rules.
//! - `status.rs`: `/versions` and the API roots; `pubkey.rs`: our keys;
//!   `lookup.rs`: v1 `lookup` and `bulk_lookup`; `internal.rs`: internal bind and unbind.
//! - `validate.rs`: email and phone validation (requestToken, submitToken);
//!   `threepid.rs`: getValidated3pid, bind, and unbind with a session or signed by the
//!   homeserver (`x_matrix.rs`: the `X-Matrix` authorization).

mod account;
pub mod error;
pub mod extract;
mod internal;
mod invite;
mod lookup;
pub mod metrics;
mod pubkey;
pub mod replication;
mod status;
mod terms;
mod threepid;
pub mod validate;
mod x_matrix;

use std::sync::Arc;

use actix::Addr;
use actix_web::http::Method;
use actix_web::middleware::DefaultHeaders;
use actix_web::{web, HttpResponse, Resource};

use crate::actors::store::AssociationStore;
use crate::config::Config;
use crate::lookup_index::SharedIndex;
use error::ApiError;

pub const V1_PREFIX: &str = "/_matrix/identity/api/v1";
pub const V2_PREFIX: &str = "/_matrix/identity/v2";

/// Largest request body accepted, as Sydent's client API (512 KiB).
pub const MAX_BODY_BYTES: usize = 512 * 1024;

/// What every handler can reach: immutable config and the actors' addresses.
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Addr<AssociationStore>,
    /// Where binds are queued (straight to the store's pending writes).
    pub store_queue: crate::actors::store::StoreQueue,
    /// What handlers need to prepare a bind (server name, signing key, pepper).
    pub store_ctx: Arc<crate::actors::store::StoreContext>,
    pub index: SharedIndex,
    /// Invite keys this node issued (`ephemeral_public_keys`), kept in memory: the table is
    /// small and `pubkey/ephemeral/isvalid` is hot on homeservers accepting invites. A lock
    /// (read on every check) that the invite issuer, when it comes, will be the only writer of.
    pub ephemeral_keys: Arc<std::sync::RwLock<std::collections::HashSet<String>>>,
    /// The newest local association id (what the pushers chase).
    pub local_id: tokio::sync::watch::Receiver<i64>,
    /// The active peers, when replication is on.
    pub replication: Option<crate::actors::peers::ActivePeers>,
    /// The terms of service in force.
    pub terms: crate::terms::SharedTerms,
    /// v2 accounts and their tokens, in memory.
    pub accounts: crate::accounts::Accounts,
    /// The client for homeservers (OpenID userinfo, onbind deliveries, key fetches).
    pub homeserver: Arc<crate::homeserver::HomeserverClient>,
    /// The onbind delivery queue (its status on the internal API).
    pub onbind: Addr<crate::actors::onbind::OnbindQueue>,
    /// The directory mirror, when `[ldap]` is set.
    pub directory: Option<Addr<crate::actors::directory::DirectoryMirror>>,
    /// Who a 3PID belongs to: the directory, the upstream, this node's bindings, in the
    /// operator's order (every lookup path and store-invite ask it).
    pub resolver: crate::resolve::Resolver,
    /// Homeservers' signing keys (homeserver-signed unbinds), fetched through `homeserver`.
    pub server_keys: Arc<crate::homeserver::ServerKeys>,
    /// The validation sessions' owner.
    pub sessions: Addr<crate::actors::sessions::ValidationSessions>,
    /// Email and page templates, per brand.
    pub templates: Arc<crate::templates::Templates>,
    pub mailer: Arc<crate::email::Mailer>,
    /// The SMS gateway client.
    pub sms: Arc<crate::sms::SmsSender>,
    /// Limits on sending tokens.
    pub limits: Arc<validate::ValidationLimits>,
}

/// The CORS headers of every client-API answer; the explicit header list is the spec's (a `*`
/// would not cover `Authorization` for browsers).
pub fn cors_headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add(("Access-Control-Allow-Origin", "*"))
        .add((
            "Access-Control-Allow-Methods",
            "GET, POST, PUT, DELETE, OPTIONS",
        ))
        .add((
            "Access-Control-Allow-Headers",
            "Origin, X-Requested-With, Content-Type, Accept, Authorization",
        ))
}

/// The client API's routes. Lookups come first: actix tries resources in the order they
/// were registered, and each pattern with a variable (`pubkey/{key_id}`, one per API
/// version) costs a regex run to every request that reaches it (measured: two fifths of a
/// v1 lookup's instructions when they came before it).
pub fn client_api(cfg: &mut web::ServiceConfig, config: &Config) {
    if config.general.enable_v1_access {
        lookup::configure_v1(cfg);
    }
    lookup::configure_v2(cfg);
    status::configure(cfg, config);
    pubkey::configure(cfg, config);
    terms::configure(cfg);
    account::configure(cfg);
    validate::configure(cfg, config.general.enable_v1_access);
    invite::configure(cfg, config.general.enable_v1_access);
    threepid::configure(
        cfg,
        config.general.enable_v1_access,
        config.general.enable_v1_associations,
    );
}

/// The internal API's routes.
pub fn internal_api(cfg: &mut web::ServiceConfig) {
    internal::configure(cfg);
    replication::configure_status(cfg);
}

/// A resource whose unknown methods are 405 `M_UNRECOGNIZED` and which answers CORS
/// preflights.
pub fn resource(path: &str) -> Resource {
    web::resource(path)
        .route(web::method(Method::OPTIONS).to(preflight))
        .default_service(web::to(|| async {
            Err::<HttpResponse, _>(ApiError::MethodNotAllowed)
        }))
}

/// `OPTIONS` on any client-API path: the CORS headers are added by [`cors_headers`].
async fn preflight() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({}))
}

/// The default service of both APIs: 404 `M_UNRECOGNIZED`.
pub async fn unknown_endpoint() -> Result<HttpResponse, ApiError> {
    Err(ApiError::UnknownEndpoint)
}

/// The body-size limit as actix app data.
pub fn payload_config() -> web::PayloadConfig {
    web::PayloadConfig::new(MAX_BODY_BYTES)
}
