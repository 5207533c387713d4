//! GGUF → Hugging Face directory (`cargo xtask convert-weights`) → the same model: tokenizer ids,
//! chat template, logits and greedy ids; and one-line refusals of incomplete directories.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use burn::backend::Flex;
use easykv_models::convert::gguf_to_hf_dir;
use easykv_models::fetch::{easykv_home, fetch_model, known_model};
use easykv_models::{generate, prefill, ChatMessage, GenerateConfig, LoadedModel, SamplingConfig, WeightDType};

mod common;
use common::{ids, load_model, load_reference};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("easykv-hf-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn greedy(m: &LoadedModel<Flex>, prompt: &[u32]) -> Vec<u32> {
    let mut cache = m.model.full_cache();
    let cfg = GenerateConfig {
        max_new_tokens: 12,
        chunk_size: 512,
        sampling: SamplingConfig::default(),
        stop_ids: m.tokenizer.stop_ids.clone(),
        top_logprobs: 0,
    };
    generate(&m.model, &mut cache, prompt, &cfg, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap()
    .ids
}

#[test]
fn converted_directory_runs_the_same_model() {
    let gguf = fetch_model(known_model("smollm2").unwrap(), &easykv_home(), &mut |m| {
        eprintln!("{m}")
    })
    .unwrap();
    let original = load_model("smollm2", WeightDType::F32);
    let reference = load_reference("smollm2-135m-q4_1.json");

    for dtype in [WeightDType::F32, WeightDType::F16] {
        let dir = scratch(&format!("{dtype:?}"));
        gguf_to_hf_dir(&gguf, &dir, dtype, &mut |_| {}).unwrap();
        let converted = LoadedModel::<Flex>::open(&dir, WeightDType::F32, &Default::default()).unwrap();
        assert_eq!(converted.config.n_layers, original.config.n_layers);
        assert_eq!(converted.tokenizer.stop_ids, original.tokenizer.stop_ids);

        // The tokenizer, rebuilt from tokenizer.json, gives the reference's ids.
        for case in reference["tokenizer"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(converted.tokenizer.encode(text).unwrap(), ids(&case["ids"]), "{text:?}");
        }
        // The chat template travels in tokenizer_config.json.
        let chat = &reference["chat"][0];
        let rendered = converted
            .chat_template
            .as_ref()
            .unwrap()
            .render(&[ChatMessage::new("user", chat["user"].as_str().unwrap())], true)
            .unwrap();
        let prompt = ids(&chat["prompt_ids"]);
        assert_eq!(converted.tokenizer.encode(&rendered).unwrap(), prompt);

        // f32 holds the dequantized weights exactly: the logits are the same numbers. f16
        // rounds the weights: close, and the same greedy answer.
        let logits = |m: &LoadedModel<Flex>| prefill(&m.model, &mut m.model.full_cache(), &prompt, 512).unwrap();
        let (a, b) = (logits(&original), logits(&converted));
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let bound = if dtype == WeightDType::F32 { 1e-4 } else { 0.5 };
        assert!(worst <= bound, "{dtype:?}: logits differ by {worst}");
        if dtype == WeightDType::F32 {
            assert_eq!(greedy(&converted, &prompt), greedy(&original, &prompt));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn incomplete_directories_are_refused_naming_what_is_missing() {
    let dir = scratch("incomplete");
    std::fs::create_dir_all(&dir).unwrap();
    let err = |dir: &PathBuf| {
        LoadedModel::<Flex>::open(dir, WeightDType::F32, &Default::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(err(&dir).contains("config.json"), "{}", err(&dir));
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "gpt_neox", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 16}"#,
    )
    .unwrap();
    assert!(err(&dir).contains("tokenizer.json"), "{}", err(&dir));
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    assert!(err(&dir).contains("gpt_neox"), "{}", err(&dir));
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("gpt_neox", "llama");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    assert!(err(&dir).contains("model.safetensors"), "{}", err(&dir));
    std::fs::write(dir.join("model.safetensors"), b"not a safetensors file").unwrap();
    assert!(err(&dir).contains("model.safetensors"), "{}", err(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
}
