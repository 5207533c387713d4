//! Fused CUDA kernels for the operations a decode step repeats in every layer.
//!
//! On a GPU every burn tensor operation is a kernel launch, and on burn's CUDA backend each
//! launch costs the host ~12–16 µs: a Llama-2-7B decode step was ~40 launches per layer, bound
//! by the host, not by the GPU. Each function here does in one launch what took several
//! (RMSNorm: 8, softmax with its casts and biases: up to 8, SwiGLU: 5, splitting and rotating
//! q/k/v: 5); `gemv` streams a weight matrix once per decoded token, and the decode attention
//! kernels read the cache's buffers in place; `row_ranks` ranks slots for eviction on the
//! device (installed into the cache as its [`easykv_core::RowRanker`]).
//!
//! They apply where the tensors are burn's unfused CUDA tensors (`--device cuda`), found by
//! type at run time, so the model code stays generic over the backend: every function hands
//! its input back (`Err`) for any other backend, shape or dtype it does not cover, and the
//! caller runs burn's operations instead. By default all but [`OFF_BY_DEFAULT`] run;
//! `EASYKV_GPU_KERNELS=all` turns every one on, `EASYKV_GPU_KERNELS=off` all off,
//! `EASYKV_GPU_KERNELS=-gemv,-softmax` all but those, `EASYKV_GPU_KERNELS=gemv` only that one (for
//! comparisons on the same build).

mod check;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod kernels;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod launch;
mod timing;

pub use check::{check_kernels, check_model, KernelCheck};
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub use launch::*;
pub use timing::{time_kernels, KernelTiming};

#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
mod fallback {
    //! Builds without a CubeCL runtime: every kernel declines.
    use burn::prelude::*;
    use burn::tensor::DType;

    pub fn rms_norm<B: Backend, const D: usize>(
        x: Tensor<B, D>,
        _gamma: &Tensor<B, 1>,
        _eps: f64,
    ) -> Result<Tensor<B, D>, Tensor<B, D>> {
        Err(x)
    }

    pub fn swiglu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
        Err(x)
    }

    pub fn softmax_rows<B: Backend>(
        scores: Tensor<B, 4>,
        _mask: Option<&Tensor<B, 4>>,
        _bias: Option<&Tensor<B, 4>>,
        _product: DType,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>), Tensor<B, 4>> {
        Err(scores)
    }

    #[allow(clippy::type_complexity)]
    pub fn split_rope<B: Backend>(
        qkv: Tensor<B, 3>,
        _heads: super::HeadShape,
        _queries: (&Tensor<B, 2>, &Tensor<B, 2>),
        _keys: Option<(&Tensor<B, 2>, &Tensor<B, 2>)>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>), Tensor<B, 3>> {
        Err(qkv)
    }

    pub fn split_rope_into<B: Backend>(
        qkv: Tensor<B, 3>,
        _heads: super::HeadShape,
        _queries: (&Tensor<B, 2>, &Tensor<B, 2>),
        _keys: (&Tensor<B, 2>, &Tensor<B, 2>),
        _cache: (&Tensor<B, 4>, &Tensor<B, 4>),
        _at: usize,
    ) -> Result<Tensor<B, 4>, Tensor<B, 3>> {
        Err(qkv)
    }

    pub fn gemv<B: Backend>(
        x: Tensor<B, 2>,
        _w: &Tensor<B, 2>,
        _epilogue: super::GemvEpilogue<'_, B>,
    ) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
        Err(x)
    }

    pub fn gemv_normed<B: Backend>(
        x: Tensor<B, 2>,
        _gamma: &Tensor<B, 1>,
        _eps: f64,
        _w: &Tensor<B, 2>,
        _epilogue: super::GemvEpilogue<'_, B>,
    ) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
        Err(x)
    }

    pub fn gemv_prescaled<B: Backend>(
        x: Tensor<B, 2>,
        _x_scaled: &Tensor<B, 2>,
        _eps: f64,
        _w: &Tensor<B, 2>,
        _epilogue: super::GemvEpilogue<'_, B>,
    ) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
        Err(x)
    }

    pub fn gemv_scaling<B: Backend>(
        x: Tensor<B, 2>,
        _w: &Tensor<B, 2>,
        _epilogue: super::GemvEpilogue<'_, B>,
        _next_gamma: &Tensor<B, 1>,
    ) -> Result<(Tensor<B, 2>, Tensor<B, 2>), Tensor<B, 2>> {
        Err(x)
    }

    pub fn attention_scores<B: Backend>(
        q: Tensor<B, 4>,
        _keys: &Tensor<B, 4>,
        _slots: usize,
    ) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
        Err(q)
    }

    pub fn attention_values<B: Backend>(
        probs: Tensor<B, 4>,
        _values: &Tensor<B, 4>,
        _slots: usize,
    ) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
        Err(probs)
    }

    pub fn decode_attention<B: Backend>(
        q: Tensor<B, 4>,
        _keys: &Tensor<B, 4>,
        _values: &Tensor<B, 4>,
        _slots: usize,
    ) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
        Err(q)
    }

    pub fn write_observation<B: Backend>(
        probs: Tensor<B, 4>,
        _buffers: [&Tensor<B, 3>; 3],
        _row: usize,
    ) -> Result<(), Tensor<B, 4>> {
        Err(probs)
    }

    pub fn row_ranks<B: Backend>(key: Tensor<B, 3>) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
        Err(key)
    }

    pub fn is_cube_backend<B: Backend>() -> bool {
        false
    }

    pub fn gather_slots<B: Backend>(
        _keys: &Tensor<B, 4>,
        _values: &Tensor<B, 4>,
        _keep: Tensor<B, 3, Int>,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        None
    }

    pub fn list_true_slots<B: Backend>(
        mask: Tensor<B, 3, Bool>,
        _count: usize,
    ) -> Result<Tensor<B, 3, Int>, Tensor<B, 3, Bool>> {
        Err(mask)
    }

    pub fn matmul_rows<B: Backend>(
        x: Tensor<B, 2>,
        _w: &Tensor<B, 2>,
        _epilogue: super::GemvEpilogue<'_, B>,
    ) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
        Err(x)
    }

    pub fn matmul_f32<B: Backend>(
        a: Tensor<B, 4>,
        _b: &Tensor<B, 4>,
        _transposed: bool,
        _n: usize,
    ) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
        Err(a)
    }
}

#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
pub use fallback::*;

/// A fingerprint of the kernels' source. cubecl caches compiled kernels on disk by the kernel's
/// name and types, not its code: a cache kept across easykv builds would run a changed kernel's
/// old code (seen while developing them), so caches live under a directory named by this.
pub const SOURCE_FINGERPRINT: u64 = fnv1a(include_str!("kernels.rs").as_bytes());

const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

/// Rows up to which `matmul_rows` takes a product (a prefill stride of 64 tokens; beyond,
/// burn's tuned products tile well).
pub const MATMUL_ROWS_MAX: usize = 64;

/// What `gemv` does with the product before writing it.
#[derive(Debug)]
pub enum GemvEpilogue<'a, B: burn::tensor::backend::Backend> {
    /// `x·Wᵀ`.
    Plain,
    /// `residual + x·Wᵀ`, `residual` `[1, out]` in `W`'s dtype.
    AddResidual(&'a burn::tensor::Tensor<B, 2>),
    /// `W` holds gate rows then up rows (`[2·out, in]`): `silu(x·W_gᵀ)·(x·W_uᵀ)`.
    Swiglu,
}

/// Where the RMS norm before a one-row product runs (`EASYKV_GEMV`'s third field: 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum GemvNorm {
    /// [`gemv_normed`] declines and callers normalize by [`rms_norm`] first: one more launch,
    /// the normalized row rounded to the weights' precision as the CPU path rounds it.
    Separate,
    /// Each cube normalizes the row into shared memory first (rounded as [`rms_norm`] rounds
    /// it), its planes waiting for the whole cube before they stream weights.
    Staged,
    /// The product that writes a row of the residual stream also writes it times the next
    /// norm's `γ` ([`gemv_scaling`]); the normalizing product ([`gemv_prescaled`]) sums the
    /// squares of `x` as its planes read it, multiplies `W` by `x·γ` and scales the finished
    /// sums by `1/rms(x)`: no plane waits for its cube. Rows no product wrote (the first
    /// layer's input) are [`Staged`](Self::Staged).
    Inline,
}

/// Launch shapes of the kernels that have more than one sensible choice; `easykv
/// check-kernels --time` measures the alternatives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Tuning {
    /// Output rows (one plane of 32 threads each) per cube of [`gemv`].
    pub gemv_rows_per_cube: u32,
    /// Whether [`gemv`] adds its lanes' sums by a plane reduction (where planes are 32 wide)
    /// instead of through shared memory.
    pub gemv_plane_reduce: bool,
    /// Where [`gemv_normed`] normalizes its input.
    pub gemv_norm: GemvNorm,
    /// Slot ranges [`attention_values`] spreads a head's slots over; 0: by the slot count.
    pub value_splits: u32,
    /// Planes `matmul_rows` aims to spread a product over (by splitting the inner axis).
    pub rows_planes: u32,
    /// Inner-axis steps of 16 whose weight tiles a `matmul_rows` plane loads at once (1–8).
    pub rows_unroll: u32,
    /// 16-column tiles per `matmul_rows` plane (1–2).
    pub rows_col_blocks: u32,
    /// Planes per `matmul_rows` cube (1–8).
    pub rows_planes_per_cube: u32,
    /// Output columns above which products of a few rows stay with burn's matmul
    /// (`matmul_rows` declines). On the H200 at 64 rows burn's tuned products won for the
    /// 12,288- and 22,016-wide qkv and gate|up projections (90 vs 108 µs, 116 vs 185 µs) and
    /// `matmul_rows` for the 4,096-wide ones (47 vs 56 µs, 96 vs 187 µs).
    pub rows_max_out: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            // With the norm inline, 4 rows per cube and plane reductions decoded fastest on the
            // H200 (RoCo 0.25: 180.0 tok/s; 8 rows and shared-memory sums 176.4).
            gemv_rows_per_cube: 4,
            gemv_plane_reduce: true,
            gemv_norm: GemvNorm::Inline,
            value_splits: 0,
            rows_planes: 2048,
            rows_unroll: 4,
            rows_col_blocks: 2,
            rows_planes_per_cube: 4,
            rows_max_out: 8192,
        }
    }
}

static TUNING: std::sync::Mutex<Option<Tuning>> = std::sync::Mutex::new(None);

/// The launch shapes in use: as [`set_tuning`] set them, else the defaults with
/// `EASYKV_GEMV=ROWS,PLANE,NORM` (rows per cube 1–8, plane reduction 0/1, [`GemvNorm`]
/// 0 separate / 1 staged / 2 inline) and
/// `EASYKV_ROWS=PLANES,UNROLL,COL_BLOCKS,PLANES_PER_CUBE,MAX_OUT` (`matmul_rows`) applied, for comparing whole runs on
/// one build.
pub fn tuning() -> Tuning {
    static FROM_ENV: std::sync::OnceLock<Tuning> = std::sync::OnceLock::new();
    TUNING.lock().ok().and_then(|t| *t).unwrap_or_else(|| {
        *FROM_ENV.get_or_init(|| {
            let mut t = Tuning::default();
            let value = std::env::var("EASYKV_GEMV").unwrap_or_default();
            let mut parts = value.split(',').map(str::trim);
            if let Some(rows) = parts.next().and_then(|r| r.parse::<u32>().ok()) {
                t.gemv_rows_per_cube = rows.clamp(1, 8);
            }
            if let Some(plane) = parts.next() {
                t.gemv_plane_reduce = plane == "1" || plane == "true";
            }
            if let Some(norm) = parts.next() {
                t.gemv_norm = match norm {
                    "0" | "false" => GemvNorm::Separate,
                    "1" => GemvNorm::Staged,
                    _ => GemvNorm::Inline,
                };
            }
            let value = std::env::var("EASYKV_ROWS").unwrap_or_default();
            let mut parts = value.split(',').map(|p| p.trim().parse::<u32>().ok());
            if let Some(Some(planes)) = parts.next() {
                t.rows_planes = planes.max(1);
            }
            if let Some(Some(unroll)) = parts.next() {
                t.rows_unroll = unroll.clamp(1, 8);
            }
            if let Some(Some(cols)) = parts.next() {
                t.rows_col_blocks = cols.clamp(1, 2);
            }
            if let Some(Some(per_cube)) = parts.next() {
                t.rows_planes_per_cube = per_cube.clamp(1, 8);
            }
            if let Some(Some(max_out)) = parts.next() {
                t.rows_max_out = max_out;
            }
            t
        })
    })
}

/// Replaces the launch shapes (`None`: the defaults), for measuring alternatives.
pub fn set_tuning(tuning: Option<Tuning>) {
    if let Ok(mut t) = TUNING.lock() {
        *t = tuning;
    }
}

// By hand: derived, both would demand `B: Copy`.
impl<B: burn::tensor::backend::Backend> Clone for GemvEpilogue<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: burn::tensor::backend::Backend> Copy for GemvEpilogue<'_, B> {}

/// Heads of a stacked q|k|v projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadShape {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The kernels, by the names `EASYKV_GPU_KERNELS` takes.
pub const KERNELS: [&str; 11] = [
    "matmul",
    "rows",
    "gather",
    "observe",
    "rms_norm",
    "softmax",
    "swiglu",
    "split_rope",
    "gemv",
    "attention",
    "rank",
];

/// Lets evicting caches on `B` rank slots with [`row_ranks`], record prefill chunks with
/// [`write_observation`], list kept slots with [`list_true_slots`] and compact keys and values
/// with [`gather_slots`] (cubecl backends only; a no-op elsewhere and once installed).
pub fn install_cache_kernels<B: burn::tensor::backend::Backend>() {
    if is_cube_backend::<B>() {
        easykv_core::install_row_ranker::<B>(row_ranks::<B>);
        easykv_core::install_observation_writer::<B>(write_observation::<B>);
        easykv_core::install_slot_lister::<B>(list_true_slots::<B>);
        easykv_core::install_slot_gatherer::<B>(gather_slots::<B>);
    }
}

/// Kernels off unless asked for (`EASYKV_GPU_KERNELS=all`): none now. (softmax and attention
/// were, while their outputs on the H200 differed: burn's CUDA allocator pads rows whose bytes
/// miss its pitch alignment, and the kernels wrote such outputs unpadded. Outputs are
/// allocated contiguous now.)
pub const OFF_BY_DEFAULT: [&str; 0] = [];

/// Which kernels `EASYKV_GPU_KERNELS` turns on.
#[derive(Debug)]
enum Setting {
    All,
    None,
    AllBut(Vec<String>),
    Only(Vec<String>),
}

impl Setting {
    /// Unset or empty: all but [`OFF_BY_DEFAULT`]; `all`: all; `off`: none; `-a,-b`: all but a
    /// and b; `a,b`: only a and b.
    fn parse(value: &str) -> Setting {
        let names = || {
            value
                .split(',')
                .map(|s| s.trim().trim_start_matches('-').to_string())
                .collect()
        };
        match value.trim() {
            "" => Setting::AllBut(OFF_BY_DEFAULT.iter().map(|k| k.to_string()).collect()),
            "on" | "all" => Setting::All,
            "off" | "0" | "none" => Setting::None,
            list if list.starts_with('-') => Setting::AllBut(names()),
            _ => Setting::Only(names()),
        }
    }

    fn allows(&self, name: &str) -> bool {
        match self {
            Setting::All => true,
            Setting::None => false,
            Setting::AllBut(names) => !names.iter().any(|n| n == name),
            Setting::Only(names) => names.iter().any(|n| n == name),
        }
    }
}

/// A setting that replaces `EASYKV_GPU_KERNELS` while [`with_kernels`] runs.
static OVERRIDE: std::sync::Mutex<Option<Setting>> = std::sync::Mutex::new(None);

/// Runs `body` with the kernels `setting` names on (the syntax of `EASYKV_GPU_KERNELS`), for
/// comparisons within one process.
pub fn with_kernels<T>(setting: &str, body: impl FnOnce() -> T) -> T {
    let set = |s: Option<Setting>| {
        if let Ok(mut o) = OVERRIDE.lock() {
            *o = s;
        }
    };
    set(Some(Setting::parse(setting)));
    let out = body();
    set(None);
    out
}

/// Whether kernel `name` is on: as [`with_kernels`] says while it runs, else as
/// `EASYKV_GPU_KERNELS` says (read once).
pub fn enabled(name: &str) -> bool {
    if let Some(allowed) = OVERRIDE.lock().ok().and_then(|o| o.as_ref().map(|s| s.allows(name))) {
        return allowed;
    }
    static SETTING: std::sync::OnceLock<Setting> = std::sync::OnceLock::new();
    SETTING
        .get_or_init(|| Setting::parse(&std::env::var("EASYKV_GPU_KERNELS").unwrap_or_default()))
        .allows(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_pick_the_kernels_they_name() {
        let on = |setting: &str, name: &str| Setting::parse(setting).allows(name);
        assert!(on("", "gemv") && on("", "softmax") && on("", "attention"));
        assert!(on("all", "softmax") && !on("off", "gemv"));
        assert!(!on("-gemv,-swiglu", "gemv") && on("-gemv,-swiglu", "softmax"));
        assert!(on("gemv, rms_norm", "rms_norm") && !on("gemv,rms_norm", "swiglu"));
        // An override holds while its body runs, and only then.
        assert!(with_kernels("off", || !enabled("gemv")));
        assert!(with_kernels("softmax", || enabled("softmax") && !enabled("gemv")));
    }
}
