//! Building the KV cache a generation runs with: full, or evicting under a policy.

use burn::prelude::Backend;
use easykv_core::{EvictingCache, EvictionConfig, FullCache, KvCache};
use easykv_policies::policy_by_name;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::linear::WeightDType;

/// A cache for a prompt of `prompt_len` tokens: `policy` by name (`full` never evicts) under
/// `eviction`'s budget and mode. Byte budgets count `kv_dtype` elements (the cache holds keys
/// and values in the weights' precision).
pub fn build_cache<B: Backend>(
    policy: &str,
    eviction: &EvictionConfig,
    model: &ModelConfig,
    kv_dtype: WeightDType,
    prompt_len: usize,
    chunk_size: usize,
) -> Result<Box<dyn KvCache<B>>> {
    match policy_by_name::<B>(policy).map_err(|e| Error::InvalidInput(e.to_string()))? {
        None => Ok(Box::new(FullCache::new(model.n_layers))),
        Some(p) => {
            let schedule = eviction.schedule(prompt_len, chunk_size, model.kv_bytes_per_token(kv_dtype.size()))?;
            Ok(Box::new(EvictingCache::new(model.n_layers, p, schedule)))
        }
    }
}
