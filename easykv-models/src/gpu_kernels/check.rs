//! Each fused kernel on random inputs, against references computed on the host (softmax,
//! attention, ranking) or the burn operations it replaces (the rest): what `easykv
//! check-kernels` runs on a GPU machine (CI has no GPU to run the kernels on).

use burn::prelude::*;
use burn::tensor::{DType, Distribution};

use super::{launch, HeadShape, Tuning};
use crate::backend::{Kernel, KernelSet};
use crate::linear::WeightDType;
use crate::llama::Logits;
use crate::random_weights::RandomModel;

/// One kernel's comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelCheck {
    pub kernel: &'static str,
    /// `None`: the kernel declined (another backend, or turned off).
    pub max_abs_diff: Option<f32>,
    /// The largest difference accepted for `dtype`.
    pub tolerance: f32,
    /// Per case: its largest difference, where, and the values there (kernel, reference).
    pub cases: Vec<String>,
}

impl KernelCheck {
    pub fn passed(&self) -> bool {
        self.max_abs_diff.is_none_or(|d| d <= self.tolerance) // NaN fails
    }
}

/// The largest difference between the kernel's `got` and the reference `want`, with where
/// it is (read on the host, so a reduction on the device cannot hide a NaN).
fn compare<B: Backend, const D: usize>(got: Tensor<B, D>, want: Tensor<B, D>) -> Diff {
    let values = |t: Tensor<B, D>| {
        t.cast(DType::F32)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_default()
    };
    let dims = got.dims();
    let (g, w) = (values(got), values(want));
    let mut worst = Diff {
        max: if g.len() == w.len() { 0.0 } else { f32::INFINITY },
        detail: format!("shape {dims:?}"),
    };
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = (a - b).abs();
        if d > worst.max || (d.is_nan() && !worst.max.is_nan()) {
            worst.max = if d.is_nan() { f32::NAN } else { d };
            worst.detail = format!(
                "shape {dims:?}: at {i} kernel {a} reference {b}; first {:?} vs {:?}",
                &g[..g.len().min(3)],
                &w[..w.len().min(3)]
            );
        }
    }
    worst
}

/// A tensor's values on the host, in f32.
fn host<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Vec<f32> {
    t.clone()
        .cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default()
}

/// [`compare`] against values computed on the host.
fn compare_host<B: Backend, const D: usize>(got: Tensor<B, D>, want: &[f32]) -> Diff {
    let dims = got.dims();
    let device = got.device();
    let want = Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(want.to_vec(), [want.len()]), &device);
    match want.dims()[0] == dims.iter().product::<usize>() {
        true => compare(got, want.reshape(dims)),
        false => Diff {
            max: f32::INFINITY,
            detail: format!("shape {dims:?}: {} reference values", want.dims()[0]),
        },
    }
}

#[derive(Debug, Clone)]
struct Diff {
    max: f32,
    detail: String,
}

impl Diff {
    fn and(self, other: Diff) -> Diff {
        if other.max > self.max || other.max.is_nan() {
            other
        } else {
            self
        }
    }
}

fn random<B: Backend, const D: usize>(shape: [usize; D], dtype: DType, device: &B::Device) -> Tensor<B, D> {
    Tensor::<B, D>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
}

/// Runs every kernel in `dtype` (activations and weights) at decode and prefill shapes.
pub fn check_kernels<B: Backend>(dtype: DType, device: &B::Device) -> Vec<KernelCheck> {
    // Half precision rounds each kernel's output once, burn's operations after every step.
    let tolerance = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
    let mut checks = Vec::new();
    let mut record = |kernel, diffs: Vec<Option<Diff>>| {
        let max_abs_diff = diffs.iter().try_fold(0f32, |m, d| {
            d.as_ref().map(|d| if d.max.is_nan() { f32::NAN } else { m.max(d.max) })
        });
        let cases = diffs
            .into_iter()
            .map(|d| d.map_or("declined".into(), |d| format!("{:.3e} ({})", d.max, d.detail)))
            .collect();
        checks.push(KernelCheck {
            kernel,
            max_abs_diff,
            tolerance,
            cases,
        });
    };

    let rms = [1, 7].map(|rows| {
        let x = random::<B, 3>([1, rows, 4096], dtype, device);
        let gamma = random::<B, 1>([4096], DType::F32, device);
        let want = (x.clone().cast(DType::F32) * norm_scale(&x) * gamma.clone().unsqueeze()).cast(dtype);
        launch::rms_norm(x, &gamma, 1e-5).ok().map(|got| compare(got, want))
    });
    record("rms_norm", rms.into());

    let swiglu = [1, 5].map(|rows| {
        let x = random::<B, 3>([1, rows, 2 * 11008], dtype, device);
        let want = crate::host_kernels::swiglu_by_ops(x.clone().cast(DType::F32)).cast(dtype);
        launch::swiglu(x).ok().map(|got| compare(got, want))
    });
    record("swiglu", swiglu.into());

    // Rows of 4 heads; the mask made per head, repeated over the heads, or one chunk's rows for
    // every head (what the model hands the kernel); rows held in registers (up to 8,192 slots)
    // and read in a loop (longer); the f32 probabilities kept or not. References computed on
    // the host, so a wrong burn operation cannot hide a kernel's mistake or fake one.
    #[derive(Clone, Copy, PartialEq)]
    enum MaskShape {
        PerHead,
        Repeated,
        Chunk,
    }
    use MaskShape::*;
    let softmax = [
        (1usize, 64usize, None, false, true),
        (1, 4352, None, true, true),
        (8, 1000, Some(PerHead), false, true),
        (64, 1000, Some(PerHead), false, false),
        (64, 1000, Some(Repeated), false, true),
        (64, 1000, None, true, true),
        (64, 1000, Some(Repeated), true, true),
        (64, 1000, Some(Chunk), true, false),
        (16, 8192, Some(Chunk), false, true),
        (4, 9000, Some(Chunk), true, true),
    ]
    .map(|(rows, slots, masked, biased, keep_f32)| {
        let scores = random::<B, 4>([1, 4, rows, slots], dtype, device).mul_scalar(4.0);
        let bias = biased.then(|| {
            let values: Vec<f32> = (0..4 * slots)
                .map(|i| if i % 7 == 3 { f32::NEG_INFINITY } else { 0.0 })
                .collect();
            Tensor::<B, 4>::from_data(burn::tensor::TensorData::new(values, [1, 4, 1, slots]), device)
        });
        // Causal: query row r sees the first slots − rows + r + 1 slots.
        let mask = masked.map(|shape| {
            let heads = if shape == PerHead { 4 } else { 1 };
            let values: Vec<f32> = (0..heads * rows * slots)
                .map(|i| {
                    let (r, j) = ((i / slots) % rows, i % slots);
                    if j > slots - rows + r {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let m = Tensor::<B, 4>::from_data(burn::tensor::TensorData::new(values, [1, heads, rows, slots]), device);
            match shape {
                Repeated => m.repeat_dim(1, 4),
                _ => m,
            }
        });
        let (s, m, b) = (host(&scores), mask.as_ref().map(host), bias.as_ref().map(host));
        let mask_at = |row: usize, j: usize| match masked {
            Some(Chunk) => (row % rows) * slots + j,
            _ => row * slots + j,
        };
        let want: Vec<f32> = (0..4 * rows)
            .flat_map(|row| {
                let logits: Vec<f64> = (0..slots)
                    .map(|j| {
                        let i = row * slots + j;
                        s[i] as f64
                            + m.as_ref().map_or(0.0, |m| m[mask_at(row, j)] as f64)
                            + b.as_ref().map_or(0.0, |b| b[(row / rows) * slots + j] as f64)
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                logits.into_iter().map(move |l| ((l - max).exp() / sum) as f32)
            })
            .collect();
        launch::softmax_rows(scores, mask.as_ref(), bias.as_ref(), dtype, keep_f32)
            .ok()
            .map(|(p, q)| match (p, keep_f32) {
                (Some(p), true) => compare_host(p, &want).and(compare_host(q, &want)),
                (None, false) => compare_host(q, &want),
                // The f32 probabilities kept exactly when asked for.
                (p, _) => Diff {
                    max: f32::INFINITY,
                    detail: format!("f32 probabilities asked for: {keep_f32}, returned: {}", p.is_some()),
                },
            })
    });
    record("softmax", softmax.into());

    let heads = HeadShape {
        q_heads: 8,
        kv_heads: 2,
        head_dim: 128,
    };
    let rope = [1, 9].map(|s| {
        let width = (heads.q_heads + 2 * heads.kv_heads) * heads.head_dim;
        let qkv = random::<B, 3>([1, s, width], dtype, device);
        let angles = |seed: f32| {
            let a = Tensor::<B, 1, Int>::arange(0..(s * heads.head_dim) as i64, device)
                .float()
                .mul_scalar(seed)
                .reshape([s, heads.head_dim]);
            (a.clone().cos().cast(dtype), a.sin().cast(dtype))
        };
        let (qa, ka) = (angles(0.37), angles(0.11));
        let want = rope_by_ops(qkv.clone(), heads, &qa, &ka);
        let fresh = launch::split_rope(qkv.clone(), heads, (&qa.0, &qa.1), Some((&ka.0, &ka.1)))
            .ok()
            .map(|(q, k, v)| {
                compare(q, want.0.clone())
                    .and(compare(k, want.1.clone()))
                    .and(compare(v, want.2.clone()))
            });
        // Straight into a cache's buffers (capacity 40, from slot 5); the slots around stay.
        let (capacity, at) = (40, 5);
        let buffer = || random::<B, 4>([1, heads.kv_heads, capacity, heads.head_dim], dtype, device);
        let (kb, vb) = (buffer(), buffer());
        let (k_before, v_before) = (kb.clone().add_scalar(0.0), vb.clone().add_scalar(0.0));
        let into = launch::split_rope_into(qkv, heads, (&qa.0, &qa.1), (&ka.0, &ka.1), (&kb, &vb), at)
            .ok()
            .map(|q| {
                let expect = |before: Tensor<B, 4>, new: Tensor<B, 4>| {
                    before.slice_assign(
                        [0..1, 0..heads.kv_heads, at..at + s, 0..heads.head_dim],
                        new.cast(dtype),
                    )
                };
                compare(q, want.0)
                    .and(compare(kb.clone(), expect(k_before, want.1)))
                    .and(compare(vb.clone(), expect(v_before, want.2)))
            });
        [fresh, into]
    });
    record("split_rope", rope.into_iter().flatten().collect());

    // Plain products, then the residual and SwiGLU epilogues (references in f32 burn
    // operations; differences relative to the row length: sums of `inp` products).
    let gemv = [
        (4096usize, 3000usize, 0u8),
        (4096, 4096, 0),
        (576, 8192, 0),
        (1536, 576, 0),
        (100, 30, 0),
        (4096, 3000, 1),
        (576, 1536, 2),
    ]
    .map(|(inp, out, epilogue)| {
        product_case::<B>([1, inp, out], epilogue, dtype, device, |x, w, e, want| {
            // Every launch shape the timing run compares (plane reductions apply where planes
            // are 32 wide).
            let tunings = [(8, false), (4, true), (2, true)].map(|(rows_per_cube, plane)| {
                let tuning = Tuning {
                    gemv_rows_per_cube: rows_per_cube,
                    gemv_plane_reduce: plane,
                    ..Tuning::default()
                };
                (tuning, format!("rows/cube {rows_per_cube}, plane {plane}"))
            });
            worst_over_tunings(&tunings, inp, want, |t| launch::gemv(x.clone(), w, e, t))
        })
    });
    record("gemv", gemv.into());

    // The same with the RMS norm inside (reference: the norm in f32 burn operations, rounded to
    // `dtype`, then the product).
    let normed = [(4096usize, 3000usize, 0u8), (576, 1536, 2), (1536, 576, 0)].map(|(inp, out, epilogue)| {
        let x = random::<B, 3>([1, 1, inp], dtype, device).mul_scalar(3.0);
        let gamma = random::<B, 1>([inp], DType::F32, device).mul_scalar(0.1);
        let xn = (x.clone().cast(DType::F32) * norm_scale(&x) * gamma.clone().unsqueeze())
            .cast(dtype)
            .reshape([1, inp]);
        let rows = if epilogue == 2 { 2 * out } else { out };
        let w = random::<B, 2>([rows, inp], dtype, device);
        let product = xn.cast(DType::F32).matmul(w.clone().cast(DType::F32).transpose());
        let (want, epilogue) = match epilogue {
            0 => (product, super::GemvEpilogue::Plain),
            _ => (crate::host_kernels::swiglu_by_ops(product), super::GemvEpilogue::Swiglu),
        };
        // The norm staged per cube, and inline from `x·γ` (as the previous product writes it:
        // rounded to `dtype`), over the launch shapes.
        let x = x.reshape([1, inp]);
        let x_scaled = (x.clone().cast(DType::F32) * gamma.clone().unsqueeze()).cast(dtype);
        let tunings: Vec<_> = [(8, false), (2, true)]
            .into_iter()
            .map(|(rows_per_cube, plane)| {
                let tuning = Tuning {
                    gemv_rows_per_cube: rows_per_cube,
                    gemv_plane_reduce: plane,
                    ..Tuning::default()
                };
                (tuning, format!("rows/cube {rows_per_cube}, plane {plane}"))
            })
            .collect();
        let staged = worst_over_tunings(&tunings, inp, &want, |t| {
            launch::gemv_normed(x.clone(), &gamma, 1e-5, &w, epilogue, t)
        });
        let inline = worst_over_tunings(&tunings, inp, &want, |t| {
            launch::gemv_prescaled(x.clone(), &x_scaled, 1e-5, &w, epilogue, t)
        });
        staged.zip(inline).map(|(s, i)| s.and(i))
    });
    record("gemv_normed", normed.into());

    // The residual product that also writes its output times the next norm's `γ` (the input
    // of `gemv_prescaled`): the sum as the plain product's check, the scaled copy against the
    // kernel's own rounded output times `γ`.
    let scaling = [(4096usize, 3000usize), (576, 1536)].map(|(inp, out)| {
        // Outputs of the residual stream's size (a few units): the scaled copy's rounding to
        // `dtype` stays well inside the tolerance.
        let x = random::<B, 2>([1, inp], dtype, device).mul_scalar(1.0 / (inp as f64).sqrt());
        let w = random::<B, 2>([out, inp], dtype, device);
        let residual = random::<B, 2>([1, out], dtype, device);
        let gamma = random::<B, 1>([out], DType::F32, device).mul_scalar(0.1);
        let want = residual.clone().cast(DType::F32)
            + x.clone()
                .cast(DType::F32)
                .matmul(w.clone().cast(DType::F32).transpose());
        let (y, scaled) = launch::gemv_scaling(
            x,
            &w,
            super::GemvEpilogue::AddResidual(&residual),
            &gamma,
            &Tuning::default(),
        )
        .ok()?;
        let want_scaled = y.clone().cast(DType::F32) * gamma.unsqueeze();
        let d = compare(y, want);
        let sum = Diff {
            max: d.max / (inp as f32).sqrt(),
            detail: format!("sum: {}", d.detail),
        };
        let d = compare(scaled, want_scaled);
        Some(sum.and(Diff {
            detail: format!("scaled: {}", d.detail),
            ..d
        }))
    });
    record("gemv_scaling", scaling.into());

    // A few rows on tensor cores (f16 and bf16 only), over launch shapes that split the inner
    // axis differently; rows that are not whole 16-row tiles; the epilogues.
    let rows = [
        (64usize, 4096usize, 3072usize, 0u8),
        (20, 576, 960, 0),
        (64, 1536, 576, 1),
        (7, 576, 1536, 2),
        (64, 11008, 512, 1),
        // An inner axis that is not whole chunks of the staged kernel (which declines).
        (12, 1040, 480, 0),
    ]
    .map(|(rows, inp, out, epilogue)| {
        product_case::<B>([rows, inp, out], epilogue, dtype, device, |x, w, e, want| {
            let shapes = [
                (2048u32, 4u32, 2u32, false),
                (256, 1, 1, false),
                (100_000, 8, 2, false),
                (2048, 4, 2, true),
                (256, 4, 2, true),
                (100_000, 4, 2, true),
            ];
            let tunings = shapes.map(|(planes, unroll, cols, staged)| {
                let tuning = Tuning {
                    rows_planes: planes,
                    rows_unroll: unroll,
                    rows_col_blocks: cols,
                    rows_staged: staged,
                    ..Tuning::default()
                };
                let kind = if staged { "staged" } else { "fragments" };
                (
                    tuning,
                    format!("{kind}, planes {planes}, unroll {unroll}, col blocks {cols}"),
                )
            });
            worst_over_tunings(&tunings, inp, want, |t| launch::matmul_rows(x.clone(), w, e, t))
        })
    });
    record("matmul_rows", rows.into());

    // Decode attention over a cache buffer of 64 slots, all or the first 50 in use; 1 and 4
    // rows per head; scores and values apart; references on the host.
    // (query rows, head dim, slots, capacity): long caches are split over cubes.
    let attention = [
        (1usize, 128usize, 64usize, 64usize),
        (1, 128, 50, 64),
        (4, 64, 50, 64),
        (7, 128, 33, 64),
        (1, 128, 1000, 1100),
        (3, 64, 700, 704),
    ]
    .map(|(rows, d, n, capacity)| {
        let keys = random::<B, 4>([1, 4, capacity, d], dtype, device);
        let values = random::<B, 4>([1, 4, capacity, d], dtype, device);
        let q = random::<B, 4>([1, 4, rows, d], dtype, device).mul_scalar(0.1);
        let (hq, hk, hv) = (host(&q), host(&keys), host(&values));
        let want_scores: Vec<f32> = (0..4 * rows * n)
            .map(|i| {
                let (head, r, j) = (i / (rows * n), (i / n) % rows, i % n);
                (0..d)
                    .map(|c| hq[(head * rows + r) * d + c] as f64 * hk[(head * capacity + j) * d + c] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        // Outputs of similar size at every length (half precision's steps grow with them).
        let probs = random::<B, 4>([1, 4, rows, n], DType::F32, device)
            .abs()
            .mul_scalar((16.0 / n as f64).sqrt())
            .cast(dtype);
        let hp = host(&probs);
        let want_out: Vec<f32> = (0..4 * rows * d)
            .map(|i| {
                let (head, r, c) = (i / (rows * d), (i / d) % rows, i % d);
                (0..n)
                    .map(|j| hp[(head * rows + r) * n + j] as f64 * hv[(head * capacity + j) * d + c] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        // The fused pass: softmax of the host scores, then the values.
        let want_fused: Vec<f32> = (0..4 * rows * d)
            .map(|i| {
                let (head, r, c) = (i / (rows * d), (i / d) % rows, i % d);
                let row = &want_scores[(head * rows + r) * n..][..n];
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
                (0..n)
                    .map(|j| (row[j] as f64 - max).exp() / sum * hv[(head * capacity + j) * d + c] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        let fused = launch::decode_attention(q.clone(), &keys, &values, n)
            .ok()
            .map(|got| compare_host(got, &want_fused));
        let scores = launch::attention_scores(q, &keys, n)
            .ok()
            .map(|got| compare_host(got, &want_scores));
        let out = launch::attention_values(probs, &values, n, &Tuning::default())
            .ok()
            .map(|got| compare_host(got, &want_out));
        (scores, out, fused)
    });
    record("attention_scores", attention.iter().map(|a| a.0.clone()).collect());
    record("attention_values", attention.iter().map(|a| a.1.clone()).collect());
    record("decode_attention", attention.iter().map(|a| a.2.clone()).collect());

    // Exact f32 products: a projection (transposed weights), attention scores over the first
    // 50 of 64 buffered slots (transposed), values over them, two batches of two heads.
    let matmul = [
        (1usize, 1usize, 5usize, 40usize, 30usize, 30usize, true),
        (1, 4, 20, 64, 64, 50, true),
        (1, 4, 20, 50, 64, 64, false),
        (2, 2, 17, 33, 40, 21, true),
    ]
    .map(|(batch, heads, m, k, rows, n, transposed)| {
        let a = random::<B, 4>([batch, heads, m, k], dtype, device);
        let cols = if transposed { k } else { n };
        let b = random::<B, 4>([batch, heads, rows, cols], dtype, device);
        let (ha, hb) = (host(&a), host(&b));
        let want: Vec<f32> = (0..batch * heads * m * n)
            .map(|i| {
                let (z, r, j) = (i / (m * n), (i / n) % m, i % n);
                (0..k)
                    .map(|kk| {
                        let bv = match transposed {
                            true => hb[(z * rows + j) * cols + kk],
                            false => hb[(z * rows + kk) * cols + j],
                        };
                        ha[(z * m + r) * k + kk] as f64 * bv as f64
                    })
                    .sum::<f64>() as f32
            })
            .collect();
        launch::matmul_f32(a, &b, transposed, n)
            .ok()
            .map(|got| compare_host(got, &want))
    });
    record("matmul", matmul.into());

    // A chunk's column statistics into the middle rows of stacked buffers (the rows around stay).
    let observe = [(1usize, 9usize, 50usize), (2, 64, 700)].map(|(b, s, n)| {
        let probs = Tensor::<B, 4>::random([b, 4, s, n], Distribution::Uniform(0.0, 1.0), device);
        let hp = host(&probs);
        let buffer = || Tensor::<B, 3>::zeros([3 * b, 4, n], device);
        let buffers = [buffer(), buffer(), buffer()];
        let [sum, sum_sq, last] = &buffers;
        launch::write_observation(probs, [sum, sum_sq, last], b).ok().map(|()| {
            let column = |f: &dyn Fn(usize, usize, usize) -> f32| -> Vec<f32> {
                (0..3 * b * 4 * n)
                    .map(|i| {
                        let (r, j) = (i / n, i % n);
                        match r / 4 >= b && r / 4 < 2 * b {
                            true => f(r - 4 * b, j, s),
                            false => 0.0,
                        }
                    })
                    .collect()
            };
            let at = |bh: usize, q: usize, j: usize| hp[(bh * s + q) * n + j];
            let want_sum = column(&|bh, j, s| (0..s).map(|q| at(bh, q, j)).sum());
            let want_sq = column(&|bh, j, s| (0..s).map(|q| at(bh, q, j) * at(bh, q, j)).sum());
            let want_last = column(&|bh, j, s| at(bh, s - 1, j));
            compare_host(sum.clone(), &want_sum)
                .and(compare_host(sum_sq.clone(), &want_sq))
                .and(compare_host(last.clone(), &want_last))
        })
    });
    record("observe", observe.into());

    // Slot ranks, with ties (keys from a small set) and rows longer than a cube's 256 slots.
    let rank = [(3usize, 100usize), (2, 700), (64, 2112), (2, 5000)].map(|(rows, n)| {
        let key = random::<B, 3>([rows, 2, n], DType::F32, device)
            .mul_scalar(2.0)
            .round()
            .cast(dtype);
        let k = host(&key);
        let want: Vec<f32> = (0..rows * 2 * n)
            .map(|i| {
                let (row, j) = (i / n, i % n);
                let r = &k[row * n..(row + 1) * n];
                (0..n).filter(|&o| r[o] < r[j] || (r[o] == r[j] && o < j)).count() as f32
            })
            .collect();
        launch::row_ranks(key).ok().map(|got| compare_host(got, &want))
    });
    record("rank", rank.into());

    // Listing kept slots: rows with exactly, fewer and more true slots than asked for; longer
    // rows than a cube's 256 threads.
    let list = [
        (3usize, 10usize, 5usize),
        (2, 700, 300),
        (64, 2112, 1056),
        (2, 5000, 4000),
    ]
    .map(|(rows, n, count)| {
        let mask = Tensor::<B, 3>::random([rows, 2, n], Distribution::Uniform(0.0, 1.0), device).lower_elem(0.5);
        let flags: Vec<bool> = mask
            .clone()
            .into_data()
            .convert::<bool>()
            .into_vec()
            .unwrap_or_default();
        let want: Vec<f32> = flags
            .chunks(n)
            .flat_map(|row| {
                let mut slots: Vec<f32> = (0..n).filter(|&j| row[j]).map(|j| j as f32).collect();
                slots.resize(count, 0.0);
                slots
            })
            .collect();
        launch::list_true_slots(mask, count)
            .ok()
            .map(|got| compare_host(got.float(), &want))
    });
    record("list_slots", list.into());

    // Compacting a layer's keys and values to listed slots (the first `kept` of the new buffers).
    let gather =
        [(1usize, 4usize, 50usize, 128usize, 30usize), (2, 3, 700, 64, 590)].map(|(b, h, capacity, d, kept)| {
            let keys = random::<B, 4>([b, h, capacity, d], dtype, device);
            let values = random::<B, 4>([b, h, capacity, d], dtype, device);
            // Every row keeps `kept` ascending slots: all but every seventh, shifted per row.
            let keep: Vec<i64> = (0..b * h)
                .flat_map(|r| {
                    (0..capacity as i64)
                        .filter(move |j| (j + r as i64) % 7 != 0)
                        .take(kept)
                        .collect::<Vec<_>>()
                })
                .collect();
            let want = |t: &Tensor<B, 4>| {
                let all = host(t);
                keep.iter()
                    .enumerate()
                    .flat_map(|(i, &slot)| {
                        let bh = i / kept;
                        let from = (bh * capacity + slot as usize) * d;
                        all[from..from + d].to_vec()
                    })
                    .collect::<Vec<f32>>()
            };
            let (want_k, want_v) = (want(&keys), want(&values));
            let keep =
                Tensor::<B, 3, Int>::from_data(burn::tensor::TensorData::new(keep.clone(), [b, h, kept]), device);
            launch::gather_slots(&keys, &values, keep).map(|(k, v)| {
                compare_host(k.slice_dim(2, 0..kept), &want_k).and(compare_host(v.slice_dim(2, 0..kept), &want_v))
            })
        });
    record("gather", gather.into());

    record("pool", vec![pool_case::<B>(dtype, device)]);
    checks
}

/// An independent copy of `t` (a cut of a pool would be a view of its memory).
fn copied<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    let options = burn::tensor::TensorCreationOptions::new(t.device()).with_dtype(t.dtype());
    Tensor::from_data(t.into_data(), options)
}

/// Three sequences of one memory pool: their keys and values written and their queries
/// rotated by one launch, attended by one launch, against each alone over a copy of its
/// region (`split_rope_into`, `decode_attention`), which both must equal exactly; the same
/// attention observed (each slot's probability averaged over a KV head's query rows) against
/// the host's softmax; and slots written through a region's view reaching the pool.
fn pool_case<B: Backend>(dtype: DType, device: &B::Device) -> Option<Diff> {
    let (hq, hkv, d, pool_slots) = (8usize, 2usize, 128usize, 3000usize);
    // (first slot, capacity, slots held before this step)
    let seqs = [(0usize, 700usize, 37usize), (700, 1500, 1400), (2200, 800, 511)];
    let n = seqs.len();
    let heads = HeadShape {
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
    };
    let pool_k = random::<B, 4>([1, hkv, pool_slots, d], dtype, device);
    let pool_v = random::<B, 4>([1, hkv, pool_slots, d], dtype, device);
    let own: Vec<_> = seqs
        .iter()
        .map(|&(start, cap, _)| {
            let cut = |t: &Tensor<B, 4>| copied(t.clone().slice_dim(2, start..start + cap));
            (cut(&pool_k), cut(&pool_v))
        })
        .collect();
    let qkv = random::<B, 3>([n, 1, (hq + 2 * hkv) * d], dtype, device);
    let angles: Vec<Tensor<B, 2>> = (0..4).map(|_| random::<B, 2>([n, d], dtype, device)).collect();
    let mut table: Vec<i32> = seqs.iter().map(|s| s.0 as i32).collect();
    table.extend(seqs.iter().map(|s| (s.2 + 1) as i32));
    let table = Tensor::<B, 1, Int>::from_data(burn::tensor::TensorData::new(table, [2 * n]), device);
    let rows = super::PoolRows {
        table: &table,
        starts_at: 0,
        lens_at: n,
        longest: seqs.iter().map(|s| s.2 + 1).max().unwrap_or(1),
    };
    let q = launch::split_rope_pool(
        qkv.clone(),
        heads,
        (&angles[0], &angles[1]),
        (&angles[2], &angles[3]),
        (&pool_k, &pool_v),
        &rows,
    )
    .ok()?;
    let q4 = q.clone().reshape([n, hkv, hq / hkv, d]);
    let out = launch::decode_attention_pool(q4.clone(), &pool_k, &pool_v, &rows, None).ok()?;
    // The same launch observed into layer 1 of a two-layer buffer: the same output, and each
    // sequence's probabilities at its slots.
    let probs = Tensor::<B, 3>::zeros([2, hkv, pool_slots], (device, DType::F32));
    let observed = launch::decode_attention_pool(q4, &pool_k, &pool_v, &rows, Some((&probs, 1))).ok()?;
    let mut diff = compare(observed, out.clone());
    for (i, (&(start, _, len), (k, v))) in seqs.iter().zip(&own).enumerate() {
        let row = |t: &Tensor<B, 2>| t.clone().slice_dim(0, i..i + 1);
        let qi = launch::split_rope_into(
            qkv.clone().slice_dim(0, i..i + 1),
            heads,
            (&row(&angles[0]), &row(&angles[1])),
            (&row(&angles[2]), &row(&angles[3])),
            (k, v),
            len,
        )
        .ok()?;
        let oi = launch::decode_attention(qi.clone().reshape([1, hkv, hq / hkv, d]), k, v, len + 1).ok()?;
        let held = |t: &Tensor<B, 4>, from: usize| t.clone().slice_dim(2, from..from + len + 1);
        let want = group_probs(&qi, k, hkv, len + 1);
        let got = probs.clone().slice_dim(0, 1..2).slice_dim(2, start..start + len + 1);
        diff = diff
            .and(compare_host(got, &want))
            .and(compare(q.clone().slice_dim(0, i..i + 1), qi))
            .and(compare(out.clone().slice_dim(0, i..i + 1), oi))
            .and(compare(held(&pool_k, start), held(k, 0)))
            .and(compare(held(&pool_v, start), held(v, 0)));
    }
    // Five slots written through the third region's view land in the pool.
    let view = launch::slot_view(&pool_k, 2200, 800)?;
    let new = random::<B, 4>([1, hkv, 5, d], dtype, device);
    launch::write_slots(&view, new.clone(), 100).ok()?;
    Some(diff.and(compare(pool_k.slice_dim(2, 2300..2305), new)))
}

/// The softmax of `q`'s rows (`[1, hq, 1, d]`, scale folded in) over the first `len` keys of
/// `keys` (`[1, kv_heads, capacity, d]`), averaged over each KV head's query rows, computed on
/// the host in f32: `[kv_heads, len]`, what a cache observes of a decode step.
fn group_probs<B: Backend>(q: &Tensor<B, 4>, keys: &Tensor<B, 4>, kv_heads: usize, len: usize) -> Vec<f32> {
    let host = |t: Tensor<B, 4>| {
        t.cast(DType::F32)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_default()
    };
    let [_, hq, _, d] = q.dims();
    let [_, _, capacity, _] = keys.dims();
    let (q, k) = (host(q.clone()), host(keys.clone()));
    let g = hq / kv_heads;
    let mut out = vec![0f32; kv_heads * len];
    for (h, row) in out.chunks_mut(len).enumerate() {
        for r in 0..g {
            let qr = &q[(h * g + r) * d..(h * g + r + 1) * d];
            let scores: Vec<f32> = (0..len)
                .map(|j| {
                    let kj = &k[(h * capacity + j) * d..(h * capacity + j + 1) * d];
                    qr.iter().zip(kj).map(|(a, b)| a * b).sum()
                })
                .collect();
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = scores.iter().map(|s| (s - m).exp()).sum();
            for (o, s) in row.iter_mut().zip(&scores) {
                *o += (s - m).exp() / sum / g as f32;
            }
        }
    }
    out
}

/// A product case: random `x` (`[rows, inp]`) and `W` (`[out, inp]`, twice the rows for SwiGLU)
/// in `dtype`, an epilogue (0: none, 1: plus a random residual, 2: SwiGLU) and the reference in
/// f32 burn operations, handed to `check` as (x, W, epilogue, reference).
fn product_case<B: Backend>(
    [rows, inp, out]: [usize; 3],
    epilogue: u8,
    dtype: DType,
    device: &B::Device,
    check: impl FnOnce(&Tensor<B, 2>, &Tensor<B, 2>, super::GemvEpilogue<'_, B>, &Tensor<B, 2>) -> Option<Diff>,
) -> Option<Diff> {
    // SwiGLU multiplies two sums: smaller inputs keep its outputs where half precision still
    // resolves the tolerance.
    let scale = if epilogue == 2 { 0.1 } else { 1.0 };
    let x = random::<B, 2>([rows, inp], dtype, device).mul_scalar(scale);
    let w_rows = if epilogue == 2 { 2 * out } else { out };
    let w = random::<B, 2>([w_rows, inp], dtype, device);
    let residual = random::<B, 2>([rows, out], dtype, device);
    let product = x
        .clone()
        .cast(DType::F32)
        .matmul(w.clone().cast(DType::F32).transpose());
    let (want, e) = match epilogue {
        0 => (product, super::GemvEpilogue::Plain),
        1 => (
            product + residual.clone().cast(DType::F32),
            super::GemvEpilogue::AddResidual(&residual),
        ),
        _ => (crate::host_kernels::swiglu_by_ops(product), super::GemvEpilogue::Swiglu),
    };
    check(&x, &w, e, &want)
}

/// The worst difference between `kernel`'s product and `want` over launch shapes `tunings`
/// (each with its label), relative to `√inp` (sums of `inp` products); `None` if a launch shape
/// declined.
fn worst_over_tunings<B: Backend>(
    tunings: &[(Tuning, String)],
    inp: usize,
    want: &Tensor<B, 2>,
    kernel: impl Fn(&Tuning) -> Result<Tensor<B, 2>, Tensor<B, 2>>,
) -> Option<Diff> {
    let mut worst: Option<Diff> = None;
    for (tuning, label) in tunings {
        let got = kernel(tuning).ok();
        let d = compare(got?, want.clone());
        let d = Diff {
            max: d.max / (inp as f32).sqrt(),
            detail: format!("{label}: {}", d.detail),
        };
        worst = Some(match worst {
            Some(w) => w.and(d),
            None => d,
        });
    }
    worst
}

/// `1 / rms(x)` over the last axis, in f32.
fn norm_scale<B: Backend>(x: &Tensor<B, 3>) -> Tensor<B, 3> {
    let x = x.clone().cast(DType::F32);
    (x.clone() * x).mean_dim(2).add_scalar(1e-5).sqrt().recip()
}

/// What `split_rope` computes, in f32 burn operations.
#[allow(clippy::type_complexity)]
fn rope_by_ops<B: Backend>(
    qkv: Tensor<B, 3>,
    heads: HeadShape,
    q_angles: &(Tensor<B, 2>, Tensor<B, 2>),
    k_angles: &(Tensor<B, 2>, Tensor<B, 2>),
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, s, _] = qkv.dims();
    let d = heads.head_dim;
    let dtype = qkv.dtype();
    let qkv = qkv.cast(DType::F32);
    let part = |first: usize, h: usize| {
        qkv.clone()
            .slice_dim(2, first * d..(first + h) * d)
            .reshape([b, s, h, d])
    };
    let rotate = |x: Tensor<B, 4>, (cos, sin): &(Tensor<B, 2>, Tensor<B, 2>)| {
        let swapped = Tensor::cat(
            vec![x.clone().slice_dim(3, d / 2..d), x.clone().slice_dim(3, 0..d / 2)],
            3,
        );
        let c = cos.clone().cast(DType::F32).reshape([1, s, 1, d]);
        let sn = sin.clone().cast(DType::F32).reshape([1, s, 1, d]);
        x * c + swapped * sn
    };
    let (hq, hkv) = (heads.q_heads, heads.kv_heads);
    let q = rotate(part(0, hq), q_angles);
    let k = rotate(part(hq, hkv), k_angles);
    let v = part(hq + hkv, hkv);
    let heads_first = |t: Tensor<B, 4>| t.swap_dims(1, 2).cast(dtype);
    (heads_first(q), heads_first(k), heads_first(v))
}

/// A random-weight model of `shape` run with each kernel alone and with all of them, against
/// burn's operations only (in f32 with exact products): the largest logit difference over a
/// 20-token prefill and three decode steps, per setting (`None`: the model could not be built or run).
pub fn check_model<B: Backend>(shape: &str, dtype: WeightDType, device: &B::Device) -> Vec<(String, Option<f32>)> {
    let Ok(mut model) = RandomModel::by_name(shape).and_then(|m| m.build::<B>(dtype, 0, device)) else {
        return vec![(shape.to_string(), None)];
    };
    let vocab = model.embed.vocab_size() as i64;
    let profile = model.profile;
    let mut run = |kernels: KernelSet| {
        model.set_profile(crate::BackendProfile { kernels, ..profile });
        let mut cache = model.full_cache();
        let ids = |n: i64, from: i64| {
            Tensor::<B, 1, Int>::arange(from..from + n, device)
                .mul_scalar(7919)
                .remainder_scalar(vocab)
                .reshape([1, n as usize])
        };
        let mut logits = Vec::new();
        let mut step = model.forward(ids(20, 0), &mut cache, Logits::Last);
        for t in 0..3 {
            logits.push(step.ok()?.cast(DType::F32));
            step = model.forward(ids(1, 20 + t), &mut cache, Logits::Last);
        }
        logits.push(step.ok()?.cast(DType::F32));
        Some(Tensor::cat(logits, 1))
    };
    // The reference is burn's operations; in f32 with exact products, since burn's CUDA f32
    // products run as TF32 and would bury every kernel's difference under TF32's rounding
    // (the `matmul` kernel itself is checked against a host reference above).
    let base = match dtype {
        WeightDType::F32 => KernelSet::only(&[Kernel::Matmul]),
        _ => KernelSet::NONE,
    };
    let Some(reference) = run(base) else {
        return vec![("reference".to_string(), None)];
    };
    Kernel::ALL
        .iter()
        .filter(|k| !base.allows(**k))
        .map(|k| (k.name().to_string(), base.with(*k)))
        .chain([("all".to_string(), KernelSet::ALL)])
        .map(|(setting, kernels)| {
            let diff = run(kernels).map(|got| compare(got, reference.clone()).max);
            (setting, diff)
        })
        .collect()
}

/// Sequences of a random-weight model of `shape` generated by the batched engine with a KV
/// pool (on cubecl backends: one tensor per layer, attended in one launch per layer, which
/// observes the attention evicting caches score by) — prompts in passes of their own, then
/// riding in the decode steps' passes — and without one (each sequence attended on its own,
/// prompts riding in the decode steps' passes): per request and run `(setting, tokens
/// generated by the longer run, tokens equal to those of the run without a pool and with
/// prompts in passes of their own, up to the first difference)`; `None` where a run failed.
pub fn check_engine<B: Backend>(
    shape: &str,
    dtype: WeightDType,
    device: &B::Device,
) -> Option<Vec<(String, usize, usize)>> {
    use crate::engine::{Engine, EngineConfig, Event, Request};
    use easykv_core::{Budget, EvictionConfig, Mode};

    let random = RandomModel::by_name(shape).ok()?;
    let vocab = random.config().vocab_size as u32;
    // Evicting while decoding: every 24 steps (observed by the pooled launch) and every
    // step (evicted slots awaiting compaction: those steps go one sequence at a time); and
    // per-head budgets cut once, whose heads then hold different counts outside the pool
    // (attended on their own beside the pooled launch).
    let settings = [
        ("roco", 24, Mode::Auto),
        ("h2o", 24, Mode::Auto),
        ("tova", 1, Mode::Auto),
        ("roco", 1, Mode::Auto),
        ("full", 1, Mode::Auto),
        ("ada-snapkv", 1, Mode::Once),
    ];
    let requests: Vec<(String, Request)> = settings
        .iter()
        .enumerate()
        .map(|(i, &(policy, decode_stride, mode))| {
            let prompt: Vec<u32> = (0..150 + 40 * i as u32)
                .map(|t| (t * 7919 + 13 * i as u32) % vocab)
                .collect();
            let eviction = EvictionConfig {
                budget: Budget::Tokens(96),
                mode,
                stride: 8,
                decode_stride,
                ..Default::default()
            };
            let request = Request {
                prompt,
                max_new_tokens: 60,
                policy: policy.to_string(),
                eviction,
                sampling: Default::default(),
                stop_ids: Vec::new(),
                logprobs: None,
            };
            let name = match mode {
                Mode::Once => format!("{policy}, cut once"),
                _ => format!("{policy}, decode stride {decode_stride}"),
            };
            (name, request)
        })
        .collect();
    let generate = |pool_bytes: u64, mixed: bool| -> Option<Vec<Vec<u32>>> {
        let model = random.build::<B>(dtype, 0, device).ok()?;
        let config = EngineConfig {
            pool_bytes,
            max_running: requests.len(),
            chunk_size: 64,
            max_queued: None,
            mixed_passes: Some(mixed),
        };
        let mut engine = Engine::new(Box::new(model), random.config(), dtype, config).ok()?;
        let mut ids = Vec::new();
        for (_, r) in &requests {
            ids.push(engine.submit(r.clone()).ok()?);
        }
        let mut out = vec![Vec::new(); requests.len()];
        engine
            .run(&mut |e| {
                if let Event::Token { id, token, .. } = e {
                    if let Some(i) = ids.iter().position(|x| x == id) {
                        out[i].push(*token);
                    }
                }
            })
            .ok()?;
        Some(out)
    };
    let alone = generate(u64::MAX / 2, false)?;
    let pool: u64 = 1 << 30;
    let mut rows = Vec::new();
    let runs = [
        ("unpooled, mixed passes", u64::MAX / 2, true),
        ("pooled", pool, false),
        ("pooled, mixed passes", pool, true),
    ];
    for (run, pool_bytes, mixed) in runs {
        let pooled = generate(pool_bytes, mixed)?;
        for ((name, _), (p, a)) in requests.iter().zip(pooled.iter().zip(&alone)) {
            // A run that stopped early counts its missing tokens as different.
            let same = p.iter().zip(a).take_while(|(x, y)| x == y).count();
            rows.push((format!("{name}, {run}"), p.len().max(a.len()), same));
        }
    }
    Some(rows)
}
