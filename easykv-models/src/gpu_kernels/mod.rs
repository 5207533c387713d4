//! Fused CubeCL kernels for the operations a decode step repeats in every layer, and the
//! types their callers use.
//!
//! On a GPU every burn tensor operation is a kernel launch, and on burn's CUDA backend each
//! launch costs the host ~12–16 µs: a Llama-2-7B decode step was ~40 launches per layer, bound
//! by the host, not by the GPU. Each kernel does in one launch what took several (RMSNorm: 8,
//! softmax with its casts and biases: up to 8, SwiGLU: 5, splitting and rotating q/k/v: 5);
//! `gemv` streams a weight matrix once per decoded token, and the decode attention kernels read
//! the cache's buffers in place; `row_ranks` ranks slots for eviction on the device.
//!
//! Only the ops layer ([`crate::ops`]) calls them, where the [`crate::BackendProfile`] says
//! they run; each hands its input back (`Err`) for a shape or dtype it does not cover. The
//! kernels exist in builds with the `cuda` or `wgpu` feature only.

#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod check;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod kernels;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) mod launch;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod timing;

#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub use check::{check_engine, check_kernels, check_model, KernelCheck};
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub use timing::{time_kernels, time_prefill, KernelTiming, PrefillTiming};

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

/// Where the RMS norm before a one-row product runs (`--gemv`'s third field: 0, 1, 2).
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
/// check-kernels --time` measures the alternatives, `--gemv` and `--rows` set them for a run.
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
    /// Planes per `matmul_rows` cube (1–8); the staged kernel takes 8 above 32 rows, where
    /// that measured fastest.
    pub rows_planes_per_cube: u32,
    /// Output columns above which products of more than 32 rows stay with burn's matmul
    /// (`matmul_rows` declines). At 64 rows burn's tuned products won for the 12,288- and
    /// 22,016-wide qkv and gate|up projections and the 32,000-wide vocabulary (H100: 91, 120
    /// and 195 µs against the staged kernel's 103, 152 and 218 at its best launch shapes),
    /// `matmul_rows` for the 4,096-wide ones (48.5 vs 71.4 µs, 95.2 vs 184.5); at 16 rows
    /// `matmul_rows` won at every width (qkv 59.9 vs 99.7 µs, vocabulary 136 vs 203).
    pub rows_max_out: u32,
    /// Whether `matmul_rows` stages each plane's weights in shared memory through whole-line
    /// loads (`matmul_rows_staged`) instead of loading the tensor cores' tiles from memory.
    pub rows_staged: bool,
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
            // H100, 16 rows: qkv 59.9 µs against 70.5–77.1 loading fragments from memory,
            // gate|up 104 against 118–150, down 60.2 against 71–73.
            rows_staged: true,
        }
    }
}

impl Tuning {
    /// With `spec` = `ROWS,PLANE,NORM` applied (`--gemv`): rows per cube 1–8, plane reduction
    /// 0/1, [`GemvNorm`] 0 separate / 1 staged / 2 inline; empty fields keep their value.
    pub fn with_gemv(mut self, spec: &str) -> Result<Self, String> {
        let bad = || format!("--gemv '{spec}': expected ROWS,PLANE,NORM (e.g. 4,1,2)");
        let mut parts = spec.split(',').map(str::trim);
        if let Some(rows) = parts.next().filter(|r| !r.is_empty()) {
            self.gemv_rows_per_cube = rows.parse::<u32>().map_err(|_| bad())?.clamp(1, 8);
        }
        if let Some(plane) = parts.next().filter(|p| !p.is_empty()) {
            self.gemv_plane_reduce = match plane {
                "1" | "true" => true,
                "0" | "false" => false,
                _ => return Err(bad()),
            };
        }
        if let Some(norm) = parts.next().filter(|n| !n.is_empty()) {
            self.gemv_norm = match norm {
                "0" => GemvNorm::Separate,
                "1" => GemvNorm::Staged,
                "2" => GemvNorm::Inline,
                _ => return Err(bad()),
            };
        }
        match parts.next() {
            None => Ok(self),
            Some(_) => Err(bad()),
        }
    }

    /// With `spec` = `PLANES,UNROLL,COL_BLOCKS,PLANES_PER_CUBE,MAX_OUT,STAGED` applied
    /// (`--rows`, `matmul_rows`' launch shape; STAGED 0/1); empty fields keep their value.
    pub fn with_rows(mut self, spec: &str) -> Result<Self, String> {
        let bad = || format!("--rows '{spec}': expected PLANES,UNROLL,COL_BLOCKS,PLANES_PER_CUBE,MAX_OUT,STAGED");
        let fields: Vec<&str> = spec.split(',').map(str::trim).collect();
        if fields.len() > 6 {
            return Err(bad());
        }
        let mut values = [None; 6];
        for (v, f) in values.iter_mut().zip(&fields) {
            if !f.is_empty() {
                *v = Some(f.parse::<u32>().map_err(|_| bad())?);
            }
        }
        let [planes, unroll, cols, per_cube, max_out, staged] = values;
        self.rows_staged = match staged {
            None => self.rows_staged,
            Some(0) => false,
            Some(1) => true,
            Some(_) => return Err(bad()),
        };
        self.rows_planes = planes.map_or(self.rows_planes, |v| v.max(1));
        self.rows_unroll = unroll.map_or(self.rows_unroll, |v| v.clamp(1, 8));
        self.rows_col_blocks = cols.map_or(self.rows_col_blocks, |v| v.clamp(1, 2));
        self.rows_planes_per_cube = per_cube.map_or(self.rows_planes_per_cube, |v| v.clamp(1, 8));
        self.rows_max_out = max_out.unwrap_or(self.rows_max_out);
        Ok(self)
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

/// Sequences of a memory pool attended in one launch: batch row `i` holds `table[lens_at + i]`
/// slots from the pool's slot `table[starts_at + i]`; `longest` is the most slots of any row.
///
/// # Shapes
/// - `table`: `[n]` integers
#[derive(Debug)]
pub struct PoolRows<'a, B: burn::tensor::backend::Backend> {
    pub table: &'a burn::tensor::Tensor<B, 1, burn::tensor::Int>,
    pub starts_at: usize,
    pub lens_at: usize,
    pub longest: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shapes_parse_from_their_flags() {
        let t = Tuning::default().with_gemv("8,0,1").unwrap();
        assert_eq!(
            (t.gemv_rows_per_cube, t.gemv_plane_reduce, t.gemv_norm),
            (8, false, GemvNorm::Staged)
        );
        let t = Tuning::default().with_gemv(",,0").unwrap();
        assert_eq!((t.gemv_rows_per_cube, t.gemv_norm), (4, GemvNorm::Separate));
        assert!(Tuning::default().with_gemv("4,1,9").is_err());
        assert!(Tuning::default().with_gemv("x").is_err());
        let t = Tuning::default().with_rows("1024,,,,12288").unwrap();
        assert_eq!((t.rows_planes, t.rows_unroll, t.rows_max_out), (1024, 4, 12288));
        assert!(Tuning::default().with_rows("1,2,3,4,5,6").is_err());
        assert!(Tuning::default().with_rows("1,2,3,4,5,0,7").is_err());
        assert!(Tuning::default().with_rows(",,,,,1").unwrap().rows_staged);
    }
}
