//! HLS for viewers: playlists, segments, init segments and LL-HLS parts,
//! from the stream's in-memory store (shared `Bytes`, made once for every
//! viewer) while its output runs, else from the data directory.
//!
//! LL-HLS playlists honour the RFC 8216bis delivery directives: `_HLS_msn`
//! and `_HLS_part` hold the request (asynchronously, on the store's watch
//! channel) until the playlist has that segment or part, `400` when it is
//! too far ahead, `503` after three target durations; `_HLS_skip=YES` (or
//! `v2`) answers a delta update. A request for the part the preload hint
//! names waits for it the same way; other missing parts are `404`.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::AppState;
use crate::config::valid_stream_name;
use crate::error::{self, AppError};
use crate::hls::store::{self, BlockError, Directives};
use crate::preset::valid_rendition_name;

/// What a file name under `/hls/{stream}/` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Playlist,
    /// `segN.ts`
    TsSegment,
    /// `segN.m4s`
    Fmp4Segment,
    /// `initN.mp4`
    Init,
    /// `partN.m4s`
    Part(u64),
}

impl Kind {
    fn of(name: &str) -> Option<Self> {
        if name == "index.m3u8" {
            return Some(Kind::Playlist);
        }
        if numbered(name, "seg", ".ts").is_some() {
            return Some(Kind::TsSegment);
        }
        if numbered(name, "seg", ".m4s").is_some() {
            return Some(Kind::Fmp4Segment);
        }
        if numbered(name, "init", ".mp4").is_some() {
            return Some(Kind::Init);
        }
        numbered(name, "part", ".m4s").map(Kind::Part)
    }

    /// Content type and cache policy.
    fn headers(self) -> (&'static str, &'static str) {
        // Media never changes once listed; live playlists change all the time.
        const IMMUTABLE: &str = "public, max-age=86400, immutable";
        match self {
            Kind::Playlist => ("application/vnd.apple.mpegurl", "no-cache"),
            Kind::TsSegment => ("video/mp2t", IMMUTABLE),
            Kind::Init => ("video/mp4", IMMUTABLE),
            Kind::Fmp4Segment | Kind::Part(_) => ("video/iso.segment", IMMUTABLE),
        }
    }
}

/// The `Content-Type` and `Cache-Control` of an HLS file `name`
/// (`index.m3u8`, `seg3.ts`, …) as `/hls/` serves it, for storage backends
/// that serve it themselves.
pub fn file_headers(name: &str) -> Option<(&'static str, &'static str)> {
    Kind::of(name).map(Kind::headers)
}

/// `PREFIX<digits>SUFFIX` (no path tricks): the number.
fn numbered(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `/hls/{stream}/{file}`: a stream's playlist (the master playlist of a
/// ladder) and media.
pub async fn get(
    State(app): State<AppState>,
    Path((stream, file)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, AppError> {
    serve(&app, &stream, None, &file, query).await
}

/// `/hls/{stream}/{rendition}/{file}`: a ladder rendition's media playlist
/// and media.
pub async fn get_rendition(
    State(app): State<AppState>,
    Path((stream, rendition, file)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, AppError> {
    serve(&app, &stream, Some(&rendition), &file, query).await
}

async fn serve(
    app: &AppState,
    stream: &str,
    rendition: Option<&str>,
    file: &str,
    query: Option<String>,
) -> Result<Response, AppError> {
    if !valid_stream_name(stream) || rendition.is_some_and(|r| !valid_rendition_name(r)) {
        return Err(AppError::NotFound);
    }
    let mut dir = app
        .streams
        .config()
        .server
        .data_dir
        .join("hls")
        .join(stream);
    if let Some(r) = rendition {
        dir.push(r);
    }
    let kind = Kind::of(file).ok_or(AppError::NotFound)?;
    let from_memory = match store::lookup(&dir) {
        Some(store) => {
            let timeout = store.edge().block_timeout();
            let found = match kind {
                Kind::Playlist => {
                    let directives = Directives::parse(query.as_deref().unwrap_or(""))
                        .map_err(|e| AppError::BadRequest(e.to_owned()))?;
                    store.reload(directives, timeout).await
                }
                Kind::Part(number) => store.part(number, timeout).await.map(Some),
                _ => Ok(store.get(file)),
            };
            match found {
                Ok(found) => found,
                Err(BlockError::BadRequest(detail)) => {
                    return Err(AppError::BadRequest(detail.to_owned()));
                }
                Err(BlockError::NotFound) => return Err(AppError::NotFound),
                // Not an error of ours (a stalled publisher): no error log.
                Err(e @ BlockError::Unavailable) => {
                    return Ok(error::problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &e.to_string(),
                    ));
                }
            }
        }
        None => None,
    };
    let data = match from_memory {
        Some(data) => data,
        // Parts live in memory only.
        None if matches!(kind, Kind::Part(_)) => return Err(AppError::NotFound),
        None => {
            let path = dir.join(file);
            let data = tokio::fs::read(&path).await.map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    AppError::NotFound
                } else {
                    AppError::Internal(format!("reading {}: {e}", path.display()))
                }
            })?;
            Bytes::from(data)
        }
    };
    let (content_type, cache) = kind.headers();
    let mut resp = (StatusCode::OK, data).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert_eq!(Kind::of("index.m3u8"), Some(Kind::Playlist));
        assert_eq!(Kind::of("seg12.ts"), Some(Kind::TsSegment));
        assert_eq!(Kind::of("seg12.m4s"), Some(Kind::Fmp4Segment));
        assert_eq!(Kind::of("init0.mp4"), Some(Kind::Init));
        assert_eq!(Kind::of("part7.m4s"), Some(Kind::Part(7)));
        for bad in [
            "seg.ts",
            "seg1.ts/../x",
            "../seg1.ts",
            "seg-1.m4s",
            "init.mp4",
            "part1.mp4",
            "part99999999999999999999.m4s",
            "index.m3u",
            "seg+1.ts",
        ] {
            assert_eq!(Kind::of(bad), None, "{bad}");
        }
        assert_eq!(Kind::Init.headers().0, "video/mp4");
        assert_eq!(Kind::Part(1).headers().0, "video/iso.segment");
        assert_eq!(Kind::Fmp4Segment.headers().0, "video/iso.segment");
    }
}
