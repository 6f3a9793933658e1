//! Calibration samples: seeded random windows of tokens from a text or
//! JSONL file (`calib_data/calib.txt` by default).

use std::path::Path;

use lmq_turbomind::tokenizer::Tokenizer;

use crate::error::{Error, Result};
use crate::rng::SplitMix;

/// How many windows of how many tokens to draw, and from where.
#[derive(Debug, Clone)]
pub struct CalibConfig {
    pub samples: usize,
    pub seqlen: usize,
    pub seed: u64,
}

/// Reads calibration text. A `.jsonl` file contributes the `"text"` field
/// of each line; anything else is plain text.
pub fn read_text(path: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let text = if path.extension().is_some_and(|e| e == "jsonl") {
        let mut out = String::new();
        for (n, line) in raw
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Invalid {
                message: format!("{}:{}: not JSON: {e}", path.display(), n + 1),
            })?;
            let t = v
                .get("text")
                .and_then(|t| t.as_str())
                .ok_or_else(|| Error::Invalid {
                    message: format!("{}:{}: no string field \"text\"", path.display(), n + 1),
                })?;
            out.push_str(t);
            out.push_str("\n\n");
        }
        out
    } else {
        raw
    };
    if text.trim().is_empty() {
        return Err(Error::Invalid {
            message: format!("{}: the calibration file is empty", path.display()),
        });
    }
    Ok(text)
}

/// Tokenizes the text and draws `samples` windows of `seqlen` tokens at
/// seeded random offsets.
pub fn sample_windows(
    text: &str,
    tokenizer: &Tokenizer,
    cfg: &CalibConfig,
    source: &Path,
) -> Result<Vec<Vec<u32>>> {
    if cfg.samples == 0 || cfg.seqlen < 2 {
        return Err(Error::Invalid {
            message: format!(
                "--calib-samples must be >= 1 and --calib-seqlen >= 2; got {} and {}",
                cfg.samples, cfg.seqlen
            ),
        });
    }
    let ids = tokenizer.encode(text)?;
    if ids.len() < cfg.seqlen {
        return Err(Error::Invalid {
            message: format!(
                "{}: {} tokens, fewer than one --calib-seqlen window of {}",
                source.display(),
                ids.len(),
                cfg.seqlen
            ),
        });
    }
    // SplitMix keeps sample positions a function of the seed alone.
    let mut rng = SplitMix::new(cfg.seed);
    let span = (ids.len() - cfg.seqlen + 1) as u64;
    Ok((0..cfg.samples)
        .map(|_| {
            let start = (rng.next() % span) as usize;
            ids[start..start + cfg.seqlen].to_vec()
        })
        .collect())
}
