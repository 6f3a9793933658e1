//! Reading a request body as JSON with OpenAI-style errors. axum's own
//! `Json` extractor answers in plain text and insists on a content type;
//! this one answers every failure with an [`ApiError`] that says what is
//! wrong and, for a field, names it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::app::App;
use crate::error::ApiError;

/// A request body that is a JSON object. Fields are read from it with
/// [`field_set`], so a bad field is named in the error.
pub struct JsonBody(pub Value);

impl FromRequest<Arc<App>> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Self, ApiError> {
        let limit = app.max_request_bytes;
        // Refuse a declared oversize body before reading any of it.
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ApiError::too_large(limit));
        }
        // The body limit itself is enforced by the `DefaultBodyLimit` layer
        // (set to the same value), which also covers chunked bodies.
        let bytes = Bytes::from_request(req, app).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(limit)
            } else {
                ApiError::bad_request(format!("Could not read the request body: {rejection}"))
            }
        })?;
        parse_object(&bytes).map(JsonBody)
    }
}

/// Parses a body that must be a JSON object.
pub fn parse_object(bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "The request body is empty; send a JSON object",
        ));
    }
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(ApiError::bad_request(format!(
            "The request body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("The request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object",
        ));
    }
    Ok(value)
}

/// Reads the fields of `T` from a parsed body; a field of the wrong type
/// or range becomes a 400 that names it (`messages[0].content`).
pub fn field_set<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." || path.is_empty() {
            ApiError::bad_request(format!("Invalid request: {inner}"))
        } else {
            ApiError::invalid(path.clone(), format!("Invalid `{path}`: {inner}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Fields {
        #[allow(dead_code)]
        temperature: Option<f32>,
    }

    #[test]
    fn bad_bodies_say_what_is_wrong() {
        let e = parse_object(b"{\"a\": ").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse_object(b"{\"a\": \"\xff\"}").unwrap_err();
        assert!(e.message.contains("UTF-8"), "{}", e.message);
        let e = parse_object(b"[1]").unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
        let e = field_set::<Fields>(&serde_json::json!({"temperature": "hot"}))
            .err()
            .unwrap();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(e.message.contains("invalid type"), "{}", e.message);
    }
}
