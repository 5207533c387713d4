//! Random eviction outside the sinks: the floor every policy must beat.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use easykv_core::{EvictionContext, SlotStats};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::compose::{ScoreCalculator, ScoredPolicy};
use crate::scope::SinksOnly;

/// Uniform scores drawn from (seed, layer, step): reproducible, different every step, and the
/// same whether layers are evicted together or one at a time.
pub struct SeededRandom;

impl<B: Backend> ScoreCalculator<B> for SeededRandom {
    fn score(&self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Tensor<B, 3> {
        let [rows, h, n] = stats.sum.dims();
        let per_layer = rows / ctx.layers.len().max(1);
        let mut values = Vec::with_capacity(rows * h * n);
        for layer in ctx.layers.clone() {
            let seed = ctx.seed
                ^ ctx.step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (layer as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
            let mut rng = StdRng::seed_from_u64(seed);
            values.extend((0..per_layer * h * n).map(|_| rng.random::<f32>()));
        }
        // Rows that do not divide into layers (never from EvictingCache) still get scores.
        values.resize(rows * h * n, 0.5);
        Tensor::from_data(TensorData::new(values, [rows, h, n]), &stats.sum.device())
    }

    fn uses_attention(&self) -> bool {
        false
    }
}

/// The random preset.
pub fn random<B: Backend>() -> ScoredPolicy<B> {
    ScoredPolicy::new("random", SeededRandom, SinksOnly)
}
