//! SplitMix64, the crate's one random generator: tiny, seeded, and the same
//! on every platform and crate version, so that calibration samples and
//! synthetic checkpoints depend only on their seed.

/// A SplitMix64 stream.
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform value in `[0, 1)` with 24 bits of resolution, which is all
    /// that an f32 (let alone the fp16 it becomes) can hold.
    pub(crate) fn unit_f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }
}

/// The seed of an independent sub-stream: one per tensor, and one per chunk
/// of a tensor, so that chunks can be filled in parallel and the result
/// does not depend on the number of threads.
pub(crate) fn substream(seed: u64, index: u64) -> u64 {
    SplitMix::new(seed ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03)).next()
}

/// The seed of the sub-stream named `name` (FNV-1a of the name), so a
/// tensor's values depend on its name and the seed, not on write order.
pub(crate) fn named_substream(seed: u64, name: &str) -> u64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    substream(seed, hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let draw = |seed| {
            let mut r = SplitMix::new(seed);
            [r.next(), r.next()]
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        assert_ne!(substream(1, 0), substream(1, 1));
        assert_ne!(
            named_substream(1, "a.weight"),
            named_substream(1, "b.weight")
        );
    }

    #[test]
    fn unit_values_stay_below_one() {
        let mut r = SplitMix::new(3);
        assert!((0..10_000)
            .map(|_| r.unit_f32())
            .all(|u| (0.0..1.0).contains(&u)));
    }
}
