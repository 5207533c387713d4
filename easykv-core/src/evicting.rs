//! A KV cache that stays within a budget by evicting slots chosen by a policy.

use std::ops::Range;

use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};

use crate::budget::Schedule;
use crate::expected::QueryMoments;
use crate::layer_kv::{ascending_rows, LayerKv};
use crate::policy::{EvictionContext, EvictionPolicy, Phase, SlotStats};
use crate::{CacheKernels, CachedKv, Error, KvCache, PoolRegion, Ranker, RegionSlots, Result};

/// Per-layer progress. Layers move in step while decoding; a layer-major prefill runs one
/// layer through several chunks before the next layer starts.
#[derive(Debug, Clone, Copy, Default)]
struct LayerProgress {
    /// Tokens appended to this layer.
    seen: usize,
    /// Tokens of the chunk in flight.
    chunk: usize,
    /// Eviction steps taken (random draws differ from step to step).
    steps: u64,
    /// Slots evicted per head.
    evicted: usize,
    /// Of those, slots still held, marked evicted (position −1) and masked out of attention
    /// until the next compaction.
    dead: usize,
}

/// One layer's attention over a chunk, reduced over the chunk's queries as soon as it is
/// observed (a `[batch, heads, s, slots]` probability tensor per layer held until the chunk's
/// end would cost 0.5 GB for a 64-token stride of a Llama-2-7B shape).
///
/// # Shapes
/// Every tensor is `[batch, heads, slots]`.
#[derive(Debug, Clone)]
struct Observed<B: Backend> {
    sum: Tensor<B, 3>,
    /// `None` for a one-query chunk (a decode step): the square of `sum`, taken once after the
    /// layers are stacked rather than once per layer.
    sum_sq: Option<Tensor<B, 3>>,
    /// The attention of the chunk's last query; `None` for a one-query chunk (it is `sum`).
    last: Option<Tensor<B, 3>>,
    /// The attention of the chunk's last `window` queries, summed, where the policy asks.
    window: Option<Tensor<B, 3>>,
}

/// A layer stack's observation: sums, sums of squares, the last query's attention and the
/// window's (where kept), `[layers·batch, heads, slots]` each.
type StackedObservation<B> = (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>, Option<Tensor<B, 3>>);

impl<B: Backend> Observed<B> {
    /// `window`: how many of the chunk's last queries to sum apart (0: none).
    fn new(probs: Tensor<B, 4>, window: usize) -> Self {
        let [b, h, s, n] = probs.dims();
        let window = (window > 0).then(|| {
            let w = window.min(s);
            probs.clone().slice_dim(2, s - w..s).sum_dim(2).reshape([b, h, n])
        });
        if s == 1 {
            return Self {
                sum: probs.reshape([b, h, n]),
                sum_sq: None,
                last: None,
                window,
            };
        }
        Self {
            sum: probs.clone().sum_dim(2).reshape([b, h, n]),
            sum_sq: Some(probs.clone().square().sum_dim(2).reshape([b, h, n])),
            last: Some(probs.slice_dim(2, s - 1..s).reshape([b, h, n])),
            window,
        }
    }

    /// Stacks the layers' observations (at least one, all from chunks of one length) along the
    /// row axis.
    fn stack(parts: Vec<Self>) -> StackedObservation<B> {
        let cat = |mut v: Vec<Tensor<B, 3>>| match v.len() {
            1 => v.remove(0),
            _ => Tensor::cat(v, 0),
        };
        let optional = |v: Vec<Option<Tensor<B, 3>>>| v.into_iter().collect::<Option<Vec<_>>>().map(cat);
        let (mut sums, mut squares, mut lasts, mut windows) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for o in parts {
            sums.push(o.sum);
            squares.push(o.sum_sq);
            lasts.push(o.last);
            windows.push(o.window);
        }
        let sum = cat(sums);
        let sum_sq = optional(squares).unwrap_or_else(|| sum.clone().square());
        let last = optional(lasts).unwrap_or_else(|| sum.clone());
        (sum, sum_sq, last, optional(windows))
    }
}

/// Slot statistics of every layer.
#[derive(Debug, Clone)]
enum Stats<B: Backend> {
    /// One `[layers·batch, heads, slots]` tensor per statistic: one policy call serves every
    /// layer, so a decode step costs a fixed handful of tensor operations for the whole model.
    Stacked(Option<SlotStats<B>>),
    /// One entry per layer, while a layer-major prefill leaves layers at different slot counts.
    PerLayer(Vec<Option<SlotStats<B>>>),
}

/// Evicts slots independently in every (layer, KV head), keeping the same count in every head
/// of a layer so tensors stay rectangular. Keys and values are compacted by row selection.
pub struct EvictingCache<B: Backend> {
    /// Per layer: keys and values `[batch, heads, slots, head_dim]`.
    kv: LayerKv<B>,
    stats: Stats<B>,
    /// Attention observed during the chunk in flight, per layer, reduced over its queries.
    pending: Vec<Option<Observed<B>>>,
    /// This chunk's statistics of every layer, written in place by the backend's
    /// [`ObservationWriter`](crate::ObservationWriter): sums, sums of squares, last rows
    /// (`[layers·batch, heads, slots]` each), and which layers' rows are written.
    written: Option<([Tensor<B, 3>; 3], Vec<bool>)>,
    /// A decode step's attention of every layer, `[layers, heads, slots]`, observed at once by
    /// a step over a memory pool ([`KvCache::observe_pooled`]).
    pooled: Option<Tensor<B, 3>>,
    progress: Vec<LayerProgress>,
    /// [`Self::dead_slot_bias`] for the next decode step, `[layers·batch, heads, 1, slots + 1]`.
    bias: Option<Tensor<B, 4>>,
    policy: Box<dyn EvictionPolicy<B>>,
    schedule: Schedule,
    /// The policy's per-layer capacities for the prompt's one cut ([`crate::Mode::Once`]); the
    /// layers then keep different slot counts and end their chunks one by one.
    layer_capacities: Option<Vec<usize>>,
    /// Tokens (prompt and generation) [`KvCache::reserve`] announced, if any.
    reserved_tokens: usize,
    /// The model's RoPE inverse frequencies (`head_dim / 2`), for policies that read
    /// [`SlotStats::expected`].
    rope_frequencies: Option<Vec<f32>>,
    /// Per layer, the statistics of the prompt's queries, for those policies.
    moments: Vec<Option<QueryMoments<B>>>,
    /// Per layer cut with per-head budgets, the positions every (batch, head) holds (its
    /// statistics are gone: nothing is evicted after that cut).
    head_positions: Vec<Option<Vec<Vec<usize>>>>,
}

impl<B: Backend> std::fmt::Debug for EvictingCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvictingCache")
            .field("policy", &self.policy.name())
            .field("schedule", &self.schedule)
            .finish()
    }
}

impl<B: Backend> EvictingCache<B> {
    /// A cache of `n_layers` layers that evicts by `policy` as `schedule` says, on a backend
    /// that offers `kernels`.
    pub fn new(
        n_layers: usize,
        policy: Box<dyn EvictionPolicy<B>>,
        schedule: Schedule,
        kernels: CacheKernels<B>,
    ) -> Self {
        let layer_capacities = match (schedule.evict_once, schedule.prefill_capacity) {
            (true, Some(c)) => policy
                .layer_capacities(n_layers, schedule.prompt_len, c)
                .filter(|caps| caps.len() == n_layers)
                .map(|caps| caps.into_iter().map(|k| k.clamp(1, schedule.prompt_len)).collect()),
            _ => None,
        };
        Self {
            kv: LayerKv::new(n_layers, kernels),
            stats: Stats::Stacked(None),
            pending: vec![None; n_layers],
            written: None,
            pooled: None,
            progress: vec![LayerProgress::default(); n_layers],
            bias: None,
            policy,
            schedule,
            layer_capacities,
            reserved_tokens: 0,
            rope_frequencies: None,
            moments: vec![None; n_layers],
            head_positions: vec![None; n_layers],
        }
    }

    /// The cache told the model's RoPE inverse frequencies (`1/θ^(2i/d)`, `i < d/2`), which
    /// policies reading [`SlotStats::expected`] need: without them those policies see none.
    pub fn with_rope_frequencies(mut self, inv_freq: Vec<f32>) -> Self {
        self.rope_frequencies = Some(inv_freq);
        self
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn policy_name(&self) -> &str {
        self.policy.name()
    }

    /// How k-smallest selections over `stats` run: as configured, or what suits the backend
    /// and the size of the problem.
    fn ranking(&self, stats: &SlotStats<B>) -> Ranker<B> {
        let [rows, heads, slots] = stats.sum.dims();
        let kernels = self.kv.kernels();
        let strategy = self
            .schedule
            .ranking
            .unwrap_or_else(|| kernels.ranking(rows * heads, slots));
        Ranker::new(strategy, kernels)
    }

    fn n_layers(&self) -> usize {
        self.kv.n_layers()
    }

    fn phase(&self, layer: usize) -> Phase {
        // The chunk in flight was counted on append; it belongs to the prompt if it ends
        // inside it.
        if self.progress[layer].seen <= self.schedule.prompt_len {
            Phase::Prefill
        } else {
            Phase::Decode
        }
    }

    fn capacity(&self, layer: usize) -> Option<usize> {
        match self.phase(layer) {
            Phase::Prefill => match &self.layer_capacities {
                Some(caps) => caps.get(layer).copied(),
                None => self.schedule.prefill_capacity,
            },
            Phase::Decode => self.schedule.decode_capacity,
        }
    }

    /// A multi-query chunk's statistics of `layer` written into the stacked rows of every
    /// layer by the backend's [`ObservationWriter`](crate::ObservationWriter) where it has one; `probs` back
    /// where there is none (or for one-query steps, which need no reduction).
    fn write_observation(&mut self, layer: usize, probs: Tensor<B, 4>) -> std::result::Result<(), Tensor<B, 4>> {
        let [b, h, s, n] = probs.dims();
        // One-query steps (decoding) need no reduction: nothing to look up for them. A
        // policy's query window is reduced by tensor operations.
        if s == 1 || probs.dtype() != DType::F32 || self.policy.query_window() > 0 {
            return Err(probs);
        }
        let Some(writer) = self.kv.kernels().observation_writer else {
            return Err(probs);
        };
        let rows = self.n_layers() * b;
        let fits = |w: &([Tensor<B, 3>; 3], Vec<bool>)| w.0[0].dims() == [rows, h, n] && !w.1[layer];
        if !self.written.as_ref().is_some_and(fits) {
            // A new chunk (or a new slot count): fresh rows, every value written before it is read.
            self.flush_written();
            let device = probs.device();
            let empty = || Tensor::<B, 3>::empty([rows, h, n], &device);
            self.written = Some(([empty(), empty(), empty()], vec![false; self.n_layers()]));
        }
        let Some((buffers, done)) = self.written.as_mut() else {
            return Err(probs);
        };
        let [sum, sum_sq, last] = &*buffers;
        writer(probs, [sum, sum_sq, last], layer * b)?;
        done[layer] = true;
        Ok(())
    }

    /// Hands the layers' written rows on as ordinary pending observations (for chunks that end
    /// for some layers only, as a layer-major prefill ends them).
    fn flush_written(&mut self) {
        let Some((buffers, done)) = self.written.take() else {
            return;
        };
        let b = self.batch();
        let [sum, sum_sq, last] = buffers;
        for (layer, _) in done.iter().enumerate().filter(|(_, d)| **d) {
            let rows = |t: &Tensor<B, 3>| t.clone().slice_dim(0, layer * b..(layer + 1) * b);
            self.pending[layer] = Some(Observed {
                sum: rows(&sum),
                sum_sq: Some(rows(&sum_sq)),
                last: Some(rows(&last)),
                window: None,
            });
        }
    }

    /// The written rows of `layers` as one stacked observation, if that is every layer and
    /// every one was written.
    fn take_written(&mut self, layers: &Range<usize>) -> Option<StackedObservation<B>> {
        let whole = *layers == (0..self.n_layers());
        if !whole || !self.written.as_ref().is_some_and(|(_, done)| done.iter().all(|d| *d)) {
            self.flush_written();
            return None;
        }
        let ([sum, sum_sq, last], _) = self.written.take()?;
        Some((sum, sum_sq, last, None))
    }

    /// Before `s` new slots of `layer` are appended: several new tokens are attended causally
    /// as the last slots, so slots evicted but not yet compacted away are compacted first.
    fn prepare_append(&mut self, layer: usize, s: usize) -> Result<()> {
        if layer >= self.n_layers() {
            return Err(Error::LayerOutOfRange {
                layer,
                layers: self.n_layers(),
            });
        }
        if s > 1 && self.progress[layer].dead > 0 {
            let stats = self.take_stacked()?;
            let stats = stats.map(|st| self.flush(st, 0..self.n_layers()));
            self.stats = Stats::Stacked(stats);
            self.bias = None;
        }
        Ok(())
    }

    /// After `s` new slots of `layer` were appended.
    fn count_appended(&mut self, layer: usize, s: usize) {
        let p = &mut self.progress[layer];
        let first = p.seen;
        p.seen += s;
        p.chunk = s;
        if let Some(Some(heads)) = self.head_positions.get_mut(layer) {
            heads.iter_mut().for_each(|h| h.extend(first..first + s));
        }
    }

    /// Whether this chunk's attention is recorded into S, Q and C. As in EasyKV: while
    /// decoding under a decode budget always; while prefilling once the cache is over its
    /// capacity (or always with `keep_attention`).
    fn recording(&self, layer: usize) -> bool {
        let slots = self.slots(layer);
        match self.phase(layer) {
            Phase::Prefill => self
                .schedule
                .prefill_capacity
                .is_some_and(|c| self.schedule.keep_attention || slots > c),
            Phase::Decode => self.schedule.decode_capacity.is_some(),
        }
    }

    fn batch(&self) -> usize {
        self.kv.batch_heads().map_or(1, |(b, _)| b)
    }

    fn heads(&self) -> usize {
        self.kv.batch_heads().map_or(1, |(_, h)| h)
    }

    /// Sorted absolute positions held in `layer`, per (batch, head) flattened as `[b·h][slots]`.
    pub fn kept_positions(&self, layer: usize) -> Vec<Vec<usize>> {
        if let Some(Some(heads)) = self.head_positions.get(layer) {
            return heads.clone();
        }
        let Some(stats) = self.stats(layer) else {
            return Vec::new();
        };
        let [b, h, n] = stats.positions.dims();
        let flat = host_positions(stats.positions);
        (0..b * h)
            .map(|row| {
                let mut v: Vec<usize> = flat[row * n..(row + 1) * n].iter().map(|&p| p as usize).collect();
                v.sort_unstable();
                v
            })
            .collect()
    }

    /// The statistics of `layer` (for tests and inspection).
    pub fn stats(&self, layer: usize) -> Option<SlotStats<B>> {
        if layer >= self.n_layers() {
            return None;
        }
        let st = match &self.stats {
            Stats::Stacked(s) => s
                .as_ref()
                .map(|s| s.rows(layer * self.batch()..(layer + 1) * self.batch())),
            Stats::PerLayer(v) => v[layer].clone(),
        }?;
        // Slots marked evicted but not compacted away yet are not part of the cache.
        match self.progress[layer].dead {
            0 => Some(st),
            dead => {
                let keep = live_slots(&st, dead, self.ranking(&st));
                Some(pick_slots(st, keep, self.kv.kernels().host_resident()))
            }
        }
    }

    /// All layers' statistics as one stacked set (layers in step), or `None` before any chunk.
    fn take_stacked(&mut self) -> Result<Option<SlotStats<B>>> {
        match std::mem::replace(&mut self.stats, Stats::Stacked(None)) {
            Stats::Stacked(s) => Ok(s),
            Stats::PerLayer(v) => {
                if v.iter().all(Option::is_none) {
                    return Ok(None);
                }
                let all: Option<Vec<SlotStats<B>>> = v.into_iter().collect();
                let all = all.ok_or(Error::LayersOutOfStep)?;
                if all.iter().any(|s| s.sum.dims()[2] != all[0].sum.dims()[2]) {
                    return Err(Error::LayersOutOfStep);
                }
                Ok(Some(SlotStats::stack(all)))
            }
        }
    }

    /// `layer`'s own statistics, splitting a stacked set into per-layer views first.
    fn take_layer(&mut self, layer: usize) -> Option<SlotStats<B>> {
        let b = self.batch();
        if let Stats::Stacked(s) = &mut self.stats {
            let per_layer = match s.take() {
                Some(s) => (0..self.kv.n_layers())
                    .map(|l| Some(s.rows(l * b..(l + 1) * b)))
                    .collect(),
                None => vec![None; self.kv.n_layers()],
            };
            self.stats = Stats::PerLayer(per_layer);
        }
        match &mut self.stats {
            Stats::PerLayer(v) => v[layer].take(),
            Stats::Stacked(_) => None,
        }
    }

    /// Grows `stats` (the rows of `layers`) by the chunk of `s` tokens just appended and adds
    /// what those layers observed.
    fn absorb(&mut self, stats: Option<SlotStats<B>>, layers: Range<usize>, s: usize) -> Option<SlotStats<B>> {
        let device = self.kv.device()?;
        let (rows, h) = (layers.len() * self.batch(), self.heads());
        let start = (self.progress[layers.start].seen - s) as i64;
        let positions = Tensor::<B, 1, Int>::arange(start..start + s as i64, &device)
            .reshape([1, 1, s])
            .repeat(&[rows, h, 1]);
        let zeros = Tensor::<B, 3>::zeros([rows, h, s], &device);
        // The new slots' key and value norms, where the policy reads them and an eviction may
        // still come (after `--mode once`'s cut none does: the norms are dropped, not grown
        // every decode step).
        let ahead = self.phase(layers.start) == Phase::Prefill || self.schedule.decode_capacity.is_some();
        let norms = match self.policy.uses_key_norms() && ahead {
            true => self.new_norms(layers.clone(), s, false),
            false => None,
        };
        let value_norms = match self.policy.uses_value_norms() && ahead {
            true => self.new_norms(layers.clone(), s, true),
            false => None,
        };
        let window = (self.policy.query_window() > 0).then(|| zeros.clone());
        let mut st = match stats {
            None => SlotStats {
                sum: zeros.clone(),
                sum_sq: zeros.clone(),
                count: zeros.clone(),
                last: zeros,
                positions,
                key_norm: norms,
                window,
                value_norm: value_norms,
                expected: None,
            },
            Some(st) => {
                // Kept for every slot or not at all (the policy's needs never change).
                let grow =
                    |old: Option<Tensor<B, 3>>, new: Option<Tensor<B, 3>>| Some(Tensor::cat(vec![old?, new?], 2));
                SlotStats {
                    key_norm: grow(st.key_norm.clone(), norms),
                    window: grow(st.window.clone(), window),
                    value_norm: grow(st.value_norm.clone(), value_norms),
                    expected: None,
                    sum: Tensor::cat(vec![st.sum, zeros.clone()], 2),
                    sum_sq: Tensor::cat(vec![st.sum_sq, zeros.clone()], 2),
                    count: Tensor::cat(vec![st.count, zeros.clone()], 2),
                    last: Tensor::cat(vec![st.last, zeros], 2),
                    positions: Tensor::cat(vec![st.positions, positions], 2),
                }
            }
        };
        let written = self.take_written(&layers);
        let observed: Vec<Observed<B>> = self.pending[layers.clone()]
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        // A pooled step's rows are the stack of one-query observations already.
        let whole = layers == (0..self.n_layers());
        let pooled = self.pooled.take().filter(|_| s == 1 && whole).map(|t| {
            let window = (self.policy.query_window() > 0).then(|| t.clone());
            (t.clone(), t.clone().square(), t, window)
        });
        // One update for every layer: `[layers·batch, heads, slots]`.
        let stacked = match (written, pooled) {
            (Some(w), _) => Some(w),
            (None, Some(p)) => Some(p),
            (None, None) if observed.len() == layers.len() && !observed.is_empty() => Some(Observed::stack(observed)),
            (None, None) => None,
        };
        if let Some((sum, sum_sq, last, window)) = stacked {
            let n = st.sum.dims()[2];
            st.sum = st.sum + sum;
            st.sum_sq = st.sum_sq + sum_sq;
            st.last = last;
            if window.is_some() {
                st.window = window;
            }
            // Queries of this chunk that could see each slot: all s for older slots, s − t for
            // the chunk's own token t (causal).
            st.count = if s == 1 {
                st.count.add_scalar(1.0)
            } else {
                let seen: Vec<f32> = (0..n)
                    .map(|j| if j + s < n { s as f32 } else { (n - j) as f32 })
                    .collect();
                st.count + Tensor::<B, 1>::from_data(TensorData::new(seen, [n]), &device).reshape([1, 1, n])
            };
        }
        Some(st)
    }

    /// The key (or with `values` value) norms of the last `s` slots of every layer of
    /// `layers`, stacked: `[layers·batch, heads, s]`.
    fn new_norms(&self, layers: Range<usize>, s: usize, values: bool) -> Option<Tensor<B, 3>> {
        let parts: Option<Vec<Tensor<B, 3>>> = layers
            .map(|l| {
                let n = self.kv.physical_slots(l);
                self.kv.norms(l, n.checked_sub(s)?..n, values)
            })
            .collect();
        parts.map(|p| Tensor::cat(p, 0))
    }

    /// The facts of evicting `n_evict` of the live slots of `layers`' rows.
    fn context(&self, stats: &SlotStats<B>, layers: Range<usize>, n_evict: usize) -> EvictionContext<B> {
        let first = layers.start;
        let phase = self.phase(first);
        let sched = &self.schedule;
        let (recent, robust_k, protected) = match phase {
            Phase::Prefill => (sched.prefill_recent, sched.prefill_robust_k, 0),
            Phase::Decode => (
                sched.decode_recent,
                sched.decode_robust_k,
                sched.decode_protected_positions,
            ),
        };
        EvictionContext {
            phase,
            slots: self.slots(first),
            n_evict,
            sinks: sched.sinks,
            recent,
            robust_k,
            protected_positions: protected,
            seed: sched.seed,
            step: self.progress[first].steps,
            layers,
            ranking: self.ranking(stats),
        }
    }

    /// The policy's choice of `n_evict` victims among the live slots of `layers`' rows.
    fn victims(&mut self, stats: &SlotStats<B>, layers: Range<usize>, n_evict: usize) -> Tensor<B, 3, Int> {
        let ctx = self.context(stats, layers, n_evict);
        self.policy.select(stats, &ctx)
    }

    /// Evicts the rows of `layers` down to `capacity` slots in every head with one policy call
    /// and compacts keys, values and statistics; returns the statistics.
    fn evict(&mut self, stats: SlotStats<B>, layers: Range<usize>, capacity: usize) -> SlotStats<B> {
        let stats = self.flush(stats, layers.clone());
        let stats = self.with_expected(stats, &layers);
        let n = stats.sum.dims()[2];
        let ranking = self.ranking(&stats);
        let keep = if n - capacity == 1 {
            keep_indices(self.victims(&stats, layers.clone(), 1), capacity)
        } else {
            let ctx = self.context(&stats, layers.clone(), n - capacity);
            ranking.true_slots(self.policy.select_mask(&stats, &ctx).bool_not(), capacity)
        };
        for layer in layers.clone() {
            let p = &mut self.progress[layer];
            p.evicted += n - capacity;
            p.steps += 1;
        }
        let mut stats = self.compact(stats, layers, keep);
        stats.expected = None;
        stats
    }

    /// `stats` with [`SlotStats::expected`] made for `layers`, where the policy reads it and
    /// the cache knows the model's RoPE frequencies.
    fn with_expected(&self, mut stats: SlotStats<B>, layers: &Range<usize>) -> SlotStats<B> {
        let (Some(spec), Some(inv_freq)) = (self.policy.expected_attention(), self.rope_frequencies.as_ref()) else {
            return stats;
        };
        let (b, d) = (self.batch(), 2 * inv_freq.len());
        let Some(device) = self.kv.device() else {
            return stats;
        };
        // Layers evicted together are in step: one rotation, made and uploaded once.
        let first = layers.start;
        let rotation = crate::expected::averaged_rotation(inv_freq, self.progress[first].seen, spec.future_positions);
        let rotation = Tensor::<B, 2>::from_data(TensorData::new(rotation, [d, d]), &device);
        let parts: Option<Vec<Tensor<B, 3>>> = layers
            .clone()
            .enumerate()
            .map(|(i, l)| {
                // Frequencies of another head size (a caller's mistake) make none.
                let keys = self.kv.live_keys(l).filter(|k| k.dims()[3] == d)?;
                let moments = self.moments.get(l)?.as_ref()?;
                let positions = stats.positions.clone().slice_dim(0, i * b..(i + 1) * b);
                Some(crate::expected::expected_attention(
                    keys,
                    moments,
                    rotation.clone(),
                    positions,
                    spec.skip_first,
                ))
            })
            .collect();
        stats.expected = parts.map(|p| Tensor::cat(p, 0));
        stats
    }

    /// Evicts like [`evict`](Self::evict) but only marks the victims (position −1): keys and
    /// values stay where they are, masked out of attention by [`KvCache::slot_bias`], until
    /// [`DEAD_SLOTS_BEFORE_COMPACTION`] have gathered. A decode step then costs no copy of the
    /// cache beyond the one its append makes.
    fn evict_lazily(&mut self, stats: SlotStats<B>, layers: Range<usize>, capacity: usize) -> SlotStats<B> {
        let mut stats = self.with_expected(stats, &layers);
        let [rows, h, n] = stats.sum.dims();
        let n_evict = self.slots(layers.start) - capacity;
        let evict = self.victims(&stats, layers.clone(), n_evict);
        // Made for this eviction only (the next one sees other slots and statistics).
        stats.expected = None;
        let device = evict.device();
        let marks = if n_evict == 1 {
            // Float rows minus a column: far cheaper on flex than integer scatters.
            let index = Tensor::<B, 2>::zeros([rows * h, n], &device)
                + Tensor::<B, 1, Int>::arange(0..n as i64, &device)
                    .float()
                    .reshape([1, n]);
            (index - evict.reshape([rows * h, 1]).float())
                .equal_elem(0.0)
                .reshape([rows, h, n])
        } else {
            Tensor::<B, 3, Int>::zeros([rows, h, n], &device)
                .cast(evict.dtype())
                .scatter(
                    2,
                    evict.clone(),
                    Tensor::<B, 3, Int>::ones([rows, h, n_evict], &device).cast(evict.dtype()),
                    burn::tensor::IndexingUpdateOp::Add,
                )
                .greater_elem(0)
        };
        stats.positions = stats.positions.mask_fill(marks, -1);
        for layer in layers.clone() {
            let p = &mut self.progress[layer];
            p.evicted += n_evict;
            p.dead += n_evict;
            p.steps += 1;
        }
        if self.progress[layers.start].dead >= DEAD_SLOTS_BEFORE_COMPACTION {
            stats = self.flush(stats, layers);
        }
        stats
    }

    /// Compacts away the slots marked evicted in `layers` (a no-op when there are none).
    fn flush(&mut self, stats: SlotStats<B>, layers: Range<usize>) -> SlotStats<B> {
        let dead = self.progress[layers.start].dead;
        if dead == 0 {
            return stats;
        }
        let keep = live_slots(&stats, dead, self.ranking(&stats));
        for layer in layers.clone() {
            self.progress[layer].dead = 0;
        }
        self.compact(stats, layers, keep)
    }

    /// Keeps the slots `keep` lists (`[rows, heads, kept]`, ascending) in the statistics and in
    /// every layer's keys and values.
    fn compact(&mut self, stats: SlotStats<B>, layers: Range<usize>, keep: Tensor<B, 3, Int>) -> SlotStats<B> {
        self.kv.retain_layers(layers, keep.clone());
        pick_slots(stats, keep, self.kv.kernels().host_resident())
    }

    /// Ends the chunk in flight for `layers` (all of them in step): absorbs what they observed
    /// and evicts if they are over capacity.
    fn finish_chunk(&mut self, stats: Option<SlotStats<B>>, layers: Range<usize>) -> Option<SlotStats<B>> {
        let first = layers.start;
        let s = self.progress[first].chunk;
        if s == 0 {
            return stats;
        }
        for l in layers.clone() {
            self.progress[l].chunk = 0;
        }
        // Cut with per-head budgets: no statistics, nothing more to evict.
        if self.kv.is_ragged(first) {
            return None;
        }
        let st = self.absorb(stats, layers.clone(), s)?;
        let Some(capacity) = self.capacity(first) else {
            return Some(st);
        };
        let slots = self.slots(first);
        let phase = self.phase(first);
        let slack = match phase {
            Phase::Prefill => 0,
            Phase::Decode => self.schedule.decode_stride.saturating_sub(1),
        };
        let prompt_unfinished = self.progress[first].seen < self.schedule.prompt_len;
        if slots <= capacity + slack || (self.schedule.evict_once && prompt_unfinished) {
            Some(st)
        } else if phase == Phase::Decode && !self.schedule.streaming {
            // StreamingLLM positions are slot indices: its slots must stay compact.
            Some(self.evict_lazily(st, layers, capacity))
        } else if self.schedule.evict_once && self.policy.per_head_budgets() && !self.schedule.streaming {
            self.cut_per_head(st, layers, capacity)
        } else {
            let st = self.evict(st, layers.clone(), capacity);
            if self.schedule.evict_once {
                // The prompt's one cut: buffers shrink to what is kept plus the generation
                // announced, so a layer that keeps less holds fewer bytes.
                let generated = self.reserved_tokens.saturating_sub(self.schedule.prompt_len);
                for layer in layers {
                    self.kv.shrink(layer, capacity + generated);
                }
            }
            Some(st)
        }
    }

    /// The prompt's one cut with per-head budgets ([`EvictionPolicy::select_per_head`]): each
    /// (batch, head) of `layers` keeps the slots the policy chose for it, in buffers of its own
    /// sized to them plus the generation announced, so heads that keep less hold fewer bytes.
    /// The statistics are dropped (nothing is evicted after this cut). A policy that answers
    /// no valid choice gets the uniform cut, and so do StreamingLLM positions (keys rotated by
    /// their slot index, which padding would shift).
    fn cut_per_head(&mut self, stats: SlotStats<B>, layers: Range<usize>, capacity: usize) -> Option<SlotStats<B>> {
        let stats = self.flush(stats, layers.clone());
        let stats = self.with_expected(stats, &layers);
        let [rows, h, n] = stats.sum.dims();
        let ctx = self.context(&stats, layers.clone(), n - capacity);
        let keep = self.policy.select_per_head(&stats, &ctx, capacity).filter(|keep| {
            keep.len() == rows * h
                && keep
                    .iter()
                    .all(|r| r.windows(2).all(|w| w[0] < w[1]) && r.last().is_none_or(|&l| l < n))
        });
        let Some(keep) = keep else {
            return Some(self.evict(stats, layers, capacity));
        };
        let per_layer = rows / layers.len().max(1) * h;
        let positions = host_positions(stats.positions);
        let room = self.reserved_tokens.saturating_sub(self.schedule.prompt_len);
        for (i, layer) in layers.enumerate() {
            let kept = &keep[i * per_layer..(i + 1) * per_layer];
            let held = kept
                .iter()
                .enumerate()
                .map(|(r, slots)| {
                    let row = &positions[(i * per_layer + r) * n..(i * per_layer + r + 1) * n];
                    slots.iter().map(|&s| row[s].max(0) as usize).collect()
                })
                .collect();
            if self.kv.split_heads(layer, kept, room) {
                self.head_positions[layer] = Some(held);
            }
            let p = &mut self.progress[layer];
            p.evicted += n - capacity;
            p.steps += 1;
        }
        None
    }

    /// The additive attention bias that masks slots evicted but not yet compacted away, for
    /// every layer (stacked), with a zero column for the token the next decode step appends.
    fn dead_slot_bias(&self) -> Option<Tensor<B, 4>> {
        let Stats::Stacked(Some(st)) = &self.stats else {
            return None;
        };
        if self.progress.first().is_none_or(|p| p.dead == 0) {
            return None;
        }
        let [rows, h, n] = st.positions.dims();
        let device = st.positions.device();
        let bias = Tensor::<B, 3>::zeros([rows, h, n], &device)
            .mask_fill(st.positions.clone().lower_elem(0), f32::NEG_INFINITY);
        Some(Tensor::cat(vec![bias, Tensor::zeros([rows, h, 1], &device)], 2).reshape([rows, h, 1, n + 1]))
    }
}

/// The live slots (position ≥ 0) of every row, in order, `dead` fewer than the row holds.
fn live_slots<B: Backend>(stats: &SlotStats<B>, dead: usize, ranking: Ranker<B>) -> Tensor<B, 3, Int> {
    let n = stats.positions.dims()[2];
    ranking.true_slots(stats.positions.clone().greater_equal_elem(0), n - dead)
}

/// The statistics of the slots `keep` lists (`[rows, heads, kept]`).
fn pick_slots<B: Backend>(stats: SlotStats<B>, keep: Tensor<B, 3, Int>, host: bool) -> SlotStats<B> {
    let [rows, h, n] = stats.sum.dims();
    let kept = keep.dims()[2];
    let device = keep.device();
    if host {
        if let Some(order) = ascending_rows(keep.clone()).filter(|o| o.iter().all(|&i| i < n)) {
            return pick_slots_on_host(stats, &order, kept);
        }
    }
    // Row numbers into flattened [rows·h·n] tensors: whole rows are copied, far cheaper than an
    // element-wise gather.
    let offsets = Tensor::<B, 1, Int>::arange_step(0..(rows * h * n) as i64, n, &device)
        .reshape([rows, h, 1])
        .cast(keep.dtype());
    let flat_rows = (keep + offsets).reshape([rows * h * kept]);
    let pick = |t: Tensor<B, 3>| {
        t.reshape([rows * h * n])
            .select(0, flat_rows.clone())
            .reshape([rows, h, kept])
    };
    let pick_int = |t: Tensor<B, 3, Int>| {
        t.reshape([rows * h * n])
            .select(0, flat_rows.clone())
            .reshape([rows, h, kept])
    };
    stats.map_each(pick, pick_int)
}

/// [`pick_slots`] on the host: flex gathers single elements slowly (~40 µs for 2,000).
/// `order` holds `kept` ascending slot indices per (row, head).
fn pick_slots_on_host<B: Backend>(stats: SlotStats<B>, order: &[usize], kept: usize) -> SlotStats<B> {
    let [rows, h, n] = stats.sum.dims();
    let device = stats.sum.device();
    // Row r's slots `order[r·kept..][..kept]` out of its `n` values.
    fn gather<T: Copy>(values: &[T], order: &[usize], kept: usize, n: usize) -> Vec<T> {
        order
            .chunks(kept.max(1))
            .enumerate()
            .flat_map(|(r, slots)| slots.iter().map(move |&j| values[r * n + j]))
            .collect()
    }
    let pick = |t: Tensor<B, 3>| {
        let values: Vec<f32> = t.into_data().convert::<f32>().into_vec().unwrap_or_default();
        Tensor::<B, 3>::from_data(
            TensorData::new(gather(&values, order, kept, n), [rows, h, kept]),
            &device,
        )
    };
    let positions = |p: Tensor<B, 3, Int>| {
        Tensor::from_data(
            TensorData::new(gather(&host_positions(p), order, kept, n), [rows, h, kept]),
            &device,
        )
    };
    stats.map_each(pick, positions)
}

/// Slot positions read back to the host, flattened.
fn host_positions<B: Backend>(positions: Tensor<B, 3, Int>) -> Vec<i64> {
    positions.into_data().convert::<i64>().into_vec().unwrap_or_default()
}

/// Evicted slots that may gather while decoding before keys and values are compacted.
pub const DEAD_SLOTS_BEFORE_COMPACTION: usize = 32;

/// The `keep` slots other than the one `evict` names (`[rows, heads, 1]`), in ascending order:
/// slot j < e stays at j, the rest shift by one.
fn keep_indices<B: Backend>(evict: Tensor<B, 3, Int>, keep: usize) -> Tensor<B, 3, Int> {
    let [rows, h, _] = evict.dims();
    let device = evict.device();
    let idx = Tensor::<B, 1, Int>::arange(0..keep as i64, &device)
        .reshape([1, 1, keep])
        .repeat(&[rows, h, 1]);
    let idx = idx.cast(evict.dtype());
    let shift = idx
        .clone()
        .greater_equal(evict.repeat_dim(2, keep))
        .int()
        .cast(idx.dtype());
    idx + shift
}

impl<B: Backend> KvCache<B> for EvictingCache<B> {
    fn append(
        &mut self,
        layer: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        Ok(self.append_in_place(layer, keys, values)?.used())
    }

    fn append_in_place(&mut self, layer: usize, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<CachedKv<B>> {
        let s = keys.dims()[2];
        self.prepare_append(layer, s)?;
        let out = self.kv.append_in_place(layer, keys, values)?;
        self.count_appended(layer, s);
        Ok(out)
    }

    fn append_per_head(
        &mut self,
        layer: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<Option<Vec<CachedKv<B>>>> {
        if !self.kv.is_ragged(layer) {
            return Ok(None);
        }
        let s = keys.dims()[2];
        self.prepare_append(layer, s)?;
        let out = self.kv.append_per_head(layer, keys, values)?;
        self.count_appended(layer, s);
        Ok(out)
    }

    fn reserve_slots(
        &mut self,
        layer: usize,
        shape: [usize; 4],
        dtype: DType,
        device: &B::Device,
    ) -> Result<Option<CachedKv<B>>> {
        self.prepare_append(layer, shape[2])?;
        if self.kv.is_ragged(layer) {
            return Ok(None);
        }
        self.kv.reserve_slots(layer, shape, dtype, device).map(Some)
    }

    fn commit_slots(&mut self, layer: usize, s: usize) -> Result<CachedKv<B>> {
        let out = self.kv.commit_slots(layer, s)?;
        self.count_appended(layer, s);
        Ok(out)
    }

    fn wants_attention(&self, layer: usize) -> bool {
        layer < self.n_layers() && self.policy.uses_attention() && self.recording(layer)
    }

    fn wants_queries(&self, layer: usize) -> bool {
        // The prompt's queries only, as kvpress gathers them.
        self.policy.expected_attention().is_some()
            && self
                .progress
                .get(layer)
                .is_some_and(|p| p.seen < self.schedule.prompt_len)
    }

    fn observe_queries(&mut self, layer: usize, queries: Tensor<B, 4>) -> Result<()> {
        if !self.wants_queries(layer) {
            return Ok(());
        }
        let skip = self.policy.expected_attention().map_or(0, |e| e.skip_first);
        // This chunk holds positions `seen..seen + s` (its keys are not appended yet).
        let [_, _, s, _] = queries.dims();
        let first = skip.saturating_sub(self.progress[layer].seen).min(s);
        if first < s {
            let q = queries.slice_dim(2, first..s);
            self.moments[layer] = Some(QueryMoments::add(self.moments[layer].take(), q));
        }
        Ok(())
    }

    fn observe(&mut self, layer: usize, probs: Tensor<B, 4>) -> Result<()> {
        if layer >= self.n_layers() {
            return Err(Error::LayerOutOfRange {
                layer,
                layers: self.n_layers(),
            });
        }
        if !self.recording(layer) {
            return Ok(());
        }
        let probs = match self.write_observation(layer, probs) {
            Ok(()) => return Ok(()),
            Err(probs) => probs,
        };
        self.pending[layer] = Some(Observed::new(probs, self.policy.query_window()));
        Ok(())
    }

    fn observe_pooled(&mut self, probs: Tensor<B, 3>, layers: &[bool]) -> Result<()> {
        // Kept whole where it is every layer's one-query observation over the same slots (the
        // decode steps of layers in step); otherwise layer by layer.
        let [rows, _, columns] = probs.dims();
        let n = self.n_layers();
        let whole = rows == n
            && self.batch() == 1
            && layers.len() == n
            && layers.iter().all(|o| *o)
            && matches!(self.stats, Stats::Stacked(_))
            && (0..n).all(|l| {
                self.wants_attention(l)
                    && self.progress[l].chunk == 1
                    && self.progress[l].dead == 0
                    && !self.kv.is_ragged(l)
                    && self.kv.physical_slots(l) == self.kv.physical_slots(0)
            });
        let slots = self.kv.physical_slots(0);
        if !whole || slots > columns {
            return crate::cache::observe_rows(self, probs, layers);
        }
        self.pooled = Some(probs.slice_dim(2, 0..slots));
        Ok(())
    }

    fn end_chunk(&mut self) -> Result<()> {
        let layers = 0..self.n_layers();
        if self.progress.iter().any(|p| p.seen != self.progress[0].seen) {
            return Err(Error::LayersOutOfStep);
        }
        if self.layer_capacities.is_some() {
            // Layers of different sizes: each ends its chunk on its own (no evicted slots
            // await compaction here: this mode never evicts while decoding). After the cut no
            // eviction reads the statistics again, so decode steps leave them as the cut left
            // them rather than grow every layer's on its own (launches per layer and step).
            let cut_done = self.phase(0) == Phase::Decode && self.schedule.decode_capacity.is_none();
            for layer in layers {
                match cut_done {
                    true => self.progress[layer].chunk = 0,
                    false => self.end_layer_chunk(layer)?,
                }
            }
            self.bias = None;
            return Ok(());
        }
        let stats = self.take_stacked()?;
        let stats = self.finish_chunk(stats, layers);
        self.stats = Stats::Stacked(stats);
        self.bias = self.dead_slot_bias();
        // Only ever for the step it was observed in.
        self.pooled = None;
        Ok(())
    }

    fn slot_bias(&self, layer: usize) -> Option<Tensor<B, 4>> {
        if self.kv.is_ragged(layer) {
            return self.kv.padding_bias(layer);
        }
        let bias = self.bias.as_ref()?;
        let b = self.batch();
        // Only valid for the one-token step it was made for.
        (bias.dims()[3] == self.kv.physical_slots(layer)).then(|| bias.clone().slice_dim(0, layer * b..(layer + 1) * b))
    }

    fn end_layer_chunk(&mut self, layer: usize) -> Result<()> {
        if layer >= self.n_layers() {
            return Err(Error::LayerOutOfRange {
                layer,
                layers: self.n_layers(),
            });
        }
        let stats = self.take_layer(layer);
        let stats = self.finish_chunk(stats, layer..layer + 1);
        if let Stats::PerLayer(v) = &mut self.stats {
            v[layer] = stats;
        }
        Ok(())
    }

    fn prefill_chunks(&self, prompt_len: usize, chunk_size: usize) -> Vec<usize> {
        if prompt_len == self.schedule.prompt_len {
            self.schedule.prefill_chunks.clone()
        } else {
            crate::cache::uniform_chunks(prompt_len, chunk_size)
        }
    }

    fn place_in(&mut self, region: PoolRegion<B>) -> bool {
        self.kv.place_in(region)
    }

    fn region_slots(&self, layer: usize) -> Option<RegionSlots<B>> {
        self.kv.region_slots(layer)
    }

    fn reserve(&mut self, tokens: usize) {
        self.reserved_tokens = tokens;
        let peak = self.peak_slots(tokens);
        self.kv.reserve(peak);
    }

    fn peak_slots(&self, tokens: usize) -> usize {
        // The most slots the schedule ever holds at once: a chunk on top of a full prefill
        // cache, a decode step plus evicted slots awaiting compaction, or (no decode budget)
        // what prefill kept plus every generated token.
        let sched = &self.schedule;
        let largest_layer = self.layer_capacities.as_ref().and_then(|c| c.iter().max().copied());
        let kept = largest_layer.or(sched.prefill_capacity).unwrap_or(sched.prompt_len);
        let prefill_peak = match sched.evict_once {
            true => sched.prompt_len,
            false => sched
                .prefill_capacity
                .map_or(sched.prompt_len, |c| c + sched.stride.max(1)),
        };
        let generated = tokens.saturating_sub(sched.prompt_len);
        // Evictions of at least DEAD_SLOTS_BEFORE_COMPACTION slots are compacted at once.
        let awaiting = match sched.decode_stride >= DEAD_SLOTS_BEFORE_COMPACTION {
            true => 0,
            false => DEAD_SLOTS_BEFORE_COMPACTION,
        };
        let decode_peak = match sched.decode_capacity {
            Some(c) => (c + sched.decode_stride + awaiting).min(kept + generated),
            None => kept + generated,
        };
        prefill_peak.max(decode_peak)
    }

    fn evicted(&self) -> usize {
        self.progress.first().map_or(0, |p| p.evicted)
    }

    fn compact_positions(&self) -> bool {
        self.schedule.streaming
    }

    fn next_position(&self) -> usize {
        if self.schedule.streaming {
            self.slots(0)
        } else {
            self.tokens_seen()
        }
    }

    fn tokens_seen(&self) -> usize {
        self.progress.iter().map(|p| p.seen).min().unwrap_or(0)
    }

    fn slots(&self, layer: usize) -> usize {
        self.kv.physical_slots(layer) - self.progress.get(layer).map_or(0, |p| p.dead)
    }

    fn head_slots(&self, layer: usize) -> Option<Vec<usize>> {
        let heads = self.head_positions.get(layer)?.as_ref()?;
        Some(heads.iter().map(Vec::len).collect())
    }

    fn bytes(&self) -> u64 {
        self.kv.bytes()
    }

    fn clear(&mut self) {
        self.kv.clear();
        self.pending.iter_mut().for_each(|e| *e = None);
        self.written = None;
        self.pooled = None;
        self.stats = Stats::Stacked(None);
        self.bias = None;
        self.progress.iter_mut().for_each(|p| *p = LayerProgress::default());
        self.moments.iter_mut().for_each(|m| *m = None);
        self.head_positions.iter_mut().for_each(|p| *p = None);
    }
}
