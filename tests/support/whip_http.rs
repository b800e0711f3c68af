//! HTTP helpers the WHIP tests share: a client, genuine offers, and the
//! check that an error is an RFC 9457 problem document.
#![allow(dead_code)]

use std::time::Duration;

use reqwest::header::{self, HeaderMap};
use reqwest::{Client, Response, StatusCode};

use super::server::Server;
use super::webrtc_publisher::Publisher;

pub const PROBLEM_JSON: &str = "application/problem+json";

pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .expect("an HTTP client")
}

/// A genuine audio + video offer from webrtc-rs (H264 + Opus, sendonly), made
/// for `stream` on `server` but not sent anywhere.
pub async fn genuine_offer(server: &Server, stream: &str) -> anyhow::Result<String> {
    let url = url::Url::parse(&server.url(&format!("/whip/{stream}")))?;
    let mut publisher = Publisher::new(&url, true, true).await?;
    let offer = publisher.offer().await;
    publisher.close().await;
    let offer = offer?;
    assert!(
        offer.contains("m=video") && offer.contains("m=audio"),
        "{offer}"
    );
    Ok(offer)
}

pub async fn post_sdp(
    client: &Client,
    server: &Server,
    stream: &str,
    token: Option<&str>,
    sdp: impl AsRef<[u8]>,
) -> reqwest::Result<Response> {
    let mut req = client
        .post(server.url(&format!("/whip/{stream}")))
        .header(header::CONTENT_TYPE, "application/sdp")
        .body(sdp.as_ref().to_vec());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await
}

pub fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Checks an error answer: the status, `application/problem+json` with a
/// body agreeing on the status, CORS; returns the headers and the body.
pub async fn expect_problem(
    resp: Response,
    status: StatusCode,
    what: &str,
) -> (HeaderMap, serde_json::Value) {
    let got = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(got, status, "{what}: {text}");
    assert_eq!(
        header_str(&headers, header::CONTENT_TYPE),
        PROBLEM_JSON,
        "{what}: Content-Type of a {status} (body {text:?})"
    );
    assert_eq!(
        header_str(&headers, header::ACCESS_CONTROL_ALLOW_ORIGIN),
        "*",
        "{what}: CORS on a {status}"
    );
    let body: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: problem body is not JSON ({e}): {text:?}"));
    assert_eq!(body["status"], status.as_u16(), "{what}: {body}");
    assert!(body["title"].is_string(), "{what}: {body}");
    assert!(body["detail"].is_string(), "{what}: {body}");
    (headers, body)
}

pub fn detail(body: &serde_json::Value) -> &str {
    body["detail"].as_str().unwrap_or_default()
}
