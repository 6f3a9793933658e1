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
