//! How long each kernel takes on the device at Llama-2-7B decode shapes, and how close it
//! comes to the memory bandwidth: what `easykv check-kernels --time` prints. Launches are
//! queued back to back and the device synchronized once, so a figure is the device's time per
//! launch when the host keeps up (and the host's, when it does not: the smallest kernels show
//! that limit).

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::{DType, Distribution};

use super::{launch, GemvEpilogue, GemvNorm, Tuning};

/// One kernel at one shape.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelTiming {
    pub kernel: String,
    pub shape: String,
    /// The launch shapes used.
    pub tuning: Option<Tuning>,
    pub micros_per_launch: f64,
    /// Bytes the kernel must move ÷ its time; `None` where that is not the point.
    pub gigabytes_per_second: Option<f64>,
}

/// Mean time of `reps` back-to-back runs of `f` (after one untimed run), in µs.
fn time<B: Backend, T>(device: &B::Device, reps: usize, mut f: impl FnMut() -> T) -> f64 {
    let sync = || {
        let _ = B::sync(device);
    };
    drop(f());
    sync();
    let start = Instant::now();
    for _ in 0..reps {
        drop(f());
    }
    sync();
    start.elapsed().as_secs_f64() * 1e6 / reps as f64
}

fn random<B: Backend, const D: usize>(shape: [usize; D], dtype: DType, device: &B::Device) -> Tensor<B, D> {
    Tensor::<B, D>::random(shape, Distribution::Normal(0.0, 0.02), device).cast(dtype)
}

/// Times the decode kernels in `dtype` at the 7B shape (hidden 4096, 32 heads of 128,
/// intermediate 11008, vocabulary 32000); caches of `slots` slots.
pub fn time_kernels<B: Backend>(dtype: DType, slots: &[usize], device: &B::Device) -> Vec<KernelTiming> {
    let mut out = Vec::new();
    let reps = 50;
    // The launch shape the kernels below run with, set per variant timed.
    let current = std::cell::Cell::new(Tuning::default());
    let bytes = dtype.size() as f64;
    let mut push = |kernel: &str, shape: String, tuning: Option<Tuning>, micros: f64, moved: Option<f64>| {
        out.push(KernelTiming {
            kernel: kernel.to_string(),
            shape,
            tuning,
            micros_per_launch: micros,
            gigabytes_per_second: moved.map(|b| b / micros / 1e3),
        })
    };

    // The host's cost of one launch: a kernel with almost nothing to do.
    let tiny = random::<B, 2>([1, 64], dtype, device);
    let gamma = random::<B, 1>([64], DType::F32, device);
    if launch::rms_norm(tiny.clone(), &gamma, 1e-5).is_ok() {
        let us = time::<B, _>(device, 500, || launch::rms_norm(tiny.clone(), &gamma, 1e-5));
        push("rms_norm (64 values: launch cost)", "[1, 64]".into(), None, us, None);
    }
    // Bandwidth burn's element-wise kernels reach (reads two, writes one).
    let big = random::<B, 1>([64 << 20], dtype, device);
    let us = time::<B, _>(device, 20, || big.clone() + big.clone());
    push(
        "burn add",
        "[64 Mi]".into(),
        None,
        us,
        Some(3.0 * (64 << 20) as f64 * bytes),
    );

    // The decode step's products: (name, rows, cols, epilogue).
    let shapes = [
        ("qkv", 12288usize, 4096usize, 0u8),
        ("o + residual", 4096, 4096, 1),
        ("gate_up + swiglu", 22016, 4096, 2),
        ("down + residual", 4096, 11008, 1),
        ("lm head", 32000, 4096, 0),
    ];
    let variants = [(8, false), (8, true), (4, true), (2, true), (4, false)];
    for (name, rows, cols, epilogue) in shapes {
        let w = random::<B, 2>([rows, cols], dtype, device);
        let x = random::<B, 2>([1, cols], dtype, device);
        let out_rows = if epilogue == 2 { rows / 2 } else { rows };
        let residual = random::<B, 2>([1, out_rows], dtype, device);
        let run = || {
            let e = match epilogue {
                1 => GemvEpilogue::AddResidual(&residual),
                2 => GemvEpilogue::Swiglu,
                _ => GemvEpilogue::Plain,
            };
            launch::gemv(x.clone(), &w, e, &current.get())
        };
        let moved = Some((rows * cols) as f64 * bytes);
        // Every launch shape of `kernel` (stops at the first it declines).
        let mut each_shape =
            |label: String, norm: GemvNorm, kernel: &dyn Fn() -> Result<Tensor<B, 2>, Tensor<B, 2>>| {
                for (rows_per_cube, plane) in variants {
                    let tuning = Tuning {
                        gemv_rows_per_cube: rows_per_cube,
                        gemv_plane_reduce: plane,
                        gemv_norm: norm,
                        ..Tuning::default()
                    };
                    current.set(tuning);
                    if kernel().is_err() {
                        break;
                    }
                    let us = time::<B, _>(device, reps, kernel);
                    push(&label, format!("[{rows}, {cols}]"), Some(tuning), us, moved);
                }
                current.set(Tuning::default());
            };
        each_shape(format!("gemv {name}"), GemvNorm::Inline, &run);
        // The residual products also write their output times the next norm's γ.
        if epilogue == 1 {
            let gamma = random::<B, 1>([out_rows], DType::F32, device);
            let scaling = || {
                launch::gemv_scaling(
                    x.clone(),
                    &w,
                    GemvEpilogue::AddResidual(&residual),
                    &gamma,
                    &current.get(),
                )
                .map(|(y, _)| y)
            };
            each_shape(format!("gemv scaling {name}"), GemvNorm::Inline, &scaling);
        }
        // With the RMS norm inside (the decode step's qkv and gate_up products).
        if epilogue != 1 && cols == 4096 {
            let gamma = random::<B, 1>([cols], DType::F32, device);
            let x_scaled = x.clone().cast(DType::F32).mul(gamma.clone().unsqueeze()).cast(dtype);
            let e = || match epilogue {
                2 => GemvEpilogue::Swiglu,
                _ => GemvEpilogue::Plain,
            };
            let inline = || launch::gemv_prescaled(x.clone(), &x_scaled, 1e-5, &w, e(), &current.get());
            each_shape(format!("gemv normed {name}"), GemvNorm::Inline, &inline);
            let staged = || launch::gemv_normed(x.clone(), &gamma, 1e-5, &w, e(), &current.get());
            each_shape(format!("gemv normed (staged) {name}"), GemvNorm::Staged, &staged);
            // The norm as a launch of its own, then the plain product.
            let apart =
                || launch::rms_norm(x.clone(), &gamma, 1e-5).and_then(|xn| launch::gemv(xn, &w, e(), &current.get()));
            if apart().is_ok() {
                let us = time::<B, _>(device, reps, apart);
                push(
                    &format!("norm, then gemv {name}"),
                    format!("[{rows}, {cols}]"),
                    None,
                    us,
                    moved,
                );
            }
        }
        // burn's own product for comparison (its autotuned matmul).
        let wt = w.clone().transpose();
        let us = time::<B, _>(device, reps, || x.clone().matmul(wt.clone()));
        push(
            &format!("burn matmul {name}"),
            format!("[{rows}, {cols}]"),
            None,
            us,
            moved,
        );
    }

    // Few-row products on tensor cores, per kernel and launch shape, against burn's: 16 rows
    // (a decode step of 16 sequences) and 64 (a prefill stride).
    let products = [
        ("qkv", 12288usize, 4096usize, 0u8),
        ("o + residual", 4096, 4096, 1),
        ("gate_up + swiglu", 22016, 4096, 2),
        ("down + residual", 4096, 11008, 1),
        ("lm_head", 32000, 4096, 0),
    ];
    // (planes, unroll, column blocks, planes per cube, staged); the staged kernel ignores
    // unroll and column blocks (32 columns and 64 inputs per plane and step).
    let shapes = [
        (2048, 4, 2, 4, false),
        (4096, 4, 2, 4, false),
        (2048, 8, 2, 4, false),
        (1024, 4, 2, 4, true),
        (2048, 4, 2, 4, true),
        (4096, 4, 2, 4, true),
        (2048, 4, 2, 2, true),
        (2048, 4, 2, 8, true),
    ];
    for rows in [16usize, super::MATMUL_ROWS_MAX] {
        for (name, w_rows, cols, epilogue) in products {
            let w = random::<B, 2>([w_rows, cols], dtype, device);
            let x = random::<B, 2>([rows, cols], dtype, device);
            let out_cols = if epilogue == 2 { w_rows / 2 } else { w_rows };
            let residual = random::<B, 2>([rows, out_cols], dtype, device);
            let moved = Some((w_rows * cols) as f64 * bytes);
            let run = || {
                let e = match epilogue {
                    1 => GemvEpilogue::AddResidual(&residual),
                    2 => GemvEpilogue::Swiglu,
                    _ => GemvEpilogue::Plain,
                };
                launch::matmul_rows(x.clone(), &w, e, &current.get())
            };
            for (planes, unroll, col_blocks, per_cube, staged) in shapes {
                let tuning = Tuning {
                    rows_planes: planes,
                    rows_unroll: unroll,
                    rows_col_blocks: col_blocks,
                    rows_planes_per_cube: per_cube,
                    rows_staged: staged,
                    // Timed at every width, including those burn's products take by default.
                    rows_max_out: u32::MAX,
                    ..Tuning::default()
                };
                current.set(tuning);
                if run().is_err() {
                    break;
                }
                let us = time::<B, _>(device, reps, run);
                let kind = if staged { "rows staged" } else { "rows" };
                push(
                    &format!("{kind} {name}"),
                    format!("{rows} × [{w_rows}, {cols}]"),
                    Some(tuning),
                    us,
                    moved,
                );
            }
            current.set(Tuning::default());
            let wt = w.clone().transpose();
            let us = time::<B, _>(device, reps, || x.clone().matmul(wt.clone()));
            push(
                &format!("burn matmul {name}"),
                format!("{rows} × [{w_rows}, {cols}]"),
                None,
                us,
                moved,
            );
        }
    }

    // A decode step's attention for 16 sequences of a pool, ~4,224 slots each (the engine's
    // full cache at 16 in flight), in one launch pair.
    {
        let (seqs, heads, d, each) = (16usize, 32usize, 128usize, 4224usize);
        let pool_slots = seqs * 4352;
        let keys = random::<B, 4>([1, heads, pool_slots, d], dtype, device);
        let values = random::<B, 4>([1, heads, pool_slots, d], dtype, device);
        let q = random::<B, 4>([seqs, heads, 1, d], dtype, device);
        // Starts then lengths, lengths spread around `each` as a running batch's are.
        let lens: Vec<usize> = (0..seqs).map(|i| each - 64 + 8 * i).collect();
        let table: Vec<i32> = (0..seqs)
            .map(|i| (i * 4352) as i32)
            .chain(lens.iter().map(|&l| l as i32))
            .collect();
        let table = Tensor::<B, 1, Int>::from_data(burn::tensor::TensorData::new(table, [2 * seqs]), device);
        let rows = super::PoolRows {
            table: &table,
            starts_at: 0,
            lens_at: seqs,
            longest: lens.iter().copied().max().unwrap_or(each),
        };
        if launch::decode_attention_pool(q.clone(), &keys, &values, &rows, None).is_ok() {
            let us = time::<B, _>(device, reps, || {
                launch::decode_attention_pool(q.clone(), &keys, &values, &rows, None)
            });
            let moved = (2 * heads * lens.iter().sum::<usize>() * d) as f64 * bytes;
            push(
                "decode attention, pool",
                format!("{seqs} sequences × {heads} heads × ~{each} slots"),
                None,
                us,
                Some(moved),
            );
        }
    }

    // Decode attention over a cache of capacity 4352 (32 heads of 128).
    let (heads, d, capacity) = (32usize, 128usize, 4352usize);
    let keys = random::<B, 4>([1, heads, capacity, d], dtype, device);
    let values = random::<B, 4>([1, heads, capacity, d], dtype, device);
    let q = random::<B, 4>([1, heads, 1, d], dtype, device);
    for &n in slots {
        let kv_bytes = Some((heads * n * d) as f64 * bytes);
        let Ok(scores) = launch::attention_scores(q.clone(), &keys, n) else {
            break;
        };
        let us = time::<B, _>(device, reps, || launch::attention_scores(q.clone(), &keys, n));
        push(
            "attention scores",
            format!("{heads} heads × {n} slots"),
            None,
            us,
            kv_bytes,
        );
        let us = time::<B, _>(device, reps, || {
            launch::softmax_rows(scores.clone(), None, None, dtype, true)
        });
        push("softmax", format!("{heads} heads × {n} slots"), None, us, None);
        let Ok((_, probs)) = launch::softmax_rows(scores, None, None, dtype, true) else {
            break;
        };
        for splits in [1u32, 4, 8, 16, 0] {
            let tuning = Tuning {
                value_splits: splits,
                ..Tuning::default()
            };
            current.set(tuning);
            let us = time::<B, _>(device, reps, || {
                launch::attention_values(probs.clone(), &values, n, &current.get())
            });
            push(
                "attention values",
                format!("{heads} heads × {n} slots"),
                Some(tuning),
                us,
                kv_bytes,
            );
        }
        current.set(Tuning::default());
        let us = time::<B, _>(device, reps, || launch::decode_attention(q.clone(), &keys, &values, n));
        let both = (2 * heads * n * d) as f64 * bytes;
        push(
            "decode attention (one pass)",
            format!("{heads} heads × {n} slots"),
            None,
            us,
            Some(both),
        );
    }

    // Eviction's ranking: every head of every layer (32 × 32 rows) at once.
    for &n in slots {
        let stats = Tensor::<B, 3>::random([32, 32, n], Distribution::Uniform(0.0, 1.0), device);
        if launch::row_ranks(stats.clone()).is_err() {
            break;
        }
        let us = time::<B, _>(device, 5, || launch::row_ranks(stats.clone()));
        push("rank", format!("32 × 32 rows × {n} slots"), None, us, None);
    }
    out
}

/// One operation of a prefill chunk at one shape, with the arithmetic rate it reached.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrefillTiming {
    pub operation: String,
    pub shape: String,
    pub micros: f64,
    /// Floating-point operations ÷ time; `None` for operations that only move bytes.
    pub teraflops_per_second: Option<f64>,
    /// Bytes the operation must move ÷ time.
    pub gigabytes_per_second: Option<f64>,
}

/// Times one 7B-shape layer's prefill operations on a chunk of `rows` tokens attending over
/// as many slots (a whole prompt in one chunk): the weights' products as the model runs them
/// (`x·Wᵀ` with `W` stored `[out, in]`) and with `W` stored transposed, attention's scores,
/// softmax and values as the model runs them (the probabilities written out, what the cache
/// observes summed), and burn's fused attention where the backend has one.
pub fn time_prefill<B: Backend>(dtype: DType, rows: usize, device: &B::Device) -> Vec<PrefillTiming> {
    let mut out = Vec::new();
    let reps = 10;
    let bytes = dtype.size() as f64;
    let mut push = |operation: &str, shape: String, micros: f64, flops: Option<f64>, moved: Option<f64>| {
        out.push(PrefillTiming {
            operation: operation.to_string(),
            shape,
            micros,
            teraflops_per_second: flops.map(|f| f / micros / 1e6),
            gigabytes_per_second: moved.map(|b| b / micros / 1e3),
        })
    };
    let products = [
        ("qkv", 12288usize, 4096usize),
        ("o", 4096, 4096),
        ("gate_up", 22016, 4096),
        ("down", 4096, 11008),
    ];
    for (name, w_rows, cols) in products {
        let x = random::<B, 2>([rows, cols], dtype, device);
        let w = random::<B, 2>([w_rows, cols], dtype, device);
        let flops = Some(2.0 * (rows * w_rows * cols) as f64);
        let shape = format!("{rows} × [{w_rows}, {cols}]");
        let wt = w.clone().transpose();
        let us = time::<B, _>(device, reps, || x.clone().matmul(wt.clone()));
        push(&format!("matmul {name}, W [out, in]"), shape.clone(), us, flops, None);
        // The operands swapped: `W·xᵀ`, `[out, rows]` (its transpose is the product).
        let xt = x.clone().transpose();
        let us = time::<B, _>(device, reps, || w.clone().matmul(xt.clone()));
        push(&format!("matmul {name}, W·xᵀ"), shape.clone(), us, flops, None);
        let w_in_out = random::<B, 2>([cols, w_rows], dtype, device);
        let us = time::<B, _>(device, reps, || x.clone().matmul(w_in_out.clone()));
        push(&format!("matmul {name}, W [in, out]"), shape, us, flops, None);
    }

    // Attention of 32 heads of 128 over a cache buffer of `rows` + 256 slots, `rows` in use.
    let (heads, d) = (32usize, 128usize);
    let capacity = rows + 256;
    let q = random::<B, 4>([1, heads, rows, d], dtype, device);
    let keys = random::<B, 4>([1, heads, capacity, d], dtype, device);
    let values = random::<B, 4>([1, heads, capacity, d], dtype, device);
    let k_used = keys.clone().slice_dim(2, 0..rows);
    let v_used = values.clone().slice_dim(2, 0..rows);
    let square = (heads * rows * rows) as f64;
    let shape = format!("{heads} heads × {rows} × {rows}");
    let scores_of = || q.clone().matmul(k_used.clone().swap_dims(2, 3));
    let us = time::<B, _>(device, reps, scores_of);
    push(
        "scores q·Kᵀ (burn matmul)",
        shape.clone(),
        us,
        Some(2.0 * square * d as f64),
        None,
    );
    // The chunk's causal mask as the model hands it to the kernel: `[1, 1, s, n]`, its rows
    // read for every head.
    // True past the diagonal (burn's lower-triangle mask marks what lies outside it).
    let future = Tensor::<B, 2, Bool>::tril_mask([rows, rows], 0, device);
    let causal = Tensor::<B, 2>::zeros([rows, rows], device)
        .mask_fill(future, f32::NEG_INFINITY)
        .reshape([1, 1, rows, rows]);
    let scores = scores_of();
    for observed in [false, true] {
        let softmax = || launch::softmax_rows(scores.clone(), Some(&causal), None, dtype, observed);
        if softmax().is_ok() {
            let us = time::<B, _>(device, reps, softmax);
            // Scores read, probabilities written (in f32 too where observed).
            let moved = square * (2.0 * bytes + if observed { 4.0 } else { 0.0 });
            let what = match observed {
                true => "softmax + mask, f32 kept (kernel)",
                false => "softmax + mask (kernel)",
            };
            push(what, shape.clone(), us, None, Some(moved));
        }
    }
    let (probs, product_probs) = match launch::softmax_rows(scores.clone(), Some(&causal), None, dtype, true) {
        Ok((Some(p), q)) => (p, q),
        _ => {
            let full = causal.clone().repeat_dim(1, heads);
            let p = burn::tensor::activation::softmax(scores.clone().cast(DType::F32) + full, 3);
            (p.clone(), p.cast(dtype))
        }
    };
    let us = time::<B, _>(device, reps, || probs.clone().sum_dim(2));
    push(
        "observe: sum over queries (burn)",
        shape.clone(),
        us,
        None,
        Some(square * 4.0),
    );
    let us = time::<B, _>(device, reps, || product_probs.clone().matmul(v_used.clone()));
    push(
        "values P·V (burn matmul)",
        shape.clone(),
        us,
        Some(2.0 * square * d as f64),
        None,
    );
    // burn's fused attention (flash attention on cubecl backends), causal, nothing observed.
    let (qc, kc, vc) = (
        random::<B, 4>([1, heads, rows, d], dtype, device),
        random::<B, 4>([1, heads, rows, d], dtype, device),
        random::<B, 4>([1, heads, rows, d], dtype, device),
    );
    let options = burn::tensor::ops::AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    let fused = || burn::tensor::module::attention(qc.clone(), kc.clone(), vc.clone(), None, None, options);
    let us = time::<B, _>(device, reps, fused);
    push(
        "burn attention (fused, causal)",
        shape,
        us,
        Some(2.0 * square * d as f64),
        None,
    );
    out
}
