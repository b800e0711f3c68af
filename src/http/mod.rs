//! HTTP at the edge: WHIP for publishers, HLS for viewers.

mod api;
mod health;
mod hls;
mod rate_limit;
pub mod serve;
mod whip;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::auth::Auth;
use crate::cluster::Cluster;
use crate::error::{self, AppError};
use crate::rtc::RtcHandle;
use crate::streams::Streams;
use crate::telemetry;

#[derive(Clone)]
pub struct AppState {
    pub streams: Arc<Streams>,
    pub rtc: RtcHandle,
    pub cluster: Arc<Cluster>,
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.streams.config().server.max_body_bytes;
    // The config was validated at load; should a key file have gone since,
    // every publication is refused rather than let through.
    let auth = Arc::new(Auth::new(&state.streams.config().auth).unwrap_or_else(|e| {
        tracing::error!(error = %e, "authorization unusable: refusing every publication");
        Auth::refusing(format!("authorization is misconfigured: {e}"))
    }));
    let limit = rate_limit::RateLimit::new(&state.streams.config().server.rate_limit);
    // Installs the metrics recorder (once per process).
    telemetry::handle();
    let whip = Router::new()
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
                .get(whip::get_session)
                .options(whip::options_session),
        )
        .layer(axum::middleware::from_fn_with_state(
            limit,
            rate_limit::limit,
        ));
    Router::new()
        .merge(whip)
        .route("/hls/{stream}/{file}", get(hls::get))
        .route("/cluster/load", get(health::load))
        .route("/metrics", get(health::metrics))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .nest("/api/v1", api_routes(state.clone()))
        .fallback(|| async { AppError::NotFound })
        .with_state(state)
        .layer(Extension(auth))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            body_limit,
            declared_length,
        ))
        .layer(axum::middleware::map_response(finish))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(30),
        ))
        .layer(axum::middleware::from_fn(health::count_requests))
        .layer(TraceLayer::new_for_http())
}

fn api_routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/streams", get(api::list_streams))
        .route("/streams/{stream}", get(api::get_stream))
        .route(
            "/streams/{stream}/push",
            get(api::list_pushes).post(api::add_push),
        )
        .route(
            "/streams/{stream}/push/{id}",
            axum::routing::delete(api::remove_push),
        )
        .layer(axum::middleware::from_fn_with_state(state, api::guard))
}

/// A body declared larger than the limit gets 413 before it is read (and
/// before a client waiting on `Expect: 100-continue` sends it).
async fn declared_length(
    axum::extract::State(limit): axum::extract::State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return axum::response::IntoResponse::into_response(AppError::PayloadTooLarge { limit });
    }
    next.run(req).await
}

/// Every response leaves here: errors that axum made itself (body too
/// large, bad path, wrong method) become problem documents like ours, and
/// CORS headers go on everything, since browsers publish and play from other
/// origins.
async fn finish(resp: Response) -> Response {
    let mut resp = problem_for_framework_errors(resp).await;
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

async fn problem_for_framework_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let detail = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text.trim().to_owned()
    };
    let mut problem = error::problem(status, &detail);
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            problem.headers_mut().insert(name, value.clone());
        }
    }
    problem
}
