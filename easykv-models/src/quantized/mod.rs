//! Weight matrices kept in their GGUF blocks in host memory, multiplied without widening them
//! to f32 tensors (`--dtype native` and `q8`).
//!
//! [`QuantMatrix`] keeps a tensor's blocks as the file stores them (a range of the loaded
//! file's bytes). Every block format reduces, per chunk of 32 weights, to `w = a·u + b` (`u`
//! unsigned, at most 6 bits; `a`, `b` per half of the 32; see [`Chunk`]), so a dot product needs
//! `Σ u·x` and `Σ x` per half:
//! - [`Activations::F32`] (`native`): `u` widened to f32 and multiplied with the activations as
//!   they are — the f32 product up to summation order;
//! - [`Activations::Int16`] (`q16`): activation rows quantized to 16-bit blocks of 32 and
//!   integer dots — the f32 product to within 2⁻¹⁶ per activation;
//! - [`Activations::Int8`] (`q8`): activation rows quantized to 8-bit blocks of 32
//!   ([`ActBlock`]) and integer dots (as llama.cpp does).
//!
//! In SIMD registers, chosen at run time: [`vnni`] where the CPU has AVX-VNNI (8- and 16-bit
//! activations; the workspace's one `unsafe` module), [`avx2`] where it has AVX2 (through
//! `pulp`'s safe intrinsic wrappers — its CPU-feature token proves they may run), in plain
//! Rust elsewhere ([`scalar`], which the SIMD kernels are tested against). Weight rows are
//! split over threads (rayon's, or for the interleaved decode kernel spinning [`workers`]);
//! each is read once for every activation row.

mod chunks;
pub mod scalar;
pub mod workers;

#[cfg(target_arch = "x86_64")]
pub mod avx2;

// The workspace's only `unsafe`: calling `#[target_feature]` kernels after run-time detection.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub mod vnni;

use rayon::prelude::*;

use crate::gguf::GgmlType;

pub use chunks::Chunk;

/// Elements of one activation block (and of one [`Chunk`] of weights).
pub const BLOCK: usize = 32;

/// The integer an activation is quantized to: `i8` (`q8`, llama.cpp's way) or `i16` (`q16`:
/// an error ~250× smaller, which keeps the greedy tokens of the full-precision product).
pub trait ActInt: pulp::bytemuck::Pod + Into<i32> + std::fmt::Debug + PartialEq + Send + Sync + 'static {
    /// The largest magnitude used (the range is symmetric).
    const MAX: f32;
    /// Wider than a byte.
    const WIDE: bool;
    /// Already rounded and clamped to ±`MAX`.
    fn from_f32(v: f32) -> Self;
}

impl ActInt for i8 {
    const MAX: f32 = 127.0;
    const WIDE: bool = false;
    fn from_f32(v: f32) -> Self {
        v as i8
    }
}

impl ActInt for i16 {
    const MAX: f32 = 32767.0;
    const WIDE: bool = true;
    fn from_f32(v: f32) -> Self {
        v as i16
    }
}

/// 32 activations as `d·q` with `q` in −MAX..=MAX, the sums of `q` over each half, and
/// `d·Σq` (what a block's minimum or centre multiplies).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActBlock<Q: ActInt = i8> {
    pub q: [Q; BLOCK],
    pub d: f32,
    pub sums: [i32; 2],
    pub dsum: f32,
}

/// Quantizes a row of activations (a whole number of blocks) to [`ActBlock`]s.
pub fn quantize_row<Q: ActInt>(x: &[f32]) -> Vec<ActBlock<Q>> {
    x.chunks_exact(BLOCK)
        .map(|v| {
            let (d, inv) = block_scale(v, Q::MAX);
            let q: [Q; BLOCK] = std::array::from_fn(|i| Q::from_f32(round(v[i] * inv).clamp(-Q::MAX, Q::MAX)));
            let half = |h: usize| q[h * 16..h * 16 + 16].iter().map(|&v| v.into()).sum();
            let sums = [half(0), half(1)];
            ActBlock {
                q,
                d,
                sums,
                dsum: d * (sums[0] + sums[1]) as f32,
            }
        })
        .collect()
}

/// The scale `d` of a block of activations quantized to ±`max` (its largest magnitude ÷ `max`)
/// and `1/d` (0 for a block of zeros).
fn block_scale(v: &[f32], max: f32) -> (f32, f32) {
    let d = v.iter().fold(0f32, |m, &a| m.max(a.abs())) / max;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

/// `v.round()` (halves away from zero) for |v| < 2³¹ in instructions every x86-64 has: the
/// baseline target has no rounding instruction, and the library call `roundf` took 3 % of a
/// prefill's time. The truncation `v as i32` and `v − t` are exact there.
#[inline(always)]
fn round(v: f32) -> f32 {
    let t = v as i32 as f32;
    let d = v - t;
    t + if d >= 0.5 {
        1.0
    } else if d <= -0.5 {
        -1.0
    } else {
        0.0
    }
}

/// The block types [`QuantMatrix`] multiplies directly.
pub fn supported(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
    )
}

/// A `[rows, cols]` matrix in one GGUF block type, row-major: each row is `cols / block_len`
/// whole blocks.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: Blocks,
    /// Stored sixteen rows to a group for the decode kernel ([`vnni::interleaved`]) rather
    /// than row by row.
    interleaved: bool,
}

/// A matrix's bytes: its own, or a range of a loaded file's (no second copy of the weights).
#[derive(Debug, Clone)]
enum Blocks {
    Owned(std::sync::Arc<Vec<u8>>),
    Shared(std::sync::Arc<Vec<u8>>, std::ops::Range<usize>),
}

impl Blocks {
    fn bytes(&self) -> &[u8] {
        match self {
            Blocks::Owned(v) => v,
            Blocks::Shared(file, range) => file.get(range.clone()).unwrap_or(&[]),
        }
    }
}

impl QuantMatrix {
    /// From a tensor's encoded bytes; `None` unless `ty` is [`supported`], `cols` a whole number
    /// of its blocks (and of activation blocks) and `bytes` exactly the matrix.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        Self::checked(ty, rows, cols, bytes.len()).map(|()| Self {
            ty,
            rows,
            cols,
            data: Blocks::Owned(std::sync::Arc::new(bytes.to_vec())),
            interleaved: false,
        })
    }

    /// [`new`](Self::new) taking `bytes` as they are (no copy).
    pub fn owned(ty: GgmlType, rows: usize, cols: usize, bytes: Vec<u8>) -> Option<Self> {
        Self::checked(ty, rows, cols, bytes.len()).map(|()| Self {
            ty,
            rows,
            cols,
            data: Blocks::Owned(std::sync::Arc::new(bytes)),
            interleaved: false,
        })
    }

    /// [`new`](Self::new) over `range` of a loaded file's bytes, without copying them.
    pub fn shared(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        file: std::sync::Arc<Vec<u8>>,
        range: std::ops::Range<usize>,
    ) -> Option<Self> {
        let len = file.get(range.clone())?.len();
        Self::checked(ty, rows, cols, len).map(|()| Self {
            ty,
            rows,
            cols,
            data: Blocks::Shared(file, range),
            interleaved: false,
        })
    }

    fn checked(ty: GgmlType, rows: usize, cols: usize, len: usize) -> Option<()> {
        let fits = supported(ty) && cols > 0 && cols.is_multiple_of(ty.block_len()) && cols.is_multiple_of(BLOCK);
        let row_bytes = (cols / ty.block_len().max(1)).checked_mul(ty.block_bytes())?;
        (fits && rows.checked_mul(row_bytes) == Some(len)).then_some(())
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_len() * self.ty.block_bytes()
    }

    /// Row `r`'s blocks (a copy where the matrix is interleaved).
    pub fn row(&self, r: usize) -> std::borrow::Cow<'_, [u8]> {
        let n = self.row_bytes();
        #[cfg(target_arch = "x86_64")]
        if self.interleaved {
            let data = self.data.bytes();
            return std::borrow::Cow::Owned(match vnni::interleaved_kquants::handles(self.ty) {
                true => vnni::interleaved_kquants::row(self.ty, data, self.cols / self.ty.block_len(), r),
                false => vnni::interleaved::row(self.ty, data, n, r),
            });
        }
        std::borrow::Cow::Borrowed(&self.data.bytes()[r * n..(r + 1) * n])
    }

    /// The rows `order` lists, in that order (reordering a projection's rows), row by row.
    pub fn select_rows(&self, order: &[usize]) -> Self {
        let mut data = Vec::with_capacity(order.len() * self.row_bytes());
        for &r in order {
            data.extend_from_slice(&self.row(r));
        }
        Self {
            rows: order.len(),
            data: Blocks::Owned(std::sync::Arc::new(data)),
            interleaved: false,
            ..*self
        }
    }

    /// This matrix stored sixteen rows to a group for the AVX-512 decode kernels
    /// ([`vnni::interleaved`], [`vnni::interleaved_kquants`]) that multiply it by
    /// `activations`, where this CPU runs them and the type and row count allow; `None`
    /// otherwise. The row-by-row storage is not kept.
    pub fn interleaved(&self, activations: Activations) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            use vnni::{interleaved, interleaved_kquants};
            let kernel = match activations {
                Activations::Int8 | Activations::Int16 if interleaved::handles(self.ty) => Some(false),
                Activations::Int8 | Activations::Int16 if interleaved_kquants::handles(self.ty) => Some(true),
                _ => None,
            };
            let fits = !self.interleaved && self.rows.is_multiple_of(interleaved::GROUP) && self.rows > 0;
            if let (Some(kquants), true, Some(_)) = (kernel, fits, vnni::gemm::Avx512Vnni::detect()) {
                let bytes = self.data.bytes();
                let data = match kquants {
                    true => interleaved_kquants::interleave(self.ty, self.rows, bytes),
                    false => interleaved::interleave(self.ty, self.rows, bytes),
                };
                return Some(Self {
                    data: Blocks::Owned(std::sync::Arc::new(data)),
                    interleaved: true,
                    ..*self
                });
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = activations;
        None
    }

    /// Bytes of one interleaved group of sixteen rows.
    #[cfg(target_arch = "x86_64")]
    fn group_bytes(&self) -> usize {
        match vnni::interleaved_kquants::handles(self.ty) {
            true => self.cols / self.ty.block_len() * vnni::interleaved_kquants::group_block_bytes(self.ty),
            false => vnni::interleaved::GROUP * self.row_bytes(),
        }
    }

    /// Whether the rows are stored interleaved ([`interleaved`](Self::interleaved)).
    pub fn is_interleaved(&self) -> bool {
        self.interleaved
    }

    /// Row `r` as f32 (an embedding lookup).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        crate::gguf::dequantize(self.ty, &self.row(r), self.cols).unwrap_or_else(|_| vec![0.0; self.cols])
    }

    /// Rows `rows` as f32, row-major.
    pub fn dequantize_rows(&self, rows: std::ops::Range<usize>) -> Vec<f32> {
        let (first, last) = (
            rows.start.min(self.rows),
            rows.end.min(self.rows).max(rows.start.min(self.rows)),
        );
        let n = self.row_bytes();
        let bytes = match self.interleaved {
            true => std::borrow::Cow::Owned((first..last).flat_map(|r| self.row(r).into_owned()).collect()),
            false => std::borrow::Cow::Borrowed(&self.data.bytes()[first * n..last * n]),
        };
        crate::gguf::dequantize(self.ty, &bytes, (last - first) * self.cols)
            .unwrap_or_else(|_| vec![0.0; (last - first) * self.cols])
    }

    /// The whole matrix as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_rows(0..self.rows)
    }
}

/// Which dot-product code runs, decided once per product.
#[derive(Debug, Clone, Copy)]
pub enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2(pulp::x86::V3),
    /// AVX2 plus AVX-VNNI and F16C: [`vnni`] for the types it handles with 8-bit activations,
    /// [`avx2`] for the rest.
    #[cfg(target_arch = "x86_64")]
    Vnni(pulp::x86::V3, vnni::Vnni),
}

impl Kernel {
    /// The fastest this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V3::try_new() {
            return match vnni::Vnni::detect() {
                Some(token) => Kernel::Vnni(simd, token),
                None => Kernel::Avx2(simd),
            };
        }
        Kernel::Scalar
    }
}

/// Weight rows per rayon task at least: enough work to outweigh scheduling.
const MIN_ROWS_PER_TASK: usize = 64;

/// A projection's weights in their GGUF blocks: row-stacked parts (same column count), and how
/// its products treat the activations.
#[derive(Debug, Clone)]
pub struct PackedWeights {
    pub parts: Vec<QuantMatrix>,
    pub activations: Activations,
}

impl PackedWeights {
    /// Output rows.
    pub fn rows(&self) -> usize {
        self.parts.iter().map(QuantMatrix::rows).sum()
    }
}

/// How a product treats the activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// As they are (f32): each weight chunk is widened to f32 in registers, so the result is
    /// the dense f32 product's up to summation order.
    F32,
    /// Quantized to 8-bit blocks of 32 ([`ActBlock`]) for integer dots (llama.cpp's way):
    /// fewer instructions per weight, and a small error of its own.
    Int8,
    /// Quantized to 16-bit blocks of 32 for integer dots (AVX-VNNI's `vpdpwssd`): nearly the
    /// f32 product (relative error per activation ≤ 2⁻¹⁶), nearly the speed of `Int8`. Where
    /// the CPU lacks AVX-VNNI, the f32 kernels run instead.
    Int16,
}

/// A row of f32 activations and the sums of each half of each chunk of 32 (what the chunks'
/// `b` multiplies).
#[derive(Debug, Clone)]
pub struct FloatRow<'a> {
    pub x: &'a [f32],
    pub sums: Vec<[f32; 2]>,
}

impl<'a> FloatRow<'a> {
    pub fn new(x: &'a [f32]) -> Self {
        let sums = x
            .chunks_exact(BLOCK)
            .map(|c| [c[..16].iter().sum(), c[16..].iter().sum()])
            .collect();
        Self { x, sums }
    }
}

/// The rows `range` of the row-stacked `parts` (counted across them), each as its part and its
/// row there.
fn weight_rows(parts: &[QuantMatrix], range: std::ops::Range<usize>) -> impl Iterator<Item = (&QuantMatrix, usize)> {
    let mut first = 0;
    parts.iter().flat_map(move |m| {
        let end = first + m.rows;
        let rows = range.start.clamp(first, end) - first..range.end.clamp(first, end) - first;
        first = end;
        rows.map(move |r| (m, r))
    })
}

/// `x·Wᵀ` for `rows` activation rows `x` (`[rows, cols]`, f32) against the row-stacked
/// matrices `parts` (same `cols`): `[rows, Σ parts' rows]`.
pub fn product(parts: &[QuantMatrix], x: &[f32], rows: usize, kernel: Kernel, activations: Activations) -> Vec<f32> {
    let cols = parts.first().map_or(0, |p| p.cols);
    let out: usize = parts.iter().map(|p| p.rows).sum();
    if rows == 0 || cols == 0 || x.len() != rows * cols {
        return vec![0.0; rows * out];
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(y) = interleaved_product(parts, x, rows, activations) {
        return y;
    }
    #[cfg(target_arch = "x86_64")]
    let vnni_here = matches!(kernel, Kernel::Vnni(..)) && parts.iter().all(|p| vnni::handles(p.ty));
    #[cfg(not(target_arch = "x86_64"))]
    let vnni_here = false;
    // One row of 16-bit activations against K-quants only (a decode step of Qwen's Q4_K_M):
    // one activation scale per 256 values, the sub-block scales applied as integers
    // (`vnni::kquants`). More rows keep the kernels below, which unpack each weight chunk once
    // for four activation rows.
    #[cfg(target_arch = "x86_64")]
    let kquants = match activations {
        Activations::Int16
            if rows == 1
                && cols.is_multiple_of(vnni::kquants::SUPER)
                && parts.iter().all(|p| vnni::kquants::handles(p.ty)) =>
        {
            vnni::gemm::Avx512Vnni::detect()
        }
        _ => None,
    };
    // 16-bit activations only where the VNNI kernels take them (the AVX-512 K-quant kernel
    // above, or the AVX-VNNI ones below, which AMD's Zen 4 lacks); elsewhere f32 ones (the same
    // products but for 16-bit rounding).
    #[cfg(target_arch = "x86_64")]
    let kquants_here = kquants.is_some();
    #[cfg(not(target_arch = "x86_64"))]
    let kquants_here = false;
    let activations = match activations {
        Activations::Int16 if !vnni_here && !kquants_here => Activations::F32,
        a => a,
    };
    #[cfg(target_arch = "x86_64")]
    let per256: Vec<Vec<vnni::kquants::SuperBlock>> = match kquants {
        Some(_) => x.chunks_exact(cols).map(vnni::kquants::quantize_row).collect(),
        None => Vec::new(),
    };
    #[cfg(target_arch = "x86_64")]
    if let Some(token) = kquants {
        let share =
            move |parts: &[QuantMatrix], acts: &Vec<Vec<vnni::kquants::SuperBlock>>, range: std::ops::Range<usize>| {
                let mut y = vec![0f32; range.len() * rows];
                for (outs, (m, r)) in y.chunks_mut(rows).zip(weight_rows(parts, range)) {
                    for (o, a) in outs.iter_mut().zip(acts) {
                        *o = vnni::kquants::dot(token, m, r, a);
                    }
                }
                y
            };
        let y = shares_on_workers(out, MIN_ROWS_PER_TASK, rows, parts, std::sync::Arc::new(per256), share);
        return outputs_by_row(y, rows, out);
    }
    let (mut int8, mut int16, mut float) = (Vec::new(), Vec::new(), Vec::new());
    match activations {
        // Quantized per 256 above.
        #[cfg(target_arch = "x86_64")]
        Activations::Int16 if kquants.is_some() => {}
        Activations::Int8 => int8 = x.chunks_exact(cols).map(quantize_row::<i8>).collect(),
        Activations::Int16 => int16 = x.chunks_exact(cols).map(quantize_row::<i16>).collect(),
        Activations::F32 => float = x.chunks_exact(cols).map(FloatRow::new).collect(),
    }
    // Laid out [out, rows] while computing (each task owns whole weight rows), then transposed.
    let mut y = vec![0f32; out * rows];
    // One task per thread: a decode step makes ~150 small products, and more tasks than
    // threads cost more in scheduling than they gain in balance (measured: 1536×576 Q4_1
    // took 5.3 ns per block in tasks of 64 rows, against 2.6 ns for a 16384-row matrix).
    let per_task = out.div_ceil(rayon::current_num_threads().max(1)).max(MIN_ROWS_PER_TASK);
    y.par_chunks_mut(per_task * rows).enumerate().for_each(|(t, block)| {
        // Tasks cut across the stacked parts freely.
        let which = weight_rows(parts, t * per_task..(t * per_task + block.len() / rows));
        match (kernel, activations) {
            #[cfg(target_arch = "x86_64")]
            (Kernel::Vnni(_, token), Activations::Int8) if vnni_here => vnni::dots(token, which, &int8, block),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Vnni(_, token), Activations::Int16) => vnni::dots(token, which, &int16, block),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2(simd) | Kernel::Vnni(simd, _), Activations::Int8) => avx2::dots(simd, which, &int8, block),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2(simd) | Kernel::Vnni(simd, _), Activations::F32) => {
                avx2::float_dots(simd, which, &float, block)
            }
            // The scalar kernels (16-bit activations never get here: without the VNNI kernels
            // they became f32 ones above).
            _ => {
                for (outs, (m, r)) in block.chunks_mut(rows).zip(which) {
                    for (j, o) in outs.iter_mut().enumerate() {
                        *o = match activations {
                            Activations::Int8 => scalar::dot(m.ty, &m.row(r), &int8[j]),
                            Activations::Int16 => scalar::dot(m.ty, &m.row(r), &int16[j]),
                            Activations::F32 => scalar::float_dot(m.ty, &m.row(r), &float[j]),
                        };
                    }
                }
            }
        }
    });
    outputs_by_row(y, rows, out)
}

/// [`product`] where every part is stored interleaved ([`QuantMatrix::interleaved`]) and the
/// activations are those its kernels take: sixteen weight rows at a time
/// ([`vnni::interleaved`], [`vnni::interleaved_kquants`]), one task per thread of whole groups
/// ([`shares_on_workers`]). `None` otherwise.
#[cfg(target_arch = "x86_64")]
fn interleaved_product(parts: &[QuantMatrix], x: &[f32], rows: usize, activations: Activations) -> Option<Vec<f32>> {
    use vnni::interleaved::{split_row, GROUP};
    use vnni::interleaved_kquants as kq;
    if parts.is_empty() || !parts.iter().all(|p| p.interleaved) {
        return None;
    }
    let token = vnni::gemm::Avx512Vnni::detect()?;
    let cols = parts.first()?.cols;
    let any_k = parts.iter().any(|p| kq::handles(p.ty));
    let any_small = parts.iter().any(|p| !kq::handles(p.ty));
    // The small types take the activations' width; K-quant groups always take 16-bit ones
    // quantized per 256 (`kq`'s only kernel; `q8`'s decode of a K-quant file then reads the
    // interleaved groups too, where the row kernels' 8-bit dots ran at a fifth of the speed).
    let wide = match activations {
        Activations::Int8 => false,
        Activations::Int16 => true,
        Activations::F32 => return None,
    };
    let rows_in = x.chunks_exact(cols);
    let small = match (any_small, wide) {
        (false, _) => Vec::new(),
        (true, false) => rows_in.clone().map(|r| split_row(&quantize_row::<i8>(r))).collect(),
        (true, true) => rows_in.clone().map(|r| split_row(&quantize_row::<i16>(r))).collect(),
    };
    let per256 = match any_k {
        true => rows_in
            .map(|r| kq::split_row(&vnni::kquants::quantize_row(r)))
            .collect(),
        false => Vec::new(),
    };
    let acts = std::sync::Arc::new((small, per256));
    // The outputs of groups `range` (counted across the parts), `[16·groups, rows]`.
    type Acts = (Vec<Vec<vnni::interleaved::SplitBlock>>, Vec<Vec<kq::SplitSuper>>);
    let share = move |parts: &[QuantMatrix], acts: &Acts, range: std::ops::Range<usize>| {
        let mut y = vec![0f32; range.len() * GROUP * rows];
        let mut outs = y.chunks_mut(GROUP * rows);
        let mut first = 0;
        for m in parts {
            let n = m.rows / GROUP;
            let mine = range.start.clamp(first, first + n) - first..range.end.clamp(first, first + n) - first;
            for group in m
                .data
                .bytes()
                .chunks_exact(m.group_bytes())
                .skip(mine.start)
                .take(mine.len())
            {
                let Some(o) = outs.next() else {
                    break;
                };
                match kq::handles(m.ty) {
                    true => kq::group_dots(token, m.ty, group, &acts.1, o),
                    false => vnni::interleaved::group_dots(token, m.ty, group, &acts.0, wide, o),
                }
            }
            first += n;
        }
        y
    };
    let groups: usize = parts.iter().map(|m| m.rows / GROUP).sum();
    let y = shares_on_workers(groups, MIN_ROWS_PER_TASK / GROUP, GROUP * rows, parts, acts, share);
    Some(outputs_by_row(y, rows, groups * GROUP))
}

/// `share` of `units` units (weight rows or groups of them, `unit_len` outputs each) split into
/// one range per thread, run on the spinning [`workers`] (rayon's threads where those are in
/// use), the shares' outputs in order. Tasks own clones of `parts` (their bytes are shared).
fn shares_on_workers<A: Send + Sync + 'static>(
    units: usize,
    min_units: usize,
    unit_len: usize,
    parts: &[QuantMatrix],
    acts: std::sync::Arc<A>,
    share: impl Fn(&[QuantMatrix], &A, std::ops::Range<usize>) -> Vec<f32> + Copy + Send + Sync + 'static,
) -> Vec<f32> {
    let pool = workers::Workers::global();
    let per_task = units.div_ceil(pool.width()).max(min_units).max(1);
    let ranges: Vec<_> = (0..units)
        .step_by(per_task)
        .map(|u| u..(u + per_task).min(units))
        .collect();
    let tasks: Vec<workers::Task> = ranges
        .iter()
        .map(|range| {
            let (parts, acts, range) = (parts.to_vec(), std::sync::Arc::clone(&acts), range.clone());
            Box::new(move || share(&parts, &acts, range)) as workers::Task
        })
        .collect();
    let shares = match pool.run(tasks) {
        // A share of the wrong size means its task failed: all again on rayon's threads.
        Some(shares) if shares.iter().zip(&ranges).all(|(s, r)| s.len() == r.len() * unit_len) => shares,
        _ => ranges.par_iter().map(|r| share(parts, &acts, r.clone())).collect(),
    };
    shares.concat()
}

/// `x·Wᵀ` for many activation rows (a prefill chunk) with 8- or 16-bit activation blocks
/// ([`ActInt`]), through the AVX-512 VNNI kernel ([`vnni::gemm`]): sixteen activation rows
/// per register, the weights widened a tile of rows at a time. `None` where the CPU lacks
/// AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
pub fn product_many<Q: ActInt>(parts: &[QuantMatrix], x: &[f32], rows: usize) -> Option<Vec<f32>> {
    use vnni::gemm::{Avx512Vnni, DecodedTile, PackedActs, LANES, TILE_ROWS};
    let token = Avx512Vnni::detect()?;
    let cols = parts.first().map_or(0, |p| p.cols);
    let out: usize = parts.iter().map(|p| p.rows).sum();
    if rows == 0 || cols == 0 || x.len() != rows * cols {
        return Some(vec![0.0; rows * out]);
    }
    let blocks: Vec<Vec<ActBlock<Q>>> = x
        .par_chunks_exact(cols)
        .map(|x| vnni::gemm::quantize_row::<Q>(token, x))
        .collect();
    let chunks = cols / BLOCK;
    let acts = PackedActs::pack(&blocks, chunks);
    let width = rows.div_ceil(LANES) * LANES;
    let tiles: Vec<(&QuantMatrix, usize)> = parts
        .iter()
        .flat_map(|m| (0..m.rows).step_by(TILE_ROWS).map(move |first| (m, first)))
        .collect();
    // Every tile's products in a slot of `[activation row, tile row]`: a
    // buffer kept from call to call up to [`RETAINED_PRODUCTS_MAX`] (a fresh one is zeroed page
    // by page by the kernel on first touch, which `perf` showed among a prefill's largest
    // costs); larger ones are freed, so a long prompt's chunk leaves no memory held.
    thread_local! {
        static PRODUCTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut products = PRODUCTS.with(|p| std::mem::take(&mut *p.borrow_mut()));
    // Every element is written below: no zeroing beyond what a larger buffer needs.
    products.resize(tiles.len() * TILE_ROWS * width, 0.0);
    products
        .par_chunks_mut(TILE_ROWS * width)
        .zip(tiles.par_iter())
        .for_each_init(
            || DecodedTile::new(chunks, Q::WIDE),
            |tile, (o, &(m, first))| {
                tile.decode(m, first);
                vnni::gemm::tile_product(token, tile, &acts, o);
            },
        );
    // The result is `[activation row, output]`, gathered on all threads (one thread took a
    // twentieth of a Qwen2.5 prefill doing it alone).
    let firsts: Vec<usize> = tiles
        .iter()
        .scan(0, |o, &(m, first)| {
            let at = *o;
            *o += TILE_ROWS.min(m.rows - first);
            Some(at)
        })
        .collect();
    // Sixteen activation rows per task: a tile's runs for them are contiguous.
    let mut y = vec![0f32; rows * out];
    y.par_chunks_mut(LANES * out).enumerate().for_each(|(g, y)| {
        for ((&(m, first), p), &o) in tiles.iter().zip(products.chunks(TILE_ROWS * width)).zip(&firsts) {
            let n = TILE_ROWS.min(m.rows - first);
            let runs = p[g * LANES * TILE_ROWS..].chunks_exact(TILE_ROWS);
            for (y, run) in y.chunks_exact_mut(out).zip(runs) {
                // A whole tile's run as a constant-size copy (inlined moves, not a call).
                match (y[o..].first_chunk_mut::<TILE_ROWS>(), run.first_chunk::<TILE_ROWS>()) {
                    (Some(y), Some(run)) if n == TILE_ROWS => *y = *run,
                    _ => y[o..o + n].copy_from_slice(&run[..n]),
                }
            }
        }
    });
    if products.capacity() <= RETAINED_PRODUCTS_MAX {
        PRODUCTS.with(|p| *p.borrow_mut() = products);
    }
    Some(y)
}

/// The most f32 values [`product_many`] keeps for its next call (64 MiB: a 512-row chunk of
/// Qwen2.5-1.5B's widest product takes 36 MB).
#[cfg(target_arch = "x86_64")]
const RETAINED_PRODUCTS_MAX: usize = 16 << 20;

/// Products computed `[out, rows]` (each task owning whole weight rows) laid out `[rows, out]`;
/// one row (a decode step alone) is laid out the same either way.
fn outputs_by_row(y: Vec<f32>, rows: usize, out: usize) -> Vec<f32> {
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
mod tests;
