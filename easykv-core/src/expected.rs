//! Expected attention (Devoto et al., 2025; kvpress's `ExpectedAttentionPress`): the attention
//! queries yet to come are expected to pay each cached key, from the mean and covariance of the
//! queries seen so far. A query `q ~ N(μ, Σ)` (before RoPE) at a future position is rotated by
//! that position's RoPE matrix; averaging the rotation `R` over the next positions gives
//! `E[exp(q·k/√d)] = exp(μ'·k/√d + kᵀΣ'k/(2d))` with `μ' = Rμ`, `Σ' = RΣRᵀ`. Those logits,
//! softmax-normalised over the slots and averaged over the query heads that share a KV head,
//! are [`crate::SlotStats::expected`].
//!
//! The cache gathers the statistics of the prompt's queries as they are computed
//! ([`QueryMoments`]) and makes the expected attention just before an eviction.

use burn::tensor::{backend::Backend, DType, Int, Tensor};

/// What a policy reading [`crate::SlotStats::expected`] asks the cache for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedAttention {
    /// Future positions whose RoPE rotations are averaged (kvpress: 512).
    pub future_positions: usize,
    /// Leading positions left out of the query statistics and out of the softmax (kvpress's
    /// `n_sink`: 4; their slots are the policy's to keep).
    pub skip_first: usize,
}

/// Running mean and scatter (sum of outer products of deviations) of one layer's queries before
/// RoPE, per batch row and query head.
///
/// # Shapes
/// - `mean`: `[batch, q_heads, head_dim]`; `scatter`: `[batch, q_heads, head_dim, head_dim]`
#[derive(Debug, Clone)]
pub struct QueryMoments<B: Backend> {
    pub count: usize,
    pub mean: Tensor<B, 3>,
    pub scatter: Tensor<B, 4>,
}

impl<B: Backend> QueryMoments<B> {
    /// `self` (if any) with the queries `q` (`[batch, q_heads, s, head_dim]`, `s ≥ 1`) added:
    /// the chunk's own mean and scatter, merged pairwise (Chan et al.), which keeps f32 sums of
    /// long prompts accurate.
    pub fn add(previous: Option<Self>, q: Tensor<B, 4>) -> Self {
        let q = q.cast(DType::F32);
        let [b, h, s, d] = q.dims();
        let mean = q.clone().mean_dim(2);
        // The mean repeated to the queries' shape: the same differences, without flex's
        // broadcasting path (~15× slower than an equal-shape subtraction).
        let centred = q - mean.clone().repeat_dim(2, s);
        let scatter = centred.clone().swap_dims(2, 3).matmul(centred);
        let mean = mean.reshape([b, h, d]);
        let Some(p) = previous else {
            return Self {
                count: s,
                mean,
                scatter,
            };
        };
        let (na, nb) = (p.count as f64, s as f64);
        let n = na + nb;
        let delta = mean - p.mean.clone();
        let outer = delta
            .clone()
            .reshape([b, h, d, 1])
            .matmul(delta.clone().reshape([b, h, 1, d]));
        Self {
            count: p.count + s,
            mean: p.mean + delta.mul_scalar(nb / n),
            scatter: p.scatter + scatter + outer.mul_scalar(na * nb / n),
        }
    }
}

/// The RoPE rotation (rotate-half layout, as the cache's keys are) averaged over `count`
/// positions from `first`, `[d, d]` row-major: `R[i][i] = mean cos`, `R[i][i + d/2] = −mean sin`
/// and `R[i + d/2][i] = mean sin` of position × `inv_freq[i]`. The angles are formed in f32 as
/// Hugging Face forms them.
pub fn averaged_rotation(inv_freq: &[f32], first: usize, count: usize) -> Vec<f32> {
    let half = inv_freq.len();
    let d = 2 * half;
    let mut r = vec![0f32; d * d];
    let count = count.max(1);
    for (i, &f) in inv_freq.iter().enumerate() {
        let (mut c, mut s) = (0f64, 0f64);
        for p in first..first + count {
            let angle = (p as f32 * f) as f64;
            c += (angle.cos() as f32) as f64;
            s += (angle.sin() as f32) as f64;
        }
        let (c, s) = ((c / count as f64) as f32, (s / count as f64) as f32);
        r[i * d + i] = c;
        r[(i + half) * d + i + half] = c;
        r[i * d + i + half] = -s;
        r[(i + half) * d + i] = s;
    }
    r
}

/// The expected attention of one layer's slots.
///
/// # Shapes
/// - `keys`: `[batch, kv_heads, slots, head_dim]` (rotated, as cached); `positions`: `[batch,
///   kv_heads, slots]` (−1 marks a dead slot); `rotation`: `[d, d]` ([`averaged_rotation`])
/// - returns `[batch, kv_heads, slots]`, each (batch, head) summing to 1 over the slots at
///   positions `≥ skip_first`
pub fn expected_attention<B: Backend>(
    keys: Tensor<B, 4>,
    moments: &QueryMoments<B>,
    rotation: Tensor<B, 2>,
    positions: Tensor<B, 3, Int>,
    skip_first: usize,
) -> Tensor<B, 3> {
    let keys = keys.cast(DType::F32);
    let [b, hkv, n, d] = keys.dims();
    let hq = moments.mean.dims()[1];
    let g = (hq / hkv.max(1)).max(1);
    let r = rotation;
    let rt = r.clone().transpose();
    let mean = moments.mean.clone().reshape([b * hq, d]).matmul(rt.clone());
    let cov = moments.scatter.clone().div_scalar(moments.count.max(1) as f64);
    let expand = |m: Tensor<B, 2>| m.reshape([1, 1, d, d]).expand([b, hq, d, d]);
    let cov = expand(r).matmul(cov).matmul(expand(rt));
    // Per KV head: its `g` query heads against its slots.
    let mean = mean.reshape([b * hkv, g, d]);
    let k = keys.reshape([b * hkv, n, d]);
    let linear = mean.matmul(k.clone().swap_dims(1, 2)).div_scalar((d as f64).sqrt());
    let kg = k.reshape([b * hkv, 1, n, d]).expand([b * hkv, g, n, d]);
    let cov = cov.reshape([b * hkv, g, d, d]);
    let quadratic = (kg.clone().matmul(cov) * kg).sum_dim(3).reshape([b * hkv, g, n]);
    let logits = (linear + quadratic.div_scalar(2.0 * d as f64)).reshape([b, hkv, g, n]);
    // Skipped and dead slots take no share.
    let skipped = positions
        .lower_elem(skip_first as i64)
        .reshape([b, hkv, 1, n])
        .expand([b, hkv, g, n]);
    let logits = logits.mask_fill(skipped, -1.0e30);
    burn::tensor::activation::softmax(logits, 3)
        .mean_dim(2)
        .reshape([b, hkv, n])
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
    }

    /// Moments merged over chunks equal the moments of all the queries at once.
    #[test]
    fn chunked_moments_equal_whole_ones() {
        let dev = Default::default();
        let q = Tensor::<Flex, 4>::random([1, 3, 37, 8], Distribution::Normal(0.5, 2.0), &dev);
        let whole = QueryMoments::add(None, q.clone());
        let chunked = [0..5, 5..6, 6..30, 30..37]
            .into_iter()
            .fold(None, |m, r| Some(QueryMoments::add(m, q.clone().slice_dim(2, r))));
        let chunked = chunked.unwrap();
        assert_eq!(chunked.count, 37);
        let v = |t: Tensor<Flex, 3>| t.into_data().to_vec::<f32>().unwrap();
        assert!(close(&v(chunked.mean), &v(whole.mean), 1e-5));
        let w = |t: Tensor<Flex, 4>| t.into_data().to_vec::<f32>().unwrap();
        assert!(close(&w(chunked.scatter), &w(whole.scatter), 1e-4));
    }

    /// Averaged over one position, the rotation is RoPE at that position: `R·q` rotates `q`
    /// as rotate-half does.
    #[test]
    fn one_position_rotation_is_rope() {
        let inv_freq = [1.0f32, 0.1];
        let r = averaged_rotation(&inv_freq, 7, 1);
        let q = [1.0f32, 2.0, 3.0, 4.0];
        let rq: Vec<f32> = (0..4).map(|i| (0..4).map(|j| r[i * 4 + j] * q[j]).sum()).collect();
        let rope = |i: usize| {
            let a = 7.0f32 * inv_freq[i % 2];
            let rotated = if i < 2 { -q[i + 2] } else { q[i - 2] };
            q[i] * a.cos() + rotated * a.sin()
        };
        let want: Vec<f32> = (0..4).map(rope).collect();
        assert!(close(&rq, &want, 1e-6), "{rq:?} vs {want:?}");
    }

    /// With no spread in the queries the expected attention is the softmax of `μ'·k/√d`;
    /// skipped positions take no share.
    #[test]
    fn without_spread_it_is_the_mean_querys_attention() {
        let dev = Default::default();
        let (d, n) = (4, 5);
        let q = Tensor::<Flex, 4>::from_data(TensorData::new([1.0f32, 0.0, 2.0, 1.0].repeat(3), [1, 1, 3, d]), &dev);
        let moments = QueryMoments::add(None, q);
        let identity: Vec<f32> = (0..d * d).map(|i| if i % (d + 1) == 0 { 1.0 } else { 0.0 }).collect();
        let keys: Vec<f32> = (0..n * d).map(|i| (i % 7) as f32 * 0.3 - 0.5).collect();
        let k = Tensor::<Flex, 4>::from_data(TensorData::new(keys.clone(), [1, 1, n, d]), &dev);
        let positions = Tensor::<Flex, 1, Int>::arange(0..n as i64, &dev).reshape([1, 1, n]);
        let identity = Tensor::<Flex, 2>::from_data(TensorData::new(identity, [d, d]), &dev);
        let got = expected_attention(k, &moments, identity, positions, 1);
        let got = got.into_data().to_vec::<f32>().unwrap();
        let logit = |j: usize| {
            let mu = [1.0f32, 0.0, 2.0, 1.0];
            (0..d).map(|i| mu[i] * keys[j * d + i]).sum::<f32>() / 2.0
        };
        let z: f32 = (1..n).map(|j| logit(j).exp()).sum();
        let want: Vec<f32> = (0..n).map(|j| if j == 0 { 0.0 } else { logit(j).exp() / z }).collect();
        assert!(close(&got, &want, 1e-5), "{got:?} vs {want:?}");
    }
}
