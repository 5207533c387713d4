//! `x·Wᵀ` for f32 rows against weights stored `[out, in]` in host memory: the products of a
//! decode step (one sequence's row or a batch's, every weight row meeting every sequence's) and
//! of prefill chunks.
//!
//! Every output is one sum taken the same way whatever tile it falls in — one vector
//! accumulator over `in` (lane `l` takes elements `l`, `l + L`, …), reduced by `pulp`, then the
//! scalar tail added — so a sequence decoded in a batch gets exactly the logits it gets alone.
//! Tiles of up to 4 weight rows × 4 activation rows keep 16 accumulators in registers and load
//! each vector once for four products: the 2 × 2 tiles before loaded one vector per product,
//! and loads bounded the step.

use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

use super::{f32_values, flex_tensor, PARALLEL_ELEMENTS};

/// Rows of `x` a task takes at once (a prefill chunk is split into blocks this tall, each
/// meeting its block of weight rows from cache).
const X_BLOCK: usize = 64;

/// One row as whole vectors and the scalar tail.
type Row<'a, S> = (&'a [<S as pulp::Simd>::f32s], &'a [f32]);

/// `out[o][j] = Σ w_o[i]·x_j[i]` for a block of weight rows and every row `x_j`.
struct RowDots<'a> {
    /// `[block rows, in]`
    w: &'a [f32],
    inp: usize,
    xs: &'a [&'a [f32]],
    /// Per row of `x`, its outputs for the block's weight rows.
    out: Vec<&'a mut [f32]>,
}

impl pulp::WithSimd for RowDots<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        // AVX-512 has 32 vector registers, AVX2 16: tiles sized so accumulators and operands fit.
        if S::F32_LANES >= 16 {
            self.tiles::<S, 4, 8>(simd)
        } else {
            self.tiles::<S, 2, 4>(simd)
        }
    }
}

impl RowDots<'_> {
    /// Weight rows `TW` at a time against up to 4 activation rows (`TW1` at a time when there is
    /// one row).
    #[inline(always)]
    fn tiles<S: pulp::Simd, const TW: usize, const TW1: usize>(mut self, simd: S) {
        let rows = self.xs.len();
        let xs: Vec<Row<S>> = self.xs.iter().map(|x| S::as_simd_f32s(x)).collect();
        let ws: Vec<Row<S>> = self.w.chunks(self.inp.max(1)).map(|w| S::as_simd_f32s(w)).collect();
        let out = &mut self.out[..];
        // Weight tiles outer, so each is read from memory once and meets every row from cache.
        let step = match rows {
            1 => TW1,
            _ => TW,
        };
        let mut o = 0;
        while o < ws.len() {
            let w = &ws[o..(o + step).min(ws.len())];
            for (g, x) in xs.chunks(4).enumerate() {
                let j = 4 * g;
                if w.len() < step {
                    // The block's last rows: one weight row at a time (the same sums).
                    for (a, wr) in w.iter().enumerate() {
                        Self::tile_of::<S, 1>(simd, std::slice::from_ref(wr), x, out, o + a, j);
                    }
                } else if rows == 1 {
                    Self::tile_of::<S, TW1>(simd, w, x, out, o, j);
                } else {
                    Self::tile_of::<S, TW>(simd, w, x, out, o, j);
                }
            }
            o += step;
        }
    }

    /// `W` weight rows against 1–4 activation rows.
    #[inline(always)]
    fn tile_of<S: pulp::Simd, const W: usize>(
        simd: S,
        w: &[Row<S>],
        x: &[Row<S>],
        out: &mut [&mut [f32]],
        o: usize,
        j: usize,
    ) {
        match x.len() {
            1 => Self::tile::<S, W, 1>(simd, w, x, out, o, j),
            2 => Self::tile::<S, W, 2>(simd, w, x, out, o, j),
            3 => Self::tile::<S, W, 3>(simd, w, x, out, o, j),
            _ => Self::tile::<S, W, 4>(simd, w, x, out, o, j),
        }
    }

    /// The `W × X` products of weight rows `o..o + W` and activation rows `j..j + X`, written to
    /// `out[j + b][o + a]`.
    #[inline(always)]
    fn tile<S: pulp::Simd, const W: usize, const X: usize>(
        simd: S,
        w: &[Row<S>],
        x: &[Row<S>],
        out: &mut [&mut [f32]],
        o: usize,
        j: usize,
    ) {
        let n = x[0].0.len();
        // Slices of exactly `n` vectors, so the loop's indexing needs no bounds checks.
        let wv: [&[S::f32s]; W] = std::array::from_fn(|a| &w[a].0[..n]);
        let xv: [&[S::f32s]; X] = std::array::from_fn(|b| &x[b].0[..n]);
        let mut acc = [[simd.splat_f32s(0.0); X]; W];
        for i in 0..n {
            let xi: [S::f32s; X] = std::array::from_fn(|b| xv[b][i]);
            for a in 0..W {
                let wi = wv[a][i];
                for b in 0..X {
                    acc[a][b] = simd.mul_add_f32s(wi, xi[b], acc[a][b]);
                }
            }
        }
        for a in 0..W {
            for b in 0..X {
                let tail: f32 = w[a].1.iter().zip(x[b].1).map(|(p, q)| p * q).sum();
                out[j + b][o + a] = simd.reduce_sum_f32s(acc[a][b]) + tail;
            }
        }
    }
}

/// `x·Wᵀ` for a few f32 rows `x` (`[rows, in]`) and `W` (`[out, in]`) in host memory: `[rows,
/// out]`, every element the same sum ([`RowDots`]) whatever `rows` is — a sequence decoded in a
/// batch gets exactly the logits it gets alone (flex's products differ in the last bits between
/// widths). Weight rows are split over rayon's threads, and each weight row is read once for
/// all rows of `x`. `x` back when either is not f32.
pub fn rows_times_weights<B: Backend>(x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let ([rows, inp], [out, w_inp]) = (x.dims(), w.dims());
    if x.dtype() != DType::F32 || w.dtype() != DType::F32 || inp != w_inp || rows == 0 || inp == 0 {
        return Err(x);
    }
    let Some(w_flex) = flex_tensor(w) else {
        return Err(x);
    };
    let Some(ws) = w_flex.as_slice::<f32>() else {
        return Err(x);
    };
    let device = x.device();
    let x_data = x.into_data();
    let xs = f32_values(&x_data);
    let x_rows: Vec<&[f32]> = xs.chunks(inp).collect();
    // A task takes a block of weight rows (a multiple of the widest tile) against a block of
    // rows of `x`, both small enough to stay in cache while the other streams, and writes its
    // outputs straight into `[rows, out]`: a piece of each of its rows.
    let per_task = ((PARALLEL_ELEMENTS / inp) / 8 * 8).clamp(8, 256);
    let w_blocks = out.div_ceil(per_task);
    let mut y = vec![0f32; rows * out];
    let mut parts: Vec<Vec<&mut [f32]>> = (0..rows.div_ceil(X_BLOCK) * w_blocks)
        .map(|_| Vec::with_capacity(rows.min(X_BLOCK)))
        .collect();
    for (j, row) in y.chunks_mut(out).enumerate() {
        let first = (j / X_BLOCK) * w_blocks;
        for (part, piece) in parts[first..first + w_blocks].iter_mut().zip(row.chunks_mut(per_task)) {
            part.push(piece);
        }
    }
    let arch = pulp::Arch::new();
    parts.into_par_iter().enumerate().for_each(|(t, outs)| {
        let (xb, wb) = (t / w_blocks, t % w_blocks);
        let first = wb * per_task;
        let count = outs.first().map_or(0, |o| o.len());
        arch.dispatch(RowDots {
            w: &ws[first * inp..(first + count) * inp],
            inp,
            xs: &x_rows[xb * X_BLOCK..(xb * X_BLOCK + outs.len())],
            out: outs,
        });
    });
    Ok(Tensor::from_data(TensorData::new(y, [rows, out]), &device))
}

/// Products computed `[out, rows]` (each task owning whole weight rows) laid out `[rows, out]`;
/// one row (a decode step alone) is laid out the same either way.
pub(crate) fn outputs_by_row(y: Vec<f32>, rows: usize, out: usize) -> Vec<f32> {
    if rows == 1 {
        return y;
    }
    let mut yt = vec![0f32; rows * out];
    for (o, col) in y.chunks(rows).enumerate() {
        for (j, v) in col.iter().enumerate() {
            yt[j * out + o] = *v;
        }
    }
    yt
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    /// Each row's products are the same bits whatever the number of rows (1–9: every tile
    /// width, widths with and without a scalar tail, blocks whose last rows are not a whole
    /// tile; 150: several blocks of rows), and close to burn's.
    #[test]
    fn rows_times_weights_is_exact_across_widths_and_close_to_burn() {
        let dev = Default::default();
        for (out, inp, n) in [(67, 13, 9), (301, 576, 9), (2000, 40, 9), (45, 70, 150)] {
            let w = Tensor::<Flex, 2>::random([out, inp], Distribution::Normal(0.0, 1.0), &dev);
            let x = Tensor::<Flex, 2>::random([n, inp], Distribution::Normal(0.0, 1.0), &dev);
            let alone: Vec<Vec<f32>> = (0..n)
                .map(|j| {
                    let y = rows_times_weights(x.clone().slice_dim(0, j..j + 1), &w).unwrap();
                    y.into_data().to_vec::<f32>().unwrap()
                })
                .collect();
            for rows in (2..=9).chain([n]) {
                let y = rows_times_weights(x.clone().slice_dim(0, 0..rows), &w).unwrap();
                let y = y.into_data().to_vec::<f32>().unwrap();
                for (j, a) in alone.iter().enumerate().take(rows) {
                    assert_eq!(&y[j * out..(j + 1) * out], &a[..], "{rows} rows, row {j}");
                }
            }
            let want = x.clone().matmul(w.clone().transpose());
            let diff = (rows_times_weights(x, &w).unwrap() - want).abs().max().into_scalar();
            assert!(diff < 1e-4 * inp as f32, "{diff}");
        }
    }

    /// Milliseconds per product of SmolLM2's shapes at 1–512 rows, against flex's (best of
    /// five; the first shape also warms the CPU up).
    /// `cargo test --release -p easykv-models --lib row_dots::tests::speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn speed() {
        let dev = Default::default();
        for (out, inp) in [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536), (49152, 576)] {
            let w = Tensor::<Flex, 2>::random([out, inp], Distribution::Normal(0.0, 1.0), &dev);
            for rows in [1, 16, 128, 512] {
                let x = Tensor::<Flex, 2>::random([rows, inp], Distribution::Normal(0.0, 1.0), &dev);
                let best = (0..5)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        for _ in 0..20 {
                            let _ = rows_times_weights(x.clone(), &w).unwrap();
                        }
                        t.elapsed().as_secs_f64() / 20.0
                    })
                    .fold(f64::MAX, f64::min);
                let gflops = 2.0 * (out * inp * rows) as f64 / best / 1e9;
                let flex = (0..5)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        for _ in 0..20 {
                            let _ = x.clone().matmul(w.clone().transpose()).into_data();
                        }
                        t.elapsed().as_secs_f64() / 20.0
                    })
                    .fold(f64::MAX, f64::min);
                let flex_gflops = 2.0 * (out * inp * rows) as f64 / flex / 1e9;
                println!(
                    "{out} × {inp}, {rows} rows: {:.3} ms, {gflops:.1} GFLOP/s; flex {flex_gflops:.1}",
                    best * 1e3
                );
            }
        }
    }
}

#[cfg(test)]
mod model_speed {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    #[test]
    #[ignore]
    fn model_step() {
        let dev = Default::default();
        let shapes = [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)];
        let ws: Vec<Tensor<Flex, 2>> = (0..30)
            .flat_map(|_| {
                shapes
                    .iter()
                    .map(|&(o, i)| Tensor::<Flex, 2>::random([o, i], Distribution::Normal(0.0, 1.0), &dev))
            })
            .chain([Tensor::<Flex, 2>::random(
                [49152, 576],
                Distribution::Normal(0.0, 1.0),
                &dev,
            )])
            .collect();
        for rows in [1usize, 4, 8, 16] {
            let x576 = Tensor::<Flex, 2>::random([rows, 576], Distribution::Normal(0.0, 1.0), &dev);
            let x1536 = Tensor::<Flex, 2>::random([rows, 1536], Distribution::Normal(0.0, 1.0), &dev);
            for _ in 0..3 {
                let t = std::time::Instant::now();
                for w in &ws {
                    let x = if w.dims()[1] == 576 {
                        x576.clone()
                    } else {
                        x1536.clone()
                    };
                    let _ = rows_times_weights(x, w).unwrap();
                }
                println!("{rows} rows: {:.2} ms per step", t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
}
