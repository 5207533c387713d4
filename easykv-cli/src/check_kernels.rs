//! `easykv check-kernels`: the fused GPU kernels against the burn operations they replace.

use clap::Args;

use easykv_models::linear::WeightDType;

use crate::common::CliResult;

#[derive(Args, Debug)]
pub struct CheckKernelsArgs {
    /// cuda[:N] (the kernels run on burn's unfused CUDA backend), or wgpu-cpu (unfused wgpu on a
    /// CPU Vulkan driver, to test them without a GPU); elsewhere every kernel declines.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Precisions to check, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "f32,f16")]
    pub dtype: Vec<WeightDType>,
    /// Random-weight model shapes run end to end with each kernel alone and all together,
    /// against burn's operations (logits over a prefill and three decode steps), and through
    /// the batched engine with a KV pool against the engine without one (greedy tokens of
    /// requests evicting while they decode).
    #[arg(long, value_delimiter = ',', default_value = "smollm2,qwen2.5-1.5b")]
    pub models: Vec<String>,
    #[arg(long)]
    pub json: bool,
    /// Every case's largest difference and where it is (always shown for a failing kernel).
    #[arg(long, short)]
    pub verbose: bool,
    /// Instead of checking: time each kernel at Llama-2-7B decode shapes (launch shapes
    /// compared, burn's operations alongside) and report the bandwidth reached.
    #[arg(long)]
    pub time: bool,
    /// Cache lengths the attention and ranking kernels are timed at (with `--time`).
    #[arg(long, value_delimiter = ',', default_value = "2112,4112")]
    pub slots: Vec<usize>,
    /// With `--time`: time one 7B-shape layer's prefill operations on a chunk of this many
    /// tokens instead (products, attention's parts, burn's fused attention) and report the
    /// arithmetic rate reached.
    #[arg(long, requires = "time", value_parser = clap::value_parser!(u32).range(1..=8192))]
    pub prefill: Option<u32>,
}

pub fn run(args: CheckKernelsArgs) -> CliResult {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    return {
        use gpu::run_on;
        let device = args.device.clone();
        crate::backend::with_backend!(&device, run_on(&args))
    };
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = args;
        Err(crate::common::CliError(
            "check-kernels needs a build with `--features cuda` or `--features wgpu` (this build has no GPU kernels)"
                .into(),
        ))
    }
}

/// The checks and timings, in builds that have the kernels.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod gpu {
    use burn::prelude::*;
    use easykv_models::gpu_kernels::{check_engine, check_kernels, check_model, time_kernels, time_prefill};
    use easykv_models::linear::WeightDType;

    use super::CheckKernelsArgs;
    use crate::common::{outln, CliError, CliResult};

    pub(super) fn run_on<B: Backend>(device: &B::Device, args: &CheckKernelsArgs) -> CliResult {
        if args.time {
            return time_on::<B>(device, args);
        }
        let mut failed = Vec::new();
        let (mut kernel_json, mut model_json) = (Vec::new(), Vec::new());
        let mut rows = Vec::new();
        for dtype in &args.dtype {
            for check in check_kernels::<B>(dtype.dtype(), device) {
                if !check.passed() {
                    failed.push(format!("{} ({dtype:?})", check.kernel));
                }
                rows.push((*dtype, check));
            }
        }
        if args.json {
            let json: Vec<_> = rows
                .iter()
                .map(|(dtype, c)| serde_json::json!({"dtype": dtype, "kernel": c.kernel, "max_abs_diff": c.max_abs_diff, "tolerance": c.tolerance, "passed": c.passed(), "cases": c.cases}))
                .collect();
            kernel_json = json;
        } else {
            outln!(
                "{:<6} {:<16} {:>14} {:>10}",
                "dtype",
                "kernel",
                "max |diff|",
                "tolerance"
            )?;
            for (dtype, check) in &rows {
                let diff = check
                    .max_abs_diff
                    .map_or("declined".to_string(), |d| format!("{d:.3e}"));
                let kernel = check.kernel;
                let dtype = format!("{dtype:?}").to_lowercase();
                outln!("{dtype:<6} {kernel:<16} {diff:>14} {:>10.1e}", check.tolerance)?;
                if !check.passed() || args.verbose {
                    for case in &check.cases {
                        outln!("       {case}")?;
                    }
                }
            }
        }
        // Whole models: logits of kernels against burn's operations, relative to the logits' scale.
        let tolerance = |dtype: &WeightDType| if *dtype == WeightDType::F32 { 1e-3 } else { 5e-2 };
        for shape in args.models.iter().filter(|m| !m.is_empty()) {
            for dtype in &args.dtype {
                for (setting, diff) in check_model::<B>(shape, *dtype, device) {
                    let ok = diff.is_some_and(|d| d <= tolerance(dtype));
                    if !ok {
                        failed.push(format!("{shape} with {setting} ({dtype:?})"));
                    }
                    let diff = diff.map_or("failed to run".to_string(), |d| format!("{d:.3e}"));
                    let dtype = format!("{dtype:?}").to_lowercase();
                    if args.json {
                        model_json.push(serde_json::json!({"model": shape, "dtype": dtype, "kernels": setting, "max_logit_diff": diff, "passed": ok}));
                    } else {
                        outln!("{dtype:<6} {shape} with {setting:<12} logits max |diff| {diff}")?;
                    }
                }
            }
        }
        // The batched engine with a KV pool (sequences attended together, evicting caches
        // observing that launch) against the engine without one: the same greedy tokens in
        // f32; half precision's count of equal tokens is reported.
        let mut engine_json = Vec::new();
        for shape in args.models.iter().filter(|m| !m.is_empty()) {
            for dtype in &args.dtype {
                let name = format!("{dtype:?}").to_lowercase();
                let Some(rows) = check_engine::<B>(shape, *dtype, device) else {
                    failed.push(format!("{shape} engine ({dtype:?}): failed to run"));
                    outln!("{name:<6} {shape} engine        failed to run")?;
                    continue;
                };
                for (setting, tokens, equal) in rows {
                    if *dtype == WeightDType::F32 && equal < tokens {
                        failed.push(format!("{shape} engine {setting} ({dtype:?})"));
                    }
                    if args.json {
                        engine_json.push(serde_json::json!({"model": shape, "dtype": name, "request": setting, "tokens": tokens, "equal_to_reference": equal}));
                    } else {
                        outln!("{name:<6} {shape} engine, {setting:<44} {tokens} tokens, {equal} equal to the reference run's (no pool, separate passes)")?;
                    }
                }
            }
        }
        if args.json {
            outln!(
                "{}",
                serde_json::json!({"kernels": kernel_json, "models": model_json, "engine": engine_json})
            )?;
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(CliError(format!("kernels off tolerance: {}", failed.join(", "))))
        }
    }

    fn time_on<B: Backend>(device: &B::Device, args: &CheckKernelsArgs) -> CliResult {
        if args.slots.iter().any(|&n| n == 0 || n > 4352) {
            return Err(CliError("--slots: each between 1 and 4352".into()));
        }
        if let Some(rows) = args.prefill {
            return time_prefill_on::<B>(device, args, rows as usize);
        }
        for dtype in &args.dtype {
            let timings = time_kernels::<B>(dtype.dtype(), &args.slots, device);
            if args.json {
                outln!("{}", serde_json::json!({"dtype": dtype, "timings": timings}))?;
                continue;
            }
            outln!(
                "{:<6} {:<40} {:<24} {:<36} {:>10} {:>9}",
                "dtype",
                "kernel",
                "shape",
                "launch shape",
                "µs",
                "GB/s"
            )?;
            for t in timings {
                let tuning = t.tuning.map_or(String::new(), |u| match t.kernel.starts_with("rows ") {
                    true => format!(
                        "planes {} unroll {} cols {} per cube {}",
                        u.rows_planes,
                        u.rows_unroll,
                        16 * u.rows_col_blocks,
                        u.rows_planes_per_cube
                    ),
                    false => format!(
                        "rows {} plane {} splits {}",
                        u.gemv_rows_per_cube,
                        u8::from(u.gemv_plane_reduce),
                        u.value_splits
                    ),
                });
                let gbs = t.gigabytes_per_second.map_or(String::new(), |g| format!("{g:.0}"));
                let dt = format!("{dtype:?}").to_lowercase();
                outln!(
                    "{dt:<6} {:<40} {:<24} {tuning:<36} {:>10.1} {gbs:>9}",
                    t.kernel,
                    t.shape,
                    t.micros_per_launch
                )?;
            }
        }
        Ok(())
    }

    fn time_prefill_on<B: Backend>(device: &B::Device, args: &CheckKernelsArgs, rows: usize) -> CliResult {
        for dtype in &args.dtype {
            let timings = time_prefill::<B>(dtype.dtype(), rows, device);
            if args.json {
                outln!("{}", serde_json::json!({"dtype": dtype, "prefill": timings}))?;
                continue;
            }
            outln!(
                "{:<6} {:<36} {:<28} {:>10} {:>9} {:>7}",
                "dtype",
                "operation",
                "shape",
                "µs",
                "TFLOP/s",
                "GB/s"
            )?;
            let dt = format!("{dtype:?}").to_lowercase();
            for t in timings {
                let tf = t.teraflops_per_second.map_or(String::new(), |f| format!("{f:.1}"));
                let gbs = t.gigabytes_per_second.map_or(String::new(), |g| format!("{g:.0}"));
                outln!(
                    "{dt:<6} {:<36} {:<28} {:>10.1} {tf:>9} {gbs:>7}",
                    t.operation,
                    t.shape,
                    t.micros
                )?;
            }
        }
        Ok(())
    }
}
