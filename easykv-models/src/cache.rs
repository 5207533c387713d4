//! Building the KV cache a generation runs with: full, or evicting under a policy.

use burn::prelude::Backend;
use easykv_core::{EvictingCache, EvictionConfig, FullCache, KvCache};
use easykv_policies::policy_by_name;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Bytes per cached key or value element (the cache holds f32).
pub const KV_ELEMENT_BYTES: usize = 4;

/// A cache for a prompt of `prompt_len` tokens: `policy` by name (`full` never evicts) under
/// `eviction`'s budget and mode.
pub fn build_cache<B: Backend>(
    policy: &str,
    eviction: &EvictionConfig,
    model: &ModelConfig,
    prompt_len: usize,
    chunk_size: usize,
) -> Result<Box<dyn KvCache<B>>> {
    match policy_by_name::<B>(policy).map_err(|e| Error::InvalidInput(e.to_string()))? {
        None => Ok(Box::new(FullCache::new(model.n_layers))),
        Some(p) => {
            let schedule = eviction.schedule(prompt_len, chunk_size, model.kv_bytes_per_token(KV_ELEMENT_BYTES))?;
            Ok(Box::new(EvictingCache::new(model.n_layers, p, schedule)))
        }
    }
}
