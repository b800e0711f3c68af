//! The web console, embedded in the binary (no CDN, nothing to install):
//! `/` lists the streams live (polling the API), `/watch/{stream}` plays a
//! stream's HLS with hls.js, `/publish/{stream}` publishes the browser's
//! camera and microphone with WHIP. Assets are under `/console/`.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::config::valid_stream_name;
use crate::error::AppError;

const INDEX: &str = include_str!("../../assets/console/index.html");
const WATCH: &str = include_str!("../../assets/console/watch.html");
const PUBLISH: &str = include_str!("../../assets/console/publish.html");

/// `/console/{file}`: name, content type, content.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/console/style.css"),
    ),
    (
        "common.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/console/common.js"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/console/console.js"),
    ),
    (
        "watch.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/console/watch.js"),
    ),
    (
        "publish.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/console/publish.js"),
    ),
    (
        "hls.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/vendor/hls.min.js"),
    ),
    (
        "hls.js-LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../../assets/vendor/hls.js-LICENSE"),
    ),
];

fn page(html: &'static str) -> Response {
    let mut resp = (StatusCode::OK, html).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

pub async fn index() -> Response {
    page(INDEX)
}

pub async fn watch(Path(stream): Path<String>) -> Result<Response, AppError> {
    if !valid_stream_name(&stream) {
        return Err(AppError::NotFound);
    }
    Ok(page(WATCH))
}

pub async fn publish(Path(stream): Path<String>) -> Result<Response, AppError> {
    if !valid_stream_name(&stream) {
        return Err(AppError::NotFound);
    }
    Ok(page(PUBLISH))
}

pub async fn asset(Path(file): Path<String>) -> Result<Response, AppError> {
    let (_, content_type, body) = ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or(AppError::NotFound)?;
    let mut resp = (StatusCode::OK, *body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_a_page_loads_is_served() {
        for html in [INDEX, WATCH, PUBLISH] {
            let mut rest = html;
            let mut found = 0;
            while let Some(i) = rest.find("\"/console/") {
                rest = &rest[i + 10..];
                let name = &rest[..rest.find('"').expect("closing quote")];
                assert!(
                    ASSETS.iter().any(|(n, _, _)| *n == name),
                    "/console/{name} is not served"
                );
                found += 1;
            }
            assert!(found >= 2, "{html}");
        }
        // No resource from another origin.
        for (name, _, body) in ASSETS.iter().filter(|(n, _, _)| !n.starts_with("hls")) {
            let text = std::str::from_utf8(body).expect("UTF-8");
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "{name}"
            );
        }
        for html in [INDEX, WATCH, PUBLISH] {
            assert!(!html.contains("http://") && !html.contains("https://"));
        }
    }
}
