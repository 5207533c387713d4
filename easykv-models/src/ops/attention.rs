//! Attention's operations: splitting and rotating the stacked projection (writing keys and
//! values into the cache where a kernel can), scores, softmax and values.

// Arguments only kernels read are unused where the kernels are compiled out.
#![cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_variables))]

use burn::prelude::*;
use burn::tensor::DType;

use super::cube;
use crate::backend::{BackendProfile, Kernel};
use crate::gpu_kernels::{HeadShape, PoolRows};

/// `cos` and `sin` rows (`[s, head_dim]`) of a chunk's positions.
pub type AngleRows<'a, B> = (&'a Tensor<B, 2>, &'a Tensor<B, 2>);

/// The stacked projection `qkv` split into rotated queries, (rotated unless `keys` is `None`)
/// keys and values, heads first, by one kernel; `qkv` back where none runs (the caller then
/// splits and rotates by tensor operations).
///
/// # Shapes
/// - `qkv`: `[batch, s, (hq + 2·hkv)·d]` → `[batch, heads, s, d]` with hq, hkv, hkv heads
#[allow(clippy::type_complexity)]
pub fn split_rope<B: Backend>(
    p: &BackendProfile,
    qkv: Tensor<B, 3>,
    heads: HeadShape,
    queries: AngleRows<'_, B>,
    keys: Option<AngleRows<'_, B>>,
) -> Result<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>), Tensor<B, 3>> {
    cube!(p, Kernel::SplitRope, qkv => crate::gpu_kernels::launch::split_rope(qkv, heads, queries, keys))
}

/// [`split_rope`] writing keys and values straight into a cache's buffers (`[batch, hkv,
/// capacity, d]`) at slots `at..at + s`: the rotated queries; `qkv` back where no kernel runs.
pub fn split_rope_into<B: Backend>(
    p: &BackendProfile,
    qkv: Tensor<B, 3>,
    heads: HeadShape,
    queries: AngleRows<'_, B>,
    keys: AngleRows<'_, B>,
    cache: (&Tensor<B, 4>, &Tensor<B, 4>),
    at: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 3>> {
    cube!(p, Kernel::SplitRope, qkv => crate::gpu_kernels::launch::split_rope_into(qkv, heads, queries, keys, cache, at))
}

/// [`split_rope_into`] for one token of each of `n` sequences whose caches lie in a memory
/// pool (`pool`: its `[1, hkv, pool_slots, d]` tensors; `rows`: where each sequence's slots lie,
/// counting this token): one launch for all of them; `qkv` back where no kernel runs.
///
/// # Shapes
/// - `qkv`: `[n, 1, (hq + 2·hkv)·d]`; angle rows `[n, d]` → q `[n, hq, 1, d]`
pub fn split_rope_pool<B: Backend>(
    p: &BackendProfile,
    qkv: Tensor<B, 3>,
    heads: HeadShape,
    queries: AngleRows<'_, B>,
    keys: AngleRows<'_, B>,
    pool: (&Tensor<B, 4>, &Tensor<B, 4>),
    rows: &PoolRows<'_, B>,
) -> Result<Tensor<B, 4>, Tensor<B, 3>> {
    cube!(p, Kernel::SplitRope, qkv => crate::gpu_kernels::launch::split_rope_pool(qkv, heads, queries, keys, pool, rows))
}

/// [`decode_attention`] for `n` sequences of a memory pool in one launch (and its join):
/// row `i` of `q` over its own slots of the pool's tensors, observed into `observe`'s
/// `(buffer, layer)` where given (see the launch's documentation); `q` back where no kernel
/// runs.
///
/// # Shapes
/// - `q`: `[n, kv_heads, rows, d]`; `keys`, `values`: `[1, kv_heads, pool_slots, d]` → `q`'s
///   shape and dtype; `observe`'s buffer: `[layers, kv_heads, pool_slots]` (f32)
pub fn decode_attention_pool<B: Backend>(
    p: &BackendProfile,
    q: Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    rows: &PoolRows<'_, B>,
    observe: Option<(&Tensor<B, 3>, usize)>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    cube!(p, Kernel::Attention, q => crate::gpu_kernels::launch::decode_attention_pool(q, keys, values, rows, observe))
}

/// Slots `start..start + len` of a pool's tensor (`[1, heads, pool_slots, d]`) as a view that
/// shares its memory, where kernels run and the runtime's alignment allows; else `None`.
pub fn pool_view<B: Backend>(
    p: &BackendProfile,
    pool: &Tensor<B, 4>,
    start: usize,
    len: usize,
) -> Option<Tensor<B, 4>> {
    let none = ();
    let view: Result<Option<Tensor<B, 4>>, ()> =
        cube!(p, Kernel::Attention, none => Ok(crate::gpu_kernels::launch::slot_view(pool, start, len)));
    view.ok().flatten()
}

/// The most bytes one pool tensor may span on `device` where kernels run (the runtime's
/// largest page: wgpu's storage-buffer binding limit); `None` where nothing limits it.
pub fn max_pool_tensor_bytes<B: Backend>(p: &BackendProfile, device: &B::Device) -> Option<u64> {
    let none = ();
    let max: Result<u64, ()> =
        cube!(p, Kernel::Attention, none => crate::gpu_kernels::launch::max_binding_bytes::<B>(device));
    max.ok()
}

/// `softmax(q·keysᵀ)·values` over the first `slots` slots of a cache's buffers, read in place
/// and never writing the scores out (for steps nobody observes); `q` back where no kernel runs.
///
/// # Shapes
/// - `q`: `[batch, kv_heads, rows, d]`; `keys`, `values`: `[batch, kv_heads, capacity, d]`
///   → `[batch, kv_heads, rows, d]` in `q`'s dtype
pub fn decode_attention<B: Backend>(
    p: &BackendProfile,
    q: Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    slots: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    cube!(p, Kernel::Attention, q => crate::gpu_kernels::launch::decode_attention(q, keys, values, slots)).or_else(
        |q| match p.host_resident() {
            true => crate::host_kernels::decode_attention(q, keys, values, slots),
            false => Err(q),
        },
    )
}

/// [`decode_attention`] for every sequence of a batched decode step, each over its own cache's
/// buffers (`kv[i]`: keys, values, slots in use) in one call; the queries back where no kernel
/// takes them all.
///
/// # Shapes
/// - `qs[i]`: `[1, kv_heads, rows, d]`; `kv[i]`: `[1, kv_heads, capacity_i, d]` each
///   → `[sequences, kv_heads, rows, d]`
pub fn decode_attention_batch<B: Backend>(
    p: &BackendProfile,
    qs: Vec<Tensor<B, 4>>,
    kv: &[(&Tensor<B, 4>, &Tensor<B, 4>, usize)],
) -> Result<Tensor<B, 4>, Vec<Tensor<B, 4>>> {
    match p.host_resident() {
        true => crate::host_kernels::decode_attention_batch(qs, kv),
        false => Err(qs),
    }
}

/// Attention scores `q·keysᵀ` over the first `slots` slots of `keys`.
///
/// `buffers`: `keys` are the cache's buffers (`[batch, kv_heads, capacity, d]`, `slots` of
/// them in use), which kernels read in place; otherwise `keys` holds exactly the slots. On
/// GPUs an attention kernel, else an exact-f32 product (burn's run f32 as TF32), else burn's.
///
/// # Shapes
/// - `q`: `[batch, kv_heads, rows, d]` → `[batch, kv_heads, rows, slots]`
pub fn attention_scores<B: Backend>(
    p: &BackendProfile,
    q: Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    slots: usize,
    buffers: bool,
) -> Tensor<B, 4> {
    let q = match buffers {
        true => cube!(p, Kernel::Attention, q => crate::gpu_kernels::launch::attention_scores(q, keys, slots))
            .or_else(|q| cube!(p, Kernel::Matmul, q => crate::gpu_kernels::launch::matmul_f32(q, keys, true, slots))),
        false => Err(q),
    };
    q.unwrap_or_else(|q| q.matmul(first_slots(keys, slots).swap_dims(2, 3)))
}

/// Attention values `probs·values` over the first `slots` slots of `values` (`buffers` as for
/// [`attention_scores`]).
///
/// # Shapes
/// - `probs`: `[batch, kv_heads, rows, slots]` → `[batch, kv_heads, rows, d]`
pub fn attention_values<B: Backend>(
    p: &BackendProfile,
    probs: Tensor<B, 4>,
    values: &Tensor<B, 4>,
    slots: usize,
    buffers: bool,
) -> Tensor<B, 4> {
    let d = values.dims()[3];
    let probs = match buffers {
        true => cube!(p, Kernel::Attention, probs => crate::gpu_kernels::launch::attention_values(probs, values, slots, &p.tuning))
            .or_else(|probs| cube!(p, Kernel::Matmul, probs => crate::gpu_kernels::launch::matmul_f32(probs, values, false, d))),
        false => Err(probs),
    };
    probs.unwrap_or_else(|probs| probs.matmul(first_slots(values, slots)))
}

/// The first `slots` slots of a cache buffer `[batch, heads, capacity, d]` (itself when full).
fn first_slots<B: Backend>(t: &Tensor<B, 4>, slots: usize) -> Tensor<B, 4> {
    match t.dims()[2] == slots {
        true => t.clone(),
        false => t.clone().slice_dim(2, 0..slots),
    }
}

/// Softmax over the slots of attention `scores` plus the additive `mask` (the scores' shape,
/// or a chunk's `[1, 1, s, slots]` for every head and query group — see [`chunk_mask`]) and
/// slot `bias` (`[batch, kv_heads, 1, slots]`, repeated over the rows): the probabilities in
/// `product` (what multiplies the values) and, when `observed`, in f32 (what the cache
/// observes).
///
/// # Shapes
/// - `scores`: `[batch, kv_heads, rows, slots]` → the same
pub fn attention_softmax<B: Backend>(
    p: &BackendProfile,
    scores: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4>>,
    bias: Option<&Tensor<B, 4>>,
    product: DType,
    observed: bool,
) -> (Option<Tensor<B, 4>>, Tensor<B, 4>) {
    let scores = match cube!(p, Kernel::Softmax, scores => crate::gpu_kernels::launch::softmax_rows(scores, mask, bias, product, observed))
    {
        Ok(probs) => return probs,
        Err(scores) => scores.cast(DType::F32),
    };
    let dims = scores.dims();
    let rows = dims[2];
    let scores = match mask {
        // Repeated to the scores' shape: flex adds equal shapes far faster than it broadcasts.
        Some(m) => scores + full_mask(m, dims),
        None => scores,
    };
    let scores = match bias {
        Some(bias) => scores + bias.clone().repeat_dim(2, rows),
        None => scores,
    };
    let probs = super::softmax_last(p, scores);
    (observed.then(|| probs.clone()), probs.cast(product))
}

/// A mask in the scores' shape `dims`: itself, or a chunk's `[1, 1, s, slots]` repeated over
/// batches, heads and query groups (rows `g·s` per head).
fn full_mask<B: Backend>(mask: &Tensor<B, 4>, dims: [usize; 4]) -> Tensor<B, 4> {
    let [b, h, r, n] = dims;
    match mask.dims() {
        d if d == dims => mask.clone(),
        [_, _, s, _] => mask
            .clone()
            .reshape([1, 1, s, n])
            .repeat(&[b, h * (r / s.max(1)), 1, 1])
            .reshape(dims),
    }
}

/// The additive mask of a chunk of `s` queries over `slots` slots whose last `s` are the
/// chunk's (`rows`: `[s, slots]`, 0 or −∞) in the shape attention takes it: as it is,
/// `[1, 1, s, slots]`, where the softmax kernel runs (it reads a chunk's rows for every head
/// and query group); repeated to the scores' `[batch, kv_heads, group·s, slots]` elsewhere
/// (flex adds equal shapes far faster than it broadcasts: once per chunk, not per layer).
pub fn chunk_mask<B: Backend>(
    p: &BackendProfile,
    rows: Tensor<B, 2>,
    batch: usize,
    heads: (usize, usize),
) -> Tensor<B, 4> {
    let [s, slots] = rows.dims();
    let (q_heads, kv_heads) = heads;
    let compact = rows.reshape([1, 1, s, slots]);
    match p.runs(Kernel::Softmax) && !p.host_resident() {
        true => compact,
        false => {
            compact
                .repeat(&[batch, q_heads, 1, 1])
                .reshape([batch, kv_heads, q_heads / kv_heads.max(1) * s, slots])
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    use super::*;

    /// A chunk's `[1, 1, s, n]` mask, where no kernel takes it, gives the probabilities of the
    /// mask repeated to the scores' shape (two batches, two KV heads, groups of three query
    /// heads: rows `3·s` per head); the f32 probabilities come back only when observed.
    #[test]
    fn a_chunks_mask_serves_every_head_and_group() {
        let device = Default::default();
        let p = BackendProfile::host();
        let (b, hq, hkv, s, n) = (2, 6, 2, 3, 5);
        let rows: Vec<f32> = (0..s * n)
            .map(|i| match i % n > n - s + i / n {
                true => f32::NEG_INFINITY,
                false => 0.0,
            })
            .collect();
        let rows = Tensor::<Flex, 2>::from_data(TensorData::new(rows, [s, n]), &device);
        let full = chunk_mask(&p, rows.clone(), b, (hq, hkv));
        assert_eq!(full.dims(), [b, hkv, hq / hkv * s, n]);
        let compact = rows.reshape([1, 1, s, n]);
        let scores = Tensor::<Flex, 4>::random([b, hkv, hq / hkv * s, n], Distribution::Normal(0.0, 2.0), &device);
        let (want, _) = attention_softmax(&p, scores.clone(), Some(&full), None, DType::F32, true);
        let (got, product) = attention_softmax(&p, scores.clone(), Some(&compact), None, DType::F32, true);
        let (want, got) = (want.expect("observed"), got.expect("observed"));
        got.into_data()
            .assert_approx_eq::<f32>(&want.clone().into_data(), Default::default());
        product
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Default::default());
        let (unobserved, _) = attention_softmax(&p, scores, Some(&compact), None, DType::F32, false);
        assert!(unobserved.is_none());
    }
}
