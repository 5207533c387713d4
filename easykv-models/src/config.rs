//! Model hyper-parameters read from GGUF metadata.

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// The transformer families easykv runs. They share one implementation ([`crate::llama`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Qwen2,
}

/// How query/key vectors are laid out for rotary embedding in the weight file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RopeLayout {
    /// Pairs `(2i, 2i+1)` rotate together (llama.cpp's "norm" type; llama-arch GGUF files).
    Interleaved,
    /// Pairs `(i, i + d/2)` rotate together (HF "rotate half"; llama.cpp's NEOX type).
    Half,
}

/// Shape and numerics of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rope_layout: RopeLayout,
    pub rms_eps: f32,
    pub context_length: usize,
    pub qkv_bias: bool,
    /// Attention reaches back at most this many positions (Mistral v0.1's sliding window);
    /// `None`: the whole context.
    pub sliding_window: Option<usize>,
}

/// Upper bounds of a model's shape (far above any real model's).
const MAX_LAYERS: usize = 1024;
const MAX_VOCAB: usize = 1 << 22;
const MAX_WIDTH: usize = 1 << 17;
const MAX_HEADS: usize = 1024;
const MAX_HEAD_DIM: usize = 1024;

impl ModelConfig {
    /// Reads the `<arch>.*` keys of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.meta_str("general.architecture")?;
        let (architecture, rope_layout, qkv_bias) = match arch {
            "llama" => (Architecture::Llama, RopeLayout::Interleaved, false),
            "qwen2" => (Architecture::Qwen2, RopeLayout::Half, true),
            other => {
                return Err(Error::Unsupported(format!(
                    "architecture '{other}' (supported: llama, qwen2)"
                )))
            }
        };
        let int = |key: &str| -> Result<usize> { Ok(file.meta_u64(&format!("{arch}.{key}"))? as usize) };
        let hidden_size = int("embedding_length")?;
        let n_heads = int("attention.head_count")?;
        let n_kv_heads = file
            .meta_u64(&format!("{arch}.attention.head_count_kv"))
            .map_or(n_heads, |v| v as usize);
        let vocab_size = match file.meta_u64(&format!("{arch}.vocab_size")) {
            Ok(v) => v as usize,
            Err(_) => file
                .meta("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(<[_]>::len)
                .ok_or_else(|| Error::MissingMetadata(format!("{arch}.vocab_size")))?,
        };
        let cfg = Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            n_layers: int("block_count")?,
            n_heads,
            n_kv_heads,
            head_dim: hidden_size.checked_div(n_heads).unwrap_or(0),
            rope_theta: file.meta_f64(&format!("{arch}.rope.freq_base")).unwrap_or(10_000.0) as f32,
            rope_layout,
            rms_eps: file.meta_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))? as f32,
            context_length: int("context_length")?,
            qkv_bias,
            sliding_window: file
                .meta_u64(&format!("{arch}.attention.sliding_window"))
                .ok()
                .map(|w| w as usize),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects shapes that cannot form a model (zero sizes, heads not dividing evenly).
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Unsupported(format!("model shape: {what}")));
        if [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.n_layers,
            self.n_heads,
            self.n_kv_heads,
        ]
        .contains(&0)
        {
            return bad("a size is zero");
        }
        if !self.hidden_size.is_multiple_of(self.n_heads) || !self.head_dim.is_multiple_of(2) {
            return bad("hidden size must split into heads of even dimension");
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad("query heads must be a multiple of KV heads");
        }
        if self.context_length == 0 || self.context_length > 1 << 20 {
            return bad("context length out of range");
        }
        // Bounds no real model comes near, checked before anything is sized by them.
        for (what, value, max) in [
            ("layers", self.n_layers, MAX_LAYERS),
            ("vocabulary", self.vocab_size, MAX_VOCAB),
            ("hidden size", self.hidden_size, MAX_WIDTH),
            ("intermediate size", self.intermediate_size, MAX_WIDTH * 8),
            ("attention heads", self.n_heads, MAX_HEADS),
            ("head dimension", self.head_dim, MAX_HEAD_DIM),
        ] {
            if value > max {
                return bad(&format!("{value} {what} (at most {max})"));
            }
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(&format!("rope theta {} must be a positive number", self.rope_theta));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0 && self.rms_eps < 1.0) {
            return bad(&format!("RMS norm epsilon {} must be in (0, 1)", self.rms_eps));
        }
        if self.sliding_window == Some(0) {
            return bad("sliding window of zero positions");
        }
        Ok(())
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Bytes of keys and values for one token over all layers, at `bytes_per_element`.
    pub fn kv_bytes_per_token(&self, bytes_per_element: usize) -> u64 {
        (2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element) as u64
    }

    /// RoPE's inverse frequencies `1/θ^(2i/d)`, `i < head_dim / 2` (what the cache needs for
    /// expected attention).
    pub fn rope_frequencies(&self) -> Vec<f32> {
        crate::llama::rope::inverse_frequencies(self.head_dim, self.rope_theta)
    }
}
