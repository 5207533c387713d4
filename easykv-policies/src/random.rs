//! Random eviction outside the sinks: the floor every policy must beat.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use easykv_core::{EvictionContext, SlotStats};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::compose::{ScoreCalculator, ScoredPolicy};
use crate::scope::SinksOnly;

/// Uniform scores drawn from (seed, step) for every layer at once: reproducible, and
/// different every step.
pub struct SeededRandom;

impl<B: Backend> ScoreCalculator<B> for SeededRandom {
    fn score(&self, stats: &SlotStats<B>, ctx: &EvictionContext) -> Tensor<B, 3> {
        let [b, h, n] = stats.sum.dims();
        let seed = ctx.seed ^ ctx.step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = StdRng::seed_from_u64(seed);
        let values: Vec<f32> = (0..b * h * n).map(|_| rng.random::<f32>()).collect();
        Tensor::from_data(TensorData::new(values, [b, h, n]), &stats.sum.device())
    }

    fn uses_attention(&self) -> bool {
        false
    }
}

/// The random preset.
pub fn random<B: Backend>() -> ScoredPolicy<B> {
    ScoredPolicy::new("random", SeededRandom, SinksOnly)
}
