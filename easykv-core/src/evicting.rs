//! A KV cache that stays within a budget by evicting slots chosen by a policy.

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

/// Evicts slots independently in every (layer, KV head), keeping the same count everywhere so
/// tensors stay rectangular.
///
/// Statistics of all layers are stacked into one `[layers·batch, heads, slots]` tensor each and
/// updated once per chunk: a decode step costs a fixed handful of tensor operations for the
/// whole model instead of dozens per layer. Keys and values are compacted by row selection.
pub struct EvictingCache<B: Backend> {
    /// Per layer: keys and values `[batch, heads, slots, head_dim]`.
    kv: LayerKv<B>,
    /// All layers' statistics, stacked; `None` before the first chunk ends.
    stats: Option<SlotStats<B>>,
    /// Attention observed during the chunk in flight, per layer.
    pending: Vec<Option<Observed<B>>>,
    policy: Box<dyn EvictionPolicy<B>>,
    schedule: Schedule,
    tokens_seen: usize,
    /// Tokens of the chunk in flight.
    chunk_len: usize,
    evicted: usize,
    steps: u64,
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
            stats: None,
            pending: vec![None; n_layers],
            policy,
            schedule,
            tokens_seen: 0,
            chunk_len: 0,
            evicted: 0,
            steps: 0,
        }
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn policy_name(&self) -> &str {
        self.policy.name()
    }

    fn phase(&self) -> Phase {
        // The chunk in flight was counted on append; it belongs to the prompt if it ends
        // inside it.
        if self.tokens_seen <= self.schedule.prompt_len {
            Phase::Prefill
        } else {
            Phase::Decode
        }
    }

    fn capacity(&self) -> Option<usize> {
        match self.phase() {
            Phase::Prefill => self.schedule.prefill_capacity,
            Phase::Decode => self.schedule.decode_capacity,
        }
    }

    /// Whether this chunk's attention is recorded into S, Q and C. As in EasyKV: while
    /// decoding under a decode budget always; while prefilling once the cache is over its
    /// capacity (or always with `keep_attention`).
    fn recording(&self, slots: usize) -> bool {
        match self.phase() {
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

    /// Rows of the stacked statistics that belong to `layer`.
    fn layer_rows(&self, layer: usize) -> std::ops::Range<usize> {
        let b = self.batch();
        layer * b..(layer + 1) * b
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
        if layer >= self.kv.n_layers() {
            return None;
        }
        let rows = self.layer_rows(layer);
        let s = self.stats.as_ref()?;
        Some(SlotStats {
            sum: s.sum.clone().slice_dim(0, rows.clone()),
            sum_sq: s.sum_sq.clone().slice_dim(0, rows.clone()),
            count: s.count.clone().slice_dim(0, rows.clone()),
            last: s.last.clone().slice_dim(0, rows.clone()),
            positions: s.positions.clone().slice_dim(0, rows),
        })
    }

    /// Grows the stacked statistics by the chunk just appended and adds what was observed.
    fn absorb_chunk(&mut self, s: usize) {
        let Some(device) = self.kv.first().map(|(k, _)| k.device()) else {
            return;
        };
        let (rows, h) = (
            self.kv.n_layers() * self.batch(),
            self.kv.first().map_or(1, |(k, _)| k.dims()[1]),
        );
        let start = (self.tokens_seen - s) as i64;
        let positions = Tensor::<B, 1, Int>::arange(start..start + s as i64, &device)
            .reshape([1, 1, s])
            .repeat(&[rows, h, 1]);
        let zeros = Tensor::<B, 3>::zeros([rows, h, s], &device);
        let mut st = match self.stats.take() {
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
        let observed: Vec<Observed<B>> = self.pending.iter_mut().filter_map(Option::take).collect();
        if observed.len() == self.kv.n_layers() {
            let n = st.sum.dims()[2];
            let stack = |f: fn(&Observed<B>) -> Tensor<B, 3>| Tensor::cat(observed.iter().map(f).collect(), 0);
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
        self.stats = Some(st);
    }

    /// Evicts down to `capacity` slots in every (layer, head) with one policy call.
    fn evict(&mut self, capacity: usize) {
        let phase = self.phase();
        let sched = &self.schedule;
        let Some(stats) = self.stats.as_ref() else { return };
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
            step: self.steps,
        };
        let evict = self.policy.select(stats, &ctx);
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
        if let Some(st) = self.stats.take() {
            self.stats = Some(SlotStats {
                sum: pick(st.sum),
                sum_sq: pick(st.sum_sq),
                count: pick(st.count),
                last: pick(st.last),
                positions: st
                    .positions
                    .reshape([rows * h * n])
                    .select(0, flat_rows.clone())
                    .reshape([rows, h, capacity]),
            });
        }
        let b = self.batch();
        let per_layer = b * h * capacity;
        for (layer, entry) in self.kv.iter_mut().enumerate() {
            let Some((k, v)) = entry.take() else { continue };
            let d = k.dims()[3];
            // This layer's rows, renumbered from the stacked layout to the layer's own.
            let local = flat_rows
                .clone()
                .slice(layer * per_layer..(layer + 1) * per_layer)
                .sub_scalar((layer * b * h * n) as i64);
            let pick4 = |t: Tensor<B, 4>| {
                t.reshape([b * h * n, d])
                    .select(0, local.clone())
                    .reshape([b, h, capacity, d])
            };
            *entry = Some((pick4(k), pick4(v)));
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
        if layer == 0 {
            self.tokens_seen += s;
            self.chunk_len = s;
        }
        Ok(out)
    }

    fn wants_attention(&self, layer: usize) -> bool {
        self.policy.uses_attention() && self.recording(self.slots(layer))
    }

    fn observe(&mut self, layer: usize, probs: Tensor<B, 4>) -> Result<()> {
        if layer >= self.kv.n_layers() {
            return Err(Error::LayerOutOfRange {
                layer,
                layers: self.kv.n_layers(),
            });
        }
        if !self.recording(self.slots(layer)) {
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
        let s = std::mem::take(&mut self.chunk_len);
        if s == 0 {
            return Ok(());
        }
        self.absorb_chunk(s);
        let Some(capacity) = self.capacity() else { return Ok(()) };
        let slots = self.slots(0);
        let slack = match self.phase() {
            Phase::Prefill => 0,
            Phase::Decode => self.schedule.decode_stride.saturating_sub(1),
        };
        if slots > capacity + slack {
            self.evict(capacity);
            self.evicted += slots - capacity;
            self.steps += 1;
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
        self.evicted
    }

    fn compact_positions(&self) -> bool {
        self.schedule.streaming
    }

    fn next_position(&self) -> usize {
        if self.schedule.streaming {
            self.slots(0)
        } else {
            self.tokens_seen
        }
    }

    fn tokens_seen(&self) -> usize {
        self.tokens_seen
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
        self.stats = None;
        self.tokens_seen = 0;
        self.chunk_len = 0;
        self.evicted = 0;
        self.steps = 0;
    }
}
