//! A batched decode step over caches that lie in one memory pool (the engine's arena on GPUs):
//! where each sequence's slots are, uploaded once per step for the kernels that attend every
//! sequence in one launch per layer.

use burn::prelude::*;
use burn::tensor::TensorData;
use easykv_core::KvCache;

use crate::gpu_kernels::PoolRows;

/// A layer's keys and values.
pub(super) type KeysValues<B> = (Tensor<B, 4>, Tensor<B, 4>);

/// A batched decode step's plan for caches that lie in one memory pool: every layer's pool
/// tensors and a table of each sequence's first slot and slot count (counting the new token),
/// uploaded once for the step.
pub(super) struct PooledStep<B: Backend> {
    /// `[layers · 2 · n]`: per layer, the sequences' first slots, then their slot counts.
    table: Tensor<B, 1, Int>,
    /// Per layer: the pool's keys and values and the most slots of any sequence, where every
    /// cache's slots of that layer lie in the pool with room for the new token.
    layers: Vec<Option<(KeysValues<B>, usize)>>,
    n: usize,
}

impl<B: Backend> PooledStep<B> {
    /// `None` unless some layer of every cache lies in one pool.
    pub(super) fn plan(caches: &[&mut dyn KvCache<B>], n_layers: usize, device: &B::Device) -> Option<Self> {
        let n = caches.len();
        let pool = caches.first()?.region_slots(0)?.pool;
        let mut table = vec![0i32; n_layers * 2 * n];
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let regions: Option<Vec<_>> = caches
                .iter()
                .map(|c| c.region_slots(l).filter(|r| r.pool == pool && r.len < r.capacity))
                .collect();
            let Some(regions) = regions else {
                layers.push(None);
                continue;
            };
            let fits = |v: usize| i32::try_from(v).ok();
            let mut longest = 0;
            for (i, r) in regions.iter().enumerate() {
                let (Some(start), Some(len)) = (fits(r.start), fits(r.len + 1)) else {
                    return None;
                };
                table[l * 2 * n + i] = start;
                table[l * 2 * n + n + i] = len;
                longest = longest.max(r.len + 1);
            }
            let first = regions.into_iter().next()?;
            layers.push(Some(((first.pool_keys, first.pool_values), longest)));
        }
        layers.iter().any(Option::is_some).then(|| Self {
            table: Tensor::from_data(TensorData::new(table, [n_layers * 2 * n]), device),
            layers,
            n,
        })
    }

    /// Layer `l`'s pool and rows, if its caches lie in the pool and none observes attention
    /// or masks evicted slots in it (those go one sequence at a time).
    pub(super) fn layer(&self, l: usize, caches: &[&mut dyn KvCache<B>]) -> Option<(&KeysValues<B>, PoolRows<'_, B>)> {
        let (pool, longest) = self.layers.get(l)?.as_ref()?;
        if caches.iter().any(|c| c.wants_attention(l) || c.slot_bias(l).is_some()) {
            return None;
        }
        let n = self.n;
        Some((
            pool,
            PoolRows {
                table: &self.table,
                starts_at: l * 2 * n,
                lens_at: l * 2 * n + n,
                longest: *longest,
            },
        ))
    }
}
