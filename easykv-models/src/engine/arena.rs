//! The engine's KV memory on GPUs: per layer, one key and one value tensor holding every
//! running sequence's slots, each sequence a contiguous range of them.
//!
//! One tensor per layer is what lets a decode step attend every sequence in one launch per
//! layer (a kernel takes the pool's tensors and each sequence's first slot and count); with
//! one buffer per sequence a step costs launches per sequence and layer, whose host time
//! bounds the step. A sequence's range is its peak footprint, known at admission, so ranges
//! are allocated first-fit from a sorted free list and merged with their neighbours when
//! they come back.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::prelude::*;
use burn::tensor::{DType, TensorCreationOptions};
use easykv_core::{PoolRegion, RegionLayer};

use crate::backend::{BackendProfile, Kernel};
use crate::config::ModelConfig;
use crate::linear::WeightDType;
use crate::model::CausalLm;
use crate::ops;

/// Distinguishes pools, so regions of two engines are never read together.
static NEXT_POOL: AtomicU64 = AtomicU64::new(0);

/// Slots of every layer for all running sequences (see the module's documentation).
pub(crate) struct SlotArena<B: Backend> {
    id: u64,
    /// Per layer: keys and values, `[1, kv_heads, slots, head_dim]`.
    layers: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// Free ranges, sorted and never adjacent.
    free: Vec<Range<usize>>,
}

impl<B: Backend> SlotArena<B> {
    /// An arena of up to `slots` slots per layer for `model` (of shape `config`, caching in
    /// `kv_dtype`), where one launch can attend it: GPUs with easykv's kernels, a size the
    /// kernels can index and the device can allocate. `None` elsewhere (each cache then
    /// allocates its own buffers).
    pub(crate) fn for_model(
        model: &dyn CausalLm<B>,
        config: &ModelConfig,
        kv_dtype: WeightDType,
        mut slots: usize,
    ) -> Option<Self> {
        let p = model.profile();
        let kernels = [Kernel::SplitRope, Kernel::Attention, Kernel::Gather]
            .iter()
            .all(|k| p.runs(*k));
        if p.memory != easykv_core::Memory::Gpu || !kernels || slots == 0 {
            return None;
        }
        let device = model.device();
        // Kernels index a layer's tensor with 32-bit offsets.
        let elements = slots.checked_mul(config.n_kv_heads)?.checked_mul(config.head_dim)?;
        if elements > u32::MAX as usize {
            return None;
        }
        // A layer's tensor, and a decode step's observation of every layer's slots
        // (`[layers, kv_heads, slots]` f32), must stay within what one kernel binding reads
        // whole (wgpu: the adapter's storage-buffer limit, 128 MiB on some): past it, reads go
        // wrong, so the arena takes fewer slots (the engine's admission then waits for them; a cache
        // without a range keeps its own buffers).
        let tensor_bytes = config.n_kv_heads * config.head_dim * kv_dtype.size();
        let observed_bytes = config.n_layers * config.n_kv_heads * 4;
        let slot_bytes = tensor_bytes.max(observed_bytes).max(1) as u64;
        if let Some(max) = ops::max_pool_tensor_bytes::<B>(p, &device) {
            let most = usize::try_from(max / slot_bytes).unwrap_or(usize::MAX);
            if slots > most {
                tracing::warn!(
                    "the KV pool holds {most} slots per layer, not {slots}: the device binds at most {max} bytes per tensor"
                );
                slots = most;
            }
        }
        if slots == 0 {
            return None;
        }
        let (layers, heads, d) = (config.n_layers, config.n_kv_heads, config.head_dim);
        // An allocation the device cannot make panics inside burn: callers then keep
        // per-sequence buffers.
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::new(layers, heads, d, slots, kv_dtype.dtype(), &device)
        }));
        match made {
            Ok(arena) => Some(arena),
            Err(_) => {
                tracing::warn!(
                    "a KV pool of {slots} slots per layer could not be allocated; sequences keep their own buffers"
                );
                None
            }
        }
    }

    /// `slots` slots of `layers` layers of `kv_heads × head_dim` in `dtype` on `device`.
    pub(super) fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        slots: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        let tensor = || {
            Tensor::<B, 4>::empty(
                [1, kv_heads, slots, head_dim],
                TensorCreationOptions::new(device.clone()).with_dtype(dtype),
            )
        };
        Self {
            id: NEXT_POOL.fetch_add(1, Ordering::Relaxed),
            layers: (0..layers).map(|_| (tensor(), tensor())).collect(),
            free: (slots > 0).then_some(0..slots).into_iter().collect(),
        }
    }

    /// Slots per layer in all.
    pub(crate) fn capacity(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[2])
    }

    /// The first free range of `len` slots, taken; `None` if no range is that long.
    pub(crate) fn take(&mut self, len: usize) -> Option<usize> {
        let i = self.free.iter().position(|r| r.len() >= len)?;
        let start = self.free[i].start;
        self.free[i].start += len;
        if self.free[i].is_empty() {
            self.free.remove(i);
        }
        Some(start)
    }

    /// Returns `start..start + len` (taken before) to the free list.
    pub(crate) fn give_back(&mut self, start: usize, len: usize) {
        if len == 0 {
            return;
        }
        let i = self.free.partition_point(|r| r.start < start);
        self.free.insert(i, start..start + len);
        // Merge with the next range, then with the previous one.
        if i + 1 < self.free.len() && self.free[i].end == self.free[i + 1].start {
            self.free[i].end = self.free.remove(i + 1).end;
        }
        if i > 0 && self.free[i - 1].end == self.free[i].start {
            self.free[i - 1].end = self.free.remove(i).end;
        }
    }

    /// Slots `start..start + len` of every layer as a region a cache can be placed in; `None`
    /// where the backend cannot view them in place.
    pub(crate) fn region(&self, p: &BackendProfile, start: usize, len: usize) -> Option<PoolRegion<B>> {
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                Some(RegionLayer {
                    keys: ops::pool_view(p, k, start, len)?,
                    values: ops::pool_view(p, v, start, len)?,
                    pool_keys: k.clone(),
                    pool_values: v.clone(),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(PoolRegion {
            pool: self.id,
            start,
            layers,
        })
    }

    /// Free slots in all (not necessarily in one range).
    #[cfg(test)]
    fn free_slots(&self) -> usize {
        self.free.iter().map(|r| r.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    #[test]
    fn ranges_are_taken_first_fit_and_merge_when_given_back() {
        let mut arena = SlotArena::<Flex>::new(1, 1, 2, 10, DType::F32, &Default::default());
        let a = arena.take(3).unwrap();
        let b = arena.take(4).unwrap();
        let c = arena.take(3).unwrap();
        assert_eq!((a, b, c), (0, 3, 7));
        assert_eq!(arena.take(1), None);
        arena.give_back(b, 4);
        // A range longer than the hole waits; a shorter one takes it.
        assert_eq!(arena.take(5), None);
        assert_eq!(arena.take(2), Some(3));
        arena.give_back(a, 3);
        arena.give_back(c, 3);
        arena.give_back(3, 2);
        assert_eq!(arena.free, vec![0..10]);
        assert_eq!(arena.free_slots(), 10);
        assert_eq!(arena.take(10), Some(0));
        assert_eq!(arena.capacity(), 10);
    }
}
