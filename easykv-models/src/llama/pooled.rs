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

/// A batched decode step's plan for the caches that lie in one memory pool (its members):
/// every layer's pool tensors and a table of each member's first slot and slot count (counting
/// the new token), uploaded once for the step. The other caches of the step (per-head budgets,
/// or a layer that left its region) attend on their own.
pub(super) struct PooledStep<B: Backend> {
    /// `[layers · 2 · n]`: per layer, the members' first slots, then their slot counts.
    table: Tensor<B, 1, Int>,
    /// Per layer: the pool's keys and values and the most slots of any member.
    layers: Vec<(KeysValues<B>, usize)>,
    /// Which of the step's caches are members, in order; `n` of them.
    members: Vec<usize>,
    n: usize,
    /// What the step's attention paid every slot of the pool, `[layers, kv_heads, pool_slots]`
    /// (f32), made when a layer's caches first want it.
    observed: OnceCell<Tensor<B, 3>>,
    /// Which layers' attention was written into `observed`.
    observed_layers: Vec<Cell<bool>>,
}

impl<B: Backend> PooledStep<B> {
    /// `None` unless some cache lies in a pool with every layer and room for the new token:
    /// those of the first such cache's pool are the members.
    pub(super) fn plan(caches: &[&mut dyn KvCache<B>], n_layers: usize, device: &B::Device) -> Option<Self> {
        if n_layers == 0 {
            return None;
        }
        let fits = |v: usize| i32::try_from(v).ok();
        // Each cache's regions where every layer lies in a pool with room and 32-bit offsets.
        let regions: Vec<Option<Vec<_>>> = caches
            .iter()
            .map(|c| {
                (0..n_layers)
                    .map(|l| {
                        c.region_slots(l)
                            .filter(|r| r.len < r.capacity && fits(r.start).is_some() && fits(r.len + 1).is_some())
                    })
                    .collect()
            })
            .collect();
        // The members: caches whose every layer lies in the first such cache's pool.
        let pool = regions.iter().flatten().next()?.first()?.pool;
        let in_pool = |r: &Option<Vec<easykv_core::RegionSlots<B>>>| {
            r.as_ref().is_some_and(|layers| layers.iter().all(|l| l.pool == pool))
        };
        let members: Vec<usize> = (0..caches.len()).filter(|&i| in_pool(&regions[i])).collect();
        let n = members.len();
        let member_regions: Vec<Vec<_>> = regions.into_iter().filter(|r| in_pool(r)).flatten().collect();
        let mut table = vec![0i32; n_layers * 2 * n];
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let mut longest = 0;
            for (i, r) in member_regions.iter().map(|m| &m[l]).enumerate() {
                table[l * 2 * n + i] = fits(r.start)?;
                table[l * 2 * n + n + i] = fits(r.len + 1)?;
                longest = longest.max(r.len + 1);
            }
            let first = &member_regions.first()?[l];
            layers.push(((first.pool_keys.clone(), first.pool_values.clone()), longest));
        }
        Some(Self {
            table: Tensor::from_data(TensorData::new(table, [n_layers * 2 * n]), device),
            layers,
            members,
            n,
            observed: OnceCell::new(),
            observed_layers: (0..n_layers).map(|_| Cell::new(false)).collect(),
        })
    }

    /// Which of the step's caches lie in the pool, in order.
    pub(super) fn members(&self) -> &[usize] {
        &self.members
    }

    /// Layer `l`'s pool and rows, if its caches lie in the pool.
    pub(super) fn layer(&self, l: usize) -> Option<(&KeysValues<B>, PoolRows<'_, B>)> {
        let (pool, longest) = self.layers.get(l)?;
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
        let ((keys, _), _) = self.layers.get(l)?;
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

    /// Hands every member its slots' rows of the observed layers (after the step's last layer,
    /// before the caches end their chunk); `caches` are all the step's caches.
    pub(super) fn hand_observations(&self, caches: &mut [&mut dyn KvCache<B>]) -> Result<()> {
        let Some(observed) = self.observed.get() else {
            return Ok(());
        };
        let layers: Vec<bool> = self.observed_layers.iter().map(Cell::get).collect();
        let slots = observed.dims()[2];
        for cache in caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| self.members.binary_search(i).is_ok())
            .map(|(_, c)| c)
        {
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
