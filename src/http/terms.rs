//! `GET /v2/terms`: the terms of service in force (`{"policies": {}}` when there are none);
//! `POST` (accepting them, with an account) is `super::account::accept_terms`.

use actix_web::{web, HttpResponse};

use super::{resource, AppState, V2_PREFIX};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource(&format!("{V2_PREFIX}/terms"))
            .route(web::get().to(get_terms))
            .route(web::post().to(super::account::accept_terms)),
    );
}

async fn get_terms(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.terms.current().policies())
}
