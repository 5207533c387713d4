//! easykv-core: the key/value cache seen by a model, and the types around it.
//!
//! A model computes attention explicitly and talks to its cache through [`KvCache`]: it appends
//! each layer's new keys and values, attends over what the cache returns, and hands the
//! attention probabilities back through [`KvCache::observe`] so that an evicting cache can keep
//! per-slot statistics. Caches decide what to keep; models never do.

mod cache;
mod error;
mod full;

pub use cache::KvCache;
pub use error::{Error, Result};
pub use full::FullCache;
