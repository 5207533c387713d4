//! Recency / StreamingLLM (Xiao et al., 2024): keep the sinks and the newest tokens.

use burn::tensor::{backend::Backend, Tensor};
use easykv_core::{EvictionContext, SlotStats};

use crate::compose::{ScoreCalculator, ScoredPolicy};
use crate::scope::SinksOnly;

/// The slot's position: the oldest go first.
pub struct Position;

impl<B: Backend> ScoreCalculator<B> for Position {
    fn score(&self, stats: &SlotStats<B>, _ctx: &EvictionContext<B>) -> Tensor<B, 3> {
        stats.positions.clone().float()
    }

    fn uses_attention(&self) -> bool {
        false
    }
}

/// The recency preset.
pub fn recency<B: Backend>() -> ScoredPolicy<B> {
    ScoredPolicy::new("recency", Position, SinksOnly)
}
