//! The products in AVX2 registers (x86-64 CPUs from 2013 on; chosen at run time): per chunk of
//! 32 weights one unsigned × signed byte product (`vpmaddubsw`), pairs summed to 32 bits and
//! scaled in f32. Q4_0, Q4_1, Q8_0, Q4_K and Q6_K (the blocks of the supported GGUF files)
//! unpack in registers; Q5 formats use the scalar unpacking.

use core::arch::x86_64::{__m128i, __m256, __m256i};

use pulp::x86::V3;

use super::chunks::{f16_at, scale_min_k4};
use super::{scalar, ActBlock, FloatRow, QuantMatrix, BLOCK};
use crate::gguf::GgmlType;

/// `N` values from the start of `v` as a register (zeros where `v` is shorter).
#[inline(always)]
fn load<const N: usize, T: pulp::bytemuck::Pod, V: pulp::bytemuck::AnyBitPattern>(v: &[T]) -> V {
    let lanes: [T; N] = match v.first_chunk::<N>() {
        Some(a) => *a,
        None => [T::zeroed(); N],
    };
    pulp::cast(lanes)
}

#[inline(always)]
fn load32(b: &[u8]) -> __m256i {
    load::<32, _, _>(b)
}

#[inline(always)]
fn load16(b: &[u8]) -> __m128i {
    load::<16, _, _>(b)
}

/// Q6_K's two high bits (the low two of each byte of `shifted`) moved to bits 4–5.
#[inline(always)]
fn q6_high(simd: V3, shifted: __m256i, low2: __m256i) -> __m256i {
    simd.avx2
        ._mm256_slli_epi16::<4>(simd.avx2._mm256_and_si256(shifted, low2))
}

/// Eight f32 from `v[at..]` (zeros past its end).
#[inline(always)]
fn load8(v: &[f32], at: usize) -> __m256 {
    load::<8, _, _>(v.get(at..).unwrap_or(&[]))
}

/// The low eight bytes of `q` as f32, signed or unsigned.
#[inline(always)]
fn widen8(simd: V3, q: __m128i, signed: bool) -> __m256 {
    let ints = match signed {
        true => simd.avx2._mm256_cvtepi8_epi32(q),
        false => simd.avx2._mm256_cvtepu8_epi32(q),
    };
    simd.avx._mm256_cvtepi32_ps(ints)
}

/// `Σ u·q` per group of four bytes: lanes 0–3 the first 16 weights, 4–7 the second 16.
#[inline(always)]
fn byte_dots(simd: V3, u: __m256i, q: __m256i) -> __m256 {
    let pairs = simd.avx2._mm256_maddubs_epi16(u, q);
    let quads = simd.avx2._mm256_madd_epi16(pairs, simd.avx._mm256_set1_epi16(1));
    simd.avx._mm256_cvtepi32_ps(quads)
}

#[inline(always)]
fn scales(simd: V3, a: [f32; 2], dx: f32) -> __m256 {
    let (lo, hi) = (simd.sse._mm_set1_ps(a[0] * dx), simd.sse._mm_set1_ps(a[1] * dx));
    simd.avx._mm256_set_m128(hi, lo)
}

#[inline(always)]
fn sum8(v: __m256) -> f32 {
    let lanes: [f32; 8] = pulp::cast(v);
    lanes.iter().sum()
}

/// Runs `$body` for every chunk `$c` of 32 weights of a row, unpacked in registers: `w = a·u +
/// b` per half, or for Q8_0 `w = a·u` with `u = |w|` and `$sign` the weights whose signs the
/// activations take. A macro rather than a function taking a closure: the body is pasted into
/// each loop, so accumulators stay in registers (through a closure they went through memory,
/// and a closure left un-inlined lost the CPU features of its intrinsics: 10× slower).
/// `continue` in the body skips a chunk. Types without a SIMD unpacking run nothing.
macro_rules! for_each_chunk {
    ($simd:expr, $ty:expr, $row:expr, |$c:ident, $u:ident, $sign:ident, $a:ident, $b:ident| $body:block) => {{
        let simd: V3 = $simd;
        let (ty, row): (GgmlType, &[u8]) = ($ty, $row);
        let (avx, avx2) = (simd.avx, simd.avx2);
        let low4 = avx._mm256_set1_epi8(0x0F);
        let bytes = ty.block_bytes();
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let low4_128 = simd.sse2._mm_set1_epi8(0x0F);
                for (c, blk) in row.chunks_exact(bytes).enumerate() {
                    let d = f16_at(blk, 0);
                    let (m, qs) = match ty {
                        GgmlType::Q4_1 => (f16_at(blk, 2), &blk[4..20]),
                        _ => (-8.0 * d, &blk[2..18]),
                    };
                    let packed = load16(qs);
                    let lo = simd.sse2._mm_and_si128(packed, low4_128);
                    let hi = simd.sse2._mm_and_si128(simd.sse2._mm_srli_epi16::<4>(packed), low4_128);
                    let ($c, $u, $sign, $a, $b): (usize, __m256i, Option<__m256i>, [f32; 2], [f32; 2]) =
                        (c, avx._mm256_set_m128i(hi, lo), None, [d; 2], [m; 2]);
                    $body
                }
            }
            GgmlType::Q8_0 => {
                for (c, blk) in row.chunks_exact(bytes).enumerate() {
                    let w = load32(&blk[2..2 + BLOCK]);
                    let ($c, $u, $sign, $a, $b): (usize, __m256i, Option<__m256i>, [f32; 2], [f32; 2]) =
                        (c, avx2._mm256_sign_epi8(w, w), Some(w), [f16_at(blk, 0); 2], [0.0; 2]);
                    $body
                }
            }
            GgmlType::Q4K => {
                for (n, blk) in row.chunks_exact(bytes).enumerate() {
                    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                    let sc = &blk[4..16];
                    for g in 0..4 {
                        let packed = load32(&blk[16 + 32 * g..]);
                        let halves = [
                            avx2._mm256_and_si256(packed, low4),
                            avx2._mm256_and_si256(avx2._mm256_srli_epi16::<4>(packed), low4),
                        ];
                        for (j, u) in halves.into_iter().enumerate() {
                            let (s, m) = scale_min_k4(2 * g + j, sc);
                            let ($c, $u, $sign, $a, $b): (usize, __m256i, Option<__m256i>, [f32; 2], [f32; 2]) =
                                (8 * n + 2 * g + j, u, None, [d * s; 2], [-dmin * m; 2]);
                            $body
                        }
                    }
                }
            }
            GgmlType::Q6K => {
                let low2 = avx._mm256_set1_epi8(0x03);
                for (n, blk) in row.chunks_exact(bytes).enumerate() {
                    let d = f16_at(blk, 208);
                    for half in 0..2 {
                        let ql0 = load32(&blk[64 * half..]);
                        let ql1 = load32(&blk[64 * half + 32..]);
                        let qh = load32(&blk[128 + 32 * half..]);
                        let chunks = [
                            avx2._mm256_or_si256(avx2._mm256_and_si256(ql0, low4), q6_high(simd, qh, low2)),
                            avx2._mm256_or_si256(
                                avx2._mm256_and_si256(ql1, low4),
                                q6_high(simd, avx2._mm256_srli_epi16::<2>(qh), low2),
                            ),
                            avx2._mm256_or_si256(
                                avx2._mm256_and_si256(avx2._mm256_srli_epi16::<4>(ql0), low4),
                                q6_high(simd, avx2._mm256_srli_epi16::<4>(qh), low2),
                            ),
                            avx2._mm256_or_si256(
                                avx2._mm256_and_si256(avx2._mm256_srli_epi16::<4>(ql1), low4),
                                q6_high(simd, avx2._mm256_srli_epi16::<6>(qh), low2),
                            ),
                        ];
                        let sc = &blk[192 + 8 * half..];
                        for (k, u) in chunks.into_iter().enumerate() {
                            let a = [d * (sc[2 * k] as i8) as f32, d * (sc[2 * k + 1] as i8) as f32];
                            let ($c, $u, $sign, $a, $b): (usize, __m256i, Option<__m256i>, [f32; 2], [f32; 2]) =
                                (8 * n + 4 * half + k, u, None, a, [-32.0 * a[0], -32.0 * a[1]]);
                            $body
                        }
                    }
                }
            }
            _ => {}
        }
    }};
}

/// Whether [`for_each_chunk!`] unpacks `ty`.
fn unpacked_here(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4K | GgmlType::Q6K
    )
}

/// `Σ u·q` of a chunk with activation block `x`, scaled: `(products, offset)` to accumulate.
#[inline(always)]
fn chunk_dot(
    simd: V3,
    u: __m256i,
    sign: Option<__m256i>,
    a: [f32; 2],
    b: [f32; 2],
    x: &ActBlock,
) -> (__m256, __m256, f32) {
    let q: __m256i = pulp::cast(x.q);
    let q = match sign {
        Some(w) => simd.avx2._mm256_sign_epi8(q, w),
        None => q,
    };
    let s = match a[0] == a[1] {
        true => simd.avx._mm256_set1_ps(a[0] * x.d),
        false => scales(simd, a, x.d),
    };
    let offset = match b[0] == b[1] {
        true => b[0] * x.dsum,
        false => x.d * (b[0] * x.sums[0] as f32 + b[1] * x.sums[1] as f32),
    };
    (byte_dots(simd, u, q), s, offset)
}

/// `Σ w·x` of one row (see [`scalar::dot`]).
#[inline(always)]
pub fn dot(simd: V3, ty: GgmlType, row: &[u8], x: &[ActBlock]) -> f32 {
    simd.vectorize(
        #[inline(always)]
        || dot_one(simd, ty, row, x),
    )
}

/// The dots of every weight row `which` yields (a matrix and its row) with every activation
/// row, into `outs` (`[rows, acts.len()]`), under one feature-enabled call.
#[inline(always)]
pub fn dots<'a>(
    simd: V3,
    which: impl Iterator<Item = (&'a QuantMatrix, usize)>,
    acts: &[Vec<ActBlock>],
    outs: &mut [f32],
) {
    simd.vectorize(
        #[inline(always)]
        || {
            let acts: Vec<&[ActBlock]> = acts.iter().map(Vec::as_slice).collect();
            for (o, (m, r)) in outs.chunks_mut(acts.len().max(1)).zip(which) {
                if let ([x], [y]) = (acts.as_slice(), &mut *o) {
                    *y = dot_one(simd, m.ty(), &m.row(r), x);
                    continue;
                }
                // Each unpacked chunk of weights serves up to four activation rows.
                for (y, a) in o.chunks_mut(ROWS).zip(acts.chunks(ROWS)) {
                    dots_of_row(simd, m.ty(), &m.row(r), a, y);
                }
            }
        },
    )
}

/// Activation rows one pass over a weight row serves.
const ROWS: usize = 4;

/// [`dots_of_row`] for one activation row (a decode step), with one accumulator.
#[inline(always)]
fn dot_one(simd: V3, ty: GgmlType, row: &[u8], x: &[ActBlock]) -> f32 {
    if !unpacked_here(ty) {
        return scalar::dot(ty, row, x);
    }
    let mut acc = simd.avx._mm256_setzero_ps();
    let mut offset = 0f32;
    for_each_chunk!(simd, ty, row, |c, u, sign, a, b| {
        let Some(x) = x.get(c) else {
            continue;
        };
        let (p, s, o) = chunk_dot(simd, u, sign, a, b, x);
        acc = simd.fma._mm256_fmadd_ps(p, s, acc);
        offset += o;
    });
    sum8(acc) + offset
}

/// `out[j] = Σ w·x_j` for one weight row and up to [`ROWS`] activation rows.
#[inline(always)]
fn dots_of_row(simd: V3, ty: GgmlType, row: &[u8], xs: &[&[ActBlock]], out: &mut [f32]) {
    if !unpacked_here(ty) {
        for (y, x) in out.iter_mut().zip(xs) {
            *y = scalar::dot(ty, row, x);
        }
        return;
    }
    let n = xs.len().min(ROWS).min(out.len());
    let mut acc = [simd.avx._mm256_setzero_ps(); ROWS];
    let mut offset = [0f32; ROWS];
    for_each_chunk!(simd, ty, row, |c, u, sign, a, b| {
        for j in 0..n {
            let Some(x) = xs[j].get(c) else {
                continue;
            };
            let (p, s, o) = chunk_dot(simd, u, sign, a, b, x);
            acc[j] = simd.fma._mm256_fmadd_ps(p, s, acc[j]);
            offset[j] += o;
        }
    });
    for j in 0..n {
        out[j] = sum8(acc[j]) + offset[j];
    }
}

/// The dots of every weight row `which` yields with every f32 activation row, into `outs`
/// (`[rows, xs.len()]`), under one feature-enabled call.
#[inline(always)]
pub fn float_dots<'a>(
    simd: V3,
    which: impl Iterator<Item = (&'a QuantMatrix, usize)>,
    xs: &[FloatRow],
    outs: &mut [f32],
) {
    simd.vectorize(
        #[inline(always)]
        || {
            for (o, (m, r)) in outs.chunks_mut(xs.len().max(1)).zip(which) {
                // Each chunk, unpacked and widened once, serves up to four activation rows.
                for (y, x) in o.chunks_mut(ROWS).zip(xs.chunks(ROWS)) {
                    float_dots_of_row(simd, m.ty(), &m.row(r), x, y);
                }
            }
        },
    )
}

/// `Σ w·x` of one row and f32 activations (see [`float_dots_of_row`]).
#[inline(always)]
pub fn float_dot(simd: V3, ty: GgmlType, row: &[u8], x: &FloatRow) -> f32 {
    let mut out = [0f32];
    float_dots_of_row(simd, ty, row, std::slice::from_ref(x), &mut out);
    out[0]
}

/// `out[j] = Σ w·x_j` for one weight row and up to [`ROWS`] rows of f32 activations: each
/// chunk's bytes widened to f32 in registers once, then multiplied with every row.
#[inline(always)]
fn float_dots_of_row(simd: V3, ty: GgmlType, row: &[u8], xs: &[FloatRow], out: &mut [f32]) {
    if !unpacked_here(ty) {
        for (y, x) in out.iter_mut().zip(xs) {
            *y = scalar::float_dot(ty, row, x);
        }
        return;
    }
    let (avx, avx2, fma) = (simd.avx, simd.avx2, simd.fma);
    let n = xs.len().min(ROWS).min(out.len());
    let mut acc = [avx._mm256_setzero_ps(); ROWS];
    let mut offset = [0f32; ROWS];
    for_each_chunk!(simd, ty, row, |c, u, sign, a, b| {
        // Q8_0's weights are signed: widen them as such instead of |w|.
        let (w, signed) = match sign {
            Some(w) => (w, true),
            None => (u, false),
        };
        let (lo, hi) = (avx._mm256_castsi256_si128(w), avx2._mm256_extracti128_si256::<1>(w));
        let quarters = [
            lo,
            simd.sse2._mm_srli_si128::<8>(lo),
            hi,
            simd.sse2._mm_srli_si128::<8>(hi),
        ];
        let widened = [
            widen8(simd, quarters[0], signed),
            widen8(simd, quarters[1], signed),
            widen8(simd, quarters[2], signed),
            widen8(simd, quarters[3], signed),
        ];
        let (a0, a1) = (avx._mm256_set1_ps(a[0]), avx._mm256_set1_ps(a[1]));
        for j in 0..n {
            let x = &xs[j];
            let (Some(v), Some(sums)) = (x.x.get(c * BLOCK..(c + 1) * BLOCK), x.sums.get(c)) else {
                continue;
            };
            let first = fma._mm256_fmadd_ps(widened[1], load8(v, 8), avx._mm256_mul_ps(widened[0], load8(v, 0)));
            let second = fma._mm256_fmadd_ps(widened[3], load8(v, 24), avx._mm256_mul_ps(widened[2], load8(v, 16)));
            acc[j] = fma._mm256_fmadd_ps(first, a0, acc[j]);
            acc[j] = fma._mm256_fmadd_ps(second, a1, acc[j]);
            offset[j] += b[0] * sums[0] + b[1] * sums[1];
        }
    });
    for j in 0..n {
        out[j] = sum8(acc[j]) + offset[j];
    }
}
