use burn::tensor::{backend::Backend, Bool, Tensor};
use easykv_core::{EvictionContext, Phase, SlotStats};

use crate::compose::{Scope, ScopeBuilder};

/// Slots that no policy may evict: the sinks, positions the schedule protects (the prompt, in
/// decoding mode), and slots already evicted but not yet compacted away (position −1).
///
/// Sinks are never evicted, so the first `sinks` live slots always hold positions
/// `0..sinks`: stating them as positions names the same slots as EasyKV's slot range.
pub(crate) fn protected<B: Backend>(stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Tensor<B, 3, Bool> {
    stats
        .positions
        .clone()
        .lower_elem(ctx.sinks.max(ctx.protected_positions) as i64)
}

/// The last `window` live slots (slots are in position order; evicted slots awaiting
/// compaction, at position −1, do not count). A window is a slot range, not a position range:
/// when a window widens (prefill → decoding), it reaches back past tokens evicted earlier,
/// as EasyKV's does.
pub(crate) fn newest<B: Backend>(stats: &SlotStats<B>, window: usize) -> Tensor<B, 3, Bool> {
    let [b, h, n] = stats.positions.dims();
    // Float rows and a column subtracted from them: the forms flex runs fastest.
    let live = stats
        .positions
        .clone()
        .greater_equal_elem(0)
        .float()
        .reshape([b * h, n]);
    // Live slots from j to the end, j included: live − (cumsum − total).
    let from_here = live.clone() - (live.clone().cumsum(1) - live.clone().sum_dim(1));
    from_here
        .lower_equal_elem(window as f32 + 0.5)
        .bool_and(live.greater_elem(0.5))
        .reshape([b, h, n])
}

/// Everything but the sinks, protected positions and the `recent` newest slots (H2O, TOVA).
pub struct SinksAndRecent {
    /// Whether the recent window applies while decoding (EasyKV's TOVA drops it there).
    pub recent_in_decode: bool,
}

impl<B: Backend> ScopeBuilder<B> for SinksAndRecent {
    fn scope(&self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Scope<B> {
        let recent = if ctx.phase == Phase::Decode && !self.recent_in_decode {
            0
        } else {
            ctx.recent
        };
        Scope::Mask(protected(stats, ctx).bool_or(newest(stats, recent)).bool_not())
    }
}

/// Everything but the sinks and protected positions (recency, random).
pub struct SinksOnly;

impl<B: Backend> ScopeBuilder<B> for SinksOnly {
    fn scope(&self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Scope<B> {
        Scope::Mask(protected(stats, ctx).bool_not())
    }
}
