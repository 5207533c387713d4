//! Models of well-known shapes with seeded random weights, for speed and memory work without
//! weight files (`easykv bench --random-weights llama2-7b`).
//!
//! The weights are drawn on the device (normal, σ = 0.02, as Hugging Face initializes these
//! models; norms 1, biases 0), so a 7B model needs no host memory and no upload.

use burn::module::Param;
use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::Distribution;

use crate::config::{Architecture, ModelConfig, RopeLayout};
use crate::error::{Error, Result};
use crate::linear::{EmbeddingTable, Linear, WeightDType};
use crate::llama::{Llama, ParamSource};

/// The context random-weight models accept at least.
const RANDOM_CONTEXT: usize = 1 << 17;

/// A model shape by name.
#[derive(Debug, Clone, Copy)]
pub struct RandomModel {
    pub name: &'static str,
    pub description: &'static str,
    architecture: Architecture,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: usize,
    rope_theta: f32,
    rms_eps: f32,
    context_length: usize,
    qkv_bias: bool,
    tied_embeddings: bool,
}

/// The shapes `--random-weights` knows, from each model's published configuration.
pub const RANDOM_MODELS: &[RandomModel] = &[
    RandomModel {
        name: "llama2-7b",
        description: "Llama-2-7B: 32 layers, 32 heads (MHA), hidden 4096",
        architecture: Architecture::Llama,
        vocab_size: 32_000,
        hidden_size: 4096,
        intermediate_size: 11_008,
        n_layers: 32,
        n_heads: 32,
        n_kv_heads: 32,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        context_length: 4096,
        qkv_bias: false,
        tied_embeddings: false,
    },
    RandomModel {
        name: "llama3-8b",
        description: "Llama-3-8B: 32 layers, GQA 32/8, hidden 4096",
        architecture: Architecture::Llama,
        vocab_size: 128_256,
        hidden_size: 4096,
        intermediate_size: 14_336,
        n_layers: 32,
        n_heads: 32,
        n_kv_heads: 8,
        rope_theta: 500_000.0,
        rms_eps: 1e-5,
        context_length: 8192,
        qkv_bias: false,
        tied_embeddings: false,
    },
    RandomModel {
        name: "qwen2.5-1.5b",
        description: "Qwen2.5-1.5B: 28 layers, GQA 12/2, hidden 1536, QKV biases, tied head",
        architecture: Architecture::Qwen2,
        vocab_size: 151_936,
        hidden_size: 1536,
        intermediate_size: 8960,
        n_layers: 28,
        n_heads: 12,
        n_kv_heads: 2,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        context_length: 32_768,
        qkv_bias: true,
        tied_embeddings: true,
    },
    RandomModel {
        name: "smollm2",
        description: "SmolLM2-135M: 30 layers, GQA 9/3, hidden 576, tied head",
        architecture: Architecture::Llama,
        vocab_size: 49_152,
        hidden_size: 576,
        intermediate_size: 1536,
        n_layers: 30,
        n_heads: 9,
        n_kv_heads: 3,
        rope_theta: 100_000.0,
        rms_eps: 1e-5,
        context_length: 8192,
        qkv_bias: false,
        tied_embeddings: true,
    },
    RandomModel {
        name: "tiny",
        description: "a tiny Llama for tests: 2 layers, GQA 4/2, hidden 64, vocabulary 256",
        architecture: Architecture::Llama,
        vocab_size: 256,
        hidden_size: 64,
        intermediate_size: 128,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        context_length: 2048,
        qkv_bias: false,
        tied_embeddings: true,
    },
];

impl RandomModel {
    /// The shape named `name`, or an error listing the known ones.
    pub fn by_name(name: &str) -> Result<Self> {
        RANDOM_MODELS.iter().find(|m| m.name == name).copied().ok_or_else(|| {
            let names: Vec<_> = RANDOM_MODELS.iter().map(|m| m.name).collect();
            Error::InvalidInput(format!(
                "unknown random-weight model '{name}' (known: {})",
                names.join(", ")
            ))
        })
    }

    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            architecture: self.architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.hidden_size / self.n_heads,
            rope_theta: self.rope_theta,
            // Random weights have no file layout to follow.
            rope_layout: RopeLayout::Half,
            rms_eps: self.rms_eps,
            // Random weights were trained on no context: positions past the published one are
            // plain RoPE, and benchmarks may want them (llama2-7b: 4096-token prompt + decode).
            context_length: self.context_length.max(RANDOM_CONTEXT),
            qkv_bias: self.qkv_bias,
            sliding_window: None,
        }
    }

    /// Parameters in the model, counting a tied head once.
    pub fn parameters(&self) -> u64 {
        let c = self.config();
        let (h, d) = (c.hidden_size as u64, c.head_dim as u64);
        let attn = h * d * (2 * c.n_heads as u64 + 2 * c.n_kv_heads as u64);
        let ffn = 3 * h * c.intermediate_size as u64;
        let tables = if self.tied_embeddings { 1 } else { 2 } * c.vocab_size as u64 * h;
        c.n_layers as u64 * (attn + ffn + 2 * h) + tables + h
    }

    /// Builds the model on `device` with weights drawn from `seed`, matrices in `dtype`.
    pub fn build<B: Backend>(&self, dtype: WeightDType, seed: u64, device: &B::Device) -> Result<Llama<B>> {
        B::seed(device, seed);
        let cfg = self.config();
        let params = RandomParams::<B> {
            dtype,
            eps: cfg.rms_eps,
            bias: cfg.qkv_bias,
            tied: self.tied_embeddings,
            device: device.clone(),
        };
        Llama::assemble(&cfg, &params, device)
    }
}

/// Modules with weights drawn on the device.
struct RandomParams<B: Backend> {
    dtype: WeightDType,
    eps: f32,
    bias: bool,
    tied: bool,
    device: B::Device,
}

impl<B: Backend> RandomParams<B> {
    fn matrix(&self, rows: usize, cols: usize) -> Tensor<B, 2> {
        Tensor::random([rows, cols], Distribution::Normal(0.0, 0.02), &self.device)
    }
}

impl<B: Backend> ParamSource<B> for RandomParams<B> {
    fn linear(&self, name: &str, out: usize, inp: usize, rope_heads: Option<usize>) -> Result<Linear<B>> {
        // Qwen2 has biases on Q, K and V only: the projections RoPE rotates, and V.
        let bias = (self.bias && (rope_heads.is_some() || name.ends_with("attn_v")))
            .then(|| Tensor::zeros([out], &self.device));
        Ok(Linear::from_tensors(self.matrix(out, inp), bias, self.dtype))
    }

    fn table(&self, _name: &str, rows: usize, cols: usize) -> Result<EmbeddingTable<B>> {
        Ok(EmbeddingTable::from_tensor(self.matrix(rows, cols), self.dtype))
    }

    fn norm(&self, _name: &str, len: usize) -> Result<RmsNorm<B>> {
        Ok(RmsNorm {
            gamma: Param::from_tensor(Tensor::ones([len], &self.device)),
            epsilon: self.eps as f64,
        })
    }

    fn has(&self, name: &str) -> bool {
        // The only optional tensor is the untied output head.
        name != "output.weight" || !self.tied
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    #[test]
    fn parameter_counts_match_the_published_sizes() {
        let count = |n: &str| RandomModel::by_name(n).map(|m| m.parameters()).unwrap_or(0);
        // Llama-2-7B has 6.74 B parameters, Llama-3-8B 8.03 B, Qwen2.5-1.5B 1.54 B, SmolLM2 134.5 M
        // (Qwen2's biases are left out of the count: 0.2 M).
        assert_eq!(count("llama2-7b"), 6_738_415_616);
        assert_eq!(count("llama3-8b"), 8_030_261_248);
        assert!(
            (1_543_000_000..1_544_000_000).contains(&count("qwen2.5-1.5b")),
            "{}",
            count("qwen2.5-1.5b")
        );
        assert_eq!(count("smollm2"), 134_515_008);
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = RandomModel::by_name("gpt5")
            .map(|_| ())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("gpt5") && err.contains("llama2-7b") && err.contains("smollm2"),
            "{err}"
        );
    }

    #[test]
    fn same_seed_same_logits_other_seed_other_logits() -> Result<()> {
        let dev = Default::default();
        let smol = RandomModel::by_name("smollm2")?;
        let logits = |seed| -> Result<Vec<f32>> {
            let model = smol.build::<Flex>(WeightDType::F32, seed, &dev)?;
            let mut cache = model.full_cache();
            let tokens = Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![1i64, 50, 900], [1, 3]), &dev);
            let out = model.forward(tokens, &mut cache, crate::llama::Logits::Last)?;
            Ok(out.into_data().to_vec::<f32>().unwrap_or_default())
        };
        let (a, b, c) = (logits(7)?, logits(7)?, logits(8)?);
        assert_eq!(a.len(), 49_152);
        assert!(a.iter().all(|x| x.is_finite()));
        assert_eq!(a, b);
        assert_ne!(a, c);
        Ok(())
    }
}
