//! Matrix products `x·Wᵀ` of activations and weights stored `[out, in]`, with the epilogues
//! and norms that kernels fuse into them.

// Arguments only kernels read are unused where the kernels are compiled out.
#![cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_variables))]

use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::DType;

use super::cube;
use crate::backend::{BackendProfile, Kernel};
use crate::gpu_kernels::GemvEpilogue;
use crate::host_kernels;

/// Up to this many rows, `W·xᵀ` beats `x·Wᵀ` (measured with flex on 2 cores: 75 vs 116 ms
/// over SmolLM2's layer weights at 8 rows); above it the plain product wins.
const SMALL_ROWS: usize = 32;

/// What a fused product normalizes its input by.
pub enum RowNorm<'a, B: Backend> {
    None,
    By(&'a RmsNorm<B>),
    /// The norm, and its input times the norm's `γ` (written by the product that made the
    /// input: [`product_residual_scaling`]), `[rows, in]`.
    Scaled(&'a RmsNorm<B>, Tensor<B, 2>),
}

/// `x·Wᵀ` (`[rows, in]` × `[out, in]`, both in `W`'s dtype) → `[rows, out]`: a GPU kernel (the
/// GEMV for one row, tensor cores for a few, exact f32 for f32), else the weights' rows split
/// over threads for a few rows in host memory, else burn's product. (f32 weights in host memory
/// do not come here: [`crate::linear::HostWeights`] holds them in panels for the host kernels.)
pub fn product<B: Backend>(p: &BackendProfile, x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
    let rows = x.dims()[0];
    device_product(p, x, w).unwrap_or_else(|x| match rows <= SMALL_ROWS {
        true => few_rows(p, w, x),
        false => x.matmul(w.clone().transpose()),
    })
}

/// [`product`] for the output projection onto the vocabulary: computed as `W·xᵀ` whatever
/// the row count (with few query rows that shape parallelizes over the vocabulary).
pub fn product_into_logits<B: Backend>(p: &BackendProfile, x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
    device_product(p, x, w).unwrap_or_else(|x| few_rows(p, w, x))
}

/// `W·xᵀ` for a few rows, split over threads in host memory.
fn few_rows<B: Backend>(p: &BackendProfile, w: &Tensor<B, 2>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    match p.host_resident() {
        true => host_kernels::matmul_rows_parallel(w, x.transpose()).transpose(),
        false => w.clone().matmul(x.transpose()).transpose(),
    }
}

/// The GPU kernels of [`product`]; `x` back where none runs.
fn device_product<B: Backend>(
    p: &BackendProfile,
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let plain = GemvEpilogue::<B>::Plain;
    cube!(p, Kernel::Gemv, x => crate::gpu_kernels::launch::gemv(x, w, plain, &p.tuning))
        .or_else(|x| cube!(p, Kernel::Rows, x => crate::gpu_kernels::launch::matmul_rows(x, w, plain, &p.tuning)))
        .or_else(|x| exact_f32_rows(p, x, w))
}

/// `x·Wᵀ` in f32 arithmetic where a kernel can (f32 on GPUs, whose matrix products otherwise
/// run f32 as TF32 and lose `--dtype f32`'s exactness); else `x` back.
fn exact_f32_rows<B: Backend>(
    p: &BackendProfile,
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    let ([rows, inp], out) = (x.dims(), w.dims()[0]);
    let x = x.reshape([1, 1, rows, inp]);
    cube!(p, Kernel::Matmul, x => {
        let w = w.clone().reshape([1, 1, out, inp]);
        crate::gpu_kernels::launch::matmul_f32(x, &w, true, out)
    })
    .map(|y: Tensor<B, 4>| y.reshape([rows, out]))
    .map_err(|x: Tensor<B, 4>| x.reshape([rows, inp]))
}

/// The product of `x` (`[rows, in]`, in `W`'s dtype) followed by `epilogue` as one kernel
/// (one row, RMS-normalized first when `norm` says) or two (a few rows, not normalized);
/// `x` back, not normalized, where no kernel takes it.
pub fn product_with<B: Backend>(
    p: &BackendProfile,
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
    epilogue: GemvEpilogue<'_, B>,
    norm: RowNorm<'_, B>,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    if x.dtype() != w.dtype() {
        return Err(x);
    }
    // A normalizing GEMV needs both kernels: it stands in for the norm's too.
    let normed = p.runs(Kernel::RmsNorm);
    let staged = |x: Tensor<B, 2>, n: &RmsNorm<B>| match normed {
        true => cube!(p, Kernel::Gemv, x => {
            crate::gpu_kernels::launch::gemv_normed(x, &n.gamma.val(), n.epsilon, w, epilogue, &p.tuning)
        }),
        false => Err(x),
    };
    match norm {
        RowNorm::Scaled(n, scaled) => match normed {
            true => cube!(p, Kernel::Gemv, x => {
                crate::gpu_kernels::launch::gemv_prescaled(x, &scaled, n.epsilon, w, epilogue, &p.tuning)
            }),
            false => Err(x),
        }
        .or_else(|x| staged(x, n)),
        RowNorm::By(n) => staged(x, n),
        RowNorm::None => cube!(p, Kernel::Gemv, x => crate::gpu_kernels::launch::gemv(x, w, epilogue, &p.tuning))
            .or_else(
                |x| cube!(p, Kernel::Rows, x => crate::gpu_kernels::launch::matmul_rows(x, w, epilogue, &p.tuning)),
            ),
    }
}

/// `residual + x·Wᵀ` for one row, and the result times `next_gamma` (the `γ` of the norm the
/// next product applies to it), by one kernel; `x` back where none runs.
///
/// # Shapes
/// - `x`: `[1, in]`, `residual`: `[1, out]`, `next_gamma`: `[out]` → twice `[1, out]`
pub fn product_residual_scaling<B: Backend>(
    p: &BackendProfile,
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
    residual: &Tensor<B, 2>,
    next_gamma: &Tensor<B, 1>,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>), Tensor<B, 2>> {
    let epilogue = GemvEpilogue::AddResidual(residual);
    cube!(p, Kernel::Gemv, x => crate::gpu_kernels::launch::gemv_scaling(x, w, epilogue, next_gamma, &p.tuning))
}
