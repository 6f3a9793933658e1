//! Writing a model folder safely: everything goes into a hidden temporary
//! folder next to the destination, which is renamed into place only once
//! complete.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A model folder being written.
pub struct StagedDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Starts writing `dest`. Fails if it exists, unless `overwrite`.
    pub fn new(dest: &Path, overwrite: bool) -> Result<Self> {
        if dest.exists() && !overwrite {
            return Err(Error::Output {
                path: dest.to_path_buf(),
                message: "already exists (pass --force to replace it)".into(),
            });
        }
        // A destination must name a folder of its own: "." or ".." would
        // make the staging folder live inside it, and --force would then
        // delete the user's working directory.
        let named = dest.file_name().is_some_and(|n| n != "." && n != "..");
        if !named
            || dest.components().next_back().is_some_and(|c| {
                matches!(
                    c,
                    std::path::Component::CurDir | std::path::Component::ParentDir
                )
            })
        {
            return Err(Error::Output {
                path: dest.to_path_buf(),
                message: "the output must be a new folder's path, not . or ..".into(),
            });
        }
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(StagedDir {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// Path of a file inside the staging folder.
    pub fn path(&self, file: &str) -> PathBuf {
        self.tmp.join(file)
    }

    pub fn write(&self, file: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(file);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))
    }

    pub fn write_json(&self, file: &str, value: &serde_json::Value) -> Result<()> {
        let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::Output {
            path: self.path(file),
            message: e.to_string(),
        })?;
        text.push('\n');
        self.write(file, text.as_bytes())
    }

    /// Moves the finished folder into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.dest.exists() {
            std::fs::remove_dir_all(&self.dest).map_err(|e| Error::io(&self.dest, e))?;
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.committed = true;
        Ok(self.dest.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: an error path must not leave a partial folder.
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Shards are cut at about this many bytes, which bounds the memory a
/// writer holds.
pub const DEFAULT_SHARD_BYTES: usize = 2 << 30;

/// One tensor waiting to be written.
struct PendingTensor {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Writes tensors into safetensors shards of bounded size inside a staged
/// folder, then names them as Hugging Face does (`model.safetensors`, or
/// `model-0000i-of-0000N.safetensors` plus an index).
pub struct ShardWriter<'a> {
    staged: &'a StagedDir,
    max_shard_bytes: usize,
    pending: Vec<PendingTensor>,
    pending_bytes: usize,
    shards: Vec<(String, Vec<String>)>,
    pub total_bytes: u64,
}

impl<'a> ShardWriter<'a> {
    pub fn new(staged: &'a StagedDir, max_shard_bytes: usize) -> Self {
        ShardWriter {
            staged,
            max_shard_bytes,
            pending: Vec::new(),
            pending_bytes: 0,
            shards: Vec::new(),
            total_bytes: 0,
        }
    }

    pub fn push(
        &mut self,
        name: String,
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    ) -> Result<()> {
        self.pending_bytes += bytes.len();
        self.total_bytes += bytes.len() as u64;
        self.pending.push(PendingTensor {
            name,
            dtype,
            shape,
            bytes,
        });
        if self.pending_bytes >= self.max_shard_bytes {
            self.flush()?;
        }
        Ok(())
    }

    /// Adds an fp16 tensor from f32 values; values beyond fp16's range are
    /// an error rather than a silent infinity.
    pub fn push_f16(&mut self, name: String, shape: Vec<usize>, values: &[f32]) -> Result<()> {
        if let Some(i) = values
            .iter()
            .position(|v| !half::f16::from_f32(*v).is_finite())
        {
            return Err(Error::Invalid {
                message: format!(
                    "{name}: value {} at index {i} does not fit in fp16",
                    values[i]
                ),
            });
        }
        let bytes = values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        self.push(name, safetensors::Dtype::F16, shape, bytes)
    }

    fn flush(&mut self) -> Result<()> {
        let file = format!("shard-{:05}.safetensors", self.shards.len());
        let path = self.staged.path(&file);
        let tensors = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let output_error = |message: String| Error::Output {
            path: path.clone(),
            message,
        };
        let views = tensors
            .iter()
            .map(|t| {
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                    .map(|v| (t.name.clone(), v))
                    .map_err(|e| output_error(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(io) => Error::io(&path, io),
            other => output_error(other.to_string()),
        })?;
        self.shards
            .push((file, tensors.into_iter().map(|t| t.name).collect()));
        Ok(())
    }

    /// Writes what is pending and gives the shards their final names.
    /// Returns the number of shards.
    pub fn finish(mut self) -> Result<usize> {
        if !self.pending.is_empty() || self.shards.is_empty() {
            self.flush()?;
        }
        let staged = self.staged;
        let rename = |from: &str, to: &str| {
            std::fs::rename(staged.path(from), staged.path(to))
                .map_err(|e| Error::io(staged.path(to), e))
        };
        if let [(only, _)] = self.shards.as_slice() {
            rename(only, "model.safetensors")?;
            return Ok(1);
        }
        let total = self.shards.len();
        let mut weight_map = serde_json::Map::new();
        for (i, (file, names)) in self.shards.iter().enumerate() {
            let name = format!("model-{:05}-of-{total:05}.safetensors", i + 1);
            rename(file, &name)?;
            for n in names {
                weight_map.insert(n.clone(), serde_json::Value::String(name.clone()));
            }
        }
        staged.write_json(
            "model.safetensors.index.json",
            &serde_json::json!({"metadata": {}, "weight_map": weight_map}),
        )?;
        Ok(total)
    }
}
