//! HTTP at the edge: WHIP for publishers, HLS for viewers.

mod hls;
mod whip;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::{get, post};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::rtc::RtcHandle;
use crate::streams::Streams;

#[derive(Clone)]
pub struct AppState {
    pub streams: Arc<Streams>,
    pub rtc: RtcHandle,
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.streams.config().server.max_body_bytes;
    Router::new()
        .route(
            "/whip/{stream}",
            post(whip::post)
                .options(whip::options_endpoint)
                .get(whip::get_endpoint),
        )
        .route(
            "/whip/{stream}/{session}",
            axum::routing::delete(whip::delete)
                .patch(whip::patch)
                .options(whip::options_session),
        )
        .route("/hls/{stream}/{file}", get(hls::get))
        .with_state(state)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::map_response(cors))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(30),
        ))
        .layer(TraceLayer::new_for_http())
}

/// Browsers publish and play from other origins: every response allows any
/// origin and exposes the WHIP headers.
async fn cors(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location, ETag, Link, Accept-Patch, Accept-Post"),
    );
    resp
}
