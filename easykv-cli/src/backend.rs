//! `--device` → a concrete burn backend. Every command body is generic over `B: Backend`.

use crate::common::{CliError, CliResult};

/// Calls `$body::<B>(device)` with the backend named by `$spec`.
macro_rules! with_backend {
    ($spec:expr, $run:ident ( $($arg:expr),* )) => {{
        match $crate::backend::parse_device($spec)? {
            $crate::backend::DeviceSpec::Cpu => $run::<burn::backend::Flex>(&Default::default(), $($arg),*),
            #[cfg(feature = "cuda")]
            $crate::backend::DeviceSpec::Cuda(i) => {
                $crate::backend::keep_kernels_on_disk();
                $crate::backend::without_panics($spec, || {
                    $run::<$crate::backend::Cuda>(&burn::backend::cuda::CudaDevice::new(i), $($arg),*)
                })
            }
            #[cfg(feature = "cuda")]
            $crate::backend::DeviceSpec::CudaFused(i) => {
                $crate::backend::keep_kernels_on_disk();
                $crate::backend::without_panics($spec, || {
                    $run::<burn::backend::Cuda>(&burn::backend::cuda::CudaDevice::new(i), $($arg),*)
                })
            }
            #[cfg(feature = "wgpu")]
            $crate::backend::DeviceSpec::WgpuCpu => {
                $crate::backend::keep_kernels_on_disk();
                $crate::backend::without_panics($spec, || {
                    $run::<$crate::backend::WgpuUnfused>(&burn::backend::wgpu::WgpuDevice::Cpu, $($arg),*)
                })
            }
            #[cfg(feature = "wgpu")]
            $crate::backend::DeviceSpec::Wgpu(i) => {
                $crate::backend::keep_kernels_on_disk();
                $crate::backend::without_panics($spec, || {
                    $run::<burn::backend::Wgpu>(&burn::backend::wgpu::WgpuDevice::DiscreteGpu(i), $($arg),*)
                })
            }
        }
    }};
}
pub(crate) use with_backend;

/// `--device cuda`: burn's CUDA backend without its operation fusion. Every tensor operation
/// is a kernel launch, but none pays fusion's per-operation bookkeeping on the host, which
/// costs more than the launches it saves where easykv spends its time. Measured on an H200
/// (Llama-2-7B shape, f16, 4096-token prompt, in one session): RoCo at budget 0.5 prefilled in
/// 3.15 s and decoded 57.9 tokens/s unfused, 4.21 s and 36.2 tokens/s fused; the full cache
/// decoded at the same speed both ways (50.6 vs 51.8), and only its plain prefill was faster
/// fused (0.44 vs 0.63 s). `--device cuda-fused` keeps the fusion backend.
#[cfg(feature = "cuda")]
pub type Cuda = burn_cubecl::CubeBackend<burn::cubecl::cuda::CudaRuntime, f32, i32, u8>;

/// `--device wgpu-cpu`: burn's wgpu backend without fusion on a CPU Vulkan driver (Mesa's
/// lavapipe): slow, but it runs easykv's fused GPU kernels where no GPU is, to test them.
#[cfg(feature = "wgpu")]
pub type WgpuUnfused = burn_cubecl::CubeBackend<burn::cubecl::wgpu::WgpuRuntime, f32, i32, u32>;

/// A parsed `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(usize),
    #[cfg(feature = "cuda")]
    CudaFused(usize),
    #[cfg(feature = "wgpu")]
    Wgpu(usize),
    #[cfg(feature = "wgpu")]
    WgpuCpu,
}

pub fn parse_device(spec: &str) -> CliResult<DeviceSpec> {
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => {
            let i = i
                .parse::<usize>()
                .map_err(|_| CliError(format!("bad device index in '{spec}'")))?;
            (k, i)
        }
        None => (spec, 0),
    };
    // Only GPU devices take an index; a CPU-only build has none to give it to.
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    let _ = index;
    match kind {
        "cpu" => Ok(DeviceSpec::Cpu),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(DeviceSpec::Cuda(index)),
        #[cfg(feature = "cuda")]
        "cuda-fused" => Ok(DeviceSpec::CudaFused(index)),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(DeviceSpec::Wgpu(index)),
        #[cfg(feature = "wgpu")]
        "wgpu-cpu" => Ok(DeviceSpec::WgpuCpu),
        #[cfg(not(feature = "cuda"))]
        "cuda" | "cuda-fused" => Err(CliError(format!(
            "device '{spec}' needs a build with `--features cuda` (this build lacks it)"
        ))),
        #[cfg(not(feature = "wgpu"))]
        "wgpu" | "wgpu-cpu" => Err(CliError(format!(
            "device '{spec}' needs a build with `--features wgpu` (this build lacks it)"
        ))),
        _ => Err(CliError(format!(
            "unknown device '{spec}' (expected cpu, cuda[:N], cuda-fused[:N], wgpu[:N] or wgpu-cpu)"
        ))),
    }
}

/// GPU kernels are compiled just in time — about a minute of a short run's first calls — and
/// autotuned per shape. Both results are kept under `$EASYKV_HOME/kernels` so that later runs
/// start warm. A `cubecl.toml` (in the working directory or above) that names its own cache
/// locations wins; `CUBECL_*` environment variables apply as usual.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub fn keep_kernels_on_disk() {
    use burn::cubecl::config::cache::CacheConfig;
    use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // One directory per build of easykv's own kernels: cubecl keys its cache by kernel
        // name and types, so a kernel whose code changed would otherwise run its old code.
        let build = format!(
            "{}-{:016x}",
            env!("CARGO_PKG_VERSION"),
            easykv_models::gpu_kernels::SOURCE_FINGERPRINT
        );
        let dir = easykv_models::fetch::easykv_home().join("kernels").join(build);
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if config.compilation.cache.is_none() {
            config.compilation.cache = Some(CacheConfig::File(dir.clone()));
        }
        if matches!(config.autotune.cache, CacheConfig::Target) {
            config.autotune.cache = CacheConfig::File(dir);
        }
        CubeClRuntimeConfig::set(config);
    });
}

/// Runs `body` on a GPU backend, turning a panic inside it or in the backend's own threads (no
/// driver, no device, an out-of-memory) into a one-line error naming the first cause.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub fn without_panics(spec: &str, body: impl FnOnce() -> CliResult) -> CliResult {
    use std::sync::{Arc, Mutex};
    let first: Arc<Mutex<Option<String>>> = Arc::default();
    let seen = first.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut slot) = seen.lock() {
            slot.get_or_insert(crate::common::panic_text(info));
        }
    }));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
    std::panic::set_hook(previous);
    outcome.unwrap_or_else(|_| {
        let cause = first.lock().ok().and_then(|c| c.clone()).unwrap_or_default();
        // Driver messages go on to list every library name tried: keep the first clause.
        let line = cause.lines().next().unwrap_or_default();
        let line = line.split(" - ").next().unwrap_or(line);
        let line: String = match line.char_indices().nth(200) {
            Some((cut, _)) => format!("{}…", &line[..cut]),
            None => line.to_string(),
        };
        Err(CliError(format!("device '{spec}' failed: {line}")))
    })
}
