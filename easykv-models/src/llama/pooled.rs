//! A batched decode step over caches that lie in one memory pool (the engine's arena on GPUs):
//! where each sequence's slots are, uploaded once per step for the kernels that attend every
//! sequence in one launch per layer, and the attention those launches observe for caches that
//! score by it.

use std::cell::{Cell, OnceCell};

use burn::prelude::*;
use burn::tensor::{DType, TensorCreationOptions, TensorData};
use easykv_core::KvCache;

use crate::error::Result;
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
    /// What the step's attention paid every slot of the pool, `[layers, kv_heads, pool_slots]`
    /// (f32), made when a layer's caches first want it.
    observed: OnceCell<Tensor<B, 3>>,
    /// Which layers' attention was written into `observed`.
    observed_layers: Vec<Cell<bool>>,
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
            observed: OnceCell::new(),
            observed_layers: (0..n_layers).map(|_| Cell::new(false)).collect(),
        })
    }

    /// Layer `l`'s pool and rows, if its caches lie in the pool.
    pub(super) fn layer(&self, l: usize) -> Option<(&KeysValues<B>, PoolRows<'_, B>)> {
        let (pool, longest) = self.layers.get(l)?.as_ref()?;
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

    /// The buffer layer `l`'s attention is observed into, and `l`; `None` where the layer does
    /// not lie in the pool.
    pub(super) fn observation(&self, l: usize) -> Option<(&Tensor<B, 3>, usize)> {
        let ((keys, _), _) = self.layers.get(l)?.as_ref()?;
        let [_, heads, slots, _] = keys.dims();
        let layers = self.layers.len();
        let buffer = self.observed.get_or_init(|| {
            let options = TensorCreationOptions::new(keys.device()).with_dtype(DType::F32);
            Tensor::empty([layers, heads, slots], options)
        });
        Some((buffer, l))
    }

    /// Records that layer `l`'s attention is in the observation buffer.
    pub(super) fn observed(&self, l: usize) {
        if let Some(c) = self.observed_layers.get(l) {
            c.set(true);
        }
    }

    /// Hands every cache its slots' rows of the observed layers (after the step's last layer,
    /// before the caches end their chunk).
    pub(super) fn hand_observations(&self, caches: &mut [&mut dyn KvCache<B>]) -> Result<()> {
        let Some(observed) = self.observed.get() else {
            return Ok(());
        };
        let layers: Vec<bool> = self.observed_layers.iter().map(Cell::get).collect();
        let slots = observed.dims()[2];
        for cache in caches.iter_mut() {
            // A cache's region starts at one slot for every layer in it; its layers may hold
            // different counts (and a layer that left the region was not observed here).
            let regions: Vec<_> = (0..layers.len()).filter_map(|l| cache.region_slots(l)).collect();
            let (Some(start), Some(len)) = (regions.first().map(|r| r.start), regions.iter().map(|r| r.len).max())
            else {
                continue;
            };
            if len == 0 || start + len > slots {
                continue;
            }
            cache.observe_pooled(observed.clone().slice_dim(2, start..start + len), &layers)?;
        }
        Ok(())
    }
}
