//! Tests of the key-factor search: the factors returned are the ones whose
//! loss is reported, the search beats no smoothing by a wide margin where
//! keys have outlier channels, and a head-wide constant on the factors
//! leaves the quantized attention unchanged (why they may be normalized).
use super::*;
use crate::rng::SplitMix;

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = 16;

fn shape() -> AttnShape {
    AttnShape {
        num_heads: HEADS,
        num_kv_heads: KV_HEADS,
        head_dim: HD,
        num_layers: 1,
    }
}

fn random(rng: &mut SplitMix, rows: usize, cols: usize, scale: &dyn Fn(usize) -> f32) -> Matrix {
    let data = (0..rows * cols)
        .map(|i| (rng.unit_f32() * 2.0 - 1.0) * scale(i % cols))
        .collect();
    Matrix { data, rows, cols }
}

/// The per-channel statistics a search input borrows.
struct Stats {
    k_absmax: Vec<f32>,
    k_range: Vec<(f32, f32)>,
    q_absmax: Vec<f32>,
}

impl Stats {
    fn of(q: &Matrix, k: &Matrix) -> Self {
        Stats {
            k_absmax: absmax(k),
            k_range: ranges(k),
            q_absmax: absmax(q),
        }
    }

    fn input<'a>(
        &'a self,
        q: &'a Matrix,
        k: &'a Matrix,
        v: &'a Matrix,
        spans: &'a [SeqSpan],
    ) -> KvSearchInput<'a> {
        KvSearchInput {
            q,
            k,
            v,
            spans,
            k_absmax: &self.k_absmax,
            k_range: &self.k_range,
            q_absmax: &self.q_absmax,
        }
    }
}

fn ranges(m: &Matrix) -> Vec<(f32, f32)> {
    let mut out = vec![(f32::INFINITY, f32::NEG_INFINITY); m.cols];
    for r in 0..m.rows {
        for (o, &v) in out.iter_mut().zip(m.row(r)) {
            *o = (o.0.min(v), o.1.max(v));
        }
    }
    out
}

fn absmax(m: &Matrix) -> Vec<f32> {
    let mut out = vec![0f32; m.cols];
    for r in 0..m.rows {
        for (o, &v) in out.iter_mut().zip(m.row(r)) {
            *o = o.max(v.abs());
        }
    }
    out
}

/// Two sequences whose keys carry outlier channels (3 and 17, one per KV
/// head) 30 times the others, as real post-RoPE keys do.
fn outlier_case() -> (Matrix, Matrix, Matrix, Vec<SeqSpan>) {
    let mut rng = SplitMix::new(7);
    let (spans, _) = SeqSpan::packed(&[70, 50], CALIB_BLOCK_LEN);
    let rows = 120;
    let q = random(&mut rng, rows, HEADS * HD, &|_| 1.0);
    let k = random(&mut rng, rows, KV_HEADS * HD, &|c| {
        if c == 3 || c == 17 {
            30.0
        } else {
            1.0
        }
    });
    let v = random(&mut rng, rows, KV_HEADS * HD, &|_| 1.0);
    (q, k, v, spans)
}

fn loss_of(input: &KvSearchInput<'_>, f: Vec<f32>, shift: &[f32], reference: &Matrix) -> Vec<f64> {
    let params = KvStaticParams {
        k_scale: vec![vec![1.0; KV_HEADS]],
        k_zero: vec![vec![0.0; KV_HEADS]],
        v_scale: vec![vec![1.0; KV_HEADS]],
        v_zero: vec![vec![0.0; KV_HEADS]],
        k_smooth: vec![f],
        k_shift: vec![shift.to_vec()],
        levels: 15.0,
    };
    let config = KvCacheConfig {
        dtype: KvDtype::Int4,
        mode: KvMode::Smooth,
        static_params: Some(Arc::new(params)),
    };
    let out = attention_over(&CpuBackend::new(), shape(), config, input).unwrap();
    head_losses(&out, reference, &shape())
}

fn reference(input: &KvSearchInput<'_>) -> Matrix {
    let config = KvCacheConfig {
        dtype: KvDtype::F32,
        mode: KvMode::Online,
        static_params: None,
    };
    attention_over(&CpuBackend::new(), shape(), config, input).unwrap()
}

#[test]
fn chosen_factors_have_the_reported_loss_and_beat_no_smoothing() {
    let (q, k, v, spans) = outlier_case();
    let stats = Stats::of(&q, &k);
    let input = stats.input(&q, &k, &v, &spans);
    let choice = search_key_factors(&CpuBackend::new(), shape(), &input).unwrap();
    assert_eq!(choice.factors.len(), KV_HEADS * HD);
    assert!(choice.factors.iter().all(|f| f.is_finite() && *f > 0.0));

    let reference = reference(&input);
    let recomputed = loss_of(&input, choice.factors.clone(), &choice.shift, &reference);
    let none = loss_of(&input, vec![1.0; KV_HEADS * HD], &[], &reference);
    for h in 0..KV_HEADS {
        // The reported loss is that of the returned factors (each head's
        // slice was copied from the candidate that scored it).
        assert!(
            (recomputed[h] - choice.loss[h]).abs() <= 1e-9 * choice.loss[h].max(1.0),
            "head {h}: reported {} recomputed {}",
            choice.loss[h],
            recomputed[h]
        );
        // α = β = 0 is a candidate, so the search can do no worse than no
        // smoothing; with 30× outliers it must do much better.
        assert!(
            choice.loss[h] < 0.5 * none[h],
            "head {h}: searched {} vs unsmoothed {}",
            choice.loss[h],
            none[h]
        );
        assert!(choice.loss[h] <= choice.loss_fixed[h]);
        assert!(choice.exponents[h].0 > 0.0, "{:?}", choice.exponents[h]);
    }
}

#[test]
fn a_head_wide_constant_on_the_factors_changes_nothing() {
    let (q, k, v, spans) = outlier_case();
    let stats = Stats::of(&q, &k);
    let input = stats.input(&q, &k, &v, &spans);
    let reference = reference(&input);
    let base: Vec<f32> = stats.k_absmax.iter().map(|m| m.sqrt()).collect();
    // Powers of two keep the division and multiplication exact in f32.
    let scaled: Vec<f32> = base
        .iter()
        .enumerate()
        .map(|(c, f)| f * if c < HD { 8.0 } else { 0.25 })
        .collect();
    let a = loss_of(&input, base, &[], &reference);
    let b = loss_of(&input, scaled, &[], &reference);
    for h in 0..KV_HEADS {
        assert!(
            (a[h] - b[h]).abs() <= 1e-3 * a[h],
            "head {h}: {} vs {}",
            a[h],
            b[h]
        );
    }
}

/// The offsets are exact: adding a per-channel constant to every key
/// changes no attention output (softmax invariance), and shifting it back
/// out before quantization gives the same quantized attention as the keys
/// without it.
#[test]
fn a_key_shift_is_exact_and_undoes_a_channel_offset() {
    let (q, k, v, spans) = outlier_case();
    let offset: Vec<f32> = (0..KV_HEADS * HD)
        .map(|c| if c % 3 == 0 { 4.0 } else { -0.5 })
        .collect();
    let mut moved = k.clone();
    for r in 0..moved.rows {
        for (x, &o) in moved.data[r * moved.cols..(r + 1) * moved.cols]
            .iter_mut()
            .zip(&offset)
        {
            *x += o;
        }
    }
    let stats = Stats::of(&q, &k);
    let plain = stats.input(&q, &k, &v, &spans);
    let ka = &stats.k_absmax;
    let shifted = KvSearchInput { k: &moved, ..plain };
    let (ref_plain, ref_moved) = (reference(&plain), reference(&shifted));
    let worst = ref_plain
        .data
        .iter()
        .zip(&ref_moved.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "fp32 attention moved by {worst}");

    let factors: Vec<f32> = ka.iter().map(|m| m.sqrt()).collect();
    let a = loss_of(&plain, factors.clone(), &[], &ref_plain);
    let b = loss_of(&shifted, factors.clone(), &offset, &ref_plain);
    // Without the shift the offset widens every token's range.
    let c = loss_of(&shifted, factors, &[], &ref_plain);
    for h in 0..KV_HEADS {
        assert!(
            (a[h] - b[h]).abs() <= 0.05 * a[h],
            "head {h}: {} vs {}",
            a[h],
            b[h]
        );
        assert!(
            c[h] > 1.3 * a[h],
            "head {h}: unshifted {} vs {}",
            c[h],
            a[h]
        );
    }
}

/// A head size the smooth mode cannot run (not a power of two) gets the
/// fixed factors and no offsets instead of an error, so `--kv` still
/// quantizes such models (their int4 default is then the online mode).
#[test]
fn a_head_size_without_a_hadamard_keeps_the_fixed_factors() {
    let shape = AttnShape {
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 12,
        num_layers: 1,
    };
    let mut rng = SplitMix::new(3);
    let (spans, _) = SeqSpan::packed(&[20], CALIB_BLOCK_LEN);
    let q = random(&mut rng, 20, 24, &|_| 1.0);
    let k = random(&mut rng, 20, 12, &|c| if c == 5 { 10.0 } else { 1.0 });
    let v = random(&mut rng, 20, 12, &|_| 1.0);
    let stats = Stats::of(&q, &k);
    let choice =
        search_key_factors(&CpuBackend::new(), shape, &stats.input(&q, &k, &v, &spans)).unwrap();
    assert!(choice.shift.iter().all(|&s| s == 0.0));
    assert!(choice.loss.is_empty());
    // max|k|^0.75 divided by its geometric mean: the outlier channel gets
    // the largest factor, in the ratio of the maxima to the 0.75.
    let (big, small) = (choice.factors[5], choice.factors[0]);
    let expected = (stats.k_absmax[5] / stats.k_absmax[0]).powf(K_SMOOTH_EXPONENT);
    assert!(
        (big / small - expected).abs() < 1e-4 * expected,
        "{big} / {small} vs {expected}"
    );
}
