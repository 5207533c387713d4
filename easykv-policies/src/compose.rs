use burn::tensor::{backend::Backend, Bool, ElementConversion, Int, Tensor};
use easykv_core::{slot_mask, EvictionContext, EvictionPolicy, Ranker, SlotStats};

/// Importance of every slot; the lowest are evicted first.
pub trait ScoreCalculator<B: Backend>: Send {
    /// # Shapes
    /// - returns `[batch, kv_heads, slots]`
    fn score(&self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Tensor<B, 3>;

    /// Whether the score reads attention statistics.
    fn uses_attention(&self) -> bool {
        true
    }

    /// Whether the score reads [`SlotStats::key_norm`].
    fn uses_key_norms(&self) -> bool {
        false
    }

    /// The query window the score reads as [`SlotStats::window`] (0: none).
    fn query_window(&self) -> usize {
        0
    }

    /// Whether the score reads [`SlotStats::value_norm`].
    fn uses_value_norms(&self) -> bool {
        false
    }

    /// What the score reads [`SlotStats::expected`] with (see [`EvictionPolicy::expected_attention`]).
    fn expected_attention(&self) -> Option<easykv_core::ExpectedAttention> {
        None
    }

    /// Per-layer capacities (see [`EvictionPolicy::layer_capacities`]); `None`: uniform.
    fn layer_capacities(&self, _n_layers: usize, _prompt_len: usize, _capacity: usize) -> Option<Vec<usize>> {
        None
    }
}

/// Which slots a policy may evict.
pub enum Scope<B: Backend> {
    /// The slots marked true, `[batch, kv_heads, slots]`.
    Mask(Tensor<B, 3, Bool>),
    /// The `k` slots of smallest `key` (`[batch, kv_heads, slots]`; ties go to the lower slot);
    /// slots keyed [`NEVER`] never. Declared rather than computed so that a single eviction
    /// can test its candidate's rank instead of sorting every slot (RoCo, once per decode step).
    Smallest { key: Tensor<B, 3>, k: usize },
}

/// Which slots may be evicted.
pub trait ScopeBuilder<B: Backend>: Send {
    fn scope(&self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Scope<B>;
}

/// Candidates whose rank is checked before a single eviction falls back to sorting.
const RANK_TRIES: usize = 4;

/// The mask of the `k` smallest keys (ties to the lower slot), never a key at [`NEVER`].
pub fn smallest_mask<B: Backend>(key: Tensor<B, 3>, k: usize, ranking: Ranker<B>) -> Tensor<B, 3, Bool> {
    ranking.smallest_mask(key.clone(), k).bool_and(key.lower_elem(NEVER))
}

/// The lowest-scoring slot among the `k` of smallest `key`, per (batch, head), without sorting:
/// take the lowest-scoring slot overall and keep it where its key ranks below `k`; elsewhere
/// rule it out and try again. Scores and keys are correlated in practice (RoCo: low mean
/// attention, low spread), so one or two rounds settle every head.
///
/// Written with float rows and per-row columns subtracted from them, the forms flex runs
/// fastest (integer tensors and broadcasting comparisons cost 10–50× more there).
///
/// # Shapes
/// - `score`, `key`: `[batch, kv_heads, slots]` → `[batch, kv_heads, 1]`
fn lowest_among_smallest<B: Backend>(
    score: Tensor<B, 3>,
    key: Tensor<B, 3>,
    k: usize,
    ranking: Ranker<B>,
) -> Tensor<B, 3, Int> {
    let [b, h, n] = key.dims();
    let rows = b * h;
    let device = key.device();
    let key2 = key.clone().reshape([rows, n]);
    let index = Tensor::<B, 2>::zeros([rows, n], &device)
        + Tensor::<B, 1, Int>::arange(0..n as i64, &device)
            .float()
            .reshape([1, n]);
    let mut masked = score
        .clone()
        .reshape([rows, n])
        .mask_fill(key2.clone().greater_equal_elem(NEVER), NEVER);
    for _ in 0..RANK_TRIES {
        let c = masked.clone().argmin(1);
        let to_c = index.clone() - c.clone().float();
        let below_c = key2.clone() - key2.clone().gather(1, c.clone());
        // Ranked before c: a smaller key, or the same key in a lower slot.
        let before = below_c
            .clone()
            .lower_elem(0.0)
            .bool_or(below_c.equal_elem(0.0).bool_and(to_c.clone().lower_elem(0.0)));
        let rank = before.float().sum_dim(1);
        if rank.clone().max().into_scalar().elem::<f32>() < k as f32 - 0.5 {
            return c.reshape([b, h, 1]);
        }
        // Rule out the candidates that rank k or later.
        let outside = rank.greater_elem(k as f32 - 0.5).float();
        let ruled_out = (to_c.equal_elem(0.0).float() * outside).greater_elem(0.5);
        masked = masked.mask_fill(ruled_out, NEVER);
    }
    score
        .mask_fill(smallest_mask(key, k, ranking).bool_not(), NEVER)
        .argmin(2)
}

/// Out-of-scope slots get this score: finite, so sorting never meets NaN or infinities.
pub(crate) const NEVER: f32 = 3.0e38;

/// Above every score a policy computes, below [`NEVER`]: slots a score keeps on purpose
/// (snapkv's window, expected attention's leading positions).
pub(crate) const KEPT: f32 = 1.0e30;

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

    fn uses_key_norms(&self) -> bool {
        self.score.uses_key_norms()
    }

    fn query_window(&self) -> usize {
        self.score.query_window()
    }

    fn uses_value_norms(&self) -> bool {
        self.score.uses_value_norms()
    }

    fn expected_attention(&self) -> Option<easykv_core::ExpectedAttention> {
        self.score.expected_attention()
    }

    fn layer_capacities(&self, n_layers: usize, prompt_len: usize, capacity: usize) -> Option<Vec<usize>> {
        self.score.layer_capacities(n_layers, prompt_len, capacity)
    }

    fn select(&mut self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Tensor<B, 3, Int> {
        let masked = match self.masked_score(stats, ctx) {
            Masked::Scores(masked) => masked,
            Masked::Victim(victim) => return victim,
        };
        if ctx.n_evict == 1 {
            // One eviction per step while decoding: a minimum, not a sort.
            masked.argmin(2)
        } else {
            ctx.ranking.smallest(masked, ctx.n_evict)
        }
    }

    fn select_mask(&mut self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Tensor<B, 3, Bool> {
        match self.masked_score(stats, ctx) {
            Masked::Scores(masked) if ctx.n_evict > 1 => ctx.ranking.smallest_mask(masked, ctx.n_evict),
            Masked::Scores(masked) => slot_mask(masked.argmin(2), ctx.slots),
            Masked::Victim(victim) => slot_mask(victim, ctx.slots),
        }
    }
}

/// A score with every slot outside the scope at [`NEVER`], or the victim itself.
enum Masked<B: Backend> {
    Scores(Tensor<B, 3>),
    /// A single eviction from a [`Scope::Smallest`], found without ranking every slot.
    Victim(Tensor<B, 3, Int>),
}

impl<B: Backend> ScoredPolicy<B> {
    /// Every slot's score, the slots outside the scope at [`NEVER`] (never evicted first).
    pub(crate) fn scores(&self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Tensor<B, 3> {
        let (score, scope) = self.score_and_scope(stats, ctx);
        out_of_scope_never(score, scope, ctx)
    }

    fn masked_score(&self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Masked<B> {
        match self.score_and_scope(stats, ctx) {
            (score, Scope::Smallest { key, k }) if ctx.n_evict == 1 => {
                Masked::Victim(lowest_among_smallest(score, key, k, ctx.ranking))
            }
            (score, scope) => Masked::Scores(out_of_scope_never(score, scope, ctx)),
        }
    }

    fn score_and_scope(&self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> (Tensor<B, 3>, Scope<B>) {
        let score = self.score.score(stats, ctx);
        // NaN or huge scores must not outrank real ones.
        let score = score
            .clone()
            .mask_fill(score.is_nan(), NEVER)
            .clamp_min(-NEVER)
            .clamp_max(NEVER);
        (score, self.scope.scope(stats, ctx))
    }
}

/// `score` with every slot outside `scope` at [`NEVER`].
fn out_of_scope_never<B: Backend>(score: Tensor<B, 3>, scope: Scope<B>, ctx: &EvictionContext<B>) -> Tensor<B, 3> {
    match scope {
        Scope::Smallest { key, k } => score.mask_fill(smallest_mask(key, k, ctx.ranking).bool_not(), NEVER),
        Scope::Mask(eligible) => score.mask_fill(eligible.bool_not(), NEVER),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;
    use easykv_core::Ranking;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The rank test equals sorting, whether scores and keys agree (one round), disagree (many
    /// rounds, then the sorting fallback), tie, or exclude slots.
    #[test]
    fn lowest_among_smallest_equals_the_sorted_scope() {
        let dev = Default::default();
        let mut rng = StdRng::seed_from_u64(5);
        for case in 0..60 {
            let (b, h, n) = (rng.random_range(1..4), rng.random_range(1..4), rng.random_range(2..40));
            let k = rng.random_range(1..=n);
            let mut key = Vec::new();
            let mut score = Vec::new();
            for _ in 0..b * h * n {
                let x: f32 = rng.random();
                key.push(match case % 3 {
                    _ if rng.random_bool(0.1) => NEVER,
                    0 => x,
                    1 => (x * 4.0).round(), // ties
                    _ => 1.0 - x,
                });
                score.push(match case % 3 {
                    2 => x, // anti-correlated with the key: the lowest scores rank last
                    _ => x + rng.random::<f32>() * 0.3,
                });
            }
            let t = |v: Vec<f32>| Tensor::<Flex, 3>::from_data(TensorData::new(v, [b, h, n]), &dev);
            let (key, score) = (t(key), t(score));
            let ranking = Ranker::plain([Ranking::Sort, Ranking::Pairwise, Ranking::Host][case % 3]);
            let fast = lowest_among_smallest(score.clone(), key.clone(), k, ranking);
            let sorted = score
                .mask_fill(smallest_mask(key, k, Ranker::plain(Ranking::Sort)).bool_not(), NEVER)
                .argmin(2);
            assert_eq!(
                fast.into_data().convert::<i64>(),
                sorted.into_data().convert::<i64>(),
                "case {case}"
            );
        }
    }
}
