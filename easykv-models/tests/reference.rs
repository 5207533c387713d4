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
        // Top-10 log-probabilities at the last prompt position.
        let lp = last_logprobs(m, &ids(&case["prompt_ids"]));
        for pair in case["top10_last"].as_array().unwrap() {
            let (id, want_lp) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
            assert!((lp[id] - want_lp).abs() < 2e-3, "token {id}: {} vs {want_lp}", lp[id]);
        }

        let (got, want) = greedy_ids(m, case);
        assert_eq!(got, want, "prompt {:?}", case["user"]);
    }
}

/// The greedy continuation of a reference chat case, and the reference's (up to EOS, which
/// ends it when the model stopped).
fn greedy_ids(m: &LoadedModel<Flex>, case: &Value) -> (Vec<u32>, Vec<u32>) {
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
    let out = generate(&m.model, &mut cache, &ids(&case["prompt_ids"]), &cfg, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    (out.ids, want)
}

/// The perplexity of the reference's first tokens scored in `chunk`-token passes, and the
/// reference's.
fn perplexity(m: &LoadedModel<Flex>, chunk: usize) -> (f64, f64) {
    let r = &reference()["perplexity"];
    let text = std::fs::read_to_string(shared("data/last_of_the_mohicans.txt")).unwrap();
    let mut ids = m.tokenizer.encode(&text).unwrap();
    ids.truncate(r["first_tokens"].as_u64().unwrap() as usize);
    let mut cache = m.model.full_cache();
    let s = score(&m.model, &mut cache, &ids, chunk).unwrap();
    assert_eq!(s.nll.len() as u64, r["n_scored"].as_u64().unwrap());
    (s.perplexity, r["ppl"].as_f64().unwrap())
}

#[test]
fn perplexity_of_512_tokens_within_half_a_percent() {
    let (got, want) = perplexity(model(), 200);
    assert!((got / want - 1.0).abs() < 0.005, "perplexity {got} vs {want}");
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

/// `--dtype native` (the GGUF's Q4_1/Q8_0 blocks kept as they are, multiplied with f32
/// activations): the reference chat prompts' greedy ids equal HF's, and the 512-token
/// perplexity, scored in 8-token passes (which read the blocks; longer ones widen them for the
/// GEMM), stays within half a percent as f32's does.
#[test]
fn native_weights_keep_the_greedy_ids_and_perplexity() {
    let m = load_model("smollm2", WeightDType::Native);
    for case in reference()["chat"].as_array().unwrap() {
        let (got, want) = greedy_ids(&m, case);
        assert_eq!(got, want, "prompt {:?}", case["user"]);
    }
    let (got, want) = perplexity(&m, 8);
    eprintln!(
        "native: perplexity {got} vs {want} ({:+.2} %)",
        (got / want - 1.0) * 100.0
    );
    assert!((got / want - 1.0).abs() < 0.005, "perplexity {got} vs {want}");
}

/// `--dtype q16` (activations quantized to 16-bit blocks for integer dots; the CPU's default
/// for one sequence): the reference chat prompts' greedy ids equal HF's, and the 512-token
/// perplexity, scored in 8-token passes (which take the integer dots), is within half a
/// percent as f32's is.
#[test]
fn q16_activations_keep_the_greedy_ids_and_perplexity() {
    let m = load_model("smollm2", WeightDType::Q16);
    for case in reference()["chat"].as_array().unwrap() {
        let (got, want) = greedy_ids(&m, case);
        assert_eq!(got, want, "prompt {:?}", case["user"]);
    }
    let (got, want) = perplexity(&m, 8);
    eprintln!("q16: perplexity {got} vs {want} ({:+.2} %)", (got / want - 1.0) * 100.0);
    assert!((got / want - 1.0).abs() < 0.005, "perplexity {got} vs {want}");
}

/// `--dtype q8` (activations quantized to 8-bit blocks for integer dots): the 512-token
/// perplexity within 1 % of HF's, scored in 8-token passes, which take the integer dots. Its
/// greedy ids are not HF's: on "What is the capital of France?" the first token's two best
/// logits lie 0.08 apart, and 8-bit activations reverse them.
#[test]
fn q8_activations_keep_the_perplexity_within_one_percent() {
    let (got, want) = perplexity(&load_model("smollm2", WeightDType::Q8), 8);
    eprintln!("q8: perplexity {got} vs {want} ({:+.2} %)", (got / want - 1.0) * 100.0);
    assert!((got / want - 1.0).abs() < 0.01, "perplexity {got} vs {want}");
}
