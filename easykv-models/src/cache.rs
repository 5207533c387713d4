//! Building the KV cache a generation runs with: full, or evicting under a policy.

use burn::prelude::Backend;
use easykv_core::{EvictingCache, EvictionConfig, FullCache, KvCache};
use easykv_policies::PolicyTable;

use crate::backend::BackendProfile;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::linear::WeightDType;

/// A cache for a prompt of `prompt_len` tokens: the built-in `policy` by name (`full` never
/// evicts) under `eviction`'s budget and mode, with the device kernels `profile` offers. Byte
/// budgets count `kv_dtype` elements (the cache holds keys and values in the weights'
/// precision).
#[allow(clippy::too_many_arguments)]
pub fn build_cache<B: Backend>(
    policy: &str,
    eviction: &EvictionConfig,
    model: &ModelConfig,
    profile: &BackendProfile,
    kv_dtype: WeightDType,
    prompt_len: usize,
    chunk_size: usize,
) -> Result<Box<dyn KvCache<B>>> {
    build_cache_from(
        &PolicyTable::builtin(),
        policy,
        eviction,
        model,
        profile,
        kv_dtype,
        prompt_len,
        chunk_size,
    )
}

/// [`build_cache`] with the policies of `table` (the built-in ones and any a caller added).
#[allow(clippy::too_many_arguments)]
pub fn build_cache_from<B: Backend>(
    table: &PolicyTable<B>,
    policy: &str,
    eviction: &EvictionConfig,
    model: &ModelConfig,
    profile: &BackendProfile,
    kv_dtype: WeightDType,
    prompt_len: usize,
    chunk_size: usize,
) -> Result<Box<dyn KvCache<B>>> {
    let evicting = table.build(policy).map_err(|e| Error::InvalidInput(e.to_string()))?;
    if let (Some(w), true) = (model.sliding_window, evicting.is_some()) {
        return Err(Error::Unsupported(format!(
            "this model attends a sliding window of {w} positions, which easykv applies with the full cache only (--policy full)"
        )));
    }
    let kernels = profile.cache_kernels::<B>();
    match evicting {
        None => Ok(Box::new(FullCache::new(model.n_layers, kernels))),
        Some(p) => {
            let schedule = eviction.schedule(prompt_len, chunk_size, model.kv_bytes_per_token(kv_dtype.size()))?;
            Ok(Box::new(
                EvictingCache::new(model.n_layers, p, schedule, kernels)
                    .with_rope_frequencies(model.rope_frequencies()),
            ))
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
        let p = BackendProfile::host();
        let refused = build_cache::<Flex>("roco", &eviction, &cfg, &p, WeightDType::F32, 500, 512)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(refused.contains("sliding window of 64"), "{refused}");
        assert!(build_cache::<Flex>("full", &eviction, &cfg, &p, WeightDType::F32, 500, 512).is_ok());
        Ok(())
    }
}
