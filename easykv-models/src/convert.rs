//! GGUF → a self-contained Hugging Face style model directory (`cargo xtask convert-weights`).
//!
//! The directory holds `model.safetensors` (in f32, f16 or bf16), `config.json`,
//! `tokenizer.json`, `tokenizer_config.json` (with the chat template) and
//! `generation_config.json`; [`crate::LoadedModel::open`] loads it. Query and key rows of
//! llama-arch GGUFs (interleaved RoPE pairs) are permuted to the rotate-half layout Hugging Face
//! checkpoints use, so the directory is a standard one.

use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, View};
use serde_json::json;

use crate::atomic::{write_atomic, write_with};
use crate::config::{Architecture, ModelConfig, RopeLayout};
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, MetaValue};
use crate::hf::hf_name;
use crate::linear::WeightDType;
use crate::llama::deinterleave_rows;
use crate::tokenizer::TextTokenizer;
use crate::weights::WeightSource;

/// One tensor ready to be written.
struct Encoded {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Encoded {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn encode(values: &[f32], shape: Vec<usize>, dtype: WeightDType) -> Encoded {
    let (dtype, bytes) = match dtype {
        WeightDType::F32 | WeightDType::Native | WeightDType::Q8 | WeightDType::Q16 => {
            (Dtype::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect())
        }
        WeightDType::F16 => (
            Dtype::F16,
            values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
        ),
        WeightDType::Bf16 => (
            Dtype::BF16,
            values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        ),
    };
    Encoded { dtype, shape, bytes }
}

/// The GGUF tensor names a model of `cfg` reads, and the RoPE heads of query/key matrices.
fn tensor_names(cfg: &ModelConfig, file: &GgufFile) -> Vec<(String, Option<usize>)> {
    let mut names = vec![
        ("token_embd.weight".to_string(), None),
        ("output_norm.weight".to_string(), None),
    ];
    if file.has("output.weight") {
        names.push(("output.weight".into(), None));
    }
    for i in 0..cfg.n_layers {
        for (t, heads) in [
            ("attn_norm", None),
            ("attn_q", Some(cfg.n_heads)),
            ("attn_k", Some(cfg.n_kv_heads)),
            ("attn_v", None),
            ("attn_output", None),
            ("ffn_norm", None),
            ("ffn_gate", None),
            ("ffn_up", None),
            ("ffn_down", None),
        ] {
            names.push((format!("blk.{i}.{t}.weight"), heads));
            let bias = format!("blk.{i}.{t}.bias");
            if cfg.qkv_bias && file.has(&bias) {
                names.push((bias, heads));
            }
        }
    }
    names
}

/// Writes the model in `gguf` to the directory `out` (created; it must not hold a model
/// already), weights in `dtype`. `log` hears progress.
pub fn gguf_to_hf_dir(gguf: &Path, out: &Path, dtype: WeightDType, log: &mut dyn FnMut(&str)) -> Result<()> {
    let file = GgufFile::open(gguf)?;
    let cfg = ModelConfig::from_gguf(&file)?;
    let tokenizer = TextTokenizer::from_gguf(&file)?;
    if out.join("config.json").exists() || out.join("model.safetensors").exists() {
        return Err(Error::InvalidInput(format!("{} already holds a model", out.display())));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    let names = tensor_names(&cfg, &file);
    let mut tensors = Vec::with_capacity(names.len());
    for (i, (name, rope_heads)) in names.iter().enumerate() {
        let (mut values, shape) = file.tensor(name)?;
        if let (Some(heads), RopeLayout::Interleaved) = (rope_heads, cfg.rope_layout) {
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            values = deinterleave_rows(&values, *heads, cfg.head_dim, cols);
        }
        let hf = hf_name(name).ok_or_else(|| Error::MissingTensor(name.clone()))?;
        tensors.push((hf, encode(&values, shape, dtype)));
        if (i + 1) % 50 == 0 {
            log(&format!("converted {} of {} tensors", i + 1, names.len()));
        }
    }
    let views: Vec<(String, &Encoded)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    let weights = out.join("model.safetensors");
    write_with(&weights, |tmp| {
        safetensors::serialize_to_file(views, None, tmp)
            .map_err(|e| Error::InvalidInput(format!("writing safetensors: {e}")))
    })?;

    let (model_type, architecture) = match cfg.architecture {
        Architecture::Llama => ("llama", "LlamaForCausalLM"),
        Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
    };
    let dtype_name = match dtype {
        WeightDType::F32 | WeightDType::Native | WeightDType::Q8 | WeightDType::Q16 => "float32",
        WeightDType::F16 => "float16",
        WeightDType::Bf16 => "bfloat16",
    };
    let config = json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        // Written as the f32 prints (1e-5), not as its f64 widening (9.99…e-6).
        "rms_norm_eps": cfg.rms_eps.to_string().parse::<f64>().unwrap_or(cfg.rms_eps as f64),
        "rope_theta": cfg.rope_theta.to_string().parse::<f64>().unwrap_or(cfg.rope_theta as f64),
        "max_position_embeddings": cfg.context_length,
        "tie_word_embeddings": !file.has("output.weight"),
        "torch_dtype": dtype_name,
        "converted_from": gguf.file_name().map(|n| n.to_string_lossy().into_owned()),
    });
    let token = |key: &str| {
        file.meta(key)
            .and_then(MetaValue::as_u64)
            .and_then(|id| tokenizer.token_text(id as u32))
    };
    let tokenizer_config = json!({
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "add_bos_token": tokenizer.add_bos,
        "chat_template": file.meta("tokenizer.chat_template").and_then(MetaValue::as_str),
    });
    let generation_config = json!({ "eos_token_id": tokenizer.stop_ids });
    let text = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    write_atomic(&out.join("tokenizer.json"), tokenizer.to_json()?)?;
    write_atomic(&out.join("tokenizer_config.json"), text(&tokenizer_config))?;
    write_atomic(&out.join("generation_config.json"), text(&generation_config))?;
    // config.json last: a directory without it is not mistaken for a finished model.
    write_atomic(&out.join("config.json"), text(&config))?;
    Ok(())
}
