//! H2O (Zhang et al., 2023), per head: accumulated attention, outside sinks and recent window.

use burn::tensor::{backend::Backend, Tensor};
use easykv_core::{EvictionContext, SlotStats};

use crate::compose::{ScoreCalculator, ScoredPolicy};
use crate::scope::SinksAndRecent;

/// S: the attention a slot accumulated (favours old slots — RoCo's point).
pub struct SumAttention;

impl<B: Backend> ScoreCalculator<B> for SumAttention {
    fn score(&self, stats: &SlotStats<B>, _ctx: &EvictionContext<B>) -> Tensor<B, 3> {
        stats.sum.clone()
    }
}

/// The H2O preset (EasyKV's `h2o_head`).
pub fn h2o<B: Backend>() -> ScoredPolicy<B> {
    ScoredPolicy::new("h2o", SumAttention, SinksAndRecent { recent_in_decode: true })
}
