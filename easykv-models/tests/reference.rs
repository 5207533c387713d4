//! The real SmolLM2-135M-Instruct against outputs of HF transformers (f32, eager attention) on
//! the same GGUF weights: `../shared/reference/smollm2-135m-q4_1.json`.
//!
//! The model is fetched on first use into `$EASYKV_HOME` (as `easykv` does) and cached.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;

use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use easykv_models::{generate, prefill, score, ChatMessage, GenerateConfig, LoadedModel, SamplingConfig, WeightDType};
use serde_json::Value;

mod common;
use common::{ids, load_model, load_reference, shared};

fn reference() -> &'static Value {
    static REF: OnceLock<Value> = OnceLock::new();
    REF.get_or_init(|| load_reference("smollm2-135m-q4_1.json"))
}

fn model() -> &'static LoadedModel<Flex> {
    static MODEL: OnceLock<LoadedModel<Flex>> = OnceLock::new();
    MODEL.get_or_init(|| load_model("smollm2", WeightDType::F32))
}

/// Log-probabilities (log-softmax on the device) at the last position of `prompt`.
fn last_logprobs(m: &LoadedModel<Flex>, prompt: &[u32]) -> Vec<f32> {
    let mut cache = m.model.full_cache();
    let logits = prefill(&m.model, &mut cache, prompt, 512).unwrap();
    let n = logits.len();
    let logits = Tensor::<Flex, 1>::from_data(TensorData::new(logits, [n]), &Default::default());
    log_softmax(logits, 0).into_data().into_vec().unwrap()
}

#[test]
fn tokenizer_ids_match_hf() {
    let tok = &model().tokenizer;
    let cases = reference()["tokenizer"].as_array().unwrap();
    assert!(cases.len() >= 9);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap(), ids(&case["ids"]), "text {text:?}");
        // Byte-level BPE round-trips exactly.
        assert_eq!(tok.decode(&ids(&case["ids"]), false).unwrap(), text);
        // Streaming, one id at a time, yields the same text (multi-byte characters whole).
        let mut stream = tok.stream(false);
        let streamed: String = ids(&case["ids"])
            .into_iter()
            .filter_map(|id| stream.push(id).unwrap())
            .collect();
        assert_eq!(streamed, text);
    }
}

#[test]
fn chat_template_renders_the_reference_prompts() {
    let m = model();
    let template = m.chat_template.as_ref().expect("SmolLM2 ships a chat template");
    for case in reference()["chat"].as_array().unwrap() {
        let text = template
            .render(&[ChatMessage::new("user", case["user"].as_str().unwrap())], true)
            .unwrap();
        assert!(text.starts_with(reference()["chat_prefix"].as_str().unwrap()));
        assert_eq!(m.tokenizer.encode(&text).unwrap(), ids(&case["prompt_ids"]));
    }
}

#[test]
fn greedy_ids_and_top10_logprobs_match_hf() {
    let m = model();
    for case in reference()["chat"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy_ids_full_cache"]);

        // Top-10 log-probabilities at the last prompt position.
        let lp = last_logprobs(m, &prompt);
        for pair in case["top10_last"].as_array().unwrap() {
            let (id, want_lp) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
            assert!((lp[id] - want_lp).abs() < 2e-3, "token {id}: {} vs {want_lp}", lp[id]);
        }

        // Greedy continuation; the reference ends with EOS when the model stopped.
        let cfg = GenerateConfig {
            max_new_tokens: want.len(),
            chunk_size: 16,
            sampling: SamplingConfig::default(),
            stop_ids: m.tokenizer.stop_ids.clone(),
            top_logprobs: 0,
        };
        let mut cache = m.model.full_cache();
        let out = generate(&m.model, &mut cache, &prompt, &cfg, |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        let want_tokens: Vec<u32> = want
            .iter()
            .copied()
            .take_while(|id| !m.tokenizer.stop_ids.contains(id))
            .collect();
        assert_eq!(out.ids, want_tokens, "prompt {:?}", case["user"]);
    }
}

#[test]
fn perplexity_of_512_tokens_within_half_a_percent() {
    let m = model();
    let r = &reference()["perplexity"];
    let text = std::fs::read_to_string(shared("data/last_of_the_mohicans.txt")).unwrap();
    let mut ids = m.tokenizer.encode(&text).unwrap();
    ids.truncate(r["first_tokens"].as_u64().unwrap() as usize);
    let mut cache = m.model.full_cache();
    let s = score(&m.model, &mut cache, &ids, 200).unwrap();
    assert_eq!(s.nll.len() as u64, r["n_scored"].as_u64().unwrap());
    let want = r["ppl"].as_f64().unwrap();
    assert!(
        (s.perplexity / want - 1.0).abs() < 0.005,
        "perplexity {} vs {want}",
        s.perplexity
    );
}

#[test]
fn f16_weights_stay_close_to_the_reference() {
    let m = load_model("smollm2", WeightDType::F16);
    let mut worst = 0f32;
    for case in reference()["chat"].as_array().unwrap() {
        let lp = last_logprobs(&m, &ids(&case["prompt_ids"]));
        for pair in case["top10_last"].as_array().unwrap() {
            let (id, want) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
            worst = worst.max((lp[id] - want).abs());
        }
    }
    eprintln!("f16: largest top-10 log-prob deviation {worst}");
    assert!(worst < 0.05, "f16 top-10 log-probs deviate by {worst}");
}

/// `--dtype native` (the GGUF's Q4_1/Q8_0 blocks kept as they are, activations quantized to
/// 8 bits for the products): the reference chat prompts' greedy ids and the 512-token
/// perplexity, against HF's f32 run of the same dequantized weights.
#[test]
fn native_weights_keep_the_greedy_ids_and_perplexity() {
    let m = load_model("smollm2", WeightDType::Native);
    let mut same = 0;
    let cases = reference()["chat"].as_array().unwrap();
    for case in cases {
        let prompt = ids(&case["prompt_ids"]);
        let want: Vec<u32> = ids(&case["greedy_ids_full_cache"])
            .into_iter()
            .take_while(|id| !m.tokenizer.stop_ids.contains(id))
            .collect();
        let cfg = GenerateConfig {
            max_new_tokens: want.len(),
            chunk_size: 16,
            sampling: SamplingConfig::default(),
            stop_ids: m.tokenizer.stop_ids.clone(),
            top_logprobs: 0,
        };
        let mut cache = m.model.full_cache();
        let out = generate(&m.model, &mut cache, &prompt, &cfg, |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        let agree = out.ids.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!(
            "native: {agree} of {} greedy ids agree for {:?}",
            want.len(),
            case["user"]
        );
        same += usize::from(out.ids == want);
    }
    let r = &reference()["perplexity"];
    let text = std::fs::read_to_string(shared("data/last_of_the_mohicans.txt")).unwrap();
    let mut ids = m.tokenizer.encode(&text).unwrap();
    ids.truncate(r["first_tokens"].as_u64().unwrap() as usize);
    let mut cache = m.model.full_cache();
    let s = score(&m.model, &mut cache, &ids, 200).unwrap();
    let want = r["ppl"].as_f64().unwrap();
    eprintln!(
        "native: perplexity {} vs {want} ({:+.2} %)",
        s.perplexity,
        (s.perplexity / want - 1.0) * 100.0
    );
    assert!(
        (s.perplexity / want - 1.0).abs() < 0.01,
        "perplexity {} vs {want}",
        s.perplexity
    );
    assert_eq!(same, cases.len(), "greedy ids differ from HF's");
}

/// `--dtype q8` (activations quantized to 8-bit blocks for integer dots): the 512-token
/// perplexity within 1 % of HF's, scored in chunks small enough to take the integer dots.
#[test]
fn q8_activations_keep_the_perplexity_within_one_percent() {
    let m = load_model("smollm2", WeightDType::Q8);
    let r = &reference()["perplexity"];
    let text = std::fs::read_to_string(shared("data/last_of_the_mohicans.txt")).unwrap();
    let mut ids = m.tokenizer.encode(&text).unwrap();
    ids.truncate(r["first_tokens"].as_u64().unwrap() as usize);
    let mut cache = m.model.full_cache();
    let s = score(&m.model, &mut cache, &ids, 8).unwrap();
    let want = r["ppl"].as_f64().unwrap();
    eprintln!(
        "q8: perplexity {} vs {want} ({:+.2} %)",
        s.perplexity,
        (s.perplexity / want - 1.0) * 100.0
    );
    assert!(
        (s.perplexity / want - 1.0).abs() < 0.01,
        "perplexity {} vs {want}",
        s.perplexity
    );
}
