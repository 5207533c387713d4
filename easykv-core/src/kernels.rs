//! What the cache's backend offers it, handed to the cache as a value when it is built.
//!
//! The core holds no GPU dependency: device kernels live with the model code, which knows the
//! backend, and reach the cache through [`CacheKernels`] (`easykv_models::backend` builds one
//! from its backend profile). A kernel that cannot run hands its input back (or returns `None`)
//! and the cache falls back to burn's tensor operations.

use burn::tensor::{backend::Backend, Bool, Int, Tensor};

use crate::Ranking;

/// Ranks every slot within its row: for `key` `[rows, heads, slots]`, how many slots of the
/// row come before each in (key, slot) order, as f32 — what [`Ranking::Pairwise`] otherwise
/// builds from `slots²` comparisons in memory. Hands `key` back when it cannot run.
pub type RowRanker<B> = fn(Tensor<B, 3>) -> std::result::Result<Tensor<B, 3>, Tensor<B, 3>>;

/// Lists the true slots of every row of a mask (`[rows, heads, slots]`) in ascending order,
/// `count` per row (`[rows, heads, count]`; a row with fewer fills the rest with slot 0, one
/// with more keeps its first `count`) — what [`Ranking::Pairwise`] otherwise builds from a
/// prefix sum and a scatter. Hands the mask back when it cannot run.
pub type SlotLister<B> = fn(Tensor<B, 3, Bool>, usize) -> std::result::Result<Tensor<B, 3, Int>, Tensor<B, 3, Bool>>;

/// Compacts one layer's key and value buffers (`[batch, kv_heads, capacity, head_dim]`): new
/// buffers of the same shape whose first `kept` slots are the slots `keep` (`[batch, kv_heads,
/// kept]`) lists, in that order (what lies beyond is unspecified). `None` when it cannot run.
/// One launch per layer instead of two row selections and the row numbers they need.
pub type SlotGatherer<B> = fn(&Tensor<B, 4>, &Tensor<B, 4>, Tensor<B, 3, Int>) -> Option<(Tensor<B, 4>, Tensor<B, 4>)>;

/// Writes the column statistics of `probs` (`[batch, heads, s, slots]`, f32) — the sum over
/// its `s` queries, the sum of squares, the last query's row — into rows `row..row + batch` of
/// the three `[rows, heads, slots]` f32 buffers, in their own memory (the caller's tensors see
/// the values). Hands `probs` back when it cannot. Without one, an evicting prefill reduces
/// each layer's probabilities by four tensor operations and stacks the layers per chunk.
pub type ObservationWriter<B> = fn(Tensor<B, 4>, [&Tensor<B, 3>; 3], usize) -> std::result::Result<(), Tensor<B, 4>>;

/// Writes `src` (`[batch, kv_heads, s, head_dim]`) into slots `at..at + s` of the buffer `dst`
/// (`[batch, kv_heads, capacity, head_dim]`, any strides with a contiguous last axis) in `dst`'s
/// own memory: buffers lent by a memory pool are views that others read, so they are written
/// in place, never replaced. Hands `src` back when it cannot.
pub type SlotWriter<B> = fn(&Tensor<B, 4>, Tensor<B, 4>, usize) -> std::result::Result<(), Tensor<B, 4>>;

/// Where a backend's tensors live, as far as the cache cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Memory {
    /// Host memory (flex): reading a tensor back is free, so selections, appends and
    /// compactions run in plain Rust on the tensor's own bytes.
    Host,
    /// A GPU's memory: every read-back is a synchronisation; rank on the device.
    Gpu,
    /// Anything else: burn's tensor operations only.
    Other,
}

/// The backend's memory and the device functions an evicting cache may call.
pub struct CacheKernels<B: Backend> {
    pub memory: Memory,
    pub row_ranker: Option<RowRanker<B>>,
    pub slot_lister: Option<SlotLister<B>>,
    pub slot_gatherer: Option<SlotGatherer<B>>,
    pub observation_writer: Option<ObservationWriter<B>>,
    pub slot_writer: Option<SlotWriter<B>>,
}

impl<B: Backend> CacheKernels<B> {
    /// No kernels, tensors in `memory`.
    pub fn plain(memory: Memory) -> Self {
        Self {
            memory,
            row_ranker: None,
            slot_lister: None,
            slot_gatherer: None,
            observation_writer: None,
            slot_writer: None,
        }
    }

    /// A backend whose tensors live in host memory (flex), without device kernels.
    pub fn host() -> Self {
        Self::plain(Memory::Host)
    }

    pub fn host_resident(&self) -> bool {
        self.memory == Memory::Host
    }

    /// The ranking strategy that suits this backend for `rows_heads` rows of `slots` slots:
    /// host selection where tensors live in host memory; pairwise where a kernel ranks rows
    /// (no comparisons materialized, no size limit); on other GPUs pairwise while the
    /// comparisons stay below [`Ranking::PAIRWISE_MAX_PAIRS`], host above; burn's sort elsewhere.
    pub fn ranking(&self, rows_heads: usize, slots: usize) -> Ranking {
        match self.memory {
            Memory::Host => Ranking::Host,
            _ if self.row_ranker.is_some() => Ranking::Pairwise,
            Memory::Gpu => Ranking::for_gpu(rows_heads, slots),
            Memory::Other => Ranking::Sort,
        }
    }
}

// By hand: derived, both would demand `B: Clone` / `B: Debug`.
impl<B: Backend> Clone for CacheKernels<B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for CacheKernels<B> {}

impl<B: Backend> std::fmt::Debug for CacheKernels<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheKernels")
            .field("memory", &self.memory)
            .field("row_ranker", &self.row_ranker.is_some())
            .field("slot_lister", &self.slot_lister.is_some())
            .field("slot_gatherer", &self.slot_gatherer.is_some())
            .field("observation_writer", &self.observation_writer.is_some())
            .field("slot_writer", &self.slot_writer.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    #[test]
    fn each_memory_gets_its_ranking() {
        assert_eq!(CacheKernels::<Flex>::host().ranking(96, 4096), Ranking::Host);
        assert_eq!(
            CacheKernels::<Flex>::plain(Memory::Other).ranking(96, 4096),
            Ranking::Sort
        );
        // A GPU without a ranking kernel ranks large problems on the host.
        let gpu = CacheKernels::<Flex>::plain(Memory::Gpu);
        assert_eq!(gpu.ranking(3, 650), Ranking::Pairwise);
        assert_eq!(gpu.ranking(32, 2112), Ranking::Host);
        let ranked = CacheKernels::<Flex> {
            row_ranker: Some(Ok),
            ..gpu
        };
        assert_eq!(ranked.ranking(32, 2112), Ranking::Pairwise);
    }
}
