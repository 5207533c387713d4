//! Hugging Face model directories: `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json`, and optionally
//! `generation_config.json`. Weights are served under their GGUF names so that one loader
//! ([`crate::llama::Llama::load`]) serves both formats.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::config::{Architecture, ModelConfig, RopeLayout};
use crate::error::{Error, Result};
use crate::weights::WeightSource;

/// The files a model directory must hold (the weights: one of the two safetensors forms).
pub const REQUIRED_FILES: &[&str] = &["config.json", "tokenizer.json"];
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// The fields of `config.json` easykv reads.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: String,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub rope_scaling: Option<serde_json::Value>,
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    pub torch_dtype: Option<String>,
}

fn default_theta() -> f64 {
    10_000.0
}

impl HfConfig {
    /// The model's shape, or why easykv cannot run it.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let (architecture, qkv_bias) = match self.model_type.as_str() {
            "llama" | "mistral" => (Architecture::Llama, false),
            "qwen2" => (Architecture::Qwen2, true),
            other => {
                return Err(Error::Unsupported(format!(
                    "config.json names model_type '{other}' (supported: llama, mistral, qwen2)"
                )))
            }
        };
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(Error::Unsupported(
                "config.json sets rope_scaling (not supported yet)".into(),
            ));
        }
        // Mistral's window applies when set; Qwen2 declares one but switches it off.
        let window_active = match self.model_type.as_str() {
            "qwen2" => self.use_sliding_window.unwrap_or(false),
            _ => true,
        };
        let sliding_window = self
            .sliding_window
            .filter(|&w| window_active && w < self.max_position_embeddings);
        let cfg = ModelConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            n_layers: self.num_hidden_layers,
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0)),
            rope_theta: self.rope_theta as f32,
            // Hugging Face checkpoints rotate halves (their q/k rows are already permuted).
            rope_layout: RopeLayout::Half,
            rms_eps: self.rms_norm_eps as f32,
            context_length: self.max_position_embeddings,
            qkv_bias,
            sliding_window,
        };
        if cfg.head_dim.checked_mul(cfg.n_heads) != Some(cfg.hidden_size) {
            return Err(Error::Unsupported("head_dim × heads differs from hidden_size".into()));
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The Hugging Face name of a GGUF tensor name.
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.into());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = tail.rsplit_once('.')?;
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// A model directory with its weights read into memory.
pub struct HfModelDir {
    pub dir: PathBuf,
    pub config: HfConfig,
    /// Shard file name → its bytes.
    shards: BTreeMap<String, Vec<u8>>,
    /// Tensor name → shard file name.
    weight_map: BTreeMap<String, String>,
}

impl std::fmt::Debug for HfModelDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfModelDir").field("dir", &self.dir).finish()
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))
}

impl HfModelDir {
    /// A one-shard model from its `config.json` and `model.safetensors` bytes, checked as
    /// [`open`](Self::open) checks them (what the fuzz target drives).
    pub fn from_bytes(config: &[u8], safetensors: Vec<u8>) -> Result<Self> {
        let config: HfConfig =
            serde_json::from_slice(config).map_err(|e| Error::InvalidInput(format!("config.json: {e}")))?;
        config.model_config()?;
        SafeTensors::deserialize(&safetensors).map_err(|e| Error::InvalidInput(format!("{SINGLE}: {e}")))?;
        Ok(Self {
            dir: PathBuf::new(),
            config,
            shards: BTreeMap::from([(SINGLE.to_string(), safetensors)]),
            weight_map: BTreeMap::new(),
        })
    }

    /// Opens `dir`, checking that every file the model needs is there.
    pub fn open(dir: &Path) -> Result<Self> {
        for f in REQUIRED_FILES {
            if !dir.join(f).is_file() {
                return Err(Error::InvalidInput(format!(
                    "model directory {} has no {f}",
                    dir.display()
                )));
            }
        }
        let config: HfConfig = json(&dir.join("config.json"))?;
        config.model_config()?;
        let weight_map = if dir.join(INDEX).is_file() {
            json::<ShardIndex>(&dir.join(INDEX))?.weight_map
        } else if dir.join(SINGLE).is_file() {
            BTreeMap::new()
        } else {
            return Err(Error::InvalidInput(format!(
                "model directory {} has neither {SINGLE} nor {INDEX}",
                dir.display()
            )));
        };
        let mut files: Vec<String> = weight_map.values().cloned().collect();
        if files.is_empty() {
            files.push(SINGLE.into());
        }
        files.sort();
        files.dedup();
        let mut shards = BTreeMap::new();
        for f in files {
            if f.contains('/') || f.contains("..") {
                return Err(Error::InvalidInput(format!(
                    "{INDEX} names a file outside the directory: {f}"
                )));
            }
            let bytes = read(&dir.join(&f))?;
            // Parse once now so that a corrupt shard fails here, with its name.
            SafeTensors::deserialize(&bytes)
                .map_err(|e| Error::InvalidInput(format!("{}: {e}", dir.join(&f).display())))?;
            shards.insert(f, bytes);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            shards,
            weight_map,
        })
    }

    fn shard_of(&self, hf: &str) -> Option<&Vec<u8>> {
        match self.weight_map.get(hf) {
            Some(f) => self.shards.get(f),
            None if self.weight_map.is_empty() => self.shards.values().next(),
            None => None,
        }
    }
}

impl WeightSource for HfModelDir {
    fn tensor(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let missing = || Error::MissingTensor(name.to_string());
        let hf = hf_name(name).ok_or_else(missing)?;
        let bytes = self.shard_of(&hf).ok_or_else(missing)?;
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let view = tensors.tensor(&hf).map_err(|_| Error::MissingTensor(hf.clone()))?;
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => widen(data, 4, |src, dst| {
                for (b, y) in src.chunks_exact(4).zip(dst) {
                    *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }),
            Dtype::F16 => widen(data, 2, |src, dst| {
                by_blocks(src, dst, |bits, out| {
                    bits.reinterpret_cast::<f16>().convert_to_f32_slice(out)
                });
            }),
            Dtype::BF16 => widen(data, 2, |src, dst| {
                by_blocks(src, dst, |bits, out| {
                    bits.reinterpret_cast::<bf16>().convert_to_f32_slice(out)
                });
            }),
            other => {
                return Err(Error::Unsupported(format!(
                    "tensor {hf} is {other:?} (supported: F32, F16, BF16)"
                )))
            }
        };
        Ok((values, view.shape().to_vec()))
    }

    fn has(&self, name: &str) -> bool {
        hf_name(name).is_some_and(|hf| {
            self.shard_of(&hf)
                .and_then(|b| SafeTensors::deserialize(b).ok())
                .is_some_and(|t| t.tensor(&hf).is_ok())
        })
    }
}

/// Little-endian elements of `size` bytes to f32, split over the cores: with the page faults of
/// the fresh output, this is most of a directory's load time. `convert` widens one part.
fn widen(data: &[u8], size: usize, convert: impl Fn(&[u8], &mut [f32]) + Sync) -> Vec<f32> {
    let n = data.len() / size;
    let mut out = vec![0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per = n.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (src, dst) in data.chunks(per * size).zip(out.chunks_mut(per)) {
            let convert = &convert;
            scope.spawn(move || convert(src, dst));
        }
    });
    out
}

/// Feeds 16-bit little-endian words to half's vectorized slice conversion a block at a time,
/// through a buffer on the stack (no second copy of the tensor).
fn by_blocks(src: &[u8], dst: &mut [f32], convert: impl Fn(&[u16], &mut [f32])) {
    const BLOCK: usize = 4096;
    let mut bits = [0u16; BLOCK];
    for (bytes, out) in src.chunks(2 * BLOCK).zip(dst.chunks_mut(BLOCK)) {
        let words = &mut bits[..out.len()];
        for (w, b) in words.iter_mut().zip(bytes.chunks_exact(2)) {
            *w = u16::from_le_bytes([b[0], b[1]]);
        }
        convert(words, out);
    }
}

/// The fields of `tokenizer_config.json` easykv reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfTokenizerConfig {
    #[serde(default, deserialize_with = "chat_template")]
    pub chat_template: Option<String>,
    #[serde(default, deserialize_with = "token_text")]
    pub bos_token: Option<String>,
    #[serde(default, deserialize_with = "token_text")]
    pub eos_token: Option<String>,
    #[serde(default)]
    pub add_bos_token: bool,
}

/// A special token is written either as a string or as `{"content": "…", …}`.
fn token_text<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match v {
        Some(serde_json::Value::String(s)) => Some(s),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
        _ => None,
    })
}

/// A chat template is a string, or (newer Hugging Face files) a list of `{"name", "template"}`
/// of which the one named `default` (else the first) is the chat template.
fn chat_template<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Named {
        name: Option<String>,
        template: String,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        One(String),
        Many(Vec<Named>),
    }
    Ok(match Option::<Form>::deserialize(d)? {
        None => None,
        Some(Form::One(t)) => Some(t),
        Some(Form::Many(list)) => {
            let default = list.iter().position(|t| t.name.as_deref() == Some("default"));
            list.into_iter().nth(default.unwrap_or(0)).map(|t| t.template)
        }
    })
}

/// `generation_config.json`'s end-of-sequence ids (one id or a list).
pub fn generation_stop_ids(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = json(&path)?;
    Ok(match v.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|id| vec![id as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|id| id as u32).collect(),
        _ => Vec::new(),
    })
}

/// Reads `tokenizer_config.json` if present.
pub fn tokenizer_config(dir: &Path) -> Result<HfTokenizerConfig> {
    let path = dir.join("tokenizer_config.json");
    if path.is_file() {
        json(&path)
    } else {
        Ok(HfTokenizerConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hugging_face_names() {
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(
            hf_name("blk.12.attn_q.bias").as_deref(),
            Some("model.layers.12.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn chat_template_as_a_string_or_a_named_list() {
        let read = |t: &str| serde_json::from_str::<HfTokenizerConfig>(t).unwrap().chat_template;
        assert_eq!(read(r#"{"chat_template": "A"}"#).as_deref(), Some("A"));
        assert_eq!(
            read(r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#)
                .as_deref(),
            Some("D")
        );
        assert_eq!(
            read(r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#).as_deref(),
            Some("R")
        );
        assert_eq!(read("{}"), None);
    }

    #[test]
    fn absurd_or_meaningless_shapes_are_refused_before_anything_is_allocated() {
        for (key, value, needle) in [
            ("num_hidden_layers", serde_json::json!(1u64 << 62), "layers"),
            ("vocab_size", serde_json::json!(1_000_000_000_000u64), "vocabulary"),
            ("rope_theta", serde_json::json!(-1.0), "rope theta"),
            ("rms_norm_eps", serde_json::json!(0.0), "epsilon"),
        ] {
            let mut v = serde_json::json!({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
                "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "rms_norm_eps": 1e-5, "max_position_embeddings": 64});
            v[key] = value;
            let err = serde_json::from_value::<HfConfig>(v)
                .map_err(|e| Error::InvalidInput(e.to_string()))
                .and_then(|c| c.model_config())
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{key}: {err}");
        }
    }

    fn config(extra: &str) -> Result<ModelConfig> {
        let text = format!(
            r#"{{"model_type": "mistral", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "rms_norm_eps": 1e-5, "max_position_embeddings": 64 {extra}}}"#
        );
        serde_json::from_str::<HfConfig>(&text)
            .map_err(|e| Error::InvalidInput(e.to_string()))?
            .model_config()
    }

    #[test]
    fn configs_are_read_or_refused_with_a_reason() {
        let c = config("").unwrap();
        assert_eq!((c.n_kv_heads, c.head_dim, c.rope_layout), (2, 4, RopeLayout::Half));
        assert_eq!(
            config(r#", "sliding_window": 128"#).unwrap().sliding_window,
            None,
            "wider than the context"
        );
        assert_eq!(config(r#", "sliding_window": 32"#).unwrap().sliding_window, Some(32));
        assert!(config(r#", "sliding_window": 0"#).is_err());
        let scaled = config(r#", "rope_scaling": {"type": "llama3"}"#)
            .unwrap_err()
            .to_string();
        assert!(scaled.contains("rope_scaling"), "{scaled}");
    }
}
