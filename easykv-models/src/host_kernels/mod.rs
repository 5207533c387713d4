//! Work that flex does slowly, done on the tensors' own buffers for backends whose tensors
//! live in host memory (reading a flex tensor nothing else shares is free). The ops layer
//! calls these only where the backend profile says tensors live in host memory; each hands
//! back what it cannot take (a buffer that is not f32).
//!
//! - Softmax and SwiGLU: flex computes `exp` one element at a time through libm on one
//!   core (~4.5 ns per element on the CI machine), which took more of a strided prefill than
//!   the attention's products. Here an `exp` the compiler vectorizes, over rayon's threads when
//!   the tensor is large.
//! - Chunks of a layer's projections handed out heads first, and joined back, by row copies
//!   (flex copies strided views element by element).
//! - f32 products against weights repacked into panels of 16 outputs (`panels`): register
//!   tiles without reductions, every output the same sum at any row count; decode-sized
//!   products of other dtypes split by weight rows over the threads (flex runs them on one core).

use std::borrow::Cow;

use burn::prelude::*;
use burn::tensor::{DType, TensorData, TensorPrimitive};
use rayon::prelude::*;

mod attention;
mod panels;

pub use attention::{decode_attention, decode_attention_batch};
pub use panels::PanelMatrix;

/// Elements below which a kernel stays on the calling thread (spawning costs more).
const PARALLEL_ELEMENTS: usize = 1 << 15;

/// `e^x` within 2 ulp for f32 (Cephes' range reduction and polynomial); exactly 0 below −87
/// (masked scores), NaN stays NaN. Branch-free, so loops over it vectorize.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to the nearest integer k (without SSE4.1's round) and leaves
    // k in the low mantissa bits, read back with integer operations (a float→int conversion
    // kept the loop from vectorizing).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let kr = xc * std::f32::consts::LOG2_E + ROUND;
    let k = kr - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^k, k ∈ [−126, 127]: a normal float's exponent field.
    let scale = f32::from_bits(kr.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * scale
    }
}

/// Softmax of one row in place. A row of −∞ only (nothing visible) becomes zeros.
fn softmax_row(row: &mut [f32]) {
    // Eight independent lanes: the compiler vectorizes the reductions.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    // Exponentials first, then the sum: fused in one loop, the compiler unrolled `exp` eight
    // times instead of vectorizing it.
    for v in row.iter_mut() {
        *v = exp(*v - max);
    }
    let mut sums = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (s, &v) in sums.iter_mut().zip(c) {
            *s += v;
        }
    }
    let sum = chunks.remainder().iter().sum::<f32>() + sums.iter().sum::<f32>();
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// Runs `kernel` on the values of `x` in place (no copy when nothing else holds the buffer);
/// hands `x` back as the error when its buffer cannot be viewed as f32.
fn in_place<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    kernel: impl FnOnce(&mut [f32]),
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let device = x.device();
    let mut data = x.into_data();
    match data.as_mut_slice::<f32>() {
        Ok(values) => kernel(values),
        Err(_) => return Err(Tensor::from_data(data, &device)),
    }
    Ok(Tensor::from_data(data, &device))
}

/// Softmax along the last axis of an f32 tensor in host memory; `x` back otherwise.
pub fn softmax_last<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    let n = x.dims()[D - 1].max(1);
    let kernel = |v: &mut [f32]| {
        if v.len() >= PARALLEL_ELEMENTS {
            // Whole rows per task, each task at least PARALLEL_ELEMENTS / 4 elements.
            let rows_per_task = (PARALLEL_ELEMENTS / 4).div_ceil(n).max(1);
            v.par_chunks_mut(rows_per_task * n)
                .for_each(|rows| rows.chunks_mut(n).for_each(softmax_row));
        } else {
            v.chunks_mut(n).for_each(softmax_row);
        }
    };
    in_place(x, kernel)
}

/// SwiGLU's `silu(gate) · up` for the gate and up projections stacked along the last axis
/// (one product makes both), of an f32 tensor in host memory; `x` back otherwise.
///
/// # Shapes
/// - `x`: `[.., 2·i]` (gate, then up) → `[.., i]`
pub fn swiglu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let mut dims = x.dims();
    let i = dims[D - 1] / 2;
    dims[D - 1] = i;
    if x.dtype() != DType::F32 || i == 0 {
        return Err(x);
    }
    let device = x.device();
    let data = x.into_data();
    let v = f32_values(&data);
    let mut out = vec![0f32; v.len() / 2];
    let kernel = |o: &mut [f32], rows: &[f32]| {
        for (o, row) in o.chunks_mut(i).zip(rows.chunks(2 * i)) {
            let (g, u) = row.split_at(i);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + exp(-g)) * u;
            }
        }
    };
    if out.len() >= PARALLEL_ELEMENTS {
        // Whole rows per task, each task at least PARALLEL_ELEMENTS / 4 outputs.
        let rows = (PARALLEL_ELEMENTS / 4).div_ceil(i).max(1);
        out.par_chunks_mut(rows * i)
            .zip(v.par_chunks(rows * 2 * i))
            .for_each(|(o, r)| kernel(o, r));
    } else {
        kernel(&mut out, &v);
    }
    Ok(Tensor::from_data(TensorData::new(out, dims), &device))
}

/// [`swiglu`] in tensor operations: `g / (1 + e^−g) · u`, five operations where burn's `silu`
/// (its sigmoid goes through a logarithm in f32) takes ten; on GPUs each is a kernel launch.
pub(crate) fn swiglu_by_ops<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let i = x.dims()[D - 1] / 2;
    let (g, u) = (x.clone().slice_dim(D - 1, 0..i), x.slice_dim(D - 1, i..2 * i));
    g.clone() / (g.neg().exp() + 1.0) * u
}

/// `W·X` for a tall `W` (`[out, in]`) and a thin `X` (`[in, r]`, a few rows of activations)
/// in host memory, with `W`'s rows split over rayon's threads.
///
/// Decoding multiplies every weight matrix by one column: a pass over the weights, bound by
/// memory bandwidth. flex hands products this small to gemm single-threaded (its threshold is
/// 192³ multiply-adds), which reads weights at one core's bandwidth (11.6 GB/s measured here,
/// 18.6 GB/s with both cores). Row blocks of `W` are views (flex multiplies strided views
/// without copying), so each thread streams its own share of the weights.
pub fn matmul_rows_parallel<B: Backend>(w: &Tensor<B, 2>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let out = w.dims()[0];
    // Four blocks per thread balance uneven progress; blocks below 64 rows are not worth a task.
    let blocks = (rayon::current_num_threads() * 4).min(out / 64).max(1);
    if blocks == 1 {
        return w.clone().matmul(x);
    }
    let per = out.div_ceil(blocks);
    let parts: Vec<Tensor<B, 2>> = (0..out.div_ceil(per))
        .into_par_iter()
        .map(|i| {
            w.clone()
                .slice_dim(0, i * per..((i + 1) * per).min(out))
                .matmul(x.clone())
        })
        .collect();
    Tensor::cat(parts, 0)
}

/// flex's tensor inside `t` (sharing its buffer, no copy): how a host kernel reads a tensor that
/// something else also holds (weights), where `into_data` would copy it. `None` for another
/// backend's tensors.
fn flex_tensor<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<burn::backend::flex::FlexTensor> {
    let TensorPrimitive::Float(p) = t.clone().into_primitive() else {
        return None;
    };
    let any: Box<dyn std::any::Any> = Box::new(p);
    any.downcast::<burn::backend::flex::FlexTensor>().ok().map(|b| *b)
}

/// The values of f32 data: borrowed, or copied where its bytes are not aligned for f32.
fn f32_values(data: &TensorData) -> Cow<'_, [f32]> {
    match data.as_slice::<f32>() {
        Ok(v) => Cow::Borrowed(v),
        // `to_vec` converts whatever the alignment; f32 data (what `on_host` admits) converts.
        Err(_) => Cow::Owned(data.to_vec::<f32>().unwrap_or_default()),
    }
}

/// A layer's projections of many chunks, handed out chunk by chunk heads first.
///
/// The layer-by-layer prefill projects every chunk at once (`[batch, positions, heads,
/// head_dim]`) and attends chunk by chunk (`[batch, heads, s, head_dim]`). Through burn that
/// is a strided view per chunk, which flex copies element by element; on the host the rows are
/// copied directly from the projection's buffer, read once per layer.
pub enum HeadsFirstChunks<B: Backend> {
    Host {
        data: TensorData,
        /// `[batch, positions, heads, head_dim]`
        dims: [usize; 4],
        device: B::Device,
    },
    /// `[batch, heads, positions, head_dim]` (a view)
    Device(Tensor<B, 4>),
}

impl<B: Backend> HeadsFirstChunks<B> {
    /// # Shapes
    /// - `x`: `[batch, positions, heads, head_dim]`
    pub fn new(x: Tensor<B, 4>) -> Self {
        if x.dtype() == DType::F32 {
            let (dims, device) = (x.dims(), x.device());
            return Self::Host {
                data: x.into_data(),
                dims,
                device,
            };
        }
        Self::Device(x.swap_dims(1, 2))
    }

    /// Positions `start..start + len`, `[batch, heads, len, head_dim]`.
    pub fn chunk(&self, start: usize, len: usize) -> Tensor<B, 4> {
        match self {
            Self::Device(t) => t.clone().slice_dim(2, start..start + len),
            Self::Host { data, dims, device } => {
                let values = f32_values(data);
                let [b, n, h, d] = *dims;
                let mut out = Vec::with_capacity(b * h * len * d);
                for bi in 0..b {
                    for hi in 0..h {
                        for p in start..start + len {
                            let at = ((bi * n + p) * h + hi) * d;
                            out.extend_from_slice(&values[at..at + d]);
                        }
                    }
                }
                Tensor::from_data(TensorData::new(out, [b, h, len, d]), device)
            }
        }
    }
}

/// Per-chunk attention outputs, `[batch, heads, s_i, head_dim]` each, joined along the
/// positions and laid out for the output projection: `[batch, Σ s_i, heads · head_dim]`.
pub fn join_positions_first<B: Backend>(outs: Vec<Tensor<B, 4>>) -> Tensor<B, 3> {
    let Some(first) = outs.first() else {
        return Tensor::empty([0, 0, 0], &Default::default());
    };
    let [b, h, _, d] = first.dims();
    let total: usize = outs.iter().map(|t| t.dims()[2]).sum();
    if outs.iter().any(|t| t.dtype() != DType::F32) {
        return Tensor::cat(outs, 2).swap_dims(1, 2).reshape([b, total, h * d]);
    }
    let device = first.device();
    let mut joined = vec![0f32; b * total * h * d];
    let mut start = 0;
    for t in outs {
        let s = t.dims()[2];
        let data = t.into_data();
        let v = f32_values(&data);
        for bi in 0..b {
            for hi in 0..h {
                for p in 0..s {
                    let from = ((bi * h + hi) * s + p) * d;
                    let to = ((bi * total + start + p) * h + hi) * d;
                    joined[to..to + d].copy_from_slice(&v[from..from + d]);
                }
            }
        }
        start += s;
    }
    Tensor::from_data(TensorData::new(joined, [b, total, h * d]), &device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::activation::{silu, softmax};
    use burn::tensor::Distribution;

    #[test]
    fn exp_is_within_two_ulp_and_zero_where_masked() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_3;
        }
        assert!(worst < 2.5 * f32::EPSILON as f64, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }

    fn close<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>, tol: f32) {
        let (a, b) = (
            a.into_data().to_vec::<f32>().unwrap(),
            b.into_data().to_vec::<f32>().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= tol * y.abs().max(1e-6), "{x} vs {y}");
        }
    }

    #[test]
    fn softmax_and_silu_match_burns_small_and_large() {
        let dev = Default::default();
        for shape in [[1, 3, 5, 13], [2, 3, 64, 700]] {
            let x = Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 4.0), &dev);
            // A causal-style mask: −∞ above the diagonal, and one row fully masked.
            let [_, _, s, n] = shape;
            let mask: Vec<f32> = (0..s * n)
                .map(|i| {
                    if i % n > i / n + n - s || i / n == 1 {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::<Flex, 2>::from_data(TensorData::new(mask, [s, n]), &dev).reshape([1, 1, s, n]);
            let x = x + mask;
            let ours = softmax_last(x.clone()).unwrap();
            let probs = ours.clone().into_data().to_vec::<f32>().unwrap();
            assert!(probs[n..2 * n].iter().all(|&p| p == 0.0), "a fully masked row is zeros");
            // burn gives NaN for the fully masked row: compare the others.
            let theirs = softmax(x.clone(), 3);
            close(ours.clone().slice_dim(2, 0..1), theirs.clone().slice_dim(2, 0..1), 1e-5);
            close(ours.slice_dim(2, 2..s), theirs.slice_dim(2, 2..s), 1e-5);
            let (g, u) = (x.clone().clamp(-80.0, 80.0), x.clamp(-3.0, 3.0).neg());
            let stacked = Tensor::cat(vec![g.clone(), u.clone()], 3);
            close(swiglu(stacked.clone()).unwrap(), silu(g.clone()) * u.clone(), 1e-5);
            close(swiglu_by_ops(stacked), silu(g) * u, 1e-5);
        }
    }

    #[test]
    fn chunks_heads_first_and_the_join_equal_burns_views() {
        let dev = Default::default();
        let x = Tensor::<Flex, 4>::random([2, 11, 3, 4], Distribution::Default, &dev);
        let chunks = HeadsFirstChunks::new(x.clone());
        assert!(matches!(chunks, HeadsFirstChunks::Host { .. }));
        let heads_first = x.clone().swap_dims(1, 2);
        let mut outs = Vec::new();
        for (start, len) in [(0, 5), (5, 1), (6, 5)] {
            let got = chunks.chunk(start, len);
            let want = heads_first.clone().slice_dim(2, start..start + len);
            close(got.clone(), want, 0.0);
            outs.push(got);
        }
        close(join_positions_first(outs), x.reshape([2, 11, 12]), 0.0);
    }

    #[test]
    fn row_blocks_in_parallel_equal_one_product() {
        let dev = Default::default();
        for (out, inp, r) in [(1000, 64, 1), (1000, 64, 3), (50, 8, 2)] {
            let w = Tensor::<Flex, 2>::random([out, inp], Distribution::Default, &dev);
            let x = Tensor::<Flex, 2>::random([inp, r], Distribution::Default, &dev);
            let got = matmul_rows_parallel(&w, x.clone());
            close(got.unsqueeze::<3>(), w.matmul(x).unsqueeze::<3>(), 1e-5);
        }
    }
}
