//! `--device` → a concrete burn backend. Every command body is generic over `B: Backend`.

use crate::common::{CliError, CliResult};

/// Calls `$body::<B>(device)` with the backend named by `$spec`.
macro_rules! with_backend {
    ($spec:expr, $run:ident ( $($arg:expr),* )) => {{
        match $crate::backend::parse_device($spec)? {
            $crate::backend::DeviceSpec::Cpu => $run::<burn::backend::Flex>(&Default::default(), $($arg),*),
            #[cfg(feature = "cuda")]
            $crate::backend::DeviceSpec::Cuda(i) => {
                $run::<burn::backend::Cuda>(&burn::backend::cuda::CudaDevice::new(i), $($arg),*)
            }
            #[cfg(feature = "wgpu")]
            $crate::backend::DeviceSpec::Wgpu(i) => {
                $run::<burn::backend::Wgpu>(&burn::backend::wgpu::WgpuDevice::DiscreteGpu(i), $($arg),*)
            }
        }
    }};
}
pub(crate) use with_backend;

/// A parsed `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(usize),
    #[cfg(feature = "wgpu")]
    Wgpu(usize),
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
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(DeviceSpec::Wgpu(index)),
        #[cfg(not(feature = "cuda"))]
        "cuda" => Err(CliError(format!(
            "device '{spec}' needs a build with `--features cuda` (this build lacks it)"
        ))),
        #[cfg(not(feature = "wgpu"))]
        "wgpu" => Err(CliError(format!(
            "device '{spec}' needs a build with `--features wgpu` (this build lacks it)"
        ))),
        _ => Err(CliError(format!(
            "unknown device '{spec}' (expected cpu, cuda[:N] or wgpu[:N])"
        ))),
    }
}
