//! The ops layer: one entry point per operation the models need, each picking a CubeCL kernel
//! (where the [`BackendProfile`] says one runs), then a host kernel (tensors in host memory),
//! then burn's tensor operations. Model code calls only these.
//!
//! A fast path that does not cover its input (a shape, a dtype) declines by handing the input
//! back, and the next one takes it. The `cfg` of GPU builds lives here and nowhere else in the
//! model code: in builds without `cuda` or `wgpu` the kernel branches are compiled out.

mod attention;
mod product;

pub use attention::{
    attention_scores, attention_softmax, attention_values, chunk_mask, decode_attention, decode_attention_batch,
    decode_attention_pool, max_pool_tensor_bytes, pool_view, split_rope, split_rope_into, split_rope_pool,
};
pub use product::{product, product_into_logits, product_residual_scaling, product_with, RowNorm};

use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::DType;
use easykv_core::CacheKernels;

use crate::backend::{BackendProfile, Kernel};
use crate::host_kernels;

/// `$body` (a kernel call returning `Result<_, input>`) where `$profile` runs `$kernel`, else
/// `Err($input)`; always `Err($input)` in builds without a GPU runtime, where `$body` is
/// compiled out.
macro_rules! cube {
    ($profile:expr, $kernel:expr, $input:ident => $body:expr) => {{
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        let out = if $profile.runs($kernel) { $body } else { Err($input) };
        #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
        let out = {
            let _ = (&$profile, $kernel);
            Err($input)
        };
        out
    }};
}
pub(crate) use cube;

/// Whether `B`'s tensors are ones this build's kernels run on (burn's unfused CubeCL tensors
/// of the CUDA or wgpu runtime). Asked once, by [`BackendProfile::detect`].
#[cfg_attr(
    not(any(feature = "cuda", feature = "wgpu")),
    allow(clippy::extra_unused_type_parameters)
)]
pub(crate) fn cube_backend<B: Backend>() -> bool {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    return crate::gpu_kernels::launch::is_cube_backend::<B>();
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    false
}

/// Adds the device kernels an evicting cache may call to `kernels`, where they run.
pub(crate) fn add_cache_kernels<B: Backend>(profile: &BackendProfile, kernels: &mut CacheKernels<B>) {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        use crate::gpu_kernels::launch;
        if profile.runs(Kernel::Rank) {
            kernels.row_ranker = Some(launch::row_ranks::<B>);
        }
        if profile.runs(Kernel::Observe) {
            kernels.observation_writer = Some(launch::write_observation::<B>);
        }
        if profile.runs(Kernel::Gather) {
            kernels.slot_lister = Some(launch::list_true_slots::<B>);
            kernels.slot_gatherer = Some(launch::gather_slots::<B>);
            kernels.slot_writer = Some(launch::write_slots::<B>);
        }
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    let _ = (profile, kernels);
}

/// RMS normalization in f32 whatever the activations' precision (as Hugging Face computes
/// it: squares of half-precision activations overflow), returned in the input's dtype.
///
/// # Shapes
/// - `x`: `[batch, s, hidden]` → the same
pub fn rms_norm<B: Backend>(p: &BackendProfile, norm: &RmsNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    cube!(p, Kernel::RmsNorm, x => crate::gpu_kernels::launch::rms_norm(x, &norm.gamma.val(), norm.epsilon))
        .unwrap_or_else(|x| {
            let dtype = x.dtype();
            norm.forward(x.cast(DType::F32)).cast(dtype)
        })
}

/// SwiGLU's `silu(gate) · up` for the gate and up projections stacked along the last axis.
///
/// # Shapes
/// - `x`: `[.., 2·i]` (gate, then up) → `[.., i]`
pub fn swiglu<B: Backend, const D: usize>(p: &BackendProfile, x: Tensor<B, D>) -> Tensor<B, D> {
    if p.host_resident() {
        return host_kernels::swiglu(x).unwrap_or_else(host_kernels::swiglu_by_ops);
    }
    cube!(p, Kernel::Swiglu, x => crate::gpu_kernels::launch::swiglu(x)).unwrap_or_else(host_kernels::swiglu_by_ops)
}

/// Softmax along the last axis, in f32.
pub fn softmax_last<B: Backend, const D: usize>(p: &BackendProfile, x: Tensor<B, D>) -> Tensor<B, D> {
    let x = x.cast(DType::F32);
    if p.host_resident() {
        return host_kernels::softmax_last(x).unwrap_or_else(|x| burn::tensor::activation::softmax(x, D - 1));
    }
    burn::tensor::activation::softmax(x, D - 1)
}
