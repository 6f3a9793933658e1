//! Rotary position embedding frequencies, with the scalings that
//! `config.json` can ask for. Pure data: backends apply the rotation.

use crate::config::RopeScaling;

/// Inverse frequencies of the rotary embedding, one per pair of channels.
#[derive(Debug, Clone)]
pub struct Rope {
    pub head_dim: usize,
    pub inv_freq: Vec<f32>,
    /// Positions are multiplied by this before rotation (linear scaling).
    pub position_scale: f32,
}

impl Rope {
    /// Builds the frequencies as Hugging Face's `LlamaRotaryEmbedding` does,
    /// rotating channel `i` with channel `i + head_dim/2` (not interleaved).
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let half = head_dim / 2;
        let mut inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        let mut position_scale = 1.0;
        match *scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => position_scale = (1.0 / factor) as f32,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_freq_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_freq_wavelen {
                        let smooth = (old_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Rope {
            head_dim,
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
            position_scale,
        }
    }

    /// `(cos, sin)` of every channel pair at one position.
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = pos as f32 * self.position_scale;
        for (i, &f) in self.inv_freq.iter().enumerate() {
            // The angle is formed in f32 as Hugging Face does, then its
            // cosine is taken accurately.
            let angle = (p * f) as f64;
            cos[i] = angle.cos() as f32;
            sin[i] = angle.sin() as f32;
        }
    }
}
