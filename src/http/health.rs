//! Operations: Prometheus metrics, liveness and readiness, and the HTTP
//! request counter every route goes through.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::telemetry;

/// `GET /metrics`: the Prometheus text exposition.
pub async fn metrics(State(app): State<AppState>) -> Response {
    let live = app
        .streams
        .all()
        .iter()
        .filter(|s| s.hub.publication().is_some())
        .count();
    metrics::gauge!(telemetry::SESSIONS_ACTIVE).set(app.streams.session_count() as f64);
    metrics::gauge!(telemetry::STREAMS_LIVE).set(live as f64);
    let mut resp = telemetry::render().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// `GET /cluster/load`: this node's sessions and capacity, for peers in
/// redirect mode and external balancers.
pub async fn load(State(app): State<AppState>) -> axum::Json<crate::cluster::Load> {
    axum::Json(own_load(&app))
}

pub fn own_load(app: &AppState) -> crate::cluster::Load {
    crate::cluster::Load {
        sessions: app.streams.session_count(),
        max_sessions: app.streams.config().server.max_sessions,
    }
}

/// `GET /healthz`: the process runs.
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: HTTP answers and the WebRTC driver takes sessions.
pub async fn readyz(State(app): State<AppState>) -> Response {
    if app.rtc.is_running() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the WebRTC driver is not running",
        )
            .into_response()
    }
}

/// Counts every request by matched route (never the raw URI: its stream
/// names and session ids would make a series each), method and final status.
pub async fn count_requests(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let resp = next.run(req).await;
    metrics::counter!(
        telemetry::HTTP_REQUESTS,
        "route" => route,
        "method" => method,
        "status" => resp.status().as_str().to_owned()
    )
    .increment(1);
    resp
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        _ => "other",
    }
}
