//! The JSON API under `/api/v1/`: streams and their RTMP push targets, changed
//! at run time. Guarded by `server.api_token` (bearer) when set, otherwise
//! only loopback clients may use it.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::config::valid_stream_name;
use crate::error::AppError;
use crate::rtmp::push::PushStats;
use crate::streams::{Stream, lock};

/// Checks the API token, or that the client is on loopback when none is set.
pub async fn guard(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Result<Response, AppError> {
    match &app.streams.config().server.api_token {
        Some(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default();
            if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
                return Err(AppError::Unauthorized);
            }
        }
        None if !peer.ip().is_loopback() => {
            return Err(AppError::Forbidden(
                "the API answers loopback clients only unless server.api_token is set".into(),
            ));
        }
        None => {}
    }
    Ok(next.run(request).await)
}

pub async fn list_streams(State(app): State<AppState>) -> Json<Value> {
    let streams: Vec<Value> = app.streams.all().iter().map(|s| stream_json(s)).collect();
    Json(json!({ "streams": streams }))
}

pub async fn get_stream(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, AppError> {
    let stream = app.streams.get(&name).ok_or(AppError::NotFound)?;
    Ok(Json(stream_json(&stream)))
}

pub async fn list_pushes(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, AppError> {
    let stream = app.streams.get(&name).ok_or(AppError::NotFound)?;
    Ok(Json(json!({ "push": pushes_json(&stream) })))
}

/// Invalid JSON and unknown fields are the client's syntax errors: 400. A
/// missing JSON type (415) or a body over the limit (413) keep their status.
fn json_rejection(e: axum::extract::rejection::JsonRejection) -> AppError {
    use axum::extract::rejection::JsonRejection as R;
    match e {
        R::JsonDataError(_) | R::JsonSyntaxError(_) => AppError::BadRequest(e.body_text()),
        e => AppError::Rejected {
            status: e.status(),
            detail: e.body_text(),
        },
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPush {
    url: String,
}

pub async fn add_push(
    State(app): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<NewPush>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, AppError> {
    let Json(new) = body.map_err(json_rejection)?;
    if !valid_stream_name(&name) {
        return Err(AppError::NotFound);
    }
    let stream = app.streams.get_or_create(&name);
    let id = app.streams.add_push(&stream, &new.url)?;
    let created = lock(&stream.pushes)
        .iter()
        .find(|p| p.id == id)
        .map(|p| push_json(p.id, &p.handle.stats()))
        .unwrap_or(Value::Null);
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

pub async fn remove_push(
    State(app): State<AppState>,
    Path((name, id)): Path<(String, u64)>,
) -> Result<StatusCode, AppError> {
    let stream = app.streams.get(&name).ok_or(AppError::NotFound)?;
    if app.streams.remove_push(&stream, id) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AppError::NotFound)
    }
}

fn stream_json(stream: &Stream) -> Value {
    let session = lock(&stream.session).clone();
    json!({
        "name": stream.name,
        "live": stream.hub.publication().is_some(),
        "session": session.map(|s| json!({
            "id": s.id,
            "uptime_secs": s.created.elapsed().as_secs(),
        })),
        "preset": stream.preset.name,
        "hls": format!("/hls/{}/index.m3u8", stream.name),
        "dropped_frames": stream.hub.dropped_frames(),
        "push": pushes_json(stream),
    })
}

fn pushes_json(stream: &Stream) -> Vec<Value> {
    lock(&stream.pushes)
        .iter()
        .map(|p| push_json(p.id, &p.handle.stats()))
        .collect()
}

fn push_json(id: u64, s: &PushStats) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("id".into(), json!(id));
    }
    v
}
