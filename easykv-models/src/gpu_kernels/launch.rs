//! Launching the kernels on burn's unfused CubeCL tensors (CUDA; wgpu, where the CPU Vulkan
//! driver lavapipe lets them be tested on a machine without a GPU).

use std::any::{Any, TypeId};

use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::calculate_cube_count_elemwise;
#[cfg(feature = "cuda")]
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::{CubeCount, CubeDim};
#[cfg(feature = "wgpu")]
use cubecl::wgpu::WgpuRuntime;

use super::kernels::{self, ROW_BLOCK};
#[cfg(feature = "cuda")]
use super::MATMUL_ROWS_MAX;
use super::{GemvEpilogue, GemvNorm, HeadShape, PoolRows, Tuning};

/// Whether `B`'s float tensors are burn's unfused tensors of runtime `R`.
fn is_runtime<B: Backend, R: CubeRuntime>() -> bool {
    TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<CubeTensor<R>>()
}

/// Calls `$f::<B, R>(args)` for the runtime `B`'s tensors belong to, or hands `$input` back.
macro_rules! on_runtime {
    ($f:ident::<$B:ty $(; $D:ident)?>($($arg:expr),*), $input:expr) => {{
        #[cfg(feature = "cuda")]
        if is_runtime::<$B, CudaRuntime>() {
            return $f::<$B, CudaRuntime $(, $D)?>($($arg),*);
        }
        #[cfg(feature = "wgpu")]
        if is_runtime::<$B, WgpuRuntime>() {
            return $f::<$B, WgpuRuntime $(, $D)?>($($arg),*);
        }
        Err($input)
    }};
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Whether every dtype is one the kernels take (the ops layer decided the kernel may run).
fn floats(dtypes: &[DType]) -> bool {
    dtypes.iter().all(|d| is_float(*d))
}

/// The runtime's tensor inside `t`. Only called once [`is_runtime`] said `B` is `R`'s.
fn cube<B: Backend, R: CubeRuntime, const D: usize>(t: Tensor<B, D>) -> CubeTensor<R> {
    into_contiguous(cube_view(t))
}

/// [`cube`] without making it contiguous: for views the kernel indexes by their strides.
fn cube_view<B: Backend, R: CubeRuntime, const D: usize>(t: Tensor<B, D>) -> CubeTensor<R> {
    let primitive = match t.into_primitive() {
        TensorPrimitive::Float(p) => p,
        TensorPrimitive::QFloat(_) => unreachable!("callers check for float dtypes"),
    };
    let any: Box<dyn Any> = Box::new(primitive);
    match any.downcast::<CubeTensor<R>>() {
        Ok(c) => *c,
        Err(_) => unreachable!("callers check the backend's runtime"),
    }
}

/// A CUDA tensor back as a `B` tensor (`B` is CUDA: see [`cube`]).
fn tensor<B: Backend, R: CubeRuntime, const D: usize>(c: CubeTensor<R>) -> Tensor<B, D> {
    let any: Box<dyn Any> = Box::new(c);
    match any.downcast::<B::FloatTensorPrimitive>() {
        Ok(p) => Tensor::from_primitive(TensorPrimitive::Float(*p)),
        Err(_) => unreachable!("callers check the backend's runtime"),
    }
}

/// A contiguous tensor on `like`'s device, as the kernels index their outputs. (burn's
/// `empty_device_dtype` may pad rows: on CUDA, rows whose bytes are not a multiple of the
/// pitch alignment get padding, and the kernels wrote such outputs as if unpadded — the
/// softmax and attention-score mismatches seen on the H200 and nowhere else.)
fn empty_like<R: CubeRuntime>(like: &CubeTensor<R>, shape: Vec<usize>, dtype: DType) -> CubeTensor<R> {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape.into(), dtype)
}

/// RMS normalization of the last axis, computed in f32, returned in `x`'s dtype.
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: &Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    on_runtime!(rms_norm_on::<B; D>(x, gamma, eps), x)
}

fn rms_norm_on<B: Backend, R: CubeRuntime, const D: usize>(
    x: Tensor<B, D>,
    gamma: &Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let dims = x.dims();
    let cols = dims[D - 1];
    let rows = dims.iter().product::<usize>() / cols.max(1);
    if !floats(&[x.dtype(), gamma.dtype()]) || rows == 0 || gamma.dims()[0] != cols {
        return Err(x);
    }
    let (x, gamma) = (cube(x), cube(gamma.clone()));
    let out = empty_like(&x, dims.to_vec(), x.dtype);
    let dtypes = [x.dtype.into(), gamma.dtype.into(), DType::F32.into()];
    kernels::rms_norm::launch::<R>(
        &x.client.clone(),
        CubeCount::Static(rows as u32, 1, 1),
        CubeDim::new_1d(ROW_BLOCK),
        x.into_tensor_arg(),
        gamma.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        cols as u32,
        eps as f32,
        dtypes,
    );
    Ok(tensor(out))
}

/// `silu(gate)·up` for gate and up stacked along the last axis: `[.., 2·i]` → `[.., i]`.
pub fn swiglu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
    on_runtime!(swiglu_on::<B; D>(x), x)
}

fn swiglu_on<B: Backend, R: CubeRuntime, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let mut dims = x.dims();
    let inner = dims[D - 1] / 2;
    dims[D - 1] = inner;
    let total = dims.iter().product::<usize>();
    if !floats(&[x.dtype()]) || total == 0 || total > u32::MAX as usize {
        return Err(x);
    }
    let x = cube(x);
    let out = empty_like(&x, dims.to_vec(), x.dtype);
    let client = x.client.clone();
    let cube_dim = CubeDim::new_1d(256);
    let dtypes = [x.dtype.into(), DType::F32.into()];
    kernels::swiglu::launch::<R>(
        &client,
        calculate_cube_count_elemwise(&client, total, cube_dim),
        cube_dim,
        x.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        inner as u32,
        total as u32,
        dtypes,
    );
    Ok(tensor(out))
}

/// Attention probabilities: in f32 where kept, and in the product's precision.
pub type Probabilities<B> = (Option<Tensor<B, 4>>, Tensor<B, 4>);

/// Softmax over the last axis of attention scores `[batch, kv_heads, rows, slots]` (any float
/// dtype), after adding `mask` and `bias` (`[batch, kv_heads, 1, slots]`, shared by a head's
/// rows) where given. The mask has the scores' shape, or `[1, 1, m, slots]` with `m` dividing
/// `rows` (score row `r` takes mask row `r % m`: a chunk's causal mask for every head and
/// query group). Returns the probabilities in `product`, and in f32 when `keep_f32` (what a
/// cache observes; the same tensor when `product` is f32).
pub fn softmax_rows<B: Backend>(
    scores: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4>>,
    bias: Option<&Tensor<B, 4>>,
    product: DType,
    keep_f32: bool,
) -> Result<Probabilities<B>, Tensor<B, 4>> {
    on_runtime!(softmax_rows_on::<B>(scores, mask, bias, product, keep_f32), scores)
}

/// Values per thread above which a row is read in a loop instead of held in registers.
const SOFTMAX_HELD_MAX: usize = 32;

fn softmax_rows_on<B: Backend, R: CubeRuntime>(
    scores: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4>>,
    bias: Option<&Tensor<B, 4>>,
    product: DType,
    keep_f32: bool,
) -> Result<Probabilities<B>, Tensor<B, 4>> {
    let dims = scores.dims();
    let [b, h, r, n] = dims;
    let mut dtypes = vec![scores.dtype(), product];
    dtypes.extend(mask.map(|m| m.dtype()));
    dtypes.extend(bias.map(|m| m.dtype()));
    // Rows of the scores per mask row period: every row its own, or a chunk's rows repeated.
    let mask_rows = match mask.map(|m| m.dims()) {
        None => Some(1),
        Some(d) if d == dims => Some(b * h * r),
        Some([1, 1, m, mn]) if mn == n && m > 0 && r.is_multiple_of(m) => Some(m),
        Some(_) => None,
    };
    let shapes_fit = mask_rows.is_some() && bias.is_none_or(|x| x.dims() == [b, h, 1, n]);
    let rows = b * h * r;
    if !floats(&dtypes)
        || !shapes_fit
        || rows == 0
        || n == 0
        || rows > u32::MAX as usize
        || rows * n > u32::MAX as usize
    {
        return Err(scores);
    }
    let mask_rows = mask_rows.unwrap_or(1);
    let scores = cube(scores);
    let f32_input = |t: Option<&Tensor<B, 4>>| t.map(|t| cube(t.clone().cast(DType::F32)));
    let (mask, bias) = (f32_input(mask), f32_input(bias));
    let write_product = product != DType::F32;
    let write_f32 = keep_f32 || !write_product;
    // Absent inputs and outputs get a stand-in the kernel never touches.
    let stand_in = || empty_like(&scores, vec![1], DType::F32);
    let probs = match write_f32 {
        true => empty_like(&scores, dims.to_vec(), DType::F32),
        false => stand_in(),
    };
    let probs_product = match write_product {
        true => empty_like(&scores, dims.to_vec(), product),
        false => probs.clone(),
    };
    let product_arg = match write_product {
        true => probs_product.clone(),
        false => stand_in(),
    };
    let (has_mask, has_bias) = (mask.is_some(), bias.is_some());
    let dtypes = [scores.dtype.into(), DType::F32.into(), product.into()];
    let client = scores.client.clone();
    let (count, dim) = (CubeCount::Static(rows as u32, 1, 1), CubeDim::new_1d(ROW_BLOCK));
    let (scores_arg, mask_arg, bias_arg, probs_arg) = (
        scores.clone().into_tensor_arg(),
        mask.unwrap_or_else(stand_in).into_tensor_arg(),
        bias.unwrap_or_else(stand_in).into_tensor_arg(),
        probs.clone().into_tensor_arg(),
    );
    // Rows short enough are held in registers (read once); longer ones are read in a loop.
    let held = match n.div_ceil(ROW_BLOCK as usize).next_power_of_two() {
        h if h <= SOFTMAX_HELD_MAX => h,
        _ => 0,
    };
    kernels::softmax_rows::launch::<R>(
        &client,
        count,
        dim,
        scores_arg,
        mask_arg,
        bias_arg,
        probs_arg,
        product_arg.into_tensor_arg(),
        n as u32,
        r as u32,
        mask_rows as u32,
        held,
        has_mask,
        has_bias,
        write_f32,
        write_product,
        dtypes,
    );
    let probs_product = tensor(probs_product);
    let probs = match (keep_f32, write_product) {
        (false, _) => None,
        (true, true) => Some(tensor(probs)),
        (true, false) => Some(probs_product.clone()),
    };
    Ok((probs, probs_product))
}

/// Splits a stacked q|k|v projection `[batch, s, (hq + 2·hkv)·d]` into heads-first q
/// `[batch, hq, s, d]` and k, v `[batch, hkv, s, d]`, rotating q by `queries` (`cos`, `sin`,
/// each `[s, d]`) and k by `keys` when given.
#[allow(clippy::type_complexity)]
pub fn split_rope<B: Backend>(
    qkv: Tensor<B, 3>,
    heads: HeadShape,
    queries: (&Tensor<B, 2>, &Tensor<B, 2>),
    keys: Option<(&Tensor<B, 2>, &Tensor<B, 2>)>,
) -> Result<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>), Tensor<B, 3>> {
    split_rope_any(qkv, heads, queries, keys, None, None).map(|(q, kv)| match kv {
        Some((k, v)) => (q, k, v),
        None => unreachable!("fresh key and value tensors are returned when no cache is given"),
    })
}

fn split_rope_any<B: Backend>(
    qkv: Tensor<B, 3>,
    heads: HeadShape,
    queries: (&Tensor<B, 2>, &Tensor<B, 2>),
    keys: Option<(&Tensor<B, 2>, &Tensor<B, 2>)>,
    cache: Option<((&Tensor<B, 4>, &Tensor<B, 4>), usize)>,
    pool: Option<&PoolRows<'_, B>>,
) -> Result<SplitHeads<B>, Tensor<B, 3>> {
    on_runtime!(split_rope_on::<B>(qkv, heads, queries, keys, cache, pool), qkv)
}

/// [`split_rope`] writing k and v straight into a cache's buffers (`[batch, hkv, capacity,
/// d]`, contiguous last axis) at slots `at..at + s` instead of new tensors: returns q.
pub fn split_rope_into<B: Backend>(
    qkv: Tensor<B, 3>,
    heads: HeadShape,
    queries: (&Tensor<B, 2>, &Tensor<B, 2>),
    keys: (&Tensor<B, 2>, &Tensor<B, 2>),
    cache: (&Tensor<B, 4>, &Tensor<B, 4>),
    at: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 3>> {
    split_rope_any(qkv, heads, queries, Some(keys), Some((cache, at)), None).map(|(q, _)| q)
}

/// [`split_rope_into`] for one token of each of `n` sequences of a memory pool: row `i` of
/// `qkv` (`[n, 1, width]`) rotated by angle row `i` (`[n, d]` each), its key and value written
/// to the pool's slot `start + len − 1` of row `i` of `rows` (the slot counts after this
/// token); `pool`: the pool's `[1, hkv, pool_slots, d]` tensors. Returns q, `[n, hq, 1, d]`.
pub fn split_rope_pool<B: Backend>(
    qkv: Tensor<B, 3>,
    heads: HeadShape,
    queries: (&Tensor<B, 2>, &Tensor<B, 2>),
    keys: (&Tensor<B, 2>, &Tensor<B, 2>),
    pool: (&Tensor<B, 4>, &Tensor<B, 4>),
    rows: &PoolRows<'_, B>,
) -> Result<Tensor<B, 4>, Tensor<B, 3>> {
    split_rope_any(qkv, heads, queries, Some(keys), Some((pool, 0)), Some(rows)).map(|(q, _)| q)
}

/// q, and k and v unless they went into `cache`'s buffers.
type SplitHeads<B> = (Tensor<B, 4>, Option<(Tensor<B, 4>, Tensor<B, 4>)>);

/// A pool's row table and where its starts and lengths begin, or (no pool) a one-element
/// stand-in that kernels compiled for one sequence never read.
fn pool_table<B: Backend, R: CubeRuntime>(
    pool: Option<&PoolRows<'_, B>>,
    like: &CubeTensor<R>,
) -> (CubeTensor<R>, u32, u32) {
    match pool {
        Some(p) => (
            int_cube::<B, R, 1>(p.table.clone()),
            p.starts_at as u32,
            p.lens_at as u32,
        ),
        None => (empty_like(like, vec![1], DType::I32), 0, 0),
    }
}

#[allow(clippy::type_complexity)]
fn split_rope_on<B: Backend, R: CubeRuntime>(
    qkv: Tensor<B, 3>,
    heads: HeadShape,
    queries: (&Tensor<B, 2>, &Tensor<B, 2>),
    keys: Option<(&Tensor<B, 2>, &Tensor<B, 2>)>,
    cache: Option<((&Tensor<B, 4>, &Tensor<B, 4>), usize)>,
    pool: Option<&PoolRows<'_, B>>,
) -> Result<SplitHeads<B>, Tensor<B, 3>> {
    let [b, s, width] = qkv.dims();
    // A pool's rows: one token per sequence, angle rows per sequence, the cache one tensor.
    let ragged = pool.is_some();
    let (angle_rows, cache_batch) = match ragged {
        true => (b * s, 1),
        false => (s, b),
    };
    let HeadShape {
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
    } = heads;
    let total = b * s * width;
    let angle_dtypes = [queries.0.dtype(), queries.1.dtype()];
    let same_angles = keys.is_none_or(|(c, s)| c.dtype() == angle_dtypes[0] && s.dtype() == angle_dtypes[0]);
    let angle_shapes = [queries.0.dims(), queries.1.dims()]
        .into_iter()
        .chain(keys.into_iter().flat_map(|(c, s)| [c.dims(), s.dims()]))
        .all(|dims| dims == [angle_rows, d]);
    let cache_fits = cache.is_none_or(|((k, v), at)| {
        let [cb, ch, capacity, cd] = k.dims();
        k.dims() == v.dims()
            && [cb, ch, cd] == [cache_batch, hkv, d]
            && (ragged || at + s <= capacity)
            && k.dtype() == qkv.dtype()
            && v.dtype() == qkv.dtype()
    });
    if !floats(&[qkv.dtype(), angle_dtypes[0], angle_dtypes[1]])
        || angle_dtypes[0] != angle_dtypes[1]
        || !same_angles
        || !angle_shapes
        || !cache_fits
        || (ragged && (s != 1 || cache.is_none()))
        || width != (hq + 2 * hkv) * d
        || d % 2 != 0
        || total == 0
        || total > u32::MAX as usize
    {
        return Err(qkv);
    }
    // Where k and v go: the cache's buffers (their strides; slots from `at`) or new tensors.
    let (k, v, at, fresh) = match cache {
        Some(((k, v), at)) => {
            let (k, v) = (cube_view(k.clone()), cube_view(v.clone()));
            let strides = |t: &CubeTensor<R>| cache_strides(t, 1);
            match (strides(&k), strides(&v)) {
                (Some(ks), Some(vs)) if ks == vs => (k, v, at, false),
                _ => return Err(qkv),
            }
        }
        None => {
            let like = cube_view(qkv.clone());
            let fresh = |_| empty_like(&like, vec![b, hkv, s, d], like.dtype);
            (fresh(0), fresh(1), 0, true)
        }
    };
    let Some([batch_stride, head_stride, slot_stride]) = cache_strides(&k, 1) else {
        return Err(qkv);
    };
    let qkv = cube(qkv);
    let (q_cos, q_sin) = (cube(queries.0.clone()), cube(queries.1.clone()));
    let rotate_keys = keys.is_some();
    let (k_cos, k_sin) = match keys {
        Some((c, s)) => (cube(c.clone()), cube(s.clone())),
        None => (q_cos.clone(), q_sin.clone()),
    };
    let dtype = qkv.dtype;
    let q = empty_like(&qkv, vec![b, hq, s, d], dtype);
    let (table, starts_at, lens_at) = pool_table::<B, R>(pool, &qkv);
    let client = qkv.client.clone();
    let cube_dim = CubeDim::new_1d(256);
    let dtypes = [dtype.into(), q_cos.dtype.into(), DType::F32.into(), table.dtype.into()];
    kernels::split_rope::launch::<R>(
        &client,
        calculate_cube_count_elemwise(&client, total, cube_dim),
        cube_dim,
        qkv.into_tensor_arg(),
        q_cos.into_tensor_arg(),
        q_sin.into_tensor_arg(),
        k_cos.into_tensor_arg(),
        k_sin.into_tensor_arg(),
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        table.into_tensor_arg(),
        s as u32,
        hq as u32,
        hkv as u32,
        d as u32,
        batch_stride,
        head_stride,
        slot_stride,
        at as u32,
        starts_at,
        lens_at,
        total as u32,
        rotate_keys,
        ragged,
        dtypes,
    );
    Ok((tensor(q), fresh.then(|| (tensor(k), tensor(v)))))
}

/// `x·Wᵀ` for one row `x` (`[1, in]`) and `W` `[rows, in]`, both in `W`'s dtype, followed by
/// `epilogue`: `[1, out]`.
pub fn gemv<B: Backend>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
    epilogue: GemvEpilogue<'_, B>,
    tuning: &Tuning,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    gemv_any(x, w, epilogue, RowNorm::None, None, tuning).map(|(y, _)| y)
}

/// [`gemv`] of the RMS-normalized `x` (`x / rms(x) · gamma`, `gamma` `[in]`, the norm in f32,
/// rounded to `x`'s dtype as [`rms_norm`] rounds it): each cube normalizes the row into shared
/// memory before its planes stream weights (declines for [`GemvNorm::Separate`]).
pub fn gemv_normed<B: Backend>(
    x: Tensor<B, 2>,
    gamma: &Tensor<B, 1>,
    eps: f64,
    w: &Tensor<B, 2>,
    epilogue: GemvEpilogue<'_, B>,
    tuning: &Tuning,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    if tuning.gemv_norm == GemvNorm::Separate {
        return Err(x);
    }
    gemv_any(x, w, epilogue, RowNorm::Staged(gamma, eps), None, tuning).map(|(y, _)| y)
}

/// [`gemv_normed`] given `x_scaled` = `x·γ` (`[1, in]`, as [`gemv_scaling`] writes it) instead
/// of `γ`: no plane waits for its cube, each sums the squares of `x` as it reads it
/// ([`GemvNorm::Inline`] only). The normalized row is `x_scaled / rms(x)`, never rounded.
pub fn gemv_prescaled<B: Backend>(
    x: Tensor<B, 2>,
    x_scaled: &Tensor<B, 2>,
    eps: f64,
    w: &Tensor<B, 2>,
    epilogue: GemvEpilogue<'_, B>,
    tuning: &Tuning,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    if tuning.gemv_norm != GemvNorm::Inline {
        return Err(x);
    }
    gemv_any(x, w, epilogue, RowNorm::Prescaled(x_scaled, eps), None, tuning).map(|(y, _)| y)
}

/// [`gemv`] that also returns its output times `next_gamma` (`[out]`, the γ of the norm the
/// next product applies to this output), both `[1, out]`: the next product then needs no
/// pass over `γ` ([`gemv_prescaled`]; [`GemvNorm::Inline`] only).
pub fn gemv_scaling<B: Backend>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
    epilogue: GemvEpilogue<'_, B>,
    next_gamma: &Tensor<B, 1>,
    tuning: &Tuning,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>), Tensor<B, 2>> {
    if tuning.gemv_norm != GemvNorm::Inline {
        return Err(x);
    }
    gemv_any(x, w, epilogue, RowNorm::None, Some(next_gamma), tuning)
}

/// How a one-row product normalizes its input.
enum RowNorm<'a, B: Backend> {
    None,
    /// By `γ` and `ε`, staged in shared memory by each cube.
    Staged(&'a Tensor<B, 1>, f64),
    /// By `x·γ` (written by the previous product) and `ε`.
    Prescaled(&'a Tensor<B, 2>, f64),
}

#[allow(clippy::type_complexity)]
fn gemv_any<B: Backend>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
    epilogue: GemvEpilogue<'_, B>,
    norm: RowNorm<'_, B>,
    scale_next: Option<&Tensor<B, 1>>,
    tuning: &Tuning,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>), Tensor<B, 2>> {
    on_runtime!(gemv_on::<B>(x, w, epilogue, norm, scale_next, tuning), x)
}

/// Whether every plane is `lanes` or more units wide and of one known width.
fn planes_hold<R: CubeRuntime>(client: &cubecl::client::ComputeClient<R>, lanes: usize) -> bool {
    let hw = &client.properties().hardware;
    hw.plane_size_min == hw.plane_size_max && lanes <= hw.plane_size_min as usize && hw.plane_size_min.is_power_of_two()
}

/// Whether every plane of `client`'s device is 32 wide (the plane reductions assume it).
fn planes_of_32<R: CubeRuntime>(client: &cubecl::client::ComputeClient<R>) -> bool {
    let hw = &client.properties().hardware;
    hw.plane_size_min == 32 && hw.plane_size_max == 32
}

/// Shared memory a normalizing [`gemv`] may stage its input in.
const GEMV_NORM_BYTES: usize = 32 << 10;

#[allow(clippy::type_complexity)]
fn gemv_on<B: Backend, R: CubeRuntime>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
    epilogue: GemvEpilogue<'_, B>,
    norm: RowNorm<'_, B>,
    scale_next: Option<&Tensor<B, 1>>,
    tuning: &Tuning,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>), Tensor<B, 2>> {
    let [rows, inp] = x.dims();
    let [w_rows, w_inp] = w.dims();
    let out = match epilogue {
        GemvEpilogue::Swiglu => w_rows / 2,
        _ => w_rows,
    };
    let gamma_fits = |g: &Tensor<B, 1>, len: usize| g.dims() == [len] && is_float(g.dtype());
    let norm_fits = match norm {
        RowNorm::None => true,
        RowNorm::Staged(g, _) => gamma_fits(g, inp) && inp * x.dtype().size() <= GEMV_NORM_BYTES,
        RowNorm::Prescaled(xs, _) => xs.dims() == [1, inp] && xs.dtype() == x.dtype(),
    };
    let scale_fits = scale_next.is_none_or(|g| gamma_fits(g, out) && matches!(norm, RowNorm::None));
    let epilogue_fits = match epilogue {
        GemvEpilogue::Plain => true,
        GemvEpilogue::AddResidual(r) => r.dims() == [1, out] && r.dtype() == w.dtype(),
        GemvEpilogue::Swiglu => w_rows % 2 == 0,
    };
    if !floats(&[x.dtype(), w.dtype()])
        || rows != 1
        || inp != w_inp
        || x.dtype() != w.dtype()
        || out == 0
        || !epilogue_fits
        || !norm_fits
        || !scale_fits
    {
        return Err(x);
    }
    // 16-byte loads where the row length allows.
    let vector = vector_size(inp, w.dtype());
    let (x, w) = (cube(x), cube(w.clone()));
    let y = empty_like(&x, vec![1, out], x.dtype);
    // `y·γ` where asked for, else a one-element stand-in nobody writes.
    let y_scaled = empty_like(
        &x,
        if scale_next.is_some() { vec![1, out] } else { vec![1, 1] },
        x.dtype,
    );
    let residual = match epilogue {
        GemvEpilogue::AddResidual(r) => cube(r.clone()),
        _ => empty_like(&x, vec![1], x.dtype),
    };
    let (gamma, eps) = match (&norm, scale_next) {
        (RowNorm::Staged(g, eps), _) => (cube((*g).clone()), *eps as f32),
        (_, Some(g)) => (cube(g.clone()), 0.0),
        (RowNorm::Prescaled(_, eps), None) => (empty_like(&x, vec![1], DType::F32), *eps as f32),
        (RowNorm::None, None) => (empty_like(&x, vec![1], DType::F32), 0.0),
    };
    let x_scaled = match &norm {
        RowNorm::Prescaled(xs, _) => cube((*xs).clone()),
        _ => x.clone(),
    };
    let norm_vectors = if matches!(norm, RowNorm::Staged(..)) {
        inp / vector
    } else {
        0
    };
    let norm_inline = matches!(norm, RowNorm::Prescaled(..));
    let client = x.client.clone();
    let dtypes = [x.dtype.into(), DType::F32.into(), x.dtype.into(), gamma.dtype.into()];
    let rows_per_cube = tuning.gemv_rows_per_cube.clamp(1, 8);
    kernels::gemv::launch::<R>(
        &client,
        CubeCount::Static((out as u32).div_ceil(rows_per_cube), 1, 1),
        CubeDim::new_2d(32, rows_per_cube),
        vector,
        x.into_tensor_arg(),
        x_scaled.into_tensor_arg(),
        w.into_tensor_arg(),
        residual.into_tensor_arg(),
        gamma.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        y_scaled.clone().into_tensor_arg(),
        out as u32,
        (inp / vector) as u32,
        eps,
        matches!(epilogue, GemvEpilogue::AddResidual(_)),
        matches!(epilogue, GemvEpilogue::Swiglu),
        tuning.gemv_plane_reduce && planes_of_32(&client),
        norm_vectors,
        norm_inline,
        scale_next.is_some(),
        dtypes,
    );
    Ok((tensor(y), tensor(y_scaled)))
}

/// Query rows per KV head up to which attention runs as the decode kernels below (beyond, a
/// prefill chunk's products are matrix products, which burn's tuned kernels do better).
const DECODE_ROWS: usize = 16;

/// Elements per 16-byte vector of `dtype` that divide `len`.
fn vector_size(len: usize, dtype: DType) -> usize {
    [8usize, 4, 2, 1]
        .into_iter()
        .find(|v| len % v == 0 && v * dtype.size() <= 16)
        .unwrap_or(1)
}

/// Strides of a `[batch, heads, slots, d]` cache view in vectors of `vector`, if its last axis
/// is contiguous and every stride is whole vectors.
fn cache_strides<R: CubeRuntime>(t: &CubeTensor<R>, vector: usize) -> Option<[u32; 3]> {
    let strides = t.meta.strides();
    let fits = strides[3] == 1
        && strides[..3]
            .iter()
            .all(|s| s % vector == 0 && s / vector <= u32::MAX as usize);
    fits.then(|| [0, 1, 2].map(|i| (strides[i] / vector) as u32))
}

/// Decode attention scores `q·keysᵀ` over the first `slots` slots of the cache buffer `keys`,
/// in f32, reading the buffer in place.
///
/// # Shapes
/// - `q`: `[batch, kv_heads, rows, d]`; `keys`: `[batch, kv_heads, capacity, d]` (any strides
///   with a contiguous last axis) → `[batch, kv_heads, rows, slots]`
pub fn attention_scores<B: Backend>(
    q: Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    slots: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    on_runtime!(attention_scores_on::<B>(q, keys, slots), q)
}

fn attention_scores_on<B: Backend, R: CubeRuntime>(
    q: Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    n: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let [b, h, r, d] = q.dims();
    let [kb, kh, capacity, kd] = keys.dims();
    let total = b * h * r * n;
    if !floats(&[q.dtype(), keys.dtype()])
        || q.dtype() != keys.dtype()
        || [kb, kh, kd] != [b, h, d]
        || n > capacity
        || r > DECODE_ROWS
        || total == 0
        || total > u32::MAX as usize
    {
        return Err(q);
    }
    let vector = vector_size(d, q.dtype());
    let k = cube_view(keys.clone());
    let Some([batch_stride, head_stride, slot_stride]) = cache_strides(&k, vector) else {
        return Err(q);
    };
    let q = cube(q);
    let out = empty_like(&q, vec![b, h, r, n], DType::F32);
    let client = q.client.clone();
    let cube_dim = CubeDim::new_1d(256);
    let dtypes = [q.dtype.into(), DType::F32.into()];
    kernels::attention_scores::launch::<R>(
        &client,
        calculate_cube_count_elemwise(&client, total, cube_dim),
        cube_dim,
        vector,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        r as u32,
        n as u32,
        h as u32,
        (d / vector) as u32,
        batch_stride,
        head_stride,
        slot_stride,
        total as u32,
        dtypes,
    );
    Ok(tensor(out))
}

/// Decode attention output `probs·values` over the first `slots` slots of the cache buffer
/// `values`, reading the buffer in place; in the values' dtype.
///
/// # Shapes
/// - `probs`: `[batch, kv_heads, rows, slots]`; `values`: `[batch, kv_heads, capacity, d]` (any
///   strides with a contiguous last axis) → `[batch, kv_heads, rows, d]`
pub fn attention_values<B: Backend>(
    probs: Tensor<B, 4>,
    values: &Tensor<B, 4>,
    slots: usize,
    tuning: &Tuning,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    on_runtime!(attention_values_on::<B>(probs, values, slots, tuning), probs)
}

fn attention_values_on<B: Backend, R: CubeRuntime>(
    probs: Tensor<B, 4>,
    values: &Tensor<B, 4>,
    slots: usize,
    tuning: &Tuning,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let [b, h, r, n] = probs.dims();
    let [vb, vh, capacity, d] = values.dims();
    let vector = vector_size(d, values.dtype());
    let lanes = d / vector;
    if !floats(&[probs.dtype(), values.dtype()])
        || [vb, vh] != [b, h]
        || n != slots
        || n > capacity
        || r > DECODE_ROWS
        || b * h * r == 0
        || n == 0
        || lanes == 0
        || lanes > 256
    {
        return Err(probs);
    }
    let v = cube_view(values.clone());
    let Some([batch_stride, head_stride, slot_stride]) = cache_strides(&v, vector) else {
        return Err(probs);
    };
    let probs = cube(probs);
    let out = empty_like(&probs, vec![b, h, r, d], v.dtype);
    // 256 threads per cube: the head dimension's vectors × slot groups; a long cache is spread
    // over several cubes per head (one cube per head left most of the GPU idle).
    let groups = (256 / lanes) as u32;
    let splits = match tuning.value_splits {
        0 => n.div_ceil(VALUE_SLOTS_PER_SPLIT).min(MAX_VALUE_SPLITS),
        s => s as usize,
    }
    .clamp(1, n);
    let per_split = n.div_ceil(splits);
    let splits = n.div_ceil(per_split);
    let rows = b * h * r;
    let partial = empty_like(&probs, vec![if splits > 1 { rows * splits * d } else { 1 }], DType::F32);
    let client = probs.client.clone();
    let dtypes = [v.dtype.into(), probs.dtype.into(), DType::F32.into()];
    kernels::attention_values::launch::<R>(
        &client,
        CubeCount::Static(rows as u32, splits as u32, 1),
        CubeDim::new_2d(lanes as u32, groups),
        vector,
        probs.into_tensor_arg(),
        v.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        partial.clone().into_tensor_arg(),
        r as u32,
        n as u32,
        h as u32,
        batch_stride,
        head_stride,
        slot_stride,
        per_split as u32,
        groups,
        splits > 1,
        dtypes,
    );
    if splits > 1 {
        let total = rows * d;
        let cube_dim = CubeDim::new_1d(256);
        kernels::sum_splits::launch::<R>(
            &client,
            calculate_cube_count_elemwise(&client, total, cube_dim),
            cube_dim,
            partial.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            splits as u32,
            d as u32,
            total as u32,
            [out.dtype.into(), DType::F32.into()],
        );
    }
    Ok(tensor(out))
}

/// Decode attention `softmax(q·keysᵀ)·values` over the first `slots` slots of a cache's
/// buffers, read in place, in two launches (ranges of slots over many cubes, then their join)
/// where the three of [`attention_scores`], [`softmax_rows`] and [`attention_values`] would
/// write and reread the scores: for steps whose probabilities nobody observes.
///
/// # Shapes
/// - `q`: `[batch, kv_heads, rows, d]`; `keys`, `values`: `[batch, kv_heads, capacity, d]` (any
///   strides with a contiguous last axis) → `[batch, kv_heads, rows, d]` in `q`'s dtype
pub fn decode_attention<B: Backend>(
    q: Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    slots: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    on_runtime!(decode_attention_on::<B>(q, keys, values, slots, None, None), q)
}

/// [`decode_attention`] for `n` sequences of a memory pool at once: batch row `i` of `q`
/// (`[n, kv_heads, rows, d]`) attends over its own slots of the pool's `[1, kv_heads,
/// pool_slots, d]` tensors, as `rows` lists them. With `observe` (`(probs, layer)`), the
/// probabilities each sequence's slots received, averaged over a KV head's query rows, are
/// written in place to `probs[layer, head, slot]` (`[layers, kv_heads, pool_slots]`, f32) at
/// the sequence's slots of the pool — what a cache that scores by attention observes.
pub fn decode_attention_pool<B: Backend>(
    q: Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    rows: &PoolRows<'_, B>,
    observe: Option<(&Tensor<B, 3>, usize)>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    on_runtime!(
        decode_attention_on::<B>(q, keys, values, rows.longest, Some(rows), observe),
        q
    )
}

fn decode_attention_on<B: Backend, R: CubeRuntime>(
    q: Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    n: usize,
    pool: Option<&PoolRows<'_, B>>,
    observe: Option<(&Tensor<B, 3>, usize)>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let [b, h, r, d] = q.dims();
    let [kb, kh, capacity, kd] = keys.dims();
    let ragged = pool.is_some();
    // The observation's buffer: every layer's `[kv_heads, pool_slots]` rows, written where its
    // strides say (CUDA may pad rows).
    let observed = match observe {
        None => None,
        Some((probs, layer)) => {
            let [layers, oh, os] = probs.dims();
            let view = cube_view::<B, R, 3>(probs.clone());
            let [ls, rs, ss] = [0, 1, 2].map(|i| view.meta.strides()[i]);
            let fits = ragged
                && probs.dtype() == DType::F32
                && [oh, os] == [h, capacity]
                && layer < layers
                && ss == 1
                && (layers * ls).max(oh * rs) <= u32::MAX as usize
                && h * r * capacity <= u32::MAX as usize;
            if !fits {
                return Err(q);
            }
            Some((view, layer * ls, rs))
        }
    };
    let vector = vector_size(d, q.dtype());
    let lanes = d / vector;
    if !floats(&[q.dtype(), keys.dtype(), values.dtype()])
        || q.dtype() != keys.dtype()
        || q.dtype() != values.dtype()
        || [kb, kh, kd] != [if ragged { 1 } else { b }, h, d]
        || values.dims() != keys.dims()
        || n > capacity
        || r > DECODE_ROWS
        || n == 0
        || b * h * r == 0
        || lanes == 0
        || lanes > 64
        || 256 % lanes != 0
    {
        return Err(q);
    }
    let (k, v) = (cube_view(keys.clone()), cube_view(values.clone()));
    let (Some(ks), Some(vs)) = (cache_strides(&k, vector), cache_strides(&v, vector)) else {
        return Err(q);
    };
    if ks != vs {
        return Err(q);
    }
    let [batch_stride, head_stride, slot_stride] = ks;
    let q = cube(q);
    let rows = b * h * r;
    let splits = n.div_ceil(kernels::DECODE_SPLIT as usize);
    let partial = empty_like(&q, vec![rows * splits * (2 + d)], DType::F32);
    let out = empty_like(&q, vec![b, h, r, d], q.dtype);
    let (table, starts_at, lens_at) = pool_table::<B, R>(pool, &q);
    let client = q.client.clone();
    let groups = (256 / lanes) as u32;
    // Observed: every query head's scores at the pool's slots (`[kv_heads·rows, pool_slots]`).
    let scores = match observed {
        Some(_) => empty_like(&q, vec![h * r, capacity], DType::F32),
        None => empty_like(&q, vec![1], DType::F32),
    };
    kernels::decode_attention::launch::<R>(
        &client,
        CubeCount::Static(rows as u32, splits as u32, 1),
        CubeDim::new_2d(lanes as u32, groups),
        vector,
        q.clone().into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        partial.clone().into_tensor_arg(),
        table.clone().into_tensor_arg(),
        scores.clone().into_tensor_arg(),
        r as u32,
        n as u32,
        h as u32,
        batch_stride,
        head_stride,
        slot_stride,
        starts_at,
        lens_at,
        capacity as u32,
        groups,
        ragged,
        // A key read by its group's lanes together where a plane holds whole groups (both
        // powers of two: `lanes` divides 256).
        planes_hold(&client, lanes),
        observed.is_some(),
        [q.dtype.into(), DType::F32.into(), table.dtype.into()],
    );
    if let Some((probs, at, row)) = observed {
        kernels::observe_pool::launch::<R>(
            &client,
            CubeCount::Static((b * h) as u32, splits as u32, 1),
            CubeDim::new_1d(kernels::DECODE_SPLIT),
            scores.into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            table.clone().into_tensor_arg(),
            probs.into_tensor_arg(),
            r as u32,
            h as u32,
            splits as u32,
            (2 + d) as u32,
            capacity as u32,
            row as u32,
            at as u32,
            starts_at,
            lens_at,
            [DType::F32.into(), table.dtype.into()],
        );
    }
    let total = rows * d;
    let cube_dim = CubeDim::new_1d(256);
    kernels::combine_ranges::launch::<R>(
        &client,
        calculate_cube_count_elemwise(&client, total, cube_dim),
        cube_dim,
        partial.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        splits as u32,
        d as u32,
        total as u32,
        [q.dtype.into(), DType::F32.into()],
    );
    Ok(tensor(out))
}

/// Slots per cube of [`attention_values`] beyond which a head's slots are split over cubes.
const VALUE_SLOTS_PER_SPLIT: usize = 256;
/// At most this many slot ranges per head.
const MAX_VALUE_SPLITS: usize = 32;

/// Rows up to this many slots are ranked by sorting in shared memory ([`kernels::sort_ranks`],
/// 32 KB of keys and slots at most); longer ones by counting ([`kernels::row_ranks`]).
const SORT_RANK_SLOTS: usize = 4096;

/// Slots per cube of [`kernels::row_ranks`].
const RANK_BLOCK: usize = 256;

/// For every slot, how many slots of its row come before it in (key, slot) order, as f32: the
/// [`easykv_core::RowRanker`] of cubecl backends.
///
/// # Shapes
/// - `key`: `[rows, heads, slots]` → the same
pub fn row_ranks<B: Backend>(key: Tensor<B, 3>) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    on_runtime!(row_ranks_on::<B>(key), key)
}

/// Whether `B` is a cubecl backend the kernels run on.
pub fn is_cube_backend<B: Backend>() -> bool {
    #[cfg(feature = "cuda")]
    if is_runtime::<B, CudaRuntime>() {
        return true;
    }
    #[cfg(feature = "wgpu")]
    if is_runtime::<B, WgpuRuntime>() {
        return true;
    }
    false
}

fn row_ranks_on<B: Backend, R: CubeRuntime>(key: Tensor<B, 3>) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    let dims = key.dims();
    let [rows, h, n] = dims;
    let blocks = n.div_ceil(RANK_BLOCK);
    // Ranks are exact in f32 below 2²⁴.
    let fits = (rows * h * blocks) as u64 <= u32::MAX as u64 && n < 1 << 24;
    if !floats(&[key.dtype()]) || rows * h * n == 0 || !fits {
        return Err(key);
    }
    let key = cube(key.cast(DType::F32));
    let ranks = empty_like(&key, dims.to_vec(), DType::F32);
    let padded = n.next_power_of_two().max(2);
    if padded <= SORT_RANK_SLOTS {
        kernels::sort_ranks::launch::<R>(
            &key.client.clone(),
            CubeCount::Static((rows * h) as u32, 1, 1),
            CubeDim::new_1d((padded / 2).min(1024) as u32),
            key.into_tensor_arg(),
            ranks.clone().into_tensor_arg(),
            n as u32,
            padded,
        );
        return Ok(tensor(ranks));
    }
    kernels::row_ranks::launch::<R>(
        &key.client.clone(),
        CubeCount::Static((rows * h * blocks) as u32, 1, 1),
        CubeDim::new_1d(RANK_BLOCK as u32),
        key.into_tensor_arg(),
        ranks.clone().into_tensor_arg(),
        n as u32,
        blocks as u32,
    );
    Ok(tensor(ranks))
}

/// Writes the column statistics of `probs` (`[batch, heads, s, slots]`, f32) into rows
/// `row..row + batch` of the `[rows, heads, slots]` f32 buffers `[sum, sum_sq, last]` in place:
/// the [`easykv_core::ObservationWriter`] of cubecl backends (one launch per layer and chunk
/// instead of four, and no stacking of the layers' rows afterwards).
pub fn write_observation<B: Backend>(
    probs: Tensor<B, 4>,
    buffers: [&Tensor<B, 3>; 3],
    row: usize,
) -> Result<(), Tensor<B, 4>> {
    on_runtime!(write_observation_on::<B>(probs, buffers, row), probs)
}

fn write_observation_on<B: Backend, R: CubeRuntime>(
    probs: Tensor<B, 4>,
    buffers: [&Tensor<B, 3>; 3],
    row: usize,
) -> Result<(), Tensor<B, 4>> {
    let [b, h, s, n] = probs.dims();
    let [rows, bh, bn] = buffers[0].dims();
    let total = b * h * n;
    let shapes_fit = buffers
        .iter()
        .all(|t| t.dims() == [rows, bh, bn] && t.dtype() == DType::F32);
    if !floats(&[probs.dtype()])
        || probs.dtype() != DType::F32
        || !shapes_fit
        || [bh, bn] != [h, n]
        || row + b > rows
        || total == 0
        || total > u32::MAX as usize
    {
        return Err(probs);
    }
    let views = buffers.map(|t| cube_view(t.clone()));
    // Rows of `n` values, `[rows, heads]` of them one after another (padding between rows is
    // fine; heads of a row must follow each other at that stride).
    let strides = views[0].meta.strides().to_vec();
    let uniform = views.iter().all(|v| v.meta.strides().to_vec() == strides);
    if !uniform || strides[2] != 1 || strides[0] != h * strides[1] || strides[1] > u32::MAX as usize {
        return Err(probs);
    }
    let probs = cube(probs);
    let client = probs.client.clone();
    let cube_dim = CubeDim::new_1d(256);
    let [sum, sum_sq, last] = views;
    kernels::observe_columns::launch::<R>(
        &client,
        calculate_cube_count_elemwise(&client, total, cube_dim),
        cube_dim,
        probs.into_tensor_arg(),
        sum.into_tensor_arg(),
        sum_sq.into_tensor_arg(),
        last.into_tensor_arg(),
        s as u32,
        n as u32,
        (row * h) as u32,
        strides[1] as u32,
        total as u32,
    );
    Ok(())
}

/// `a·B` in f32 arithmetic (no TF32), per batch and head, for f32 tensors: `a` `[batch, heads,
/// m, k]`; `b` a `[batch, heads, rows, cols]` buffer read in place, its matrix `B` being the
/// first `k` of its rows (`cols` columns) or, `transposed`, the first `n` of its rows transposed.
/// Returns `[batch, heads, m, n]` with `n` = `cols`, or the given `n` when transposed.
pub fn matmul_f32<B: Backend>(
    a: Tensor<B, 4>,
    b: &Tensor<B, 4>,
    transposed: bool,
    n: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    on_runtime!(matmul_f32_on::<B>(a, b, transposed, n), a)
}

fn matmul_f32_on<B: Backend, R: CubeRuntime>(
    a: Tensor<B, 4>,
    b: &Tensor<B, 4>,
    transposed: bool,
    n: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let [batch, heads, m, k] = a.dims();
    let [bb, bh, rows, cols] = b.dims();
    let (n, fits) = match transposed {
        true => (n, cols == k && n <= rows),
        false => (cols, k <= rows),
    };
    let z = batch * heads;
    let sizes_fit = [m, k, n, z, bb * bh * rows * cols]
        .iter()
        .all(|&v| v > 0 && v <= u32::MAX as usize)
        && z <= 65_535
        && m.div_ceil(16) <= 65_535;
    if !floats(&[a.dtype()])
        || a.dtype() != DType::F32
        || b.dtype() != DType::F32
        || [bb, bh] != [batch, heads]
        || !fits
        || !sizes_fit
    {
        return Err(a);
    }
    let buffer = cube_view::<B, R, 4>(b.clone());
    let strides = buffer.meta.strides().to_vec();
    // One stride per (batch, head) pair: heads evenly spaced within and across batches.
    if batch > 1 && strides[0] != heads * strides[1] {
        return Err(a);
    }
    let (b_row, b_col) = match transposed {
        true => (strides[3], strides[2]),
        false => (strides[2], strides[3]),
    };
    let stride_fits = [strides[1], b_row, b_col].iter().all(|&s| s <= u32::MAX as usize);
    if !stride_fits {
        return Err(a);
    }
    let a = cube(a);
    let out = empty_like(&a, vec![batch, heads, m, n], DType::F32);
    kernels::matmul_f32::launch::<R>(
        &a.client.clone(),
        CubeCount::Static(n.div_ceil(16) as u32, m.div_ceil(16) as u32, z as u32),
        CubeDim::new_2d(16, 16),
        a.into_tensor_arg(),
        buffer.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        m as u32,
        k as u32,
        n as u32,
        strides[1] as u32,
        b_row as u32,
        b_col as u32,
    );
    Ok(tensor(out))
}

/// `x·Wᵀ` for a few rows (2 to [`MATMUL_ROWS_MAX`]) of `x` (`[rows, in]`) and `W` `[out, in]`,
/// both f16 or both bf16, on tensor cores, followed by `epilogue` (its residual `[rows, out]`):
/// `[rows, out]` in `x`'s dtype (the residual's with one). CUDA only.
pub fn matmul_rows<B: Backend>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
    epilogue: GemvEpilogue<'_, B>,
    tuning: &Tuning,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    // Cooperative matrices on wgpu are untested (lavapipe has none), so CUDA alone.
    #[cfg(feature = "cuda")]
    if is_runtime::<B, CudaRuntime>() {
        return matmul_rows_on::<B, CudaRuntime>(x, w, epilogue, tuning);
    }
    let _ = (w, epilogue, tuning);
    Err(x)
}

#[cfg(feature = "cuda")]
fn matmul_rows_on<B: Backend, R: CubeRuntime>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
    epilogue: GemvEpilogue<'_, B>,
    tuning: &Tuning,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let [rows, inp] = x.dims();
    let [w_rows, w_inp] = w.dims();
    let out = match epilogue {
        GemvEpilogue::Swiglu => w_rows / 2,
        _ => w_rows,
    };
    let epilogue_fits = match epilogue {
        GemvEpilogue::Plain => true,
        GemvEpilogue::AddResidual(r) => r.dims() == [rows, out] && is_float(r.dtype()),
        GemvEpilogue::Swiglu => w_rows % 2 == 0,
    };
    // x padded to 64 rows, W, and the partial sums of up to 16 splits, indexed in u32.
    let sizes_fit = [MATMUL_ROWS_MAX * inp, w_rows * w_inp, MATMUL_ROWS_MAX * w_rows * 16]
        .iter()
        .all(|&v| v <= u32::MAX as usize);
    if !floats(&[x.dtype(), w.dtype()])
        || (rows > 32 && w_rows > tuning.rows_max_out as usize)
        || !matches!(w.dtype(), DType::F16 | DType::BF16)
        || x.dtype() != w.dtype()
        || !(2..=MATMUL_ROWS_MAX).contains(&rows)
        || inp != w_inp
        || inp % 16 != 0
        || w_rows % 16 != 0
        || out == 0
        || !epilogue_fits
        || !sizes_fit
    {
        return Err(x);
    }
    let w = cube::<B, R, 2>(w.clone());
    let mma = cubecl::features::MmaConfig {
        a_type: w.dtype.into(),
        b_type: w.dtype.into(),
        cd_type: DType::F32.into(),
        m: 16,
        n: 16,
        k: 16,
    };
    if !w.client.features().matmul.cmma.contains(&mma) {
        return Err(x);
    }
    // Rows padded to whole 16-row tiles.
    let m_blocks = rows.div_ceil(16);
    let padded = m_blocks * 16;
    let x = match padded - rows {
        0 => x,
        pad => Tensor::cat(
            vec![
                x.clone(),
                Tensor::<B, 2>::zeros([pad, inp], &x.device()).cast(x.dtype()),
            ],
            0,
        ),
    };
    let x = cube::<B, R, 2>(x);
    let client = x.client.clone();
    let vector = vector_size(inp, x.dtype);
    let staged = tuning.rows_staged && w_rows % 32 == 0 && inp % kernels::STAGED_CHUNK == 0 && vector == 8;
    let (partial, splits) = if staged {
        let planes = w_rows / 32;
        let chunks = inp / kernels::STAGED_CHUNK;
        let splits = (tuning.rows_planes as usize / planes).clamp(1, 16).min(chunks);
        let per_split = chunks.div_ceil(splits);
        let splits = chunks.div_ceil(per_split);
        // Above 32 rows, 8 planes per cube measured fastest on an H100 (64 rows: o 48.5 µs
        // against 63.0 with 4, down 95.2 against 138.2); at 16 rows the tuning's 4.
        let planes_per_cube = if m_blocks > 2 {
            8
        } else {
            tuning.rows_planes_per_cube.clamp(1, 8) as usize
        };
        let partial = empty_like(&x, vec![splits, padded, w_rows], DType::F32);
        kernels::matmul_rows_staged::launch::<R>(
            &client,
            CubeCount::Static(planes.div_ceil(planes_per_cube) as u32, splits as u32, 1),
            CubeDim::new_2d(32, planes_per_cube as u32),
            vector,
            x.clone().into_tensor_arg(),
            w.into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            inp as u32,
            w_rows as u32,
            per_split as u32,
            m_blocks,
            planes_per_cube,
            kernels::STAGED_CHUNK / vector,
            [x.dtype.into(), DType::F32.into()],
        );
        (partial, splits)
    } else {
        fragments_from_memory::<R>(&x, w, [padded, inp, w_rows], m_blocks, tuning)
    };
    let (residual, out_dtype) = match epilogue {
        GemvEpilogue::AddResidual(r) => {
            let r = cube::<B, R, 2>(r.clone());
            let dtype = r.dtype;
            (r, dtype)
        }
        _ => (empty_like(&x, vec![1], x.dtype), x.dtype),
    };
    let y = empty_like(&x, vec![rows, out], out_dtype);
    let total = rows * out;
    let cube_dim = CubeDim::new_1d(256);
    kernels::sum_partials::launch::<R>(
        &client,
        calculate_cube_count_elemwise(&client, total, cube_dim),
        cube_dim,
        partial.into_tensor_arg(),
        residual.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        splits as u32,
        padded as u32,
        w_rows as u32,
        out as u32,
        total as u32,
        matches!(epilogue, GemvEpilogue::AddResidual(_)),
        matches!(epilogue, GemvEpilogue::Swiglu),
        [DType::F32.into(), out_dtype.into()],
    );
    Ok(tensor(y))
}

/// [`kernels::matmul_rows`]' launch: `(partial sums, splits)`.
#[cfg(feature = "cuda")]
fn fragments_from_memory<R: CubeRuntime>(
    x: &CubeTensor<R>,
    w: CubeTensor<R>,
    [padded, inp, w_rows]: [usize; 3],
    m_blocks: usize,
    tuning: &Tuning,
) -> (CubeTensor<R>, usize) {
    let client = x.client.clone();
    let col_blocks = if w_rows % 32 == 0 {
        tuning.rows_col_blocks.clamp(1, 2) as usize
    } else {
        1
    };
    let planes = w_rows / (16 * col_blocks);
    let steps = inp / 16;
    // Steps of 16 staged at once: a whole number of them along the inner axis.
    let unroll = (1..=tuning.rows_unroll.clamp(1, 8) as usize)
        .rev()
        .find(|u| steps % u == 0)
        .unwrap_or(1);
    // Enough planes over the whole GPU to keep many weight loads in flight; each split
    // writes (and the sum rereads) an f32 copy of the output, so no more than needed.
    let splits = (tuning.rows_planes as usize / planes).clamp(1, 16).min(steps / unroll);
    let steps_per_split = (steps / unroll).div_ceil(splits) * unroll;
    let splits = steps.div_ceil(steps_per_split);
    let planes_per_cube = tuning.rows_planes_per_cube.clamp(1, 8) as usize;
    let partial = empty_like(x, vec![splits, padded, w_rows], DType::F32);
    kernels::matmul_rows::launch::<R>(
        &client,
        CubeCount::Static(planes.div_ceil(planes_per_cube) as u32, splits as u32, 1),
        CubeDim::new_2d(32, planes_per_cube as u32),
        x.clone().into_tensor_arg(),
        w.into_tensor_arg(),
        partial.clone().into_tensor_arg(),
        inp as u32,
        w_rows as u32,
        steps_per_split as u32,
        m_blocks,
        col_blocks,
        unroll,
        [x.dtype.into(), DType::F32.into()],
    );
    (partial, splits)
}

/// The runtime's tensor inside an integer `t`, contiguous (see [`cube`]).
fn int_cube<B: Backend, R: CubeRuntime, const D: usize>(t: Tensor<B, D, Int>) -> CubeTensor<R> {
    let any: Box<dyn Any> = Box::new(t.into_primitive());
    match any.downcast::<CubeTensor<R>>() {
        Ok(c) => into_contiguous(*c),
        Err(_) => unreachable!("callers check the backend's runtime"),
    }
}

/// A runtime tensor back as a `B` integer tensor (see [`tensor`]).
fn int_tensor<B: Backend, R: CubeRuntime, const D: usize>(c: CubeTensor<R>) -> Tensor<B, D, Int> {
    let any: Box<dyn Any> = Box::new(c);
    match any.downcast::<B::IntTensorPrimitive>() {
        Ok(p) => Tensor::from_primitive(*p),
        Err(_) => unreachable!("callers check the backend's runtime"),
    }
}

/// One layer's keys and values compacted to the slots `keep` lists, as the cache's
/// [`easykv_core::SlotGatherer`]: one launch for both buffers.
///
/// # Shapes
/// - `keys`, `values`: `[batch, kv_heads, capacity, d]`; `keep`: `[batch, kv_heads, kept]` →
///   two new `[batch, kv_heads, capacity, d]` buffers, their first `kept` slots filled
pub fn gather_slots<B: Backend>(
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    keep: Tensor<B, 3, Int>,
) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
    #[cfg(feature = "cuda")]
    if is_runtime::<B, CudaRuntime>() {
        return gather_slots_on::<B, CudaRuntime>(keys, values, keep);
    }
    #[cfg(feature = "wgpu")]
    if is_runtime::<B, WgpuRuntime>() {
        return gather_slots_on::<B, WgpuRuntime>(keys, values, keep);
    }
    let _ = (keys, values, keep);
    None
}

fn gather_slots_on<B: Backend, R: CubeRuntime>(
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    keep: Tensor<B, 3, Int>,
) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
    let [b, h, capacity, d] = keys.dims();
    let [kb, kh, kept] = keep.dims();
    let vector = vector_size(d, keys.dtype());
    let lanes = d / vector;
    let total = b * h * kept * lanes;
    if !floats(&[keys.dtype(), values.dtype()])
        || values.dims() != keys.dims()
        || values.dtype() != keys.dtype()
        || [kb, kh] != [b, h]
        || kept == 0
        || kept > capacity
        || b * h * capacity * d > u32::MAX as usize
        || total > u32::MAX as usize
    {
        return None;
    }
    let (k, v) = (cube(keys.clone()), cube(values.clone()));
    let keep = int_cube::<B, R, 3>(keep);
    let new_k = empty_like(&k, vec![b, h, capacity, d], k.dtype);
    let new_v = empty_like(&k, vec![b, h, capacity, d], k.dtype);
    let client = k.client.clone();
    let cube_dim = CubeDim::new_1d(256);
    let dtypes = [k.dtype.into(), keep.dtype.into()];
    kernels::gather_slots::launch::<R>(
        &client,
        calculate_cube_count_elemwise(&client, total, cube_dim),
        cube_dim,
        vector,
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        keep.into_tensor_arg(),
        new_k.clone().into_tensor_arg(),
        new_v.clone().into_tensor_arg(),
        capacity as u32,
        kept as u32,
        lanes as u32,
        total as u32,
        dtypes,
    );
    Some((tensor(new_k), tensor(new_v)))
}

/// Writes `src` (`[batch, heads, s, d]`) into slots `at..at + s` of `dst` (`[batch, heads,
/// capacity, d]`, any strides with a contiguous last axis) in `dst`'s own memory: the
/// [`easykv_core::SlotWriter`] of cubecl backends. `src` back when it cannot.
pub fn write_slots<B: Backend>(dst: &Tensor<B, 4>, src: Tensor<B, 4>, at: usize) -> Result<(), Tensor<B, 4>> {
    on_runtime!(write_slots_on::<B>(dst, src, at), src)
}

fn write_slots_on<B: Backend, R: CubeRuntime>(
    dst: &Tensor<B, 4>,
    src: Tensor<B, 4>,
    at: usize,
) -> Result<(), Tensor<B, 4>> {
    let [b, h, s, d] = src.dims();
    let [db, dh, capacity, dd] = dst.dims();
    let vector = vector_size(d, src.dtype());
    let lanes = d / vector.max(1);
    let total = b * h * s * lanes;
    if !floats(&[src.dtype()])
        || src.dtype() != dst.dtype()
        || [db, dh, dd] != [b, h, d]
        || at + s > capacity
        || total == 0
        || total > u32::MAX as usize
    {
        return Err(src);
    }
    let (from, to) = (cube_view(src.clone()), cube_view(dst.clone()));
    let (Some(fs), Some(ts)) = (cache_strides(&from, vector), cache_strides(&to, vector)) else {
        return Err(src);
    };
    let client = to.client.clone();
    let cube_dim = CubeDim::new_1d(256);
    kernels::write_slots::launch::<R>(
        &client,
        calculate_cube_count_elemwise(&client, total, cube_dim),
        cube_dim,
        vector,
        from.into_tensor_arg(),
        to.clone().into_tensor_arg(),
        h as u32,
        s as u32,
        lanes as u32,
        fs[0],
        fs[1],
        fs[2],
        ts[0],
        ts[1],
        ts[2],
        at as u32,
        total as u32,
        to.dtype.into(),
    );
    Ok(())
}

/// Slots `start..start + len` of `pool` (`[1, heads, pool_slots, d]`) as a view sharing its
/// memory (writes through the view reach the pool); `None` where the backend is not a cubecl
/// one or the view's byte offset breaks the runtime's alignment (burn would copy).
pub fn slot_view<B: Backend>(pool: &Tensor<B, 4>, start: usize, len: usize) -> Option<Tensor<B, 4>> {
    let on_runtime = || -> Result<Option<Tensor<B, 4>>, ()> { on_runtime!(slot_view_on::<B>(pool, start, len), ()) };
    on_runtime().ok().flatten()
}

fn slot_view_on<B: Backend, R: CubeRuntime>(
    pool: &Tensor<B, 4>,
    start: usize,
    len: usize,
) -> Result<Option<Tensor<B, 4>>, ()> {
    let [b, _, slots, d] = pool.dims();
    if b != 1 || start + len > slots || len == 0 || d == 0 {
        return Ok(None);
    }
    let t: CubeTensor<R> = cube_view(pool.clone());
    let strides = t.meta.strides().to_vec();
    let size = t.dtype.size() as u64;
    let offset_start = (strides[2] * start) as u64 * size;
    let offset_end = (strides[2] * (slots - start - len)) as u64 * size;
    let alignment = t.client.properties().memory.alignment;
    if strides[3] != 1 || !offset_start.is_multiple_of(alignment) || !offset_end.is_multiple_of(alignment) {
        return Ok(None);
    }
    // burn's cut is a view exactly when both offsets are aligned (else it copies).
    Ok(Some(pool.clone().slice_dim(2, start..start + len)))
}

/// The most bytes one tensor of `device` may span and still be read whole by a kernel: the
/// runtime's largest page (wgpu: the adapter's storage-buffer binding limit; a buffer past it
/// is bound cut short, and kernels then read wrong values past the limit).
pub fn max_binding_bytes<B: Backend>(device: &B::Device) -> Result<u64, ()> {
    on_runtime!(max_binding_bytes_on::<B>(device), ())
}

fn max_binding_bytes_on<B: Backend, R: CubeRuntime>(device: &B::Device) -> Result<u64, ()> {
    let probe = Tensor::<B, 1>::empty([1], device);
    Ok(cube_view::<B, R, 1>(probe).client.properties().memory.max_page_size)
}

/// The true slots of every row of `mask`, ascending, `count` per row, as the cache's
/// [`easykv_core::SlotLister`]: one launch (and a cast of the mask) instead of a prefix sum
/// and a scatter.
///
/// # Shapes
/// - `mask`: `[rows, heads, slots]` → `[rows, heads, count]`
pub fn list_true_slots<B: Backend>(
    mask: Tensor<B, 3, Bool>,
    count: usize,
) -> Result<Tensor<B, 3, Int>, Tensor<B, 3, Bool>> {
    on_runtime!(list_true_slots_on::<B>(mask, count), mask)
}

fn list_true_slots_on<B: Backend, R: CubeRuntime>(
    mask: Tensor<B, 3, Bool>,
    count: usize,
) -> Result<Tensor<B, 3, Int>, Tensor<B, 3, Bool>> {
    let [rows, h, n] = mask.dims();
    if rows * h == 0 || rows * h > 65_535 || count == 0 || n > u32::MAX as usize {
        return Err(mask);
    }
    let m = cube::<B, R, 3>(mask.float().cast(DType::F32));
    let int = <B::IntElem as burn::tensor::Element>::dtype();
    let out = empty_like(&m, vec![rows, h, count], int);
    kernels::list_true_slots::launch::<R>(
        &m.client.clone(),
        CubeCount::Static((rows * h) as u32, 1, 1),
        CubeDim::new_1d(256),
        m.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        n as u32,
        count as u32,
        int.into(),
    );
    Ok(int_tensor(out))
}
