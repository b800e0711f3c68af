//! Errors that reach HTTP clients, and the one place that maps them to status
//! codes. Bodies are RFC 9457 `application/problem+json`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("expected Content-Type {expected}")]
    UnsupportedMediaType { expected: &'static str },
    #[error("malformed SDP offer: {0}")]
    BadSdp(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unacceptable(String),
    #[error("a valid bearer token is required to publish this stream")]
    Unauthorized,
    #[error("stream `{0}` is not enabled")]
    StreamDisabled(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("no such resource")]
    NotFound,
    /// 404 saying what is missing.
    #[error("{0}")]
    NotFoundDetail(String),
    #[error("stream `{0}` already has a publisher")]
    StreamBusy(String),
    #[error("server is at capacity")]
    Overloaded,
    #[error("too many requests from this address; retry in {retry_after} s")]
    RateLimited { retry_after: u64 },
    /// The offer belongs to another node (redirect mode).
    #[error("this stream is served by {0}")]
    Redirect(String),
    #[error("{0}")]
    AuthUnavailable(String),
    #[error("this request needs an If-Match header with the session's ETag")]
    PreconditionRequired,
    #[error("If-Match does not match the session's current ETag")]
    PreconditionFailed,
    #[error("request body too large: at most {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// An extractor's own refusal (JSON body, path), with its status.
    #[error("{detail}")]
    Rejected { status: StatusCode, detail: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::BadSdp(_) | AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::Unacceptable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Unauthorized => StatusCode::UNAUTHORIZED,
            AppError::StreamDisabled(_) | AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound | AppError::NotFoundDetail(_) => StatusCode::NOT_FOUND,
            AppError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::Redirect(_) => StatusCode::TEMPORARY_REDIRECT,
            AppError::StreamBusy(_) => StatusCode::CONFLICT,
            AppError::Overloaded | AppError::AuthUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::PreconditionRequired => StatusCode::PRECONDITION_REQUIRED,
            AppError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            AppError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Rejected { status, .. } => *status,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "request refused");
        }
        let mut resp = problem(status, &self.to_string());
        let h = resp.headers_mut();
        match self {
            AppError::Unauthorized => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"whipgate\""),
                );
            }
            AppError::Overloaded | AppError::AuthUnavailable(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            AppError::RateLimited { retry_after } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            AppError::Redirect(url) => {
                if let Ok(v) = HeaderValue::from_str(&url) {
                    h.insert(header::LOCATION, v);
                }
            }
            _ => {}
        }
        resp
    }
}

/// An RFC 9457 problem document.
pub fn problem(status: StatusCode, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    resp
}
