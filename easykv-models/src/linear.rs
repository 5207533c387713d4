//! Weight-holding layers whose storage precision can differ from the activations'.
//!
//! Decoding is bound by memory bandwidth: every weight is read once per token. Keeping weights
//! (and the KV cache, see [`crate::llama`]) in f16 or bf16 halves those bytes while the residual
//! stream, norms and softmax stay in f32; matrix products run in the storage precision.
//! On the CPU, `native` keeps a GGUF file's quantized blocks as they are
//! ([`crate::quantized`]): 4–5 bits per weight read instead of 32.

use std::sync::Arc;

use burn::module::Param;
use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use crate::backend::BackendProfile;
use crate::gpu_kernels::GemvEpilogue;
use crate::host_kernels::PanelMatrix;
use crate::ops::{self, RowNorm};
use crate::quantized::{self, Activations, PackedWeights, QuantMatrix};

/// Storage precision of weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDType {
    F32,
    F16,
    Bf16,
    /// A GGUF file's quantized matrices kept in their blocks (CPU only), multiplied with f32
    /// activations (each block widened in registers: the f32 product's result up to summation
    /// order); everything else, and the KV cache, in f32.
    Native,
    /// As `Native`, with activations quantized to 8-bit blocks for integer dots (llama.cpp's
    /// way: fewer instructions per weight, a small error of its own). Where K-quant matrices
    /// are stored interleaved (AVX-512 VNNI), products of up to 32 rows against them take
    /// `Q16`'s kernel, whose 16-bit activations per 256 are its only width.
    Q8,
    /// As `Native`, with activations quantized to 16-bit blocks for integer dots (AVX-VNNI or
    /// AVX-512 VNNI): nearly `Q8`'s speed and nearly `Native`'s products (the CPU's default
    /// for one sequence; `Native`'s kernels where the CPU has neither).
    Q16,
}

impl WeightDType {
    /// The dense precision: of the matrices, or with `Native` of what is not quantized.
    pub fn dtype(self) -> DType {
        match self {
            WeightDType::F32 | WeightDType::Native | WeightDType::Q8 | WeightDType::Q16 => DType::F32,
            WeightDType::F16 => DType::F16,
            WeightDType::Bf16 => DType::BF16,
        }
    }

    /// How products treat activations when the weights stay in their blocks; `None` for dense
    /// weights.
    pub fn packed_activations(self) -> Option<Activations> {
        match self {
            WeightDType::Native => Some(Activations::F32),
            WeightDType::Q8 => Some(Activations::Int8),
            WeightDType::Q16 => Some(Activations::Int16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        self.dtype().size()
    }
}

impl std::str::FromStr for WeightDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            "native" => Ok(Self::Native),
            "q8" => Ok(Self::Q8),
            "q16" => Ok(Self::Q16),
            other => Err(format!(
                "unknown dtype '{other}' (expected f32, f16, bf16, native, q8 or q16)"
            )),
        }
    }
}

/// Weights held in host memory in a layout of easykv's own kernels (the module's burn
/// parameter is then a `[out, 1]` stand-in that only says the output size).
#[derive(Debug)]
pub enum HostWeights {
    /// A GGUF file's quantized blocks, row-stacked parts (`--dtype native`, `q8`, `q16`).
    Blocks(PackedWeights),
    /// f32 in panels of 16 outputs (`--dtype f32` on the CPU): every product's tile keeps
    /// outputs in registers, where the `[out, in]` rows needed a reduction per output.
    Panels(PanelMatrix),
}

/// `y = x·Wᵀ + b` with `W` stored `[out, in]` (the file's layout) in any float dtype.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out, in]`; with `packed`, a `[out, 1]` stand-in that only says the output size.
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The weights in a host layout of their own (GGUF blocks, or f32 panels).
    #[module(skip)]
    pub packed: Option<Arc<HostWeights>>,
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
        let weight = Tensor::<B, 2>::from_data(TensorData::new(w_out_in, [out, inp]), device);
        let bias = bias.map(|b| Tensor::from_data(TensorData::new(b, [out]), device));
        Self::from_tensors(weight, bias, dtype)
    }

    /// From tensors already on the device: `weight` `[out, in]`, `bias` `[out]` (kept in f32).
    pub fn from_tensors(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>, dtype: WeightDType) -> Self {
        Self {
            weight: Param::from_tensor(weight.cast(dtype.dtype())),
            bias: bias.map(Param::from_tensor),
            packed: None,
        }
    }

    /// From a matrix's quantized blocks (`[out, in]`), kept as they are; `bias` `[out]` in f32.
    pub fn quantized(
        matrix: QuantMatrix,
        activations: Activations,
        bias: Option<Vec<f32>>,
        device: &B::Device,
    ) -> Self {
        let out = matrix.rows();
        let matrix = decode_layout(matrix, activations);
        Self {
            weight: Param::from_tensor(Tensor::zeros([out, 1], device)),
            bias: bias.map(|b| Param::from_tensor(Tensor::from_data(TensorData::new(b, [out]), device))),
            packed: Some(Arc::new(HostWeights::Blocks(PackedWeights {
                parts: vec![matrix],
                activations,
            }))),
        }
    }

    /// The same layer with f32 weights repacked into panels for the host kernels
    /// ([`PanelMatrix`]); other dtypes and host layouts stay as they are.
    pub fn into_panels(self) -> Self {
        match (self.packed.is_none(), panels_of(&self.weight)) {
            (true, Some(m)) => Self {
                weight: Param::from_tensor(Tensor::zeros([m.out(), 1], &self.weight.device())),
                bias: self.bias,
                packed: Some(Arc::new(HostWeights::Panels(m))),
            },
            _ => self,
        }
    }

    /// The weights as a dense tensor (widening quantized blocks to f32).
    fn dense_weight(&self) -> Tensor<B, 2> {
        let device = self.weight.device();
        match self.packed.as_deref() {
            Some(HostWeights::Blocks(packed)) => widened(&packed.parts, &device),
            Some(HostWeights::Panels(m)) => {
                Tensor::from_data(TensorData::new(m.to_rows(), [m.out(), m.inp()]), &device)
            }
            None => self.weight.val(),
        }
    }

    /// The projections `parts` (same input size) as one: outputs follow each other in the
    /// order given. A part without a bias gets zeros when another has one.
    pub fn stacked(parts: Vec<Linear<B>>) -> Self {
        let biased = parts.iter().any(|p| p.bias.is_some());
        let bias = biased.then(|| {
            let biases = parts
                .iter()
                .map(|p| match &p.bias {
                    Some(b) => b.val(),
                    None => Tensor::zeros([p.weight.dims()[0]], &p.weight.device()),
                })
                .collect();
            Param::from_tensor(Tensor::cat(biases, 0))
        });
        // Quantized parts stack as they are; beside a dense part, all are widened.
        let blocks: Vec<&PackedWeights> = parts
            .iter()
            .filter_map(|p| match p.packed.as_deref() {
                Some(HostWeights::Blocks(b)) => Some(b),
                _ => None,
            })
            .collect();
        if let (Some(first), true) = (blocks.first(), blocks.len() == parts.len()) {
            let weights = parts.iter().map(|p| p.weight.val()).collect();
            let packed = blocks.iter().flat_map(|b| b.parts.iter().cloned()).collect();
            return Self {
                weight: Param::from_tensor(Tensor::cat(weights, 0)),
                bias,
                packed: Some(Arc::new(HostWeights::Blocks(PackedWeights {
                    parts: packed,
                    activations: first.activations,
                }))),
            };
        }
        let weights = parts.iter().map(|p| p.dense_weight()).collect();
        Self {
            weight: Param::from_tensor(Tensor::cat(weights, 0)),
            bias,
            packed: None,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, s, in]` → `[batch, s, out]`, in `x`'s dtype
    pub fn forward(&self, p: &BackendProfile, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, inp] = x.dims();
        let w = self.weight.val();
        let out = w.dims()[0];
        let activation = x.dtype();
        let y = match &self.packed {
            Some(host) => host_product(host, x.reshape([b * s, inp])).cast(activation),
            None => {
                let x = x.reshape([b * s, inp]).cast(w.dtype());
                ops::product(p, x, &w).cast(activation)
            }
        }
        .reshape([b, s, out]);
        match &self.bias {
            // Biases are kept in f32; the addition runs in the activations' precision.
            Some(b) => {
                let dtype = y.dtype();
                y + b.val().cast(dtype).unsqueeze()
            }
            None => y,
        }
    }

    /// `residual + forward(x)`: one kernel for a decode step and two for a few rows (a prefill
    /// stride), where there are.
    ///
    /// # Shapes
    /// - `x`: `[batch, s, in]`, `residual`: `[batch, s, out]` → `[batch, s, out]`
    pub fn forward_residual(&self, p: &BackendProfile, x: Tensor<B, 3>, residual: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, out] = residual.dims();
        let r = residual.clone().reshape([b * s, out]);
        match self.fused(p, x, GemvEpilogue::AddResidual(&r), RowNorm::None) {
            Ok(y) => y.reshape([b, s, out]),
            Err(x) => residual + self.forward(p, x),
        }
    }

    /// [`forward_residual`](Self::forward_residual) and, for a decode step where a kernel can,
    /// the result times the `γ` of `next` (the norm the next product applies to it), made by
    /// the same kernel: the next product's `scaled` argument.
    pub fn forward_residual_scaling(
        &self,
        p: &BackendProfile,
        x: Tensor<B, 3>,
        residual: Tensor<B, 3>,
        next: Option<&RmsNorm<B>>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 3>>) {
        let [b, s, out] = residual.dims();
        let w = self.weight.val();
        let Some(next) = next.filter(|_| b * s == 1 && self.bias.is_none() && x.dtype() == w.dtype()) else {
            return (self.forward_residual(p, x, residual), None);
        };
        let inp = x.dims()[2];
        let r = residual.clone().reshape([1, out]);
        match ops::product_residual_scaling(p, x.reshape([1, inp]), &w, &r, &next.gamma.val()) {
            Ok((y, scaled)) => (y.reshape([b, s, out]), Some(scaled.reshape([b, s, out]))),
            Err(x) => (self.forward_residual(p, x.reshape([b, s, inp]), residual), None),
        }
    }

    /// `silu(gate)·up` of the stacked gate|up projection `forward(norm(x))` (`[.., 2·inter]` →
    /// `[.., inter]`): one kernel for a decode step (norm included), and the product with
    /// SwiGLU in two for a few rows, where there are.
    /// `scaled`: `x·γ` where the product that made `x` wrote it
    /// ([`forward_residual_scaling`](Self::forward_residual_scaling)).
    pub fn forward_swiglu_normed(
        &self,
        p: &BackendProfile,
        x: Tensor<B, 3>,
        scaled: Option<Tensor<B, 3>>,
        norm: &RmsNorm<B>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let inter = self.weight.dims()[0] / 2;
        let x = match self.fused(p, x, GemvEpilogue::Swiglu, row_norm(norm, scaled)) {
            Ok(y) => return y.reshape([b, s, inter]),
            Err(x) => ops::rms_norm(p, norm, x),
        };
        match self.fused(p, x, GemvEpilogue::Swiglu, RowNorm::None) {
            Ok(y) => y.reshape([b, s, inter]),
            Err(x) => ops::swiglu(p, self.forward(p, x)),
        }
    }

    /// `forward(norm(x))`: one kernel for a decode step (norm included) where there is one;
    /// `scaled` as for [`forward_swiglu_normed`](Self::forward_swiglu_normed).
    pub fn forward_normed(
        &self,
        p: &BackendProfile,
        x: Tensor<B, 3>,
        scaled: Option<Tensor<B, 3>>,
        norm: &RmsNorm<B>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let out = self.weight.dims()[0];
        if b * s == 1 {
            match self.fused(p, x, GemvEpilogue::Plain, row_norm(norm, scaled)) {
                Ok(y) => y.reshape([b, s, out]),
                Err(x) => self.forward(p, ops::rms_norm(p, norm, x)),
            }
        } else {
            self.forward(p, ops::rms_norm(p, norm, x))
        }
    }

    /// [`ops::product_with`] for `x` `[batch, s, in]` where there is no bias; `x` back.
    fn fused(
        &self,
        p: &BackendProfile,
        x: Tensor<B, 3>,
        epilogue: GemvEpilogue<'_, B>,
        norm: RowNorm<'_, B>,
    ) -> Result<Tensor<B, 2>, Tensor<B, 3>> {
        let [b, s, inp] = x.dims();
        if self.bias.is_some() || self.packed.is_some() {
            return Err(x);
        }
        ops::product_with(p, x.reshape([b * s, inp]), &self.weight.val(), epilogue, norm)
            .map_err(|x| x.reshape([b, s, inp]))
    }
}

/// The norm a fused product applies: by `γ`, or by `x·γ` where the product that wrote `x`
/// wrote that too.
fn row_norm<B: Backend>(norm: &RmsNorm<B>, scaled: Option<Tensor<B, 3>>) -> RowNorm<'_, B> {
    match scaled {
        Some(s) => {
            let [b, t, inp] = s.dims();
            RowNorm::Scaled(norm, s.reshape([b * t, inp]))
        }
        None => RowNorm::By(norm),
    }
}

/// Token embedding that doubles as the output projection when the model ties them.
#[derive(Module, Debug)]
pub struct EmbeddingTable<B: Backend> {
    /// `[vocab, hidden]`; with `packed`, a `[vocab, 1]` stand-in.
    pub weight: Param<Tensor<B, 2>>,
    /// The table in a host layout of its own (GGUF blocks, or f32 panels).
    #[module(skip)]
    pub packed: Option<Arc<HostWeights>>,
}

impl<B: Backend> EmbeddingTable<B> {
    pub fn new(w: Vec<f32>, vocab: usize, hidden: usize, dtype: WeightDType, device: &B::Device) -> Self {
        Self::from_tensor(Tensor::from_data(TensorData::new(w, [vocab, hidden]), device), dtype)
    }

    /// From a `[vocab, hidden]` tensor already on the device.
    pub fn from_tensor(weight: Tensor<B, 2>, dtype: WeightDType) -> Self {
        Self {
            weight: Param::from_tensor(weight.cast(dtype.dtype())),
            packed: None,
        }
    }

    /// From a table's quantized blocks (`[vocab, hidden]`), kept as they are.
    pub fn quantized(matrix: QuantMatrix, activations: Activations, device: &B::Device) -> Self {
        let matrix = decode_layout(matrix, activations);
        Self {
            weight: Param::from_tensor(Tensor::zeros([matrix.rows(), 1], device)),
            packed: Some(Arc::new(HostWeights::Blocks(PackedWeights {
                parts: vec![matrix],
                activations,
            }))),
        }
    }

    /// The same table with f32 weights repacked into panels ([`Linear::into_panels`]).
    pub fn into_panels(self) -> Self {
        match (self.packed.is_none(), panels_of(&self.weight)) {
            (true, Some(m)) => Self {
                weight: Param::from_tensor(Tensor::zeros([m.out(), 1], &self.weight.device())),
                packed: Some(Arc::new(HostWeights::Panels(m))),
            },
            _ => self,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.weight.dims()[0]
    }

    /// # Shapes
    /// - `tokens`: `[batch, s]` → `[batch, s, hidden]` (f32)
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, s] = tokens.dims();
        if let Some(host) = self.packed.as_deref() {
            let device = tokens.device();
            let ids: Vec<i64> = tokens.into_data().convert::<i64>().into_vec().unwrap_or_default();
            let rows = self.vocab_size();
            let row = |id: i64| (id.max(0) as usize).min(rows.saturating_sub(1));
            let (values, hidden): (Vec<f32>, usize) = match host {
                HostWeights::Blocks(b) => match b.parts.first() {
                    Some(table) => (
                        ids.iter().flat_map(|&id| table.dequantize_row(row(id))).collect(),
                        table.cols(),
                    ),
                    None => (Vec::new(), 0),
                },
                HostWeights::Panels(m) => (ids.iter().flat_map(|&id| m.row(row(id))).collect(), m.inp()),
            };
            return Tensor::from_data(TensorData::new(values, [b, s, hidden]), &device);
        }
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
    pub fn logits(&self, p: &BackendProfile, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, hidden] = x.dims();
        let w = self.weight.val();
        let vocab = w.dims()[0];
        if let Some(host) = &self.packed {
            return host_product(host, x.reshape([b * s, hidden])).reshape([b, s, vocab]);
        }
        let x = x.reshape([b * s, hidden]).cast(w.dtype());
        ops::product_into_logits(p, x, &w)
            .cast(DType::F32)
            .reshape([b, s, vocab])
    }
}

/// Up to this many rows a product reads the quantized blocks directly (a decode step, a batch
/// of decode steps); above it the weights are widened to f32 a tile at a time and multiplied
/// in panels ([`PanelMatrix`]; prefill chunks, where its throughput outweighs the widening).
const QUANTIZED_ROWS_MAX: usize = 32;

/// Weights widened to f32 at once for a product of many rows (4 MiB).
const WIDENED_TILE_ELEMENTS: usize = 1 << 20;

/// Row-stacked quantized parts as one dense f32 matrix.
fn widened<B: Backend>(parts: &[QuantMatrix], device: &B::Device) -> Tensor<B, 2> {
    let dense = parts
        .iter()
        .map(|m| Tensor::from_data(TensorData::new(m.dequantize(), [m.rows(), m.cols()]), device))
        .collect();
    Tensor::cat(dense, 0)
}

/// The weights of an f32 tensor in host memory as panels; `None` for other dtypes and devices.
fn panels_of<B: Backend>(w: &Param<Tensor<B, 2>>) -> Option<PanelMatrix> {
    let w = w.val();
    let [out, inp] = w.dims();
    if w.dtype() != DType::F32 || !BackendProfile::detect::<B>(&w.device()).host_resident() {
        return None;
    }
    let data = w.into_data();
    PanelMatrix::pack(data.as_slice::<f32>().ok()?, out, inp)
}

/// `matrix` stored for the fastest decode product of its activations: sixteen rows interleaved
/// where the CPU's decode kernels take them ([`QuantMatrix::interleaved`]), else as it is.
fn decode_layout(matrix: QuantMatrix, activations: Activations) -> QuantMatrix {
    matrix.interleaved(activations).unwrap_or(matrix)
}

/// `x·Wᵀ` of f32 rows `x` (`[rows, in]`, host memory) and weights in a host layout: `[rows, out]`.
fn host_product<B: Backend>(host: &HostWeights, x: Tensor<B, 2>) -> Tensor<B, 2> {
    match host {
        HostWeights::Blocks(packed) => packed_product(packed, x),
        HostWeights::Panels(m) => {
            let [rows, _] = x.dims();
            let device = x.device();
            let data = x.cast(DType::F32).into_data();
            let y = m.product(data.as_slice::<f32>().unwrap_or(&[]), rows);
            Tensor::from_data(TensorData::new(y, [rows, m.out()]), &device)
        }
    }
}

/// `x·Wᵀ` of f32 rows `x` (`[rows, in]`, host memory) and quantized weights: `[rows, out]`.
fn packed_product<B: Backend>(packed: &PackedWeights, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let [rows, _] = x.dims();
    let (parts, out) = (&packed.parts, packed.rows());
    let device = x.device();
    let data = x.cast(DType::F32).into_data();
    let values = data.as_slice::<f32>().unwrap_or(&[]);
    #[cfg(target_arch = "x86_64")]
    if rows > QUANTIZED_ROWS_MAX && packed.activations != quantized::Activations::F32 {
        // Integer products, sixteen activation rows per register, where the CPU has AVX-512
        // VNNI.
        let y = match packed.activations {
            quantized::Activations::Int8 => quantized::product_many::<i8>(parts, values, rows),
            _ => quantized::product_many::<i16>(parts, values, rows),
        };
        if let Some(y) = y {
            return Tensor::from_data(TensorData::new(y, [rows, out]), &device);
        }
    }
    if rows > QUANTIZED_ROWS_MAX {
        // Widened into f32 panels a tile of rows at a time: one whole widened matrix a call
        // had the kernel zeroing fresh pages for 38 % of a prefill's time; tiles this size are
        // recycled by the allocator.
        let mut y = vec![0f32; rows * out];
        let mut o = 0;
        for m in parts.iter() {
            // Whole register tiles of panels ([`PanelMatrix::TILE_OUTPUTS`]).
            let tile = (WIDENED_TILE_ELEMENTS / m.cols().max(1)).next_multiple_of(PanelMatrix::TILE_OUTPUTS);
            for first in (0..m.rows()).step_by(tile) {
                let n = (first + tile).min(m.rows()) - first;
                let Some(w) = PanelMatrix::pack(&m.dequantize_rows(first..first + n), n, m.cols()) else {
                    continue;
                };
                for (dst, src) in y.chunks_mut(out).zip(w.product(values, rows).chunks(n)) {
                    dst[o..o + n].copy_from_slice(src);
                }
                o += n;
            }
        }
        return Tensor::from_data(TensorData::new(y, [rows, out]), &device);
    }
    let y = quantized::product(parts, values, rows, quantized::Kernel::detect(), packed.activations);
    Tensor::from_data(TensorData::new(y, [rows, out]), &device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    /// One stacked product equals the parts' products side by side, a missing bias counting
    /// as zeros; in f32 and in f16 storage, for decode-sized and prefill-sized inputs.
    #[test]
    fn stacked_projection_equals_its_parts() {
        let dev = Default::default();
        let w = |out: usize| Tensor::<Flex, 2>::random([out, 6], Distribution::Normal(0.0, 1.0), &dev);
        let b = |out: usize| Tensor::<Flex, 1>::random([out], Distribution::Normal(0.0, 1.0), &dev);
        for dtype in [WeightDType::F32, WeightDType::F16] {
            let parts = || {
                vec![
                    Linear::from_tensors(w(4), Some(b(4)), dtype),
                    Linear::from_tensors(w(3), None, dtype),
                    Linear::from_tensors(w(5), Some(b(5)), dtype),
                ]
            };
            let (a, stacked) = {
                let a = parts();
                let clones = a
                    .iter()
                    .map(|l| Linear::from_tensors(l.weight.val(), l.bias.as_ref().map(|b| b.val()), dtype))
                    .collect();
                (a, Linear::stacked(clones))
            };
            assert_eq!(stacked.weight.dims(), [12, 6]);
            let p = BackendProfile::host();
            for rows in [1, 40] {
                let x = Tensor::<Flex, 3>::random([1, rows, 6], Distribution::Normal(0.0, 1.0), &dev);
                let want = Tensor::cat(a.iter().map(|l| l.forward(&p, x.clone())).collect(), 2);
                let got = stacked.forward(&p, x);
                let diff = (got - want).abs().max().into_scalar();
                assert!(diff < 1e-4, "{dtype:?}, {rows} rows: {diff}");
            }
        }
    }
}
