//! The server's shared state: the served models (each a name, an engine
//! handle and its metrics), the API key and the body limit.

use std::time::{SystemTime, UNIX_EPOCH};

use lmq_turbomind::engine::EngineHandle;

use crate::error::ApiError;
use crate::metrics::ModelMetrics;

/// A model to serve: the name clients put in `model`, and its engine.
pub struct ServedModel {
    pub name: String,
    pub engine: EngineHandle,
}

pub(crate) struct Model {
    pub name: String,
    pub engine: EngineHandle,
    pub metrics: ModelMetrics,
}

pub struct App {
    pub(crate) models: Vec<Model>,
    pub(crate) api_key: Option<String>,
    pub(crate) max_request_bytes: u64,
    /// When the server started (the `created` of `/v1/models`).
    pub(crate) started: u64,
}

impl App {
    pub(crate) fn new(
        models: Vec<ServedModel>,
        api_key: Option<String>,
        max_request_bytes: u64,
    ) -> Self {
        App {
            models: models
                .into_iter()
                .map(|m| Model {
                    name: m.name,
                    engine: m.engine,
                    metrics: ModelMetrics::default(),
                })
                .collect(),
            api_key,
            max_request_bytes,
            started: unix_time(),
        }
    }

    pub(crate) fn names(&self) -> Vec<&str> {
        self.models.iter().map(|m| m.name.as_str()).collect()
    }

    /// The index of the model a request names. With one model served,
    /// `model` may be left out.
    pub(crate) fn model_index(&self, asked: Option<&str>) -> Result<usize, ApiError> {
        match asked {
            Some(name) => self
                .models
                .iter()
                .position(|m| m.name == name)
                .ok_or_else(|| ApiError::model_not_found(name, &self.names())),
            None if self.models.len() == 1 => Ok(0),
            None => Err(ApiError::invalid(
                "model",
                format!(
                    "`model` is required; models served here: {}",
                    self.names().join(", ")
                ),
            )),
        }
    }

    /// Checks an `Authorization: Bearer KEY` header value against the key.
    pub(crate) fn authorize(&self, header: Option<&[u8]>) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let Some(value) = header else {
            return Err(ApiError::unauthorized(
                "Missing API key: send the header `Authorization: Bearer YOUR_KEY`",
            ));
        };
        let given = value.strip_prefix(b"Bearer ").unwrap_or(b"");
        if constant_time_eq(given, key.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("Incorrect API key provided"))
        }
    }
}

/// Compares without returning early, so timing does not reveal how much
/// of a guessed key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= (x ^ b.get(i).copied().unwrap_or(!x)) as usize;
    }
    diff == 0
}

pub(crate) fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random 64-bit value (request ids, seeds when none is given), from the
/// standard library's per-process random hasher keys.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert_ne!(random_u64(), random_u64());
    }
}
