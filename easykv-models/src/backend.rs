//! The backend decision, made once when a model is loaded: which fast paths exist for its
//! tensors. Everything below (the ops layer, the cache's kernels) reads this profile; nothing
//! else asks the backend what it is.

use std::str::FromStr;

use burn::tensor::backend::Backend;
use easykv_core::{CacheKernels, Memory};

use crate::gpu_kernels::Tuning;

/// easykv's fused GPU kernels, by the names `--kernels` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kernel {
    /// Exact f32 products (burn's CUDA f32 products run as TF32).
    Matmul,
    /// Products of a few rows (prefill strides) on tensor cores.
    Rows,
    /// Compacting keys and values after an eviction (and listing kept slots).
    Gather,
    /// Writing a prefill chunk's attention statistics into the cache's rows.
    Observe,
    RmsNorm,
    Softmax,
    Swiglu,
    /// Splitting q|k|v, rotating q and k, and writing k and v into the cache.
    SplitRope,
    /// One-row products (decode steps) with their norms and epilogues.
    Gemv,
    /// Decode-step attention over the cache's buffers in place.
    Attention,
    /// Ranking slots for eviction.
    Rank,
}

impl Kernel {
    pub const ALL: [Kernel; 11] = [
        Kernel::Matmul,
        Kernel::Rows,
        Kernel::Gather,
        Kernel::Observe,
        Kernel::RmsNorm,
        Kernel::Softmax,
        Kernel::Swiglu,
        Kernel::SplitRope,
        Kernel::Gemv,
        Kernel::Attention,
        Kernel::Rank,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Matmul => "matmul",
            Kernel::Rows => "rows",
            Kernel::Gather => "gather",
            Kernel::Observe => "observe",
            Kernel::RmsNorm => "rms_norm",
            Kernel::Softmax => "softmax",
            Kernel::Swiglu => "swiglu",
            Kernel::SplitRope => "split_rope",
            Kernel::Gemv => "gemv",
            Kernel::Attention => "attention",
            Kernel::Rank => "rank",
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl FromStr for Kernel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Kernel::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Kernel::ALL.iter().map(|k| k.name()).collect();
            format!("unknown kernel '{s}' (valid: {})", names.join(", "))
        })
    }
}

/// Which kernels may run: all by default; `--kernels` narrows it for comparisons on one build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSet(u32);

impl KernelSet {
    pub const ALL: KernelSet = KernelSet((1 << Kernel::ALL.len()) - 1);
    pub const NONE: KernelSet = KernelSet(0);

    pub fn only(kernels: &[Kernel]) -> Self {
        KernelSet(kernels.iter().fold(0, |m, k| m | k.bit()))
    }

    pub fn allows(self, kernel: Kernel) -> bool {
        self.0 & kernel.bit() != 0
    }

    pub fn without(self, kernel: Kernel) -> Self {
        KernelSet(self.0 & !kernel.bit())
    }

    pub fn with(self, kernel: Kernel) -> Self {
        KernelSet(self.0 | kernel.bit())
    }

    /// The kernels on, by name.
    pub fn names(self) -> Vec<&'static str> {
        Kernel::ALL
            .into_iter()
            .filter(|k| self.allows(*k))
            .map(Kernel::name)
            .collect()
    }
}

impl Default for KernelSet {
    fn default() -> Self {
        Self::ALL
    }
}

impl FromStr for KernelSet {
    type Err = String;

    /// `all`, `none`, `a,b` (only those) or `-a,-b` (all but those).
    fn from_str(s: &str) -> Result<Self, String> {
        let names = |list: &str| {
            list.split(',')
                .map(|n| n.trim().trim_start_matches('-').parse::<Kernel>())
                .collect::<Result<Vec<_>, _>>()
        };
        match s.trim() {
            "" | "all" => Ok(Self::ALL),
            "none" | "off" => Ok(Self::NONE),
            list if list.starts_with('-') => Ok(names(list)?.into_iter().fold(Self::ALL, Self::without)),
            list => Ok(Self::only(&names(list)?)),
        }
    }
}

/// What the backend of a loaded model offers: decided once by [`BackendProfile::detect`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackendProfile {
    /// Where tensors live: in host memory the host kernels work on their bytes.
    pub memory: Memory,
    /// Whether the tensors are burn's unfused CubeCL tensors of a runtime this build has
    /// kernels for (`--device cuda`, `wgpu-cpu`).
    pub cube_kernels: bool,
    /// Whether half-precision matrix products are native (GPUs): the residual stream then
    /// stays in the weights' precision and prefill chunks multiply in it; elsewhere products
    /// of many rows widen to f32 (flex's f16 products made CPU prefill 30 % slower).
    pub half_products: bool,
    /// The kernels allowed to run (all unless narrowed for a comparison).
    pub kernels: KernelSet,
    /// Launch shapes of the kernels that have more than one sensible choice.
    pub tuning: Tuning,
}

impl BackendProfile {
    /// The profile of backend `B` on `device`: the one place that asks a backend what it is.
    pub fn detect<B: Backend>(device: &B::Device) -> Self {
        let name = B::name(device);
        let memory = if name == "flex" {
            Memory::Host
        } else if name.contains("cubecl") {
            Memory::Gpu
        } else {
            Memory::Other
        };
        Self {
            memory,
            cube_kernels: crate::ops::cube_backend::<B>(),
            half_products: memory == Memory::Gpu,
            kernels: KernelSet::ALL,
            tuning: Tuning::default(),
        }
    }

    /// A profile for host tensors (flex), without GPU kernels.
    pub fn host() -> Self {
        Self {
            memory: Memory::Host,
            cube_kernels: false,
            half_products: false,
            kernels: KernelSet::ALL,
            tuning: Tuning::default(),
        }
    }

    pub fn host_resident(&self) -> bool {
        self.memory == Memory::Host
    }

    /// Whether `kernel` runs on this backend (it may still decline a shape or dtype).
    pub fn runs(&self, kernel: Kernel) -> bool {
        self.cube_kernels && self.kernels.allows(kernel)
    }

    /// The device functions an evicting cache on this backend may use.
    pub fn cache_kernels<B: Backend>(&self) -> CacheKernels<B> {
        let mut kernels = CacheKernels::plain(self.memory);
        crate::ops::add_cache_kernels(self, &mut kernels);
        kernels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_settings_pick_the_kernels_they_name() {
        let on = |setting: &str, k: Kernel| setting.parse::<KernelSet>().unwrap().allows(k);
        assert!(on("", Kernel::Gemv) && on("all", Kernel::Softmax) && !on("none", Kernel::Gemv));
        assert!(!on("-gemv,-swiglu", Kernel::Gemv) && on("-gemv,-swiglu", Kernel::Softmax));
        assert!(on("gemv, rms_norm", Kernel::RmsNorm) && !on("gemv,rms_norm", Kernel::Swiglu));
        let err = "gemv,fast".parse::<KernelSet>().unwrap_err();
        assert!(err.contains("unknown kernel 'fast'"), "{err}");
        assert_eq!(KernelSet::ALL.names().len(), Kernel::ALL.len());
    }

    #[test]
    fn flex_is_host_memory_without_gpu_kernels() {
        let p = BackendProfile::detect::<burn::backend::Flex>(&Default::default());
        assert_eq!(p, BackendProfile::host());
        assert!(!p.runs(Kernel::Gemv));
        assert!(p.cache_kernels::<burn::backend::Flex>().host_resident());
    }
}
