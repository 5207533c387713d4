use burn::tensor::{backend::Backend, Bool, Int, Tensor};
use easykv_core::{EvictionContext, Phase, SlotStats};

use crate::compose::ScopeBuilder;

/// Slot indices `0..n` broadcast to the stats' shape `[batch, kv_heads, n]`.
pub fn slot_index<B: Backend>(stats: &SlotStats<B>) -> Tensor<B, 3, Int> {
    let [b, h, n] = stats.positions.dims();
    Tensor::<B, 1, Int>::arange(0..n as i64, &stats.positions.device())
        .reshape([1, 1, n])
        .repeat(&[b, h, 1])
}

/// Slots that no policy may evict: the sinks, and positions the schedule protects (the
/// prompt, in decoding mode).
pub(crate) fn protected<B: Backend>(stats: &SlotStats<B>, ctx: &EvictionContext) -> Tensor<B, 3, Bool> {
    let idx = slot_index(stats);
    idx.lower_elem(ctx.sinks as i64)
        .bool_or(stats.positions.clone().lower_elem(ctx.protected_positions as i64))
}

/// Everything but the sinks, protected positions and the `recent` newest slots (H2O, TOVA).
pub struct SinksAndRecent {
    /// Whether the recent window applies while decoding (EasyKV's TOVA drops it there).
    pub recent_in_decode: bool,
}

impl<B: Backend> ScopeBuilder<B> for SinksAndRecent {
    fn eligible(&self, stats: &SlotStats<B>, ctx: &EvictionContext) -> Tensor<B, 3, Bool> {
        let recent = if ctx.phase == Phase::Decode && !self.recent_in_decode {
            0
        } else {
            ctx.recent
        };
        let idx = slot_index(stats);
        let in_recent = idx.greater_equal_elem(ctx.slots.saturating_sub(recent) as i64);
        protected(stats, ctx).bool_or(in_recent).bool_not()
    }
}

/// Everything but the sinks and protected positions (recency, random).
pub struct SinksOnly;

impl<B: Backend> ScopeBuilder<B> for SinksOnly {
    fn eligible(&self, stats: &SlotStats<B>, ctx: &EvictionContext) -> Tensor<B, 3, Bool> {
        protected(stats, ctx).bool_not()
    }
}
