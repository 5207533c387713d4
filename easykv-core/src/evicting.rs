//! A KV cache that stays within a budget by evicting slots chosen by a policy.

use std::ops::Range;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::budget::Schedule;
use crate::layer_kv::LayerKv;
use crate::policy::{EvictionContext, EvictionPolicy, Phase, SlotStats};
use crate::{Error, KvCache, Result};

/// One layer's share of a chunk's attention, reduced over the chunk's queries.
#[derive(Debug, Clone)]
struct Observed<B: Backend> {
    sum: Tensor<B, 3>,
    sum_sq: Tensor<B, 3>,
    last: Tensor<B, 3>,
}

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
    /// Attention observed during the chunk in flight, per layer.
    pending: Vec<Option<Observed<B>>>,
    progress: Vec<LayerProgress>,
    policy: Box<dyn EvictionPolicy<B>>,
    schedule: Schedule,
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
    pub fn new(n_layers: usize, policy: Box<dyn EvictionPolicy<B>>, schedule: Schedule) -> Self {
        Self {
            kv: LayerKv::new(n_layers),
            stats: Stats::Stacked(None),
            pending: vec![None; n_layers],
            progress: vec![LayerProgress::default(); n_layers],
            policy,
            schedule,
        }
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn policy_name(&self) -> &str {
        self.policy.name()
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
            Phase::Prefill => self.schedule.prefill_capacity,
            Phase::Decode => self.schedule.decode_capacity,
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
        self.kv.first().map_or(1, |(k, _)| k.dims()[0])
    }

    fn heads(&self) -> usize {
        self.kv.first().map_or(1, |(k, _)| k.dims()[1])
    }

    /// Sorted absolute positions held in `layer`, per (batch, head) flattened as `[b·h][slots]`.
    pub fn kept_positions(&self, layer: usize) -> Vec<Vec<usize>> {
        let Some(stats) = self.stats(layer) else {
            return Vec::new();
        };
        let [b, h, n] = stats.positions.dims();
        let flat: Vec<i64> = stats
            .positions
            .into_data()
            .convert::<i64>()
            .into_vec()
            .unwrap_or_default();
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
        match &self.stats {
            Stats::Stacked(s) => s
                .as_ref()
                .map(|s| s.rows(layer * self.batch()..(layer + 1) * self.batch())),
            Stats::PerLayer(v) => v[layer].clone(),
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
        if let Stats::Stacked(s) = &mut self.stats {
            let b = self.kv.first().map_or(1, |(k, _)| k.dims()[0]);
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
        let device = self.kv.first().map(|(k, _)| k.device())?;
        let (rows, h) = (layers.len() * self.batch(), self.heads());
        let start = (self.progress[layers.start].seen - s) as i64;
        let positions = Tensor::<B, 1, Int>::arange(start..start + s as i64, &device)
            .reshape([1, 1, s])
            .repeat(&[rows, h, 1]);
        let zeros = Tensor::<B, 3>::zeros([rows, h, s], &device);
        let mut st = match stats {
            None => SlotStats {
                sum: zeros.clone(),
                sum_sq: zeros.clone(),
                count: zeros.clone(),
                last: zeros,
                positions,
            },
            Some(st) => SlotStats {
                sum: Tensor::cat(vec![st.sum, zeros.clone()], 2),
                sum_sq: Tensor::cat(vec![st.sum_sq, zeros.clone()], 2),
                count: Tensor::cat(vec![st.count, zeros.clone()], 2),
                last: Tensor::cat(vec![st.last, zeros], 2),
                positions: Tensor::cat(vec![st.positions, positions], 2),
            },
        };
        let observed: Vec<Observed<B>> = self.pending[layers.clone()]
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        if observed.len() == layers.len() {
            let n = st.sum.dims()[2];
            let stack = |f: fn(&Observed<B>) -> Tensor<B, 3>| match observed.len() {
                1 => f(&observed[0]),
                _ => Tensor::cat(observed.iter().map(f).collect(), 0),
            };
            st.sum = st.sum + stack(|o| o.sum.clone());
            st.sum_sq = st.sum_sq + stack(|o| o.sum_sq.clone());
            st.last = stack(|o| o.last.clone());
            // Queries of this chunk that could see each slot: all s for older slots, s − t for
            // the chunk's own token t (causal).
            let seen: Vec<f32> = (0..n)
                .map(|j| if j + s < n { s as f32 } else { (n - j) as f32 })
                .collect();
            st.count = st.count + Tensor::<B, 1>::from_data(TensorData::new(seen, [n]), &device).reshape([1, 1, n]);
        }
        Some(st)
    }

    /// Evicts the rows of `layers` down to `capacity` slots in every head with one policy call;
    /// returns the compacted statistics.
    fn evict(&mut self, stats: SlotStats<B>, layers: Range<usize>, capacity: usize) -> SlotStats<B> {
        let first = layers.start;
        let phase = self.phase(first);
        let sched = &self.schedule;
        let [rows, h, n] = stats.sum.dims();
        let (recent, robust_k, protected) = match phase {
            Phase::Prefill => (sched.prefill_recent, sched.prefill_robust_k, 0),
            Phase::Decode => (
                sched.decode_recent,
                sched.decode_robust_k,
                sched.decode_protected_positions,
            ),
        };
        let ctx = EvictionContext {
            phase,
            slots: n,
            n_evict: n - capacity,
            sinks: sched.sinks,
            recent,
            robust_k,
            protected_positions: protected,
            seed: sched.seed,
            step: self.progress[first].steps,
            layers: layers.clone(),
        };
        let evict = self.policy.select(&stats, &ctx);
        let keep = keep_indices(evict, n, capacity);
        let device = keep.device();
        // Row numbers into flattened [rows·h·n] tensors: whole rows are copied, far cheaper than
        // an element-wise gather.
        let offsets = Tensor::<B, 1, Int>::arange_step(0..(rows * h * n) as i64, n, &device).reshape([rows, h, 1]);
        let offsets = offsets.cast(keep.dtype());
        let flat_rows = (keep + offsets).reshape([rows * h * capacity]);
        let pick = |t: Tensor<B, 3>| {
            t.reshape([rows * h * n])
                .select(0, flat_rows.clone())
                .reshape([rows, h, capacity])
        };
        let compacted = SlotStats {
            sum: pick(stats.sum),
            sum_sq: pick(stats.sum_sq),
            count: pick(stats.count),
            last: pick(stats.last),
            positions: stats
                .positions
                .reshape([rows * h * n])
                .select(0, flat_rows.clone())
                .reshape([rows, h, capacity]),
        };
        let b = self.batch();
        let per_layer = b * h * capacity;
        for (i, layer) in layers.enumerate() {
            let Some(entry) = self.kv.get_mut(layer) else { continue };
            let Some((k, v)) = entry.take() else { continue };
            let d = k.dims()[3];
            // This layer's rows, renumbered from the stacked layout to the layer's own.
            let local = flat_rows
                .clone()
                .slice(i * per_layer..(i + 1) * per_layer)
                .sub_scalar((i * b * h * n) as i64);
            let pick4 = |t: Tensor<B, 4>| {
                t.reshape([b * h * n, d])
                    .select(0, local.clone())
                    .reshape([b, h, capacity, d])
            };
            *entry = Some((pick4(k), pick4(v)));
            let p = &mut self.progress[layer];
            p.evicted += n - capacity;
            p.steps += 1;
        }
        compacted
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
        let st = self.absorb(stats, layers.clone(), s)?;
        let Some(capacity) = self.capacity(first) else {
            return Some(st);
        };
        let slots = self.slots(first);
        let slack = match self.phase(first) {
            Phase::Prefill => 0,
            Phase::Decode => self.schedule.decode_stride.saturating_sub(1),
        };
        if slots > capacity + slack {
            Some(self.evict(st, layers, capacity))
        } else {
            Some(st)
        }
    }
}

/// The slots not in `evict`, in ascending order.
fn keep_indices<B: Backend>(evict: Tensor<B, 3, Int>, n: usize, keep: usize) -> Tensor<B, 3, Int> {
    let [rows, h, n_evict] = evict.dims();
    let device = evict.device();
    if n_evict == 1 {
        // One eviction (every decode step): slot j < e stays at j, the rest shift by one.
        let idx = Tensor::<B, 1, Int>::arange(0..keep as i64, &device)
            .reshape([1, 1, keep])
            .repeat(&[rows, h, 1]);
        let idx = idx.cast(evict.dtype());
        let shift = idx
            .clone()
            .greater_equal(evict.repeat_dim(2, keep))
            .int()
            .cast(idx.dtype());
        return idx + shift;
    }
    // Sort `evicted·n + index`: kept slots come first, in order. (Index dtypes differ between
    // sorts and aranges on some backends: bring everything to the indices' own.)
    let dt = evict.dtype();
    let marks = Tensor::<B, 3, Int>::zeros([rows, h, n], &device).cast(dt).scatter(
        2,
        evict,
        Tensor::<B, 3, Int>::ones([rows, h, n_evict], &device).cast(dt),
        burn::tensor::IndexingUpdateOp::Add,
    );
    let index = Tensor::<B, 1, Int>::arange(0..n as i64, &device)
        .reshape([1, 1, n])
        .repeat(&[rows, h, 1])
        .cast(dt);
    (marks.cast(dt).mul_scalar(n as i64) + index)
        .argsort(2)
        .slice_dim(2, 0..keep)
}

impl<B: Backend> KvCache<B> for EvictingCache<B> {
    fn append(
        &mut self,
        layer: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        let s = keys.dims()[2];
        let out = self.kv.append(layer, keys, values)?;
        let p = &mut self.progress[layer];
        p.seen += s;
        p.chunk = s;
        Ok(out)
    }

    fn wants_attention(&self, layer: usize) -> bool {
        layer < self.n_layers() && self.policy.uses_attention() && self.recording(layer)
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
        let [b, h, s, n] = probs.dims();
        // Reduce over the queries now, so only [b, h, n] per layer waits for the chunk's end.
        self.pending[layer] = Some(Observed {
            sum: probs.clone().sum_dim(2).reshape([b, h, n]),
            sum_sq: probs.clone().square().sum_dim(2).reshape([b, h, n]),
            last: probs.slice_dim(2, s - 1..s).reshape([b, h, n]),
        });
        Ok(())
    }

    fn end_chunk(&mut self) -> Result<()> {
        let layers = 0..self.n_layers();
        if self.progress.iter().any(|p| p.seen != self.progress[0].seen) {
            return Err(Error::LayersOutOfStep);
        }
        let stats = self.take_stacked()?;
        let stats = self.finish_chunk(stats, layers);
        self.stats = Stats::Stacked(stats);
        Ok(())
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
        self.kv.slots(layer)
    }

    fn bytes(&self) -> u64 {
        self.kv.bytes()
    }

    fn clear(&mut self) {
        self.kv.clear();
        self.pending.iter_mut().for_each(|e| *e = None);
        self.stats = Stats::Stacked(None);
        self.progress.iter_mut().for_each(|p| *p = LayerProgress::default());
    }
}
