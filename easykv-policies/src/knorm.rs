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
