//! Shared by the integration tests that use real models and the reference outputs in
//! `../shared/reference/`.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::PathBuf;

use burn::backend::Flex;
use easykv_models::fetch::{easykv_home, fetch_model, known_model};
use easykv_models::{LoadedModel, WeightDType};
use serde_json::Value;

/// `../shared/<path>` beside the checkout.
pub fn shared(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(path)
}

/// A reference file of `../shared/reference/`, parsed.
pub fn load_reference(file: &str) -> Value {
    let path = shared(&format!("reference/{file}"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A known model, fetched on first use into `$EASYKV_HOME` (as `easykv` does) and loaded on
/// the CPU.
pub fn load_model(alias: &str, dtype: WeightDType) -> LoadedModel<Flex> {
    let path = fetch_model(known_model(alias).unwrap(), &easykv_home(), &mut |m| eprintln!("{m}")).unwrap();
    LoadedModel::from_gguf(&path, dtype, &Default::default()).unwrap()
}

/// A JSON array of positions.
pub fn positions(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The prompt positions (below `prompt_len`) `cache` keeps in every (layer, KV head),
/// ascending: `[layer][head]`.
pub fn kept_prompt_positions(
    cache: &easykv_core::EvictingCache<Flex>,
    layers: usize,
    prompt_len: usize,
) -> Vec<Vec<Vec<usize>>> {
    (0..layers)
        .map(|l| {
            cache
                .kept_positions(l)
                .into_iter()
                .map(|v| v.into_iter().filter(|&p| p < prompt_len).collect())
                .collect()
        })
        .collect()
}
