//! HTTP at the edge: WHIP for publishers, HLS for viewers.

mod api;
mod console;
mod health;
pub(crate) mod hls;
mod rate_limit;
pub mod serve;
mod whip;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::http::{HeaderValue, Method, header};
use axum::response::Response;
use axum::routing::{MethodFilter, MethodRouter, get, post};
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
        .route("/hls/{stream}/{rendition}/{file}", get(hls::get_rendition))
        .route("/cluster/load", get(health::load))
        .route("/metrics", get(health::metrics))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/", get(console::index))
        .route("/watch/{stream}", get(console::watch))
        .route("/publish/{stream}", get(console::publish))
        .route("/console/{file}", get(console::asset))
        .nest(API_PREFIX, api_routes(state.clone()))
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

/// Where the API is mounted.
pub const API_PREFIX: &str = "/api/v1";

/// One API route: its path under [`API_PREFIX`] and a handler per method.
type ApiRoute = (&'static str, Vec<(Method, MethodRouter<AppState>)>);

/// `handler` for `method`, remembering the method for [`api_route_list`].
fn op<H, T>(method: Method, handler: H) -> (Method, MethodRouter<AppState>)
where
    H: Handler<T, AppState>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a method axum routes");
    (method, axum::routing::on(filter, handler))
}

/// The API, one table that both the router and [`api_route_list`] (so the
/// OpenAPI test) are made from.
fn api_table() -> Vec<ApiRoute> {
    use Method as M;
    vec![
        ("/streams", vec![op(M::GET, api::list_streams)]),
        (
            "/streams/{stream}",
            vec![
                op(M::GET, api::get_stream),
                op(M::PUT, api::put_stream),
                op(M::DELETE, api::delete_stream),
            ],
        ),
        ("/streams/{stream}/kick", vec![op(M::POST, api::kick)]),
        (
            "/streams/{stream}/push",
            vec![op(M::GET, api::list_pushes), op(M::POST, api::add_push)],
        ),
        (
            "/streams/{stream}/push/{id}",
            vec![op(M::DELETE, api::remove_push)],
        ),
        ("/openapi.json", vec![op(M::GET, api::openapi)]),
    ]
}

/// Every API route as served: full path (`/api/v1/streams/{stream}`) and
/// its methods.
pub fn api_route_list() -> Vec<(String, Vec<Method>)> {
    api_table()
        .into_iter()
        .map(|(path, ops)| {
            let methods = ops.into_iter().map(|(m, _)| m).collect();
            (format!("{API_PREFIX}{path}"), methods)
        })
        .collect()
}

fn api_routes(state: AppState) -> Router<AppState> {
    let mut router = Router::new();
    for (path, ops) in api_table() {
        let mut methods = MethodRouter::new();
        for (_, handler) in ops {
            methods = methods.merge(handler);
        }
        router = router.route(path, methods);
    }
    router.layer(axum::middleware::from_fn_with_state(state, api::guard))
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Every `$ref` in `v` (recursively).
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn openapi_describes_every_api_route_and_nothing_else() {
        let doc: Value = serde_json::from_str(api::OPENAPI).expect("openapi.json is JSON");
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1.")),
            "OpenAPI 3.1"
        );
        assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
        let paths = doc["paths"].as_object().expect("paths");
        let routes = api_route_list();
        let operations = ["get", "put", "post", "delete", "patch", "head", "options"];
        for (path, methods) in &routes {
            let item = paths
                .get(path)
                .unwrap_or_else(|| panic!("{path} is served but not described"));
            let mut described: Vec<String> = item
                .as_object()
                .expect("path item")
                .keys()
                .filter(|k| operations.contains(&k.as_str()))
                .cloned()
                .collect();
            described.sort();
            let mut served: Vec<String> = methods
                .iter()
                .map(|m| m.as_str().to_ascii_lowercase())
                .collect();
            served.sort();
            assert_eq!(described, served, "{path}: described vs served methods");
            // Every `{param}` of the path is declared, and every operation
            // has an id and responses.
            for (i, part) in path.split('/').enumerate() {
                let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) else {
                    continue;
                };
                let declared = |v: &Value| {
                    v["parameters"].as_array().is_some_and(|ps| {
                        ps.iter().any(|p| {
                            p["name"] == name && p["in"] == "path" && p["required"] == true
                        })
                    })
                };
                for m in &served {
                    assert!(
                        declared(item) || declared(&item[m]),
                        "{path} {m}: path parameter {name} (segment {i}) not declared"
                    );
                }
            }
            for m in &served {
                let op = &item[m];
                assert!(op["operationId"].is_string(), "{path} {m}: operationId");
                let responses = op["responses"].as_object().expect("responses");
                assert!(
                    responses.keys().any(|c| c.starts_with('2')),
                    "{path} {m}: no 2xx response"
                );
            }
        }
        for path in paths.keys() {
            assert!(
                routes.iter().any(|(p, _)| p == path),
                "{path} is described but not served"
            );
        }
        // Every reference resolves.
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty());
        for r in all {
            let pointer = r.strip_prefix('#').expect("local reference");
            assert!(doc.pointer(pointer).is_some(), "unresolved {r}");
        }
    }
}
