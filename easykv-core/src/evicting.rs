//! A KV cache that stays within a budget by evicting slots chosen by a policy.

use burn::tensor::{backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::budget::Schedule;
use crate::full::tensor_bytes;
use crate::policy::{EvictionContext, EvictionPolicy, Phase, SlotStats};
use crate::{Error, KvCache, Result};

/// One layer's keys, values and statistics.
#[derive(Debug, Clone)]
struct LayerSlots<B: Backend> {
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    stats: SlotStats<B>,
}

/// Evicts slots independently in every (layer, KV head), keeping the same count everywhere so
/// tensors stay rectangular. Statistics live on the device; eviction is one index selection.
pub struct EvictingCache<B: Backend> {
    layers: Vec<Option<LayerSlots<B>>>,
    policy: Box<dyn EvictionPolicy<B>>,
    schedule: Schedule,
    tokens_seen: usize,
    /// Tokens of the chunk in flight (appended, not yet ended).
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
            layers: vec![None; n_layers],
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
        // The chunk in flight was counted on append; it belongs to the prompt if it ended
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
            Phase::Prefill => {
                self.schedule.prefill_capacity.is_some()
                    && (self.schedule.keep_attention || self.schedule.prefill_capacity.is_some_and(|c| slots > c))
            }
            Phase::Decode => self.schedule.decode_capacity.is_some(),
        }
    }

    /// Sorted absolute positions held in `layer`, per (batch, head) flattened as `[b·h][slots]`.
    pub fn kept_positions(&self, layer: usize) -> Vec<Vec<usize>> {
        let Some(Some(l)) = self.layers.get(layer) else {
            return Vec::new();
        };
        let [b, h, n] = l.stats.positions.dims();
        let flat: Vec<i64> = l
            .stats
            .positions
            .clone()
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
    pub fn stats(&self, layer: usize) -> Option<&SlotStats<B>> {
        self.layers.get(layer)?.as_ref().map(|l| &l.stats)
    }

    fn evict_layer(&mut self, layer: usize, capacity: usize) -> Result<()> {
        let phase = self.phase();
        let sched = &self.schedule;
        let Some(Some(l)) = self.layers.get(layer) else {
            return Ok(());
        };
        let [b, h, n] = l.stats.sum.dims();
        if n <= capacity {
            return Ok(());
        }
        let (recent, robust_k, protected) = match phase {
            Phase::Prefill => (sched.prefill_recent, sched.prefill_robust_k, 0),
            Phase::Decode => (
                sched.decode_recent,
                sched.decode_robust_k,
                sched.decode_protected_positions,
            ),
        };
        let ctx = EvictionContext {
            layer,
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
        let evict = self.policy.select(&l.stats, &ctx);
        let keep = keep_indices(evict, [b, h, n], capacity);
        // Row indices into the flattened [b·h·n] slots: whole rows of d values are copied,
        // which is far cheaper than an element-wise gather.
        let device = keep.device();
        let offsets = Tensor::<B, 1, Int>::arange_step(0..(b * h * n) as i64, n, &device).reshape([b, h, 1]);
        let offsets = offsets.cast(keep.dtype());
        let rows = (keep + offsets).reshape([b * h * capacity]);
        let Some(Some(l)) = self.layers.get_mut(layer) else {
            return Ok(());
        };
        let d = l.keys.dims()[3];
        let pick4 = |t: Tensor<B, 4>| {
            t.reshape([b * h * n, d])
                .select(0, rows.clone())
                .reshape([b, h, capacity, d])
        };
        l.keys = pick4(l.keys.clone());
        l.values = pick4(l.values.clone());
        let pick = |t: Tensor<B, 3>| t.reshape([b * h * n]).select(0, rows.clone()).reshape([b, h, capacity]);
        let s = &mut l.stats;
        s.sum = pick(s.sum.clone());
        s.sum_sq = pick(s.sum_sq.clone());
        s.count = pick(s.count.clone());
        s.last = pick(s.last.clone());
        s.positions = s
            .positions
            .clone()
            .reshape([b * h * n])
            .select(0, rows)
            .reshape([b, h, capacity]);
        Ok(())
    }
}

/// The slots not in `evict`, in ascending order: sort `evicted·n + index` and keep the head.
fn keep_indices<B: Backend>(evict: Tensor<B, 3, Int>, [b, h, n]: [usize; 3], keep: usize) -> Tensor<B, 3, Int> {
    let device = evict.device();
    let n_evict = evict.dims()[2];
    let marks = Tensor::<B, 3, Int>::zeros([b, h, n], &device).scatter(
        2,
        evict,
        Tensor::ones([b, h, n_evict], &device),
        IndexingUpdateOp::Add,
    );
    let index = Tensor::<B, 1, Int>::arange(0..n as i64, &device)
        .reshape([1, 1, n])
        .repeat(&[b, h, 1]);
    let key = marks.mul_scalar(n as i64) + index;
    key.argsort(2).slice_dim(2, 0..keep)
}

impl<B: Backend> KvCache<B> for EvictingCache<B> {
    fn append(
        &mut self,
        layer: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        let n_layers = self.layers.len();
        if layer >= n_layers {
            return Err(Error::LayerOutOfRange {
                layer,
                layers: n_layers,
            });
        }
        let [b, h, s, _] = keys.dims();
        if layer == 0 {
            self.tokens_seen += s;
            self.chunk_len = s;
        }
        let device = keys.device();
        let start = (self.tokens_seen - s) as i64;
        let positions = Tensor::<B, 1, Int>::arange(start..start + s as i64, &device)
            .reshape([1, 1, s])
            .repeat(&[b, h, 1]);
        let zeros = || Tensor::<B, 3>::zeros([b, h, s], &device);
        let entry = &mut self.layers[layer];
        *entry = Some(match entry.take() {
            None => LayerSlots {
                keys,
                values,
                stats: SlotStats {
                    sum: zeros(),
                    sum_sq: zeros(),
                    count: zeros(),
                    last: zeros(),
                    positions,
                },
            },
            Some(l) => LayerSlots {
                keys: Tensor::cat(vec![l.keys, keys], 2),
                values: Tensor::cat(vec![l.values, values], 2),
                stats: SlotStats {
                    sum: Tensor::cat(vec![l.stats.sum, zeros()], 2),
                    sum_sq: Tensor::cat(vec![l.stats.sum_sq, zeros()], 2),
                    count: Tensor::cat(vec![l.stats.count, zeros()], 2),
                    last: Tensor::cat(vec![l.stats.last, zeros()], 2),
                    positions: Tensor::cat(vec![l.stats.positions, positions], 2),
                },
            },
        });
        let Some(l) = entry.as_ref() else {
            unreachable!("just set")
        };
        Ok((l.keys.clone(), l.values.clone()))
    }

    fn wants_attention(&self, layer: usize) -> bool {
        let slots = self.slots(layer);
        self.policy.uses_attention() && self.recording(slots)
    }

    fn observe(&mut self, layer: usize, probs: Tensor<B, 4>) -> Result<()> {
        let slots = self.slots(layer);
        if !self.recording(slots) {
            return Ok(());
        }
        let Some(Some(l)) = self.layers.get_mut(layer) else {
            return Err(Error::LayerOutOfRange {
                layer,
                layers: self.layers.len(),
            });
        };
        let [b, h, s, n] = probs.dims();
        let device = probs.device();
        let st = &mut l.stats;
        st.sum = st.sum.clone() + probs.clone().sum_dim(2).reshape([b, h, n]);
        st.sum_sq = st.sum_sq.clone() + probs.clone().square().sum_dim(2).reshape([b, h, n]);
        st.last = probs.slice_dim(2, s - 1..s).reshape([b, h, n]);
        // Queries of this chunk that could see each slot: all s for older slots, s − t for
        // the chunk's own token t (causal).
        let seen: Vec<f32> = (0..n)
            .map(|j| if j + s < n { s as f32 } else { (n - j) as f32 })
            .collect();
        let seen = Tensor::<B, 1>::from_data(TensorData::new(seen, [n]), &device).reshape([1, 1, n]);
        st.count = st.count.clone() + seen;
        Ok(())
    }

    fn end_chunk(&mut self) -> Result<()> {
        let Some(capacity) = self.capacity() else {
            return Ok(());
        };
        let slots = self.slots(0);
        if slots <= capacity {
            return Ok(());
        }
        for layer in 0..self.layers.len() {
            self.evict_layer(layer, capacity)?;
        }
        self.evicted += slots - capacity;
        self.steps += 1;
        self.chunk_len = 0;
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

    fn tokens_seen(&self) -> usize {
        self.tokens_seen
    }

    fn slots(&self, layer: usize) -> usize {
        self.layers
            .get(layer)
            .and_then(|e| e.as_ref())
            .map_or(0, |l| l.keys.dims()[2])
    }

    fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .flatten()
            .map(|l| tensor_bytes(&l.keys) + tensor_bytes(&l.values))
            .sum()
    }

    fn clear(&mut self) {
        self.layers.iter_mut().for_each(|e| *e = None);
        self.tokens_seen = 0;
        self.chunk_len = 0;
        self.evicted = 0;
        self.steps = 0;
    }
}
