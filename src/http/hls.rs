//! HLS for viewers: playlists and segments from the data directory.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::config::valid_stream_name;
use crate::error::AppError;

pub async fn get(
    State(app): State<AppState>,
    Path((stream, file)): Path<(String, String)>,
) -> Result<Response, AppError> {
    if !valid_stream_name(&stream) {
        return Err(AppError::NotFound);
    }
    let (content_type, cache) = if file == "index.m3u8" {
        // Live playlists change every segment.
        ("application/vnd.apple.mpegurl", "no-cache")
    } else if is_segment_name(&file) {
        // A segment never changes once listed.
        ("video/mp2t", "public, max-age=86400, immutable")
    } else {
        return Err(AppError::NotFound);
    };
    let path = app
        .streams
        .config()
        .server
        .data_dir
        .join("hls")
        .join(&stream)
        .join(&file);
    let data = tokio::fs::read(&path).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            AppError::NotFound
        } else {
            AppError::Internal(format!("reading {}: {e}", path.display()))
        }
    })?;
    let mut resp = (StatusCode::OK, data).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    Ok(resp)
}

/// `seg<digits>.ts`, nothing else (no path tricks).
fn is_segment_name(name: &str) -> bool {
    name.strip_prefix("seg")
        .and_then(|n| n.strip_suffix(".ts"))
        .is_some_and(|n| !n.is_empty() && n.len() <= 20 && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn segment_names() {
        assert!(super::is_segment_name("seg12.ts"));
        assert!(!super::is_segment_name("seg.ts"));
        assert!(!super::is_segment_name("seg1.ts/../x"));
        assert!(!super::is_segment_name("../seg1.ts"));
    }
}
