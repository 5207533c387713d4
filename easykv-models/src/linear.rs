//! Weight-holding layers whose storage precision can differ from the activations'.
//!
//! CPU decoding is bound by memory bandwidth: every weight is read once per token. Keeping
//! weights in f16 halves those bytes while activations, norms and softmax stay in f32.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::{DType, TensorData};

/// Storage precision of weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDType {
    F32,
    F16,
}

impl WeightDType {
    pub fn dtype(self) -> DType {
        match self {
            WeightDType::F32 => DType::F32,
            WeightDType::F16 => DType::F16,
        }
    }
}

impl std::str::FromStr for WeightDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            other => Err(format!("unknown dtype '{other}' (expected f32 or f16)")),
        }
    }
}

/// Up to this many rows, `W·xᵀ` beats `x·Wᵀ` (measured with flex on 2 cores: 75 vs 116 ms
/// over SmolLM2's layer weights at 8 rows); above it the plain product wins.
const SMALL_ROWS: usize = 32;

/// `y = x·Wᵀ + b` with `W` stored `[out, in]` (the file's layout) in any float dtype.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out, in]`
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// From a row-major `[out, in]` matrix.
    pub fn new(
        w_out_in: Vec<f32>,
        out: usize,
        inp: usize,
        bias: Option<Vec<f32>>,
        dtype: WeightDType,
        device: &B::Device,
    ) -> Self {
        let weight = Tensor::<B, 2>::from_data(TensorData::new(w_out_in, [out, inp]), device).cast(dtype.dtype());
        Self {
            weight: Param::from_tensor(weight),
            bias: bias.map(|b| Param::from_tensor(Tensor::from_data(TensorData::new(b, [out]), device))),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, s, in]` (f32) → `[batch, s, out]` (f32)
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, inp] = x.dims();
        let w = self.weight.val();
        let out = w.dims()[0];
        let x = x.reshape([b * s, inp]).cast(w.dtype());
        let y = if b * s <= SMALL_ROWS {
            w.matmul(x.transpose()).transpose()
        } else {
            x.matmul(w.transpose())
        };
        let y = y.cast(DType::F32).reshape([b, s, out]);
        match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        }
    }
}

/// Token embedding that doubles as the output projection when the model ties them.
#[derive(Module, Debug)]
pub struct EmbeddingTable<B: Backend> {
    /// `[vocab, hidden]`
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> EmbeddingTable<B> {
    pub fn new(w: Vec<f32>, vocab: usize, hidden: usize, dtype: WeightDType, device: &B::Device) -> Self {
        let weight = Tensor::<B, 2>::from_data(TensorData::new(w, [vocab, hidden]), device).cast(dtype.dtype());
        Self {
            weight: Param::from_tensor(weight),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.weight.dims()[0]
    }

    /// # Shapes
    /// - `tokens`: `[batch, s]` → `[batch, s, hidden]` (f32)
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, s] = tokens.dims();
        let hidden = self.weight.dims()[1];
        self.weight
            .val()
            .select(0, tokens.reshape([b * s]))
            .cast(DType::F32)
            .reshape([b, s, hidden])
    }

    /// Logits `x·Wᵀ`, computed as `W·xᵀ`: with one query row that shape parallelizes over the
    /// vocabulary, which measured faster than the transposed product.
    ///
    /// # Shapes
    /// - `x`: `[batch, s, hidden]` → `[batch, s, vocab]` (f32)
    pub fn logits(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, hidden] = x.dims();
        let w = self.weight.val();
        let vocab = w.dims()[0];
        let xt = x.reshape([b * s, hidden]).cast(w.dtype()).transpose();
        w.matmul(xt).cast(DType::F32).transpose().reshape([b, s, vocab])
    }
}
