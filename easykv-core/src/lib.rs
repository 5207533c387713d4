//! easykv-core: the key/value cache seen by a model, and the types around it.
//!
//! A model computes attention explicitly and talks to its cache through [`KvCache`]: it appends
//! each layer's new keys and values, attends over what the cache returns, and hands the
//! attention probabilities back through [`KvCache::observe`] so that an [`EvictingCache`] can
//! keep per-slot statistics ([`SlotStats`]) and let an [`EvictionPolicy`] choose what to drop.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod budget;
mod cache;
mod error;
mod evicting;
pub mod expected;
mod full;
mod kernels;
mod layer_kv;
mod policy;
mod ragged;
mod ranking;

pub use budget::{Budget, EvictionConfig, Mode, Schedule, DECODE_RECENT_RATIO, ROBUST_PROTECTED_TAIL};
pub use cache::{uniform_chunks, CachedKv, KvCache, PoolRegion, RegionLayer, RegionSlots};
pub use error::{Error, Result};
pub use evicting::EvictingCache;
pub use expected::ExpectedAttention;
pub use full::FullCache;
pub use kernels::{CacheKernels, Memory, ObservationWriter, RowRanker, SlotGatherer, SlotLister, SlotWriter};
pub use policy::{slot_mask, EvictionContext, EvictionPolicy, Phase, SlotStats};
pub use ranking::{Ranker, Ranking};
