//! The `--config models.yaml` format of `lmq serve`: the models to serve,
//! each with its folder, served name and engine options. An option left
//! out takes the value of the command-line flag of the same name.
//!
//! ```yaml
//! models:
//!   - model: ~/.cache/lmq/models/smollm2-135m   # relative paths: to this file
//!     name: smollm2                             # default: the folder's name
//!   - model: smollm2-awq
//!     name: smollm2-awq
//!     kv_cache_dtype: int8
//!     kv_cache_bytes: 256M
//!     max_batch_size: 32
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::ServeError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsFile {
    pub models: Vec<ModelEntry>,
}

/// One served model; the engine fields mirror the `lmq serve` flags.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The model folder.
    pub model: PathBuf,
    /// The name clients use in `model`.
    #[serde(alias = "served_model_name")]
    pub name: Option<String>,
    pub kv_cache_dtype: Option<String>,
    pub kv_cache_mode: Option<String>,
    pub max_batch_size: Option<usize>,
    pub max_prefill_tokens: Option<usize>,
    pub cache_block_seq_len: Option<usize>,
    pub cache_max_entry_count: Option<f64>,
    pub kv_cache_bytes: Option<ByteSize>,
    pub enable_prefix_caching: Option<bool>,
    pub max_queued_requests: Option<usize>,
}

/// A size in bytes: a number, or text with a unit (`512M`, `2GiB`) that
/// the binary parses as it parses `--kv-cache-bytes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ModelsFile {
    /// Reads and checks a models file. Relative model paths become
    /// relative to the file's folder, and `~/` expands to `$HOME`.
    pub fn from_path(path: &Path) -> Result<Self, ServeError> {
        let text = std::fs::read_to_string(path).map_err(|source| ServeError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        let mut file = Self::parse(&text).map_err(|message| ServeError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for entry in &mut file.models {
            entry.model = resolve(base, &entry.model);
        }
        Ok(file)
    }

    /// Parses and checks the YAML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: ModelsFile = yaml_serde::from_str(text).map_err(|e| e.to_string())?;
        if file.models.is_empty() {
            return Err("`models` lists no model".into());
        }
        for (i, entry) in file.models.iter().enumerate() {
            if entry.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                return Err(format!("models[{i}].name is empty"));
            }
        }
        Ok(file)
    }
}

fn resolve(base: &Path, model: &Path) -> PathBuf {
    if let Ok(rest) = model.strip_prefix("~") {
        if let Some(home) = std::env::var_os("HOME") {
            return Path::new(&home).join(rest);
        }
    }
    if model.is_absolute() {
        model.to_path_buf()
    } else {
        base.join(model)
    }
}

/// The name a model folder is served under by default: its last
/// component, after resolving `.` and symlinks.
pub fn default_served_name(dir: &Path) -> String {
    std::fs::canonicalize(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_file_parses_and_rejects_typos() {
        let f = ModelsFile::parse(
            "models:\n  - model: a\n    name: x\n    kv_cache_bytes: 64M\n  - model: /b\n    max_batch_size: 4\n    kv_cache_bytes: 1000\n",
        )
        .unwrap();
        assert_eq!(f.models.len(), 2);
        assert!(matches!(&f.models[0].kv_cache_bytes, Some(ByteSize::Text(t)) if t == "64M"));
        assert!(matches!(
            f.models[1].kv_cache_bytes,
            Some(ByteSize::Bytes(1000))
        ));
        assert_eq!(f.models[1].max_batch_size, Some(4));
        let e = ModelsFile::parse("models:\n  - model: a\n    max_batch: 4\n").unwrap_err();
        assert!(e.contains("max_batch"), "{e}");
        assert!(ModelsFile::parse("models: []\n").is_err());
        assert_eq!(
            resolve(Path::new("/etc/lmq"), Path::new("m")),
            Path::new("/etc/lmq/m")
        );
        assert_eq!(
            resolve(Path::new("/etc/lmq"), Path::new("/m")),
            Path::new("/m")
        );
    }
}
