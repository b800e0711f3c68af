//! The JSON API under `/api/v1/`: streams (listed with their live state,
//! created, replaced and deleted, their publisher kicked) and their RTMP
//! push targets, changed at run time. Guarded by `server.api_token`
//! (bearer) when set, otherwise only loopback clients may use it. Secrets
//! (publishing tokens, stream keys) are never shown nor logged.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::auth::Auth;
use crate::config::{StreamConfig, Takeover, valid_stream_name};
use crate::error::AppError;
use crate::rtmp::push::PushStats;
use crate::rtmp::target::mask_unparsed;
use crate::state::{SettingsError, parse_settings};
use crate::streams::{Stream, lock};

/// How a publishing token is shown.
const MASKED_TOKEN: &str = "********";

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
        // Without a token, any web page open in a browser on this machine
        // is a loopback client too: only pages of this server may call.
        None if cross_origin(&headers, &request) => {
            return Err(AppError::Forbidden(
                "cross-origin API requests are refused unless server.api_token is set".into(),
            ));
        }
        None => {}
    }
    Ok(next.run(request).await)
}

/// Every stream the server knows: running ones, those of the config file
/// and those defined through the API, sorted by name.
/// A browser request from a page of another origin than this server
/// (`Origin` is not a scheme plus the host asked for: `Host`, or the
/// authority of an HTTP/2 request).
fn cross_origin(headers: &HeaderMap, request: &Request) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
        .unwrap_or_default();
    let authority = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, a)| a);
    !authority.is_some_and(|a| !host.is_empty() && a.eq_ignore_ascii_case(host))
}

pub async fn list_streams(State(app): State<AppState>) -> Json<Value> {
    let mut names: Vec<String> = app.streams.all().iter().map(|s| s.name.clone()).collect();
    names.extend(app.streams.config().streams.keys().cloned());
    names.extend(app.streams.store().names());
    names.sort();
    names.dedup();
    let streams: Vec<Value> = names.iter().map(|n| stream_json(&app, n)).collect();
    Json(json!({ "streams": streams }))
}

pub async fn get_stream(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, AppError> {
    if !known(&app, &name) {
        return Err(AppError::NotFound);
    }
    Ok(Json(stream_json(&app, &name)))
}

/// Running, configured in the file, or defined through the API.
fn known(app: &AppState, name: &str) -> bool {
    valid_stream_name(name)
        && (app.streams.get(name).is_some()
            || app.streams.config().streams.contains_key(name)
            || app.streams.store().contains(name))
}

/// `PUT /streams/{stream}`: creates or replaces the stream's settings,
/// kept in the state file before the answer. Push targets follow at once;
/// the rest applies to the stream's next publication.
pub async fn put_stream(
    State(app): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, AppError> {
    if !valid_stream_name(&name) {
        return Err(AppError::BadRequest(format!(
            "`{name}` is not a valid stream name: letters, digits, '-', '_' and '.' (1 to 64), not starting with '.'"
        )));
    }
    let Json(json) = body.map_err(json_rejection)?;
    let settings = parse_settings(app.streams.config(), &json).map_err(|e| match e {
        SettingsError::Syntax(m) => AppError::BadRequest(m),
        SettingsError::Invalid(m) => AppError::Unacceptable(m),
    })?;
    let store = app.streams.store().clone();
    let stored = name.clone();
    let created = tokio::task::spawn_blocking(move || store.put(&stored, settings, json))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(|e| AppError::Internal(e.to_string()))?;
    app.streams.apply_push_settings(&name);
    tracing::info!(stream = %name, created, "stream settings stored (API)");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut resp = (status, Json(stream_json(&app, &name))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/streams/{name}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// `DELETE /streams/{stream}`: forgets the settings defined through the
/// API (the config file's, or the defaults, apply again) and ends the
/// current publication.
pub async fn delete_stream(
    State(app): State<AppState>,
    Extension(auth): Extension<Arc<Auth>>,
    Path(name): Path<String>,
) -> Result<StatusCode, AppError> {
    if !valid_stream_name(&name) {
        return Err(AppError::NotFound);
    }
    let store = app.streams.store().clone();
    let stored = name.clone();
    let removed = tokio::task::spawn_blocking(move || store.remove(&stored))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(|e| AppError::Internal(e.to_string()))?;
    if !removed {
        return Err(AppError::NotFoundDetail(format!(
            "stream `{name}` has no settings defined through the API"
        )));
    }
    kick_publisher(&app, &auth, &name).await;
    app.streams.apply_push_settings(&name);
    tracing::info!(stream = %name, "stream settings deleted (API)");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /streams/{stream}/kick`: ends the current publisher's session.
pub async fn kick(
    State(app): State<AppState>,
    Extension(auth): Extension<Arc<Auth>>,
    Path(name): Path<String>,
) -> Result<StatusCode, AppError> {
    if !known(&app, &name) {
        return Err(AppError::NotFound);
    }
    if kick_publisher(&app, &auth, &name).await {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AppError::NotFoundDetail(format!(
            "stream `{name}` has no publisher"
        )))
    }
}

/// Ends the session of the stream's publisher; false when there is none.
async fn kick_publisher(app: &AppState, auth: &Auth, name: &str) -> bool {
    let Some(stream) = app.streams.get(name) else {
        return false;
    };
    let Some(session) = lock(&stream.session).clone() else {
        return false;
    };
    app.rtc.close(&session.id).await;
    app.streams.remove_session(&session.id);
    auth.forget_session(&session.id);
    tracing::info!(stream = %name, session = %session.id, "publisher kicked (API)");
    true
}

/// The OpenAPI 3.1 description of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

pub async fn openapi() -> Response {
    let mut resp = OPENAPI.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
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

/// A stream as the API shows it: its settings (secrets masked), where they
/// come from, and, when it runs, its publisher and outputs.
fn stream_json(app: &AppState, name: &str) -> Value {
    let settings = app.streams.settings(name);
    let running = app.streams.get(name);
    let stream = running.as_deref();
    let session = stream.and_then(|s| lock(&s.session).clone());
    let hls = match stream {
        Some(s) => s.hls.clone(),
        None => app.streams.config().hls_with(&settings),
    };
    let playlist = format!("/hls/{name}/index.m3u8");
    let playlist_exists = app
        .streams
        .config()
        .server
        .data_dir
        .join("hls")
        .join(name)
        .join("index.m3u8")
        .is_file();
    let publisher = session.as_ref().map(|s| {
        let media = stream.map(|st| lock(&st.media).clone()).unwrap_or_default();
        let ingress = stream.and_then(|st| st.hub.ingress());
        json!({
            "session": s.id,
            "ip": s.client_ip.map(|ip| ip.to_string()),
            "uptime_secs": s.created.elapsed().as_secs(),
            "video": media.video,
            "audio": media.audio,
            // From the WebRTC stack every 2 s; null until the first report.
            "packet_loss": ingress.map(|i| i.loss),
            "nacks_sent": ingress.map(|i| i.nacks),
            "rtt_ms": ingress.and_then(|i| i.rtt_ms),
        })
    });
    json!({
        "name": name,
        "source": app.streams.settings_source(name),
        "settings": settings_json(&settings, name),
        "running": stream.is_some(),
        "live": stream.is_some_and(|s| s.hub.publication().is_some()),
        // Preset or HLS changed while running: applied when the stream
        // next starts without a publisher.
        "settings_pending": stream.is_some_and(|s| app.streams.outdated(s)),
        "session": session.as_ref().map(|s| json!({
            "id": s.id,
            "uptime_secs": s.created.elapsed().as_secs(),
        })),
        "publisher": publisher,
        "preset": stream.map_or(settings.preset.clone(), |s| s.preset.name.clone()),
        "hls": playlist,
        "outputs": {
            "hls": {
                "url": playlist,
                "format": format!("{:?}", hls.format).to_ascii_lowercase(),
                "playlist": playlist_exists,
                // A ladder's media playlists; the playlist above is then
                // the master playlist.
                "renditions": stream.filter(|s| s.renditions.len() > 1).map(|s| {
                    s.renditions
                        .iter()
                        .map(|r| json!({
                            "name": r.name,
                            "url": format!("/hls/{name}/{}/index.m3u8", r.name),
                        }))
                        .collect::<Vec<_>>()
                }),
            },
        },
        "dropped_frames": stream.map_or(0, |s| s.hub.dropped_frames()),
        "push": stream.map(pushes_json).unwrap_or_default(),
    })
}

/// Stream settings with the tokens and stream keys masked.
fn settings_json(s: &StreamConfig, name: &str) -> Value {
    json!({
        "enabled": s.enabled,
        "preset": s.preset,
        "tokens": vec![MASKED_TOKEN; s.tokens.len()],
        "push": s.push.iter().map(|u| mask_unparsed(&u.replace("{stream}", name))).collect::<Vec<_>>(),
        "takeover": match s.takeover {
            Takeover::Stale => "stale",
            Takeover::Never => "never",
            Takeover::Always => "always",
        },
        "hls": {
            "format": s.hls.format.map(|f| format!("{f:?}").to_ascii_lowercase()),
        },
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
