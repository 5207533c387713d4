use burn::tensor::{backend::Backend, Bool, Int, Tensor};
use easykv_core::{EvictionContext, EvictionPolicy, SlotStats};

/// Importance of every slot; the lowest are evicted first.
pub trait ScoreCalculator<B: Backend>: Send {
    /// # Shapes
    /// - returns `[batch, kv_heads, slots]`
    fn score(&self, stats: &SlotStats<B>, ctx: &EvictionContext) -> Tensor<B, 3>;

    /// Whether the score reads attention statistics.
    fn uses_attention(&self) -> bool {
        true
    }
}

/// Which slots may be evicted.
pub trait ScopeBuilder<B: Backend>: Send {
    /// # Shapes
    /// - returns `[batch, kv_heads, slots]`, true where eviction is allowed
    fn eligible(&self, stats: &SlotStats<B>, ctx: &EvictionContext) -> Tensor<B, 3, Bool>;
}

/// Out-of-scope slots get this score: finite, so sorting never meets NaN or infinities.
pub(crate) const NEVER: f32 = 3.0e38;

/// A policy made of a score and a scope: evict the `n_evict` lowest-scoring eligible slots.
pub struct ScoredPolicy<B: Backend> {
    name: String,
    score: Box<dyn ScoreCalculator<B>>,
    scope: Box<dyn ScopeBuilder<B>>,
}

impl<B: Backend> ScoredPolicy<B> {
    pub fn new(name: &str, score: impl ScoreCalculator<B> + 'static, scope: impl ScopeBuilder<B> + 'static) -> Self {
        Self {
            name: name.into(),
            score: Box::new(score),
            scope: Box::new(scope),
        }
    }
}

impl<B: Backend> EvictionPolicy<B> for ScoredPolicy<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn uses_attention(&self) -> bool {
        self.score.uses_attention()
    }

    fn select(&mut self, stats: &SlotStats<B>, ctx: &EvictionContext) -> Tensor<B, 3, Int> {
        let score = self.score.score(stats, ctx);
        // NaN or huge scores must not outrank real ones.
        let score = score.clone().mask_fill(score.is_nan(), NEVER).clamp(-NEVER, NEVER);
        let eligible = self.scope.eligible(stats, ctx);
        score
            .mask_fill(eligible.bool_not(), NEVER)
            .argsort(2)
            .slice_dim(2, 0..ctx.n_evict)
    }
}
