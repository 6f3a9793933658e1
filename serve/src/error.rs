//! Errors: [`ApiError`] is what a client sees (OpenAI's JSON shape and the
//! right HTTP status); [`ServeError`] is what stops the server from
//! starting or running.
//!
//! Every rejection of a request goes through [`ApiError`], so no handler
//! or extractor can answer with axum's plain-text defaults.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use lmq_turbomind::engine::SubmitError;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot read {path}: {source}")]
    ReadConfig {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("{0}")]
    InvalidOption(String),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// An error answered to a client: `{"error": {"message", "type", "param",
/// "code"}}` with `status`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (overload only).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 about one request parameter.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::bad_request(message);
        e.param = Some(param.into());
        e
    }

    /// 400 about the request as a whole (unreadable body, bad JSON).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn model_not_found(asked: &str, served: &[&str]) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "The model `{asked}` does not exist. Models served here: {}",
                served.join(", ")
            ),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message);
        e.code = Some("invalid_api_key");
        e
    }

    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body is larger than the server's limit of {limit} bytes (--max-request-bytes)"),
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "This method is not allowed on this path",
        )
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// Maps an engine refusal; `prompt_param` names the field the prompt
    /// came from (`prompt` or `messages`).
    pub fn from_submit(e: SubmitError, prompt_param: &str) -> Self {
        match e {
            SubmitError::InvalidRequest(message) => {
                let mut err = Self::bad_request(message);
                err.param = Some(prompt_param.into());
                err
            }
            SubmitError::PromptTooLong { .. } => {
                let mut err = Self::invalid(prompt_param, e.to_string());
                err.code = Some("context_length_exceeded");
                err
            }
            SubmitError::QueueFull { .. } => {
                let mut err = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    e.to_string(),
                );
                err.code = Some("queue_full");
                err.retry_after = Some(1);
                err
            }
            SubmitError::Stopped => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "The model's engine has stopped",
            ),
        }
    }

    /// The JSON body, also sent as a stream's last chunk when a request
    /// fails after streaming began.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
