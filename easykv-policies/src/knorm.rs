//! Key norm (Devoto et al., 2024; kvpress's `KnormPress`): keys of small L2 norm draw the most
//! attention, so the largest norms go first. Reads no attention at all.

use burn::tensor::{backend::Backend, Tensor};
use easykv_core::{EvictionContext, SlotStats};

use crate::compose::{ScoreCalculator, ScoredPolicy};
use crate::scope::SinksAndRecent;

/// Minus the key's L2 norm.
pub struct KeyNorm;

impl<B: Backend> ScoreCalculator<B> for KeyNorm {
    fn score(&self, stats: &SlotStats<B>, _ctx: &EvictionContext<B>) -> Tensor<B, 3> {
        match &stats.key_norm {
            Some(norm) => norm.clone().neg(),
            // Not kept (a cache that ignores `uses_key_norms`): every slot alike.
            None => stats.sum.zeros_like(),
        }
    }

    fn uses_attention(&self) -> bool {
        false
    }

    fn uses_key_norms(&self) -> bool {
        true
    }
}

/// The key-norm preset.
pub fn knorm<B: Backend>() -> ScoredPolicy<B> {
    ScoredPolicy::new("knorm", KeyNorm, SinksAndRecent { recent_in_decode: true })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapkv::tests::{context, one_row};

    /// The largest norm scores lowest (evicted first); without norms every slot is alike.
    #[test]
    fn larger_key_norms_score_lower() {
        let stats = one_row(vec![0.0; 3], Some(vec![1.0, 3.0, 2.0]));
        let score = ScoreCalculator::<burn::backend::Flex>::score(&KeyNorm, &stats, &context(3));
        assert_eq!(score.into_data().to_vec::<f32>().unwrap(), vec![-1.0, -3.0, -2.0]);
        let without = one_row(vec![0.0; 3], None);
        let flat = ScoreCalculator::<burn::backend::Flex>::score(&KeyNorm, &without, &context(3));
        assert_eq!(flat.into_data().to_vec::<f32>().unwrap(), vec![0.0; 3]);
    }
}
