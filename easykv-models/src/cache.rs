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
    let evicting = policy_by_name::<B>(policy).map_err(|e| Error::InvalidInput(e.to_string()))?;
    if let (Some(w), true) = (model.sliding_window, evicting.is_some()) {
        return Err(Error::Unsupported(format!(
            "this model attends a sliding window of {w} positions, which easykv applies with the full cache only (--policy full)"
        )));
    }
    match evicting {
        None => Ok(Box::new(FullCache::new(model.n_layers))),
        Some(p) => {
            let schedule = eviction.schedule(prompt_len, chunk_size, model.kv_bytes_per_token(kv_dtype.size()))?;
            Ok(Box::new(EvictingCache::new(model.n_layers, p, schedule)))
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use easykv_core::EvictionConfig;

    use super::*;
    use crate::random_weights::RandomModel;

    #[test]
    fn sliding_window_models_take_the_full_cache_only() -> Result<()> {
        let cfg = ModelConfig {
            sliding_window: Some(64),
            ..RandomModel::by_name("smollm2")?.config()
        };
        let eviction = EvictionConfig::default();
        let refused = build_cache::<Flex>("roco", &eviction, &cfg, WeightDType::F32, 500, 512)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(refused.contains("sliding window of 64"), "{refused}");
        assert!(build_cache::<Flex>("full", &eviction, &cfg, WeightDType::F32, 500, 512).is_ok());
        Ok(())
    }
}
