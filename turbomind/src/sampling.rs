//! Token sampling from logits: repetition penalty, OpenAI's presence and
//! frequency penalties, temperature, top-k, top-p, min-p, in that order
//! (the order of Hugging Face's logits processors, with OpenAI's penalties
//! beside the repetition penalty, as vLLM applies them), with a seeded
//! generator so that a run is reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Per-request sampling parameters. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables top-p.
    pub top_p: f32,
    /// 0 disables min-p.
    pub min_p: f32,
    /// 1 disables the penalty.
    pub repetition_penalty: f32,
    /// OpenAI's: subtracted once from every token already generated; 0
    /// disables it.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted per occurrence in the generated tokens; 0
    /// disables it.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Rejects values that have no meaning, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, rule: &str, value: f32| {
            Err(Error::InvalidRequest(format!(
                "{name} must be {rule}; got {value}"
            )))
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", ">= 0", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "in (0, 1]", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "in [0, 1]", self.min_p);
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty", "> 0", self.repetition_penalty);
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad("presence_penalty", "in [-2, 2]", self.presence_penalty);
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad("frequency_penalty", "in [-2, 2]", self.frequency_penalty);
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Samples tokens for one sequence.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// The index of the largest value; the lowest index wins ties.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// The distinct tokens of `history` in ascending order, each with how
/// many times it appears from `prompt_len` on (in the output): what every
/// penalty needs. One sort of the history, no hash map: a few tens of
/// microseconds for thousands of tokens, paid per row and step.
pub fn token_counts(history: &[u32], prompt_len: usize) -> Vec<(u32, u32)> {
    // Token in the high bits, "in the output" in bit 0: a sort groups each
    // token's occurrences.
    let mut keyed: Vec<u64> = history
        .iter()
        .enumerate()
        .map(|(i, &t)| (u64::from(t) << 1) | u64::from(i >= prompt_len))
        .collect();
    keyed.sort_unstable();
    let mut counts: Vec<(u32, u32)> = Vec::new();
    for k in keyed {
        let (token, generated) = ((k >> 1) as u32, (k & 1) as u32);
        match counts.last_mut() {
            Some(last) if last.0 == token => last.1 += generated,
            _ => counts.push((token, generated)),
        }
    }
    counts
}

/// [`token_counts`] of a request's tokens, kept up to date as it
/// generates: one sorted insert per token instead of a sort of the whole
/// history per step (the engine keeps one for each request whose
/// penalties need them).
#[derive(Debug, Clone, Default)]
pub struct PenaltyCounts {
    counts: Vec<(u32, u32)>,
    /// Tokens counted: the prompt's and the generated ones.
    len: usize,
}

impl PenaltyCounts {
    /// The counts of a prompt (none of its tokens generated).
    pub fn new(prompt: &[u32]) -> Self {
        PenaltyCounts {
            counts: token_counts(prompt, prompt.len()),
            len: prompt.len(),
        }
    }

    /// Counts one generated token.
    pub fn push_generated(&mut self, token: u32) {
        match self.counts.binary_search_by_key(&token, |c| c.0) {
            Ok(i) => self.counts[i].1 += 1,
            Err(i) => self.counts.insert(i, (token, 1)),
        }
        self.len += 1;
    }

    /// The counts, if they cover a history of `history_len` tokens (else
    /// the caller counts the history itself).
    pub fn for_history(&self, history_len: usize) -> Option<&[(u32, u32)]> {
        (self.len == history_len).then_some(self.counts.as_slice())
    }
}

/// Whether `p` applies any penalty (and so needs the history's counts).
pub fn wants_penalties(p: &SamplingParams) -> bool {
    p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0
}

/// Hugging Face's repetition penalty: every token seen before has its
/// logit divided by the penalty if positive, multiplied if negative.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    apply_counted_penalties(
        logits,
        &token_counts(history, history.len()),
        penalty,
        0.0,
        0.0,
    );
}

/// OpenAI's presence and frequency penalties over the generated tokens:
/// `logit -= presence · [count > 0] + frequency · count`.
pub fn apply_output_penalties(logits: &mut [f32], output: &[u32], presence: f32, frequency: f32) {
    apply_counted_penalties(logits, &token_counts(output, 0), 1.0, presence, frequency);
}

/// The three penalties from [`token_counts`]: the repetition penalty on
/// every listed token, presence and frequency on those generated.
fn apply_counted_penalties(
    logits: &mut [f32],
    counts: &[(u32, u32)],
    repetition: f32,
    presence: f32,
    frequency: f32,
) {
    for &(t, n) in counts {
        let Some(l) = logits.get_mut(t as usize) else {
            continue;
        };
        if repetition != 1.0 {
            *l = if *l > 0.0 {
                *l / repetition
            } else {
                *l * repetition
            };
        }
        if n > 0 {
            *l -= presence + frequency * n as f32;
        }
    }
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `history` is every token of the sequence so
    /// far (prompt and generated), for the repetition penalty; the
    /// generated ones start at `prompt_len`, for the OpenAI penalties.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32], prompt_len: usize) -> u32 {
        self.apply_penalties(logits, history, prompt_len);
        let u = self.next_uniform();
        sample_penalized(&self.params, logits, u)
    }

    /// The penalties of [`Sampler::sample`], applied to `logits` in place.
    pub fn apply_penalties(&self, logits: &mut [f32], history: &[u32], prompt_len: usize) {
        apply_penalties(&self.params, logits, history, prompt_len);
    }

    /// The uniform number in [0, 1) of the next draw: one per sampled
    /// token, none when greedy. It is drawn before the logits are looked
    /// at, so that a device that samples with it and the host consume the
    /// generator alike.
    pub fn next_uniform(&mut self) -> f32 {
        if self.params.is_greedy() {
            0.0
        } else {
            self.rng.random::<f32>()
        }
    }
}

/// `p`'s penalties applied to `logits` in place: the repetition penalty
/// over `history`, OpenAI's over its generated part (from `prompt_len`).
pub fn apply_penalties(p: &SamplingParams, logits: &mut [f32], history: &[u32], prompt_len: usize) {
    if !wants_penalties(p) {
        return;
    }
    apply_penalties_counted(p, logits, &token_counts(history, prompt_len));
}

/// [`apply_penalties`] from the history's [`token_counts`].
pub fn apply_penalties_counted(p: &SamplingParams, logits: &mut [f32], counts: &[(u32, u32)]) {
    if !wants_penalties(p) {
        return;
    }
    apply_counted_penalties(
        logits,
        counts,
        p.repetition_penalty,
        p.presence_penalty,
        p.frequency_penalty,
    );
}

/// The token drawn from penalized `logits` with the uniform number `u`:
/// temperature, top-k, top-p, min-p, then the first token in order of
/// probability (descending, then by index) whose cumulative probability
/// reaches `u` times the kept mass. Greedy parameters take the argmax.
///
/// No sort: the top-k, the top-p prefix and the drawn token are found by
/// selections in that order (weighted by probability for top-p and the
/// draw), O(vocabulary) each, where sorting every token took most of a
/// sampled token's time at a 49k vocabulary. Sums are taken in selection
/// order, so a draw within rounding of a boundary may land on the
/// neighbouring token.
pub fn sample_penalized(p: &SamplingParams, logits: &[f32], u: f32) -> u32 {
    if p.is_greedy() {
        return argmax(logits);
    }
    let mut cands: Vec<Candidate> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| Candidate {
            id: i as u32,
            value: l / p.temperature,
            weight: 0.0,
        })
        .collect();
    let Some(best) = cands.iter().min_by(|a, b| before(a, b)).copied() else {
        return 0;
    };
    if p.top_k > 0 && p.top_k < cands.len() {
        cands.select_nth_unstable_by(p.top_k - 1, before);
        cands.truncate(p.top_k);
    }
    // Weights relative to the best token: its weight is 1.
    for c in cands.iter_mut() {
        c.weight = (c.value - best.value).exp();
    }
    let total: f32 = cands.iter().map(|c| c.weight).sum();
    if !total.is_finite() {
        // Non-finite logits leave no distribution: the best token.
        return best.id;
    }
    let mut keep = cands.len();
    if p.top_p < 1.0 {
        // The shortest prefix whose mass reaches top_p, moved to the front.
        if let Some(last) = first_reaching(&mut cands, p.top_p * total) {
            keep = last + 1;
        }
    }
    if p.min_p > 0.0 {
        // p ≥ min_p · p_best, i.e. weight ≥ min_p (the best weighs 1); they
        // lead the order, so counting them gives the prefix, and when it
        // is shorter the kept tokens are that many best of the prefix.
        let count = cands[..keep]
            .iter()
            .filter(|c| c.weight >= p.min_p)
            .count()
            .max(1);
        if count < keep {
            cands[..keep].select_nth_unstable_by(count - 1, before);
            keep = count;
        }
    }
    let kept = &mut cands[..keep];
    let kept_mass: f32 = kept.iter().map(|c| c.weight).sum();
    if !(kept_mass.is_finite() && kept_mass > 0.0) {
        return best.id;
    }
    match first_reaching(kept, u * kept_mass) {
        Some(i) => kept[i].id,
        None => best.id,
    }
}

/// A token in the sampler's selections.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u32,
    /// logit / temperature.
    value: f32,
    /// exp(value − best value): probability up to the normalizer.
    weight: f32,
}

/// The sampler's order: higher value first, then lower id (ties).
fn before(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.value.total_cmp(&a.value).then(a.id.cmp(&b.id))
}

/// The first candidate in [`before`] order at which the cumulative weight
/// reaches `target`: its index after this rearranges `c` so that every
/// candidate up to it precedes it (and so the prefix `c[..=index]` is that
/// many best candidates, unordered). `None` only when the whole weight
/// falls short of `target` (by rounding). Expected O(len): each step
/// partitions around the middle and keeps the side the boundary is in.
fn first_reaching(c: &mut [Candidate], target: f32) -> Option<usize> {
    let (mut lo, mut hi) = (0, c.len());
    if target <= 0.0 {
        // The first candidate reaches any target ≤ 0.
        let best = (0..hi).min_by(|&i, &j| before(&c[i], &c[j]))?;
        c.swap(0, best);
        return Some(0);
    }
    // Invariant: c[..lo] precede everything in c[lo..hi] and weigh less
    // than target; c[..hi] precede the rest.
    let mut below = 0.0f32;
    while lo < hi {
        let mid = (hi - lo) / 2;
        c[lo..hi].select_nth_unstable_by(mid, before);
        let pivot = lo + mid;
        let ahead: f32 = c[lo..pivot].iter().map(|x| x.weight).sum();
        if below + ahead >= target {
            hi = pivot;
        } else if below + ahead + c[pivot].weight >= target {
            return Some(pivot);
        } else {
            below += ahead + c[pivot].weight;
            lo = pivot + 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_ties_go_low() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[], 0), 1);
    }

    #[test]
    fn openai_penalties_count_generated_tokens_only() {
        let mut l = vec![1.0, 1.0, 1.0, 1.0];
        apply_output_penalties(&mut l, &[2, 2, 1], 0.5, 0.25);
        assert_eq!(l, vec![1.0, 0.25, 0.0, 1.0]);
        // The prompt (history before prompt_len) is not penalized: token 0
        // appears only there and still wins over 1 and 2 after penalties.
        let params = SamplingParams {
            presence_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(params).unwrap();
        assert_eq!(s.sample(&mut [3.0, 4.0, 0.0], &[0, 0, 1], 2), 0);
    }

    /// The sorted counts and the penalties built on them against a plain
    /// per-token reference (a hash map of the output, a set of the whole
    /// history), on random histories with repeats, out-of-vocabulary ids
    /// and every prompt split.
    #[test]
    fn counted_penalties_match_a_direct_reference() {
        let mut state = 11u64;
        let mut next = |n: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % n
        };
        for _ in 0..200 {
            let vocab = 1 + next(40) as usize;
            let history: Vec<u32> = (0..next(60))
                .map(|_| next(vocab as u64 + 3) as u32)
                .collect();
            let prompt_len = next(history.len() as u64 + 2) as usize;
            let p = SamplingParams {
                repetition_penalty: 1.0 + next(3) as f32 * 0.25,
                presence_penalty: next(3) as f32 * 0.5,
                frequency_penalty: next(3) as f32 * 0.25,
                ..Default::default()
            };
            let logits: Vec<f32> = (0..vocab).map(|_| next(200) as f32 / 20.0 - 5.0).collect();
            let mut want = logits.clone();
            let mut seen = std::collections::HashSet::new();
            for &t in &history {
                if (t as usize) < vocab && seen.insert(t) && p.repetition_penalty != 1.0 {
                    let l = &mut want[t as usize];
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in history.get(prompt_len..).unwrap_or(&[]) {
                *counts.entry(t).or_default() += 1;
            }
            for (&t, &n) in &counts {
                if let Some(l) = want.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
            let mut got = logits.clone();
            apply_penalties(&p, &mut got, &history, prompt_len);
            assert_eq!(got, want, "history {history:?} prompt {prompt_len} {p:?}");
            let listed = token_counts(&history, prompt_len);
            assert!(listed.windows(2).all(|w| w[0].0 < w[1].0));
            assert_eq!(
                listed.len(),
                history
                    .iter()
                    .collect::<std::collections::HashSet<_>>()
                    .len()
            );
            for &(t, n) in &listed {
                assert_eq!(n, counts.get(&t).copied().unwrap_or(0));
            }
        }
    }

    #[test]
    fn repetition_penalty_matches_hf_rule() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let params = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            seed: 7,
            ..Default::default()
        };
        let mut s = Sampler::new(params).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 0.5, 0.4, 0.49], &[], 0), 1);
        }
    }

    #[test]
    fn same_seed_same_tokens_and_frequencies_follow_softmax() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let logits = [0.0f32, (2.0f32).ln(), (5.0f32).ln()];
        let draw = |params: SamplingParams| {
            let mut s = Sampler::new(params).unwrap();
            (0..8000)
                .map(|_| s.sample(&mut logits.clone(), &[], 0))
                .collect::<Vec<_>>()
        };
        let a = draw(params.clone());
        assert_eq!(a, draw(params));
        // Expected probabilities 1/8, 2/8, 5/8.
        for (tok, want) in [(0u32, 0.125), (1, 0.25), (2, 0.625)] {
            let freq = a.iter().filter(|&&t| t == tok).count() as f64 / a.len() as f64;
            assert!((freq - want).abs() < 0.02, "token {tok}: {freq} vs {want}");
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // Probabilities 0.5, 0.3, 0.2 (from logs).
        let logits = [(0.5f32).ln(), (0.3f32).ln(), (0.2f32).ln()];
        let top_p = SamplingParams {
            temperature: 1.0,
            top_p: 0.75,
            seed: 1,
            ..Default::default()
        };
        let min_p = SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            seed: 1,
            ..Default::default()
        };
        for params in [top_p, min_p] {
            let mut s = Sampler::new(params).unwrap();
            for _ in 0..500 {
                assert_ne!(s.sample(&mut logits.clone(), &[], 0), 2);
            }
        }
    }

    /// The sampler as it was before the selections: every token sorted.
    /// Also returns the candidates in that order with their probabilities
    /// in f64, and the kept count.
    fn full_sort_reference(
        p: &SamplingParams,
        logits: &[f32],
        u: f32,
    ) -> (u32, Vec<(u32, f64)>, usize) {
        let mut c: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < c.len() {
            c.truncate(p.top_k);
        }
        let z: f64 = c.iter().map(|&(_, l)| ((l - c[0].1) as f64).exp()).sum();
        let ranks: Vec<(u32, f64)> = c
            .iter()
            .map(|&(i, l)| (i, ((l - c[0].1) as f64).exp() / z))
            .collect();
        let max = c[0].1;
        let mut probs: Vec<f32> = c.iter().map(|&(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, &q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let t = p.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&x| x >= t).count().max(1));
        }
        let kept: f32 = probs[..keep].iter().sum();
        let mut r = u * kept;
        for i in 0..keep {
            r -= probs[i];
            if r <= 0.0 {
                return (c[i].0, ranks, keep);
            }
        }
        (c[keep - 1].0, ranks, keep)
    }

    /// The selections against the full sort over peaked and flat
    /// distributions at a 49k vocabulary: the same token or, where the
    /// normalizer's different summation order (f32) moves the draw across
    /// a boundary, one whose boundary with the full sort's token lies
    /// within 1e-4 of the draw when every sum is taken in f64; at most 5%
    /// of draws (flat distributions put a boundary every 2e-5).
    #[test]
    fn selections_draw_what_the_full_sort_draws() {
        let mut rng = StdRng::seed_from_u64(5);
        let vocab = 49152;
        let p = |temperature, top_k, top_p, min_p| SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            ..Default::default()
        };
        let cases = [
            p(0.7, 0, 1.0, 0.0),
            p(1.0, 50, 1.0, 0.0),
            p(0.8, 0, 0.95, 0.0),
            p(1.0, 0, 0.5, 0.0),
            p(1.0, 0, 1.0, 0.05),
            p(0.9, 300, 0.9, 0.02),
            p(1.5, 0, 0.99, 0.0),
            p(1.0, 2000, 1.0, 0.0),
        ];
        let (mut draws, mut neighbours) = (0, 0);
        for spread in [0.5f32, 3.0, 10.0] {
            let logits: Vec<f32> = (0..vocab)
                .map(|i| {
                    let peak = if i % 211 == 0 { 6.0 } else { 0.0 };
                    (rng.random::<f32>() * 2.0 - 1.0) * spread + peak
                })
                .collect();
            for params in &cases {
                for _ in 0..25 {
                    let u = rng.random::<f32>();
                    let got = sample_penalized(params, &logits, u);
                    let (want, ranks, keep) = full_sort_reference(params, &logits, u);
                    draws += 1;
                    if got != want {
                        let rank = |t| ranks.iter().position(|&(x, _)| x == t);
                        let (Some(a), Some(b)) = (rank(got), rank(want)) else {
                            panic!("{params:?}: {got} is not a candidate");
                        };
                        // The boundary between the two: the end of the
                        // lower-ranked one's interval.
                        let boundary: f64 = ranks[..=a.min(b)].iter().map(|&(_, q)| q).sum();
                        let between: f64 =
                            ranks[a.min(b) + 1..a.max(b)].iter().map(|&(_, q)| q).sum();
                        let kept: f64 = ranks[..keep].iter().map(|&(_, q)| q).sum();
                        let off = (boundary - u as f64 * kept).abs() + between;
                        assert!(
                            off <= 1e-4,
                            "{params:?}, spread {spread}, u {u}: {got} against {want}, {off:.2e} from the draw"
                        );
                        neighbours += 1;
                    }
                }
            }
        }
        assert!(
            neighbours * 20 <= draws,
            "{neighbours} of {draws} draws moved by rounding"
        );
    }

    #[test]
    fn invalid_parameters_are_named() {
        let e = Sampler::new(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("top_p"));
    }

    /// Counts kept token by token equal the counts of the whole history
    /// (prompt and generated), and are refused for a history of another
    /// length.
    #[test]
    fn kept_counts_equal_counts_of_the_history() {
        let mut rng = StdRng::seed_from_u64(21);
        for _ in 0..200 {
            let prompt_len = rng.random_range(0..50);
            let vocab = rng.random_range(1..40u32);
            let prompt: Vec<u32> = (0..prompt_len)
                .map(|_| rng.random_range(0..vocab))
                .collect();
            let mut kept = PenaltyCounts::new(&prompt);
            let mut history = prompt.clone();
            for _ in 0..rng.random_range(0..60) {
                let t = rng.random_range(0..vocab);
                kept.push_generated(t);
                history.push(t);
                assert_eq!(
                    kept.for_history(history.len()),
                    Some(token_counts(&history, prompt_len).as_slice())
                );
            }
            assert_eq!(kept.for_history(history.len() + 1), None);
        }
    }
}
