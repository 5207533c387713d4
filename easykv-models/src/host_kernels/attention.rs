//! A decode step's attention over a cache's buffers in host memory, in one pass: no scores
//! tensor, no softmax tensor, no packing of a product a few rows wide. Through burn each
//! (sequence, layer) cost two GEMM calls that packed their operands, a softmax and the
//! tensors between them — a quarter of a 16-sequence decode step.

use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use super::{exp, f32_values, flex_tensor};

/// One KV head: `out[r] = softmax(q_r·Kᵀ)·V` for its rows of queries.
struct HeadAttention<'a> {
    /// `[rows, d]`
    q: &'a [f32],
    /// `[slots, d]` each
    keys: &'a [f32],
    values: &'a [f32],
    d: usize,
    /// `[rows, d]`
    out: &'a mut [f32],
}

impl pulp::WithSimd for HeadAttention<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let d = self.d;
        let slots = self.keys.len() / d;
        let mut probs = vec![0f32; slots];
        for (q, out) in self.q.chunks_exact(d).zip(self.out.chunks_exact_mut(d)) {
            let (qv, qt) = S::as_simd_f32s(q);
            for (p, k) in probs.iter_mut().zip(self.keys.chunks_exact(d)) {
                let (kv, kt) = S::as_simd_f32s(k);
                let mut acc = simd.splat_f32s(0.0);
                for (a, b) in qv.iter().zip(kv) {
                    acc = simd.mul_add_f32s(*a, *b, acc);
                }
                let tail: f32 = qt.iter().zip(kt).map(|(a, b)| a * b).sum();
                *p = simd.reduce_sum_f32s(acc) + tail;
            }
            let max = probs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for p in probs.iter_mut() {
                *p = exp(*p - max);
                sum += *p;
            }
            let (ov, ot) = S::as_mut_simd_f32s(out);
            ov.iter_mut().for_each(|o| *o = simd.splat_f32s(0.0));
            ot.iter_mut().for_each(|o| *o = 0.0);
            for (p, v) in probs.iter().zip(self.values.chunks_exact(d)) {
                let (vv, vt) = S::as_simd_f32s(v);
                let pv = simd.splat_f32s(*p);
                for (o, x) in ov.iter_mut().zip(vv) {
                    *o = simd.mul_add_f32s(pv, *x, *o);
                }
                for (o, x) in ot.iter_mut().zip(vt) {
                    *o += p * x;
                }
            }
            let inv = simd.splat_f32s(1.0 / sum);
            ov.iter_mut().for_each(|o| *o = simd.mul_f32s(*o, inv));
            ot.iter_mut().for_each(|o| *o /= sum);
        }
    }
}

/// `softmax(q·keysᵀ)·values` over the first `slots` slots of a cache's f32 buffers in host
/// memory (the queries already scaled by 1/√d); `q` back where the tensors are not that.
///
/// # Shapes
/// - `q`: `[batch, kv_heads, rows, d]`; `keys`, `values`: `[batch, kv_heads, capacity, d]`
///   → `[batch, kv_heads, rows, d]`
pub fn decode_attention<B: Backend>(
    q: Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    slots: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let [b, h, rows, d] = q.dims();
    let [kb, kh, capacity, kd] = keys.dims();
    let f32s = [q.dtype(), keys.dtype(), values.dtype()].iter().all(|t| *t == DType::F32);
    if !f32s || [kb, kh, kd] != [b, h, d] || values.dims() != keys.dims() || slots == 0 || slots > capacity || d == 0 {
        return Err(q);
    }
    let (Some(kf), Some(vf)) = (flex_tensor(keys), flex_tensor(values)) else {
        return Err(q);
    };
    let (Some(ks), Some(vs)) = (kf.as_slice::<f32>(), vf.as_slice::<f32>()) else {
        return Err(q);
    };
    let device = q.device();
    let q_data = q.into_data();
    let qs = f32_values(&q_data);
    let mut out = vec![0f32; b * h * rows * d];
    let arch = pulp::Arch::new();
    for (head, (q, out)) in qs.chunks_exact(rows * d).zip(out.chunks_exact_mut(rows * d)).enumerate() {
        let at = head * capacity * d;
        arch.dispatch(HeadAttention {
            q,
            keys: &ks[at..at + slots * d],
            values: &vs[at..at + slots * d],
            d,
            out,
        });
    }
    Ok(Tensor::from_data(TensorData::new(out, [b, h, rows, d]), &device))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::activation::softmax;
    use burn::tensor::Distribution;

    /// Equal to burn's products and softmax over the slots in use, with and without a scalar
    /// tail in the head size.
    #[test]
    fn decode_attention_equals_burns_over_the_slots_in_use() {
        let dev = Default::default();
        for (d, slots) in [(64, 37), (13, 5), (64, 1)] {
            let q = Tensor::<Flex, 4>::random([2, 3, 3, d], Distribution::Normal(0.0, 1.0), &dev);
            let k = Tensor::<Flex, 4>::random([2, 3, 40, d], Distribution::Normal(0.0, 1.0), &dev);
            let v = Tensor::<Flex, 4>::random([2, 3, 40, d], Distribution::Normal(0.0, 1.0), &dev);
            let got = decode_attention(q.clone(), &k, &v, slots).unwrap();
            let (ku, vu) = (k.slice_dim(2, 0..slots), v.slice_dim(2, 0..slots));
            let want = softmax(q.matmul(ku.swap_dims(2, 3)), 3).matmul(vu);
            let diff = (got - want).abs().max().into_scalar();
            assert!(diff < 1e-5, "d {d}, {slots} slots: {diff}");
        }
    }

    #[test]
    fn decode_attention_hands_back_what_it_cannot_take() {
        let dev = Default::default();
        let q = Tensor::<Flex, 4>::random([1, 3, 3, 8], Distribution::Default, &dev);
        let k = Tensor::<Flex, 4>::random([1, 3, 10, 8], Distribution::Default, &dev);
        assert!(decode_attention(q.clone(), &k, &k, 0).is_err());
        assert!(decode_attention(q.clone(), &k, &k, 11).is_err());
        assert!(decode_attention(q, &k, &k.clone().slice_dim(3, 0..4), 5).is_err());
    }
}
