//! RoCo (Ren & Zhu, 2024): mean attention as the score, within a robust scope of the slots
//! whose attention has been most stable (smallest standard deviation).

use burn::tensor::{backend::Backend, Tensor};
use easykv_core::{EvictionContext, SlotStats, ROBUST_PROTECTED_TAIL};

use crate::compose::{Scope, ScopeBuilder, ScoreCalculator, ScoredPolicy, NEVER};
use crate::scope::{newest, protected};

/// μ = S / C: the mean attention a slot received since it entered (slots never observed score
/// as never-evict).
pub struct MeanAttention;

impl<B: Backend> ScoreCalculator<B> for MeanAttention {
    fn score(&self, stats: &SlotStats<B>, _ctx: &EvictionContext<B>) -> Tensor<B, 3> {
        let unseen = stats.count.clone().lower_equal_elem(0.0);
        (stats.sum.clone() / stats.count.clone().clamp_min(1.0)).mask_fill(unseen, NEVER)
    }
}

/// The `robust_k` slots of smallest σ = sqrt(max(0, Q/C − μ²)), never the sinks, protected
/// positions, or the last [`ROBUST_PROTECTED_TAIL`] slots.
pub struct RobustStdScope;

impl RobustStdScope {
    /// σ per slot, with excluded slots at [`NEVER`].
    pub fn std<B: Backend>(stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Tensor<B, 3> {
        let c = stats.count.clone().clamp_min(1.0);
        let mean = stats.sum.clone() / c.clone();
        // EasyKV takes sqrt of a difference that float noise can push below zero (NaN): clamp.
        let std = (stats.sum_sq.clone() / c - mean.square()).clamp_min(0.0).sqrt();
        let tail = newest(stats, ROBUST_PROTECTED_TAIL);
        let excluded = protected(stats, ctx)
            .bool_or(tail)
            .bool_or(stats.count.clone().lower_equal_elem(0.0));
        std.mask_fill(excluded, NEVER)
    }
}

impl<B: Backend> ScopeBuilder<B> for RobustStdScope {
    fn scope(&self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Scope<B> {
        // When fewer than k slots are allowed at all, the k smallest would include excluded
        // ones (EasyKV then evicts sinks): those are keyed NEVER and never offered.
        Scope::Smallest {
            key: Self::std(stats, ctx),
            k: ctx.robust_k.clamp(ctx.n_evict, stats.sum.dims()[2]),
        }
    }
}

/// The RoCo preset.
pub fn roco<B: Backend>() -> ScoredPolicy<B> {
    ScoredPolicy::new("roco", MeanAttention, RobustStdScope)
}
