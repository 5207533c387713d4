//! A decode step's attention over a cache's buffers in host memory, in one pass: no scores
//! tensor, no softmax tensor, no packing of a product a few rows wide. Through burn each
//! (sequence, layer) cost two GEMM calls that packed their operands, a softmax and the
//! tensors between them — a quarter of a 16-sequence decode step.

use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

use super::{f32_values, flex_tensor};

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
        let mut probs = vec![0f32; 4 * slots];
        // Query rows (a KV head's group) up to four at a time: each key and value row is read
        // once for all of them.
        for (q, out) in self.q.chunks(4 * d).zip(self.out.chunks_mut(4 * d)) {
            match q.len() / d {
                1 => Self::rows::<S, 1>(simd, q, self.keys, self.values, d, &mut probs, out),
                2 => Self::rows::<S, 2>(simd, q, self.keys, self.values, d, &mut probs, out),
                3 => Self::rows::<S, 3>(simd, q, self.keys, self.values, d, &mut probs, out),
                _ => Self::rows::<S, 4>(simd, q, self.keys, self.values, d, &mut probs, out),
            }
        }
    }
}

impl HeadAttention<'_> {
    /// `R` query rows (`q`: `[R, d]`) over all the slots; `probs` holds at least `R · slots`.
    #[inline(always)]
    fn rows<S: pulp::Simd, const R: usize>(
        simd: S,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        d: usize,
        probs: &mut [f32],
        out: &mut [f32],
    ) {
        let slots = keys.len() / d;
        let qs: [(&[S::f32s], &[f32]); R] = std::array::from_fn(|r| S::as_simd_f32s(&q[r * d..(r + 1) * d]));
        let (probs, _) = probs.split_at_mut(R * slots);
        for (j, k) in keys.chunks_exact(d).enumerate() {
            let (kv, kt) = S::as_simd_f32s(k);
            let mut acc = [simd.splat_f32s(0.0); R];
            for (i, k) in kv.iter().enumerate() {
                for r in 0..R {
                    acc[r] = simd.mul_add_f32s(qs[r].0[i], *k, acc[r]);
                }
            }
            for r in 0..R {
                let tail: f32 = qs[r].1.iter().zip(kt).map(|(a, b)| a * b).sum();
                probs[r * slots + j] = simd.reduce_sum_f32s(acc[r]) + tail;
            }
        }
        for row in probs.chunks_exact_mut(slots) {
            super::softmax_row(row);
        }
        let mut outs: [(&mut [S::f32s], &mut [f32]); R] = {
            let mut rest = &mut out[..R * d];
            std::array::from_fn(|_| {
                let (row, tail) = std::mem::take(&mut rest).split_at_mut(d);
                rest = tail;
                row.fill(0.0);
                S::as_mut_simd_f32s(row)
            })
        };
        for (j, v) in values.chunks_exact(d).enumerate() {
            let (vv, vt) = S::as_simd_f32s(v);
            for (r, (ov, ot)) in outs.iter_mut().enumerate() {
                let p = probs[r * slots + j];
                let pv = simd.splat_f32s(p);
                for (o, x) in ov.iter_mut().zip(vv) {
                    *o = simd.mul_add_f32s(pv, *x, *o);
                }
                for (o, x) in ot.iter_mut().zip(vt) {
                    *o += p * x;
                }
            }
        }
    }
}

/// `softmax(q·keysᵀ)·values` over the first `slots` slots of a cache's f32 buffers in host
/// memory (the queries already scaled by 1/√d); `q` back where the tensors are not that.
///
/// # Shapes
/// - `q`: `[1, kv_heads, rows, d]`; `keys`, `values`: `[1, kv_heads, capacity, d]`
///   → `[1, kv_heads, rows, d]`
pub fn decode_attention<B: Backend>(
    q: Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    slots: usize,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    decode_attention_batch(vec![q], &[(keys, values, slots)]).map_err(|mut back| match back.pop() {
        Some(q) => q,
        None => Tensor::empty([0, 0, 0, 0], &Default::default()),
    })
}

/// [`decode_attention`] for many sequences at once, each over its own cache (`kv[i]`: its key
/// and value buffers and the slots in use), split over the threads by sequence and KV head:
/// a batched decode step attends every sequence in one call instead of one after another.
/// The queries back where any of the tensors is not f32 in host memory.
///
/// # Shapes
/// - `qs[i]`: `[1, kv_heads, rows, d]`; `kv[i]`: `[1, kv_heads, capacity_i, d]` each
///   → `[sequences, kv_heads, rows, d]`
pub fn decode_attention_batch<B: Backend>(
    qs: Vec<Tensor<B, 4>>,
    kv: &[(&Tensor<B, 4>, &Tensor<B, 4>, usize)],
) -> Result<Tensor<B, 4>, Vec<Tensor<B, 4>>> {
    let Some(first) = qs.first() else {
        return Err(qs);
    };
    let [_, h, rows, d] = first.dims();
    let fits = |q: &Tensor<B, 4>, (k, v, slots): &(&Tensor<B, 4>, &Tensor<B, 4>, usize)| {
        let [kb, kh, capacity, kd] = k.dims();
        let f32s = [q.dtype(), k.dtype(), v.dtype()].iter().all(|t| *t == DType::F32);
        f32s && q.dims() == [1, h, rows, d]
            && [kb, kh, kd] == [1, h, d]
            && v.dims() == k.dims()
            && (1..=capacity).contains(slots)
    };
    if d == 0 || qs.len() != kv.len() || !qs.iter().zip(kv).all(|(q, kv)| fits(q, kv)) {
        return Err(qs);
    }
    let buffers: Option<Vec<_>> = kv
        .iter()
        .map(|(k, v, _)| Some((flex_tensor(*k)?, flex_tensor(*v)?)))
        .collect();
    let Some(buffers) = buffers else {
        return Err(qs);
    };
    let slices: Option<Vec<(&[f32], &[f32])>> = buffers
        .iter()
        .map(|(k, v)| Some((k.as_slice::<f32>()?, v.as_slice::<f32>()?)))
        .collect();
    let Some(slices) = slices else {
        return Err(qs);
    };
    let shape: Vec<(usize, usize)> = kv.iter().map(|(k, _, slots)| (k.dims()[2], *slots)).collect();
    let (n, device) = (qs.len(), first.device());
    let q_data: Vec<TensorData> = qs.into_iter().map(|q| q.into_data()).collect();
    let q_values: Vec<_> = q_data.iter().map(f32_values).collect();
    let mut out = vec![0f32; n * h * rows * d];
    let arch = pulp::Arch::new();
    out.par_chunks_mut(rows * d).enumerate().for_each(|(t, out)| {
        let (i, head) = (t / h, t % h);
        let ((keys, values), (capacity, slots)) = (slices[i], shape[i]);
        let at = head * capacity * d;
        arch.dispatch(HeadAttention {
            q: &q_values[i][head * rows * d..(head + 1) * rows * d],
            keys: &keys[at..at + slots * d],
            values: &values[at..at + slots * d],
            d,
            out,
        });
    });
    Ok(Tensor::from_data(TensorData::new(out, [n, h, rows, d]), &device))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::activation::softmax;
    use burn::tensor::Distribution;

    /// Equal to burn's products and softmax over the slots in use, with and without a scalar
    /// tail in the head size, for groups of 1–6 query rows per KV head.
    #[test]
    fn decode_attention_equals_burns_over_the_slots_in_use() {
        let dev = Default::default();
        for (d, slots, rows) in [(64, 37, 3), (13, 5, 5), (64, 1, 1), (64, 200, 6)] {
            let q = Tensor::<Flex, 4>::random([1, 3, rows, d], Distribution::Normal(0.0, 1.0), &dev);
            let k = Tensor::<Flex, 4>::random([1, 3, 256, d], Distribution::Normal(0.0, 1.0), &dev);
            let v = Tensor::<Flex, 4>::random([1, 3, 256, d], Distribution::Normal(0.0, 1.0), &dev);
            let got = decode_attention(q.clone(), &k, &v, slots).unwrap();
            let (ku, vu) = (k.slice_dim(2, 0..slots), v.slice_dim(2, 0..slots));
            let want = softmax(q.matmul(ku.swap_dims(2, 3)), 3).matmul(vu);
            let diff = (got - want).abs().max().into_scalar();
            assert!(diff < 1e-5, "d {d}, {slots} slots, {rows} rows: {diff}");
        }
    }

    /// Many sequences at once, each over its own slot count and capacity, equal one by one.
    #[test]
    fn a_batch_equals_each_sequence_alone() {
        let dev = Default::default();
        let caches: Vec<_> = [(40, 7), (9, 9), (100, 64)]
            .iter()
            .map(|&(capacity, slots)| {
                let k = Tensor::<Flex, 4>::random([1, 3, capacity, 64], Distribution::Normal(0.0, 1.0), &dev);
                let v = Tensor::<Flex, 4>::random([1, 3, capacity, 64], Distribution::Normal(0.0, 1.0), &dev);
                (k, v, slots)
            })
            .collect();
        let qs: Vec<_> = (0..3)
            .map(|_| Tensor::<Flex, 4>::random([1, 3, 3, 64], Distribution::Normal(0.0, 1.0), &dev))
            .collect();
        let kv: Vec<_> = caches.iter().map(|(k, v, s)| (k, v, *s)).collect();
        let all = decode_attention_batch(qs.clone(), &kv)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        for (i, (q, (k, v, slots))) in qs.into_iter().zip(&caches).enumerate() {
            let alone = decode_attention(q, k, v, *slots)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            assert_eq!(&all[i * alone.len()..(i + 1) * alone.len()], &alone[..], "sequence {i}");
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
