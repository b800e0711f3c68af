//! The WHIP endpoint (RFC 9725): `POST /whip/{stream}` creates a session,
//! `DELETE /whip/{stream}/{session}` ends it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::config::{Takeover, valid_stream_name};
use crate::error::AppError;
use crate::hub::Publication;
use crate::rtc::{RtcError, offer};
use crate::streams::{SessionInfo, lock};

/// A publisher that sent no frame for this long may be replaced.
const STALE_AFTER: Duration = Duration::from_secs(3);
/// A session this young is still connecting, never stale.
const CONNECT_GRACE: Duration = Duration::from_secs(5);

pub async fn post(
    State(app): State<AppState>,
    Path(stream_name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let started = Instant::now();
    if !valid_stream_name(&stream_name) {
        return Err(AppError::NotFound);
    }
    let settings = app.streams.config().stream(&stream_name).clone();
    authorize(&headers, &settings.tokens)?;
    if !settings.enabled {
        return Err(AppError::StreamDisabled(stream_name));
    }
    if !content_type_is(&headers, "application/sdp") {
        return Err(AppError::UnsupportedMediaType {
            expected: "application/sdp",
        });
    }
    let sdp = std::str::from_utf8(&body)
        .map_err(|_| AppError::BadSdp("the offer is not UTF-8".into()))?
        .to_owned();
    let sections = offer::parse(&sdp).map_err(|e| AppError::BadSdp(e.to_string()))?;
    let accepted = offer::check(sections).map_err(|e| match e {
        offer::OfferError::Malformed(m) => AppError::BadSdp(m),
        offer::OfferError::Unacceptable(m) => AppError::Unacceptable(m),
    })?;
    if app.streams.session_count() >= app.streams.config().server.max_sessions {
        return Err(AppError::Overloaded);
    }

    let stream = app.streams.get_or_create(&stream_name);
    // One negotiation at a time per stream, so two publishers cannot both win.
    let _negotiating = stream.negotiating.lock().await;
    let current = lock(&stream.session).clone();
    if let Some(old) = current {
        let stale = old.created.elapsed() > CONNECT_GRACE && stream.hub.idle_for() > STALE_AFTER;
        let replace = match settings.takeover {
            Takeover::Always => true,
            Takeover::Stale => stale,
            Takeover::Never => false,
        };
        if !replace {
            return Err(AppError::StreamBusy(stream_name));
        }
        tracing::info!(stream = %stream_name, old = %old.id, "new publisher takes over");
        app.rtc.close(&old.id).await;
        app.streams.remove_session(&old.id);
    }

    let id = crate::rtc::random_id(16);
    let publication = Publication {
        id: app.streams.next_publication_id(),
        video: accepted.video.is_some(),
        audio: accepted.audio.is_some(),
    };
    let streams = app.streams.clone();
    let closing_id = id.clone();
    let created = app
        .rtc
        .create(
            id.clone(),
            sdp,
            accepted,
            stream.hub.clone(),
            publication,
            Box::new(move || streams.remove_session(&closing_id)),
        )
        .await
        .map_err(|e| match e {
            RtcError::Sdp(m) => AppError::BadSdp(m),
            RtcError::Negotiation(m) => AppError::Unacceptable(m),
            RtcError::Gone => AppError::Internal(e.to_string()),
        })?;
    let info = Arc::new(SessionInfo {
        id: id.clone(),
        stream: stream_name.clone(),
        etag: created.etag.clone(),
        publication_id: publication.id,
        created: Instant::now(),
    });
    app.streams.add_session(&stream, info);

    let location = format!("/whip/{stream_name}/{id}");
    let mut resp = (StatusCode::CREATED, created.answer).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/sdp"),
    );
    insert(h, header::LOCATION, &location);
    insert(h, header::ETAG, &created.etag);
    for link in ice_server_links(&app) {
        if let Ok(v) = HeaderValue::from_str(&link) {
            h.append(header::LINK, v);
        }
    }
    tracing::info!(stream = %stream_name, session = %id, ms = started.elapsed().as_secs_f64() * 1000.0, "session created");
    Ok(resp)
}

pub async fn delete(
    State(app): State<AppState>,
    Path((stream_name, session)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let info = app
        .streams
        .session(&session)
        .filter(|s| s.stream == stream_name)
        .ok_or(AppError::NotFound)?;
    // The session id is a 128-bit secret; a configured token is checked too.
    let settings = app.streams.config().stream(&stream_name);
    authorize(&headers, &settings.tokens)?;
    app.rtc.close(&info.id).await;
    app.streams.remove_session(&info.id);
    Ok(StatusCode::OK.into_response())
}

/// `PATCH` on a session: trickle ICE and ICE restarts are not offered yet
/// (the server is ICE-lite and learns the client's address from its checks).
pub async fn patch(
    State(app): State<AppState>,
    Path((stream_name, session)): Path<(String, String)>,
) -> Result<Response, AppError> {
    app.streams
        .session(&session)
        .filter(|s| s.stream == stream_name)
        .ok_or(AppError::NotFound)?;
    let mut resp = StatusCode::METHOD_NOT_ALLOWED.into_response();
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("OPTIONS, DELETE"));
    Ok(resp)
}

/// `OPTIONS` on the endpoint (CORS preflight included): no ICE servers here.
pub async fn options_endpoint() -> Response {
    let mut resp = options("OPTIONS, POST", "Authorization, Content-Type");
    resp.headers_mut()
        .insert("accept-post", HeaderValue::from_static("application/sdp"));
    resp
}

pub async fn options_session() -> Response {
    options("OPTIONS, DELETE", "Authorization, Content-Type, If-Match")
}

fn options(methods: &'static str, request_headers: &'static str) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    h.insert(header::ALLOW, HeaderValue::from_static(methods));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(request_headers),
    );
    resp
}

/// GET on the endpoint answers 2xx without a body (RFC 9725 §4.1).
pub async fn get_endpoint() -> StatusCode {
    StatusCode::NO_CONTENT
}

fn authorize(headers: &HeaderMap, tokens: &[String]) -> Result<(), AppError> {
    if tokens.is_empty() {
        return Ok(());
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or(AppError::Unauthorized)?;
    // Compare with every token, without stopping early.
    let mut ok = subtle::Choice::from(0);
    for t in tokens {
        ok |= t.as_bytes().ct_eq(given.as_bytes());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(AppError::Unauthorized)
    }
}

fn content_type_is(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(expected))
}

fn ice_server_links(app: &AppState) -> Vec<String> {
    let mut links = Vec::new();
    for s in &app.streams.config().webrtc.ice_servers {
        for url in &s.urls {
            let mut link = format!("<{url}>; rel=\"ice-server\"");
            if let (Some(u), Some(c)) = (&s.username, &s.credential) {
                link.push_str(&format!(
                    "; username=\"{}\"; credential=\"{}\"; credential-type=\"password\"",
                    u.replace('"', ""),
                    c.replace('"', "")
                ));
            }
            links.push(link);
        }
    }
    links
}

fn insert(h: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}
