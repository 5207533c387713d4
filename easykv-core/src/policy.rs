//! What an eviction policy sees and answers.

use burn::tensor::{backend::Backend, Bool, IndexingUpdateOp, Int, Tensor};

/// Per-slot statistics, kept on the device next to the keys and values.
///
/// # Shapes
/// Every tensor is `[rows, kv_heads, slots]`. An [`crate::EvictingCache`] stacks all layers
/// along the first axis (`rows = layers × batch`) so that one policy call serves every layer.
#[derive(Debug, Clone)]
pub struct SlotStats<B: Backend> {
    /// S: attention received, summed over the queries recorded since the slot entered.
    pub sum: Tensor<B, 3>,
    /// Q: the sum of squares of that attention.
    pub sum_sq: Tensor<B, 3>,
    /// C: how many recorded queries attended the slot.
    pub count: Tensor<B, 3>,
    /// Attention from the most recent query row.
    pub last: Tensor<B, 3>,
    /// Absolute token position held by each slot.
    pub positions: Tensor<B, 3, Int>,
    /// The L2 norm of each slot's key, kept only for policies that ask
    /// ([`EvictionPolicy::uses_key_norms`]).
    pub key_norm: Option<Tensor<B, 3>>,
    /// Attention from the last [`EvictionPolicy::query_window`] queries of the latest chunk,
    /// summed, kept only for policies that ask (SnapKV's observation window).
    pub window: Option<Tensor<B, 3>>,
    /// The L2 norm of each slot's value, kept only for policies that ask
    /// ([`EvictionPolicy::uses_value_norms`]).
    pub value_norm: Option<Tensor<B, 3>>,
    /// The attention future queries are expected to pay each slot, made just before an
    /// eviction for policies that ask ([`EvictionPolicy::expected_attention`]; see
    /// [`crate::expected`]).
    pub expected: Option<Tensor<B, 3>>,
}

impl<B: Backend> SlotStats<B> {
    /// The statistics of rows `rows` (views, no copy on backends that slice lazily).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Self {
        self.clone()
            .map_each(|t| t.slice_dim(0, rows.clone()), |t| t.slice_dim(0, rows.clone()))
    }

    /// Stacks sets of equal slot counts along the row axis.
    pub fn stack(parts: Vec<Self>) -> Self {
        let field = |f: fn(&Self) -> Tensor<B, 3>| Tensor::cat(parts.iter().map(f).collect(), 0);
        Self {
            sum: field(|s| s.sum.clone()),
            sum_sq: field(|s| s.sum_sq.clone()),
            count: field(|s| s.count.clone()),
            last: field(|s| s.last.clone()),
            positions: Tensor::cat(parts.iter().map(|s| s.positions.clone()).collect(), 0),
            key_norm: optional_field(&parts, |s| s.key_norm.clone()),
            window: optional_field(&parts, |s| s.window.clone()),
            value_norm: optional_field(&parts, |s| s.value_norm.clone()),
            expected: optional_field(&parts, |s| s.expected.clone()),
        }
    }

    /// Applies `f` to every float statistic and `g` to the positions (a cut of rows, a
    /// selection of slots).
    pub fn map_each(
        self,
        f: impl Fn(Tensor<B, 3>) -> Tensor<B, 3>,
        g: impl Fn(Tensor<B, 3, Int>) -> Tensor<B, 3, Int>,
    ) -> Self {
        Self {
            sum: f(self.sum),
            sum_sq: f(self.sum_sq),
            count: f(self.count),
            last: f(self.last),
            positions: g(self.positions),
            key_norm: self.key_norm.map(&f),
            window: self.window.map(&f),
            value_norm: self.value_norm.map(&f),
            expected: self.expected.map(&f),
        }
    }
}

/// An optional statistic of every part stacked along the rows, if every part has it.
fn optional_field<B: Backend>(
    parts: &[SlotStats<B>],
    f: fn(&SlotStats<B>) -> Option<Tensor<B, 3>>,
) -> Option<Tensor<B, 3>> {
    let all: Option<Vec<Tensor<B, 3>>> = parts.iter().map(f).collect();
    all.map(|v| Tensor::cat(v, 0))
}

/// Whether the cache is taking in the prompt or generated tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Prefill,
    Decode,
}

/// The facts of one eviction step.
#[derive(Debug, Clone)]
pub struct EvictionContext<B: Backend> {
    pub phase: Phase,
    /// Live slots held now (before eviction).
    pub slots: usize,
    /// Slots to evict in every (batch, head).
    pub n_evict: usize,
    /// Leading slots never evicted.
    pub sinks: usize,
    /// Trailing slots never evicted.
    pub recent: usize,
    /// Size of the robust-σ candidate set (RoCo).
    pub robust_k: usize,
    /// Slots whose position is below this are never evicted.
    pub protected_positions: usize,
    /// Policies that draw random numbers derive them from this.
    pub seed: u64,
    /// Counts eviction steps, so random draws differ from step to step.
    pub step: u64,
    /// The layers the statistics' rows belong to, `batch` rows each, in order.
    pub layers: std::ops::Range<usize>,
    /// How k-smallest selections are computed on this backend, with its kernels.
    pub ranking: crate::Ranker<B>,
}

/// Chooses which slots to drop. Implementations live in `easykv-policies`.
pub trait EvictionPolicy<B: Backend>: Send {
    /// The name users select it by.
    fn name(&self) -> &str;

    /// Whether the policy reads attention statistics (recency and random do not).
    fn uses_attention(&self) -> bool {
        true
    }

    /// Whether the policy reads [`SlotStats::key_norm`] (the cache computes it only then).
    fn uses_key_norms(&self) -> bool {
        false
    }

    /// How many of a chunk's last queries [`SlotStats::window`] sums; 0: not kept.
    fn query_window(&self) -> usize {
        0
    }

    /// Whether the policy reads [`SlotStats::value_norm`] (the cache computes it only then).
    fn uses_value_norms(&self) -> bool {
        false
    }

    /// What [`SlotStats::expected`] is made with, for a policy that reads it (the cache then
    /// gathers the statistics of the prompt's queries); `None`: not made.
    fn expected_attention(&self) -> Option<crate::ExpectedAttention> {
        None
    }

    /// Per-layer capacities for a prompt of `prompt_len` tokens cut once to `capacity` slots
    /// per layer on average ([`crate::Mode::Once`]); `None`: every layer keeps `capacity`.
    fn layer_capacities(&self, _n_layers: usize, _prompt_len: usize, _capacity: usize) -> Option<Vec<usize>> {
        None
    }

    /// Whether the prompt's one cut ([`crate::Mode::Once`]) gives heads budgets of their own
    /// ([`select_per_head`](Self::select_per_head)), so that the heads of a layer keep
    /// different numbers of slots.
    fn per_head_budgets(&self) -> bool {
        false
    }

    /// The prompt's one cut with per-head budgets (AdaKV): for every (row, head), the slots
    /// it keeps, ascending, the heads of a row keeping `capacity` each on average (`None`:
    /// this policy has none; the cut keeps `capacity` in every head).
    fn select_per_head(
        &mut self,
        _stats: &SlotStats<B>,
        _ctx: &EvictionContext<B>,
        _capacity: usize,
    ) -> Option<Vec<Vec<usize>>> {
        None
    }

    /// Slot indices to evict, `ctx.n_evict` of them per (row, head), all distinct.
    ///
    /// # Shapes
    /// - returns `[rows, kv_heads, n_evict]`
    fn select(&mut self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Tensor<B, 3, Int>;

    /// [`select`](Self::select)'s slots as a mask over the `ctx.slots` slots. Policies that
    /// rank every slot answer this directly: compaction wants the mask, and turning a mask
    /// into indices and back costs a selection (on GPUs a dozen kernels or a round trip to
    /// the host) per eviction step.
    ///
    /// # Shapes
    /// - returns `[rows, kv_heads, slots]`
    fn select_mask(&mut self, stats: &SlotStats<B>, ctx: &EvictionContext<B>) -> Tensor<B, 3, Bool> {
        slot_mask(self.select(stats, ctx), ctx.slots)
    }
}

/// Marks the slots `indices` lists (`[rows, kv_heads, k]`) among `slots` slots.
///
/// # Shapes
/// - returns `[rows, kv_heads, slots]`
pub fn slot_mask<B: Backend>(indices: Tensor<B, 3, Int>, slots: usize) -> Tensor<B, 3, Bool> {
    let [rows, h, k] = indices.dims();
    let device = indices.device();
    Tensor::<B, 3>::zeros([rows, h, slots], &device)
        .scatter(2, indices, Tensor::ones([rows, h, k], &device), IndexingUpdateOp::Add)
        .greater_elem(0.5)
}
