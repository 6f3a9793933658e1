//! Memory-mapped safetensors checkpoints, single-file or sharded.
//!
//! Headers are parsed and validated once at open time (offsets inside the
//! file, file length equal to what the header declares), so a truncated or
//! corrupt file is rejected with its path before any tensor is read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use crate::error::{read_json, Error, Result};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
}

/// A read-only view of every tensor in a checkpoint folder.
pub struct Checkpoint {
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

/// Dtype and shape of a stored tensor.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
            });
        }
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index_path.exists() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index_path, "field \"weight_map\" is missing"))?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            return Err(Error::NotFound { path: single });
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for path in files {
            let shard = open_shard(&path)?;
            for name in shard.metadata.tensors().keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(shard);
        }
        Ok(Checkpoint { shards, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The path of the file that holds `name` (or of the first shard).
    pub fn path_of(&self, name: &str) -> &Path {
        let shard = self.index.get(name).copied().unwrap_or(0);
        self.shards
            .get(shard)
            .map(|s| s.path.as_path())
            .unwrap_or(Path::new("model.safetensors"))
    }

    pub fn meta(&self, name: &str) -> Option<TensorMeta> {
        let shard = &self.shards[*self.index.get(name)?];
        let info = shard.metadata.info(name)?;
        Some(TensorMeta {
            dtype: info.dtype,
            shape: info.shape.clone(),
        })
    }

    /// The raw little-endian bytes of a tensor, borrowed from the mapping.
    pub fn raw(&self, name: &str) -> Result<(TensorMeta, &[u8])> {
        let &shard_idx = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path_of(name).to_path_buf(),
            name: name.to_string(),
        })?;
        let shard = &self.shards[shard_idx];
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| Error::MissingTensor {
                path: shard.path.clone(),
                name: name.to_string(),
            })?;
        let (begin, end) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + begin..shard.data_start + end];
        Ok((
            TensorMeta {
                dtype: info.dtype,
                shape: info.shape.clone(),
            },
            bytes,
        ))
    }

    /// The raw bytes of a tensor whose shape must be `expected_shape`.
    fn shaped_raw(&self, name: &str, expected_shape: &[usize]) -> Result<(TensorMeta, &[u8])> {
        let (meta, bytes) = self.raw(name)?;
        if meta.shape != expected_shape {
            return Err(Error::ShapeMismatch {
                path: self.path_of(name).to_path_buf(),
                name: name.to_string(),
                expected: expected_shape.to_vec(),
                actual: meta.shape,
            });
        }
        Ok((meta, bytes))
    }

    /// Reads a floating-point tensor as f32, checking its shape.
    pub fn f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let (meta, bytes) = self.shaped_raw(name, expected_shape)?;
        decode_f32(meta.dtype, bytes).ok_or_else(|| Error::UnsupportedDtype {
            path: self.path_of(name).to_path_buf(),
            name: name.to_string(),
            dtype: format!("{:?}", meta.dtype),
        })
    }
}

impl Checkpoint {
    fn checked_raw(&self, name: &str, expected_shape: &[usize], dtype: Dtype) -> Result<&[u8]> {
        let (meta, bytes) = self.shaped_raw(name, expected_shape)?;
        if meta.dtype != dtype {
            return Err(Error::UnsupportedDtype {
                path: self.path_of(name).to_path_buf(),
                name: name.to_string(),
                dtype: format!("{:?} (expected {dtype:?})", meta.dtype),
            });
        }
        Ok(bytes)
    }

    /// Reads an I32 tensor, checking shape and dtype.
    pub fn i32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<i32>> {
        let bytes = self.checked_raw(name, expected_shape, Dtype::I32)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Reads an F16 tensor, checking shape and dtype.
    pub fn f16(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f16>> {
        let bytes = self.checked_raw(name, expected_shape, Dtype::F16)?;
        Ok(bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]))
            .collect())
    }
}

/// Converts little-endian F32/F16/BF16 bytes to f32; `None` for other dtypes.
pub fn decode_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(out)
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only and lives as long as the Checkpoint.
    // A checkpoint that another process truncates while we run is outside
    // what any mmap-based loader (safetensors, llama.cpp) can defend against.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            message: describe_safetensors_error(&e, mmap.len()),
        })?;
    Ok(Shard {
        path: path.to_path_buf(),
        data_start: 8 + header_len,
        mmap,
        metadata,
    })
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError, len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("file is {len} bytes, too short for a safetensors header"),
        E::InvalidHeaderLength => {
            "the header length points past the end of the file (truncated?)".into()
        }
        E::MetadataIncompleteBuffer => {
            "the tensor data is shorter or longer than the header declares (truncated or corrupt)"
                .into()
        }
        other => format!("{other}"),
    }
}
