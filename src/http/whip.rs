//! The WHIP endpoint (RFC 9725): `POST /whip/{stream}` creates a session,
//! `PATCH /whip/{stream}/{session}` trickles ICE candidates into it,
//! `DELETE /whip/{stream}/{session}` ends it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::auth::{Auth, bearer_token};
use crate::config::{Takeover, valid_stream_name};
use crate::error::AppError;
use crate::hub::Publication;
use crate::rtc::{RtcError, offer, trickle};
use crate::streams::{SessionInfo, lock};

const TRICKLE_TYPE: &str = "application/trickle-ice-sdpfrag";

/// The client's address, when the server runs with connect info.
type Peer = Option<Extension<ConnectInfo<SocketAddr>>>;

/// A publisher that sent no frame for this long may be replaced.
const STALE_AFTER: Duration = Duration::from_secs(3);
/// A session this young is still connecting, never stale.
const CONNECT_GRACE: Duration = Duration::from_secs(5);

pub async fn post(
    State(app): State<AppState>,
    Extension(auth): Extension<Arc<Auth>>,
    peer: Peer,
    Path(stream_name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let started = Instant::now();
    if !valid_stream_name(&stream_name) {
        return Err(AppError::NotFound);
    }
    let redirected = query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|p| p == crate::cluster::REDIRECTED_QUERY));
    let own = super::health::own_load(&app);
    if let Some(url) = app.cluster.redirect(&stream_name, own, redirected) {
        tracing::info!(stream = %stream_name, to = %url, "offer redirected (307)");
        crate::telemetry::counters().redirects.increment(1);
        return Err(AppError::Redirect(url));
    }
    let settings = app.streams.settings(&stream_name);
    let client_ip = peer.map(|Extension(ConnectInfo(a))| a.ip());
    let grant = auth
        .authorize_publish(
            &stream_name,
            &settings.tokens,
            bearer_token(&headers),
            client_ip,
        )
        .await?;
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
    let accept_non_h264 = app
        .streams
        .config()
        .preset_with(&settings)
        .video
        .accepts_non_h264();
    let accepted = offer::check(sections, accept_non_h264).map_err(|e| match e {
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
    // Before the session exists, so that its end always forgets it.
    auth.bind_session(&id, &grant);
    let publication = Publication {
        id: app.streams.next_publication_id(),
        video: accepted.video.is_some(),
        audio: accepted.audio.is_some(),
    };
    let streams = app.streams.clone();
    let closing_id = id.clone();
    let closing_auth = auth.clone();
    let created = app
        .rtc
        .create(
            id.clone(),
            sdp,
            accepted,
            crate::rtc::Hubs {
                hub: stream.hub.clone(),
                layers: stream.layers(),
            },
            publication,
            Box::new(move || {
                streams.remove_session(&closing_id);
                closing_auth.forget_session(&closing_id);
            }),
        )
        .await
        .map_err(|e| {
            auth.forget_session(&id);
            match e {
                RtcError::Sdp(m) => AppError::BadSdp(m),
                RtcError::Negotiation(m) => AppError::Unacceptable(m),
                RtcError::Gone | RtcError::UnknownSession => AppError::Internal(e.to_string()),
            }
        })?;
    let info = Arc::new(SessionInfo {
        id: id.clone(),
        stream: stream_name.clone(),
        etag: std::sync::Mutex::new(created.etag.clone()),
        publication_id: publication.id,
        created: Instant::now(),
        client_ip,
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
    // ICE restarts are always offered, trickle ICE when on: PATCH is.
    h.insert("accept-patch", HeaderValue::from_static(TRICKLE_TYPE));
    for link in ice_server_links(&app) {
        if let Ok(v) = HeaderValue::from_str(&link) {
            h.append(header::LINK, v);
        }
    }
    tracing::info!(stream = %stream_name, session = %id, ms = started.elapsed().as_secs_f64() * 1000.0, "session created");
    Ok(resp)
}

/// The session `session` of `stream_name`, if the request may touch it:
/// 404 for an unknown one, 401 without the token it was created with.
fn session_for(
    app: &AppState,
    auth: &Auth,
    stream_name: &str,
    session: &str,
    headers: &HeaderMap,
) -> Result<Arc<SessionInfo>, AppError> {
    let info = app
        .streams
        .session(session)
        .filter(|s| s.stream == stream_name)
        .ok_or(AppError::NotFound)?;
    auth.check_session(&info.id, bearer_token(headers))?;
    Ok(info)
}

/// `DELETE` on a session: 200, everything freed. Its `If-Match` (if any)
/// is ignored (RFC 9725 §4.2).
pub async fn delete(
    State(app): State<AppState>,
    Extension(auth): Extension<Arc<Auth>>,
    Path((stream_name, session)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let info = session_for(&app, &auth, &stream_name, &session, &headers)?;
    app.rtc.close(&info.id).await;
    app.streams.remove_session(&info.id);
    auth.forget_session(&info.id);
    Ok(StatusCode::OK.into_response())
}

/// `GET` on a session: 2xx, no body (RFC 9725 §4.1).
pub async fn get_session(
    State(app): State<AppState>,
    Extension(auth): Extension<Arc<Auth>>,
    Path((stream_name, session)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    session_for(&app, &auth, &stream_name, &session, &headers)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PATCH` on a session (RFC 9725 §4.3): trickle ICE with the session's
/// ETag, or an ICE restart with `If-Match: "*"`. With trickle turned off, a
/// trickle `PATCH` gets 422 (the server supports ICE restarts, not trickle).
pub async fn patch(
    State(app): State<AppState>,
    Extension(auth): Extension<Arc<Auth>>,
    Path((stream_name, session)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let info = session_for(&app, &auth, &stream_name, &session, &headers)?;
    if !content_type_is(&headers, TRICKLE_TYPE) {
        let mut resp = AppError::UnsupportedMediaType {
            expected: TRICKLE_TYPE,
        }
        .into_response();
        resp.headers_mut()
            .insert("accept-patch", HeaderValue::from_static(TRICKLE_TYPE));
        return Ok(resp);
    }
    let if_match = headers
        .get(header::IF_MATCH)
        .ok_or(AppError::PreconditionRequired)?
        .to_str()
        .map_err(|_| AppError::PreconditionFailed)?
        .trim();
    let text = std::str::from_utf8(&body)
        .map_err(|_| AppError::BadRequest("the SDP fragment is not UTF-8".into()))?;
    if if_match == "*" {
        return ice_restart(&app, &info, text).await;
    }
    if !app.streams.config().webrtc.trickle {
        return Err(AppError::Unacceptable(
            "trickle ICE is turned off on this server (webrtc.trickle = false); \
             the SDP offer must carry every candidate (ICE restarts with \
             If-Match: \"*\" are supported)"
                .into(),
        ));
    }
    // Strong comparison (RFC 9110 §13.1.1): any listed tag equal to ours.
    let etag = info.etag();
    if !if_match.split(',').any(|t| t.trim() == etag) {
        return Err(AppError::PreconditionFailed);
    }
    let fragment = trickle::parse(text)
        .map_err(|e| AppError::BadRequest(format!("malformed SDP fragment: {e}")))?;
    let added = app
        .rtc
        .add_remote_candidates(&info.id, fragment.candidates, fragment.end_of_candidates)
        .await
        .map_err(|e| patch_error(e, "SDP fragment"))?;
    tracing::debug!(
        stream = %stream_name,
        session = %info.id,
        added,
        dropped = fragment.dropped,
        end = fragment.end_of_candidates,
        "trickle ICE"
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// An ICE restart (RFC 9725 §4.3.2): the client's new `ice-ufrag`/`ice-pwd`
/// (and candidates, if any) in, 200 with the server's new ones and a new
/// ETag out. A refused restart changes nothing: the session goes on.
async fn ice_restart(app: &AppState, info: &SessionInfo, text: &str) -> Result<Response, AppError> {
    let fragment = trickle::parse(text)
        .map_err(|e| AppError::BadRequest(format!("malformed SDP fragment: {e}")))?;
    let (Some(ufrag), Some(pwd)) = (fragment.ufrag, fragment.pwd) else {
        return Err(AppError::BadRequest(
            "an ICE restart (If-Match: \"*\") needs a=ice-ufrag and a=ice-pwd".into(),
        ));
    };
    let answer = app
        .rtc
        .ice_restart(&info.id, ufrag, pwd, fragment.candidates)
        .await
        .map_err(|e| patch_error(e, "ICE restart"))?;
    let etag = format!("\"{}\"", crate::rtc::random_id(12));
    *lock(&info.etag) = etag.clone();
    tracing::info!(stream = %info.stream, session = %info.id, "ICE restart");
    let mut resp = (StatusCode::OK, answer).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(TRICKLE_TYPE));
    insert(h, header::ETAG, &etag);
    Ok(resp)
}

fn patch_error(e: RtcError, what: &str) -> AppError {
    match e {
        RtcError::Sdp(m) => AppError::BadRequest(format!("malformed {what}: {m}")),
        RtcError::Negotiation(m) => AppError::Unacceptable(format!("{what} refused: {m}")),
        RtcError::UnknownSession => AppError::NotFound,
        RtcError::Gone => AppError::Internal(e.to_string()),
    }
}

/// `OPTIONS` on the endpoint (CORS preflight included): no ICE servers here.
pub async fn options_endpoint() -> Response {
    let mut resp = options("OPTIONS, GET, POST", "Authorization, Content-Type");
    resp.headers_mut()
        .insert("accept-post", HeaderValue::from_static("application/sdp"));
    resp
}

/// `OPTIONS` on a session: what it supports. `PATCH` always (ICE
/// restarts; trickle ICE too unless turned off).
pub async fn options_session() -> Response {
    let mut resp = options(
        "OPTIONS, GET, PATCH, DELETE",
        "Authorization, Content-Type, If-Match",
    );
    resp.headers_mut()
        .insert("accept-patch", HeaderValue::from_static(TRICKLE_TYPE));
    resp
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
