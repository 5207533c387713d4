//! Eviction decisions against the original EasyKV on SmolLM2 (`summarize` in
//! `../shared/reference/smollm2-135m-q4_1.json`): encoding mode, budget 0.5, stride 8, 4 sinks,
//! recent ratio 0.1, greedy, 32 new tokens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;

use burn::backend::Flex;
use easykv_core::{EvictingCache, EvictionConfig, KvCache};
use easykv_models::{generate, CausalLm, GenerateConfig, LoadedModel, SamplingConfig, StopReason, WeightDType};
use easykv_policies::PolicyTable;
use serde_json::Value;

mod common;
use common::{kept_prompt_positions, load_model, load_reference, positions};

fn reference() -> &'static Value {
    static REF: OnceLock<Value> = OnceLock::new();
    REF.get_or_init(|| load_reference("smollm2-135m-q4_1.json"))
}

fn model() -> &'static LoadedModel<Flex> {
    static MODEL: OnceLock<LoadedModel<Flex>> = OnceLock::new();
    MODEL.get_or_init(|| load_model("smollm2", WeightDType::F32))
}

/// Runs one EasyKV case; returns (text, kept positions [layer][head]).
fn run(policy: &str) -> (String, Vec<Vec<Vec<usize>>>) {
    let m = model();
    let r = &reference()["summarize"];
    let prompt: Vec<u32> = r["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let cfg = EvictionConfig::default();
    let schedule = cfg.schedule(prompt.len(), 512, m.config.kv_bytes_per_token(4)).unwrap();
    let policy = PolicyTable::<Flex>::builtin().build(policy).unwrap().unwrap();
    let kernels = m.model.profile().cache_kernels();
    let mut cache = EvictingCache::<Flex>::new(m.config.n_layers, policy, schedule, kernels);
    let gen = GenerateConfig {
        max_new_tokens: 32,
        chunk_size: 512,
        sampling: SamplingConfig::default(),
        stop_ids: vec![2],
        top_logprobs: 0,
    };
    let out = generate(&m.model, &mut cache, &prompt, &gen, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    let text = m.tokenizer.decode(&out.ids, true).unwrap().trim().to_string();
    // Positions after generation: generated tokens were appended after the prompt (encoding
    // mode never evicts while decoding), so filter them out.
    let kept = kept_prompt_positions(&cache, m.config.n_layers, prompt.len());
    // Encoding mode: the prompt is cut to the capacity, then every fed token is appended.
    let fed = if out.stop == StopReason::MaxTokens {
        out.ids.len() - 1
    } else {
        out.ids.len()
    };
    assert_eq!(cache.slots(0), cache.schedule().prefill_capacity.unwrap() + fed);
    (text, kept)
}

/// Kept sets must be identical to EasyKV's in every (layer, KV head), and the greedy text too.
/// (The specification allows differences where two scores tie within float noise; on this
/// case there are none, so the test demands exact equality.)
fn check(policy: &str) {
    let r = &reference()["summarize"];
    let case = r["easykv"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["policy"] == policy)
        .unwrap();
    assert_eq!(
        (case["mode"].as_str(), case["budget"].as_f64(), case["stride"].as_u64()),
        (Some("encoding"), Some(0.5), Some(8))
    );
    let (text, kept) = run(policy);
    let want = r["kept_positions"][policy].as_array().unwrap();
    assert_eq!(want.len(), kept.len());
    for (l, heads) in want.iter().enumerate() {
        for (h, pos) in heads.as_array().unwrap().iter().enumerate() {
            assert_eq!(kept[l][h], positions(pos), "{policy}: layer {l} head {h}");
        }
    }
    assert_eq!(text, case["text"].as_str().unwrap(), "{policy}");
}

#[test]
fn roco_matches_easykv() {
    check("roco");
}

#[test]
fn h2o_matches_easykv() {
    check("h2o_head");
}

#[test]
fn tova_matches_easykv() {
    check("tova");
}

#[test]
fn recency_matches_easykv() {
    check("recency");
}
