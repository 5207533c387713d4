//! The products in AVX2 registers (x86-64 CPUs from 2013 on; chosen at run time): per chunk of
//! 32 weights one unsigned × signed byte product (`vpmaddubsw`), pairs summed to 32 bits and
//! scaled in f32. Q4_0, Q4_1, Q8_0, Q4_K and Q6_K (the blocks of the supported GGUF files)
//! unpack in registers; Q5 formats use the scalar unpacking.

use core::arch::x86_64::{__m128i, __m256, __m256i};

use pulp::x86::V3;

use super::chunks::{f16_at, scale_min_k4};
use super::{scalar, ActBlock, QuantMatrix, BLOCK};
use crate::gguf::GgmlType;

#[inline(always)]
fn load32(b: &[u8]) -> __m256i {
    let bytes: [u8; 32] = match b.first_chunk::<32>() {
        Some(a) => *a,
        None => [0; 32],
    };
    pulp::cast(bytes)
}

#[inline(always)]
fn load16(b: &[u8]) -> __m128i {
    let bytes: [u8; 16] = match b.first_chunk::<16>() {
        Some(a) => *a,
        None => [0; 16],
    };
    pulp::cast(bytes)
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

/// `Σ w·x` of one row (see [`scalar::dot`]).
#[inline(always)]
pub fn dot(simd: V3, ty: GgmlType, row: &[u8], x: &[ActBlock]) -> f32 {
    simd.vectorize(
        #[inline(always)]
        || dot_here(simd, ty, row, x),
    )
}

/// The dots of every weight row `which` lists (`(part, row)`) with every activation row, into
/// `outs` (`[which.len(), acts.len()]`), under one feature-enabled call.
#[inline(always)]
pub fn dots(simd: V3, parts: &[QuantMatrix], which: &[(usize, usize)], acts: &[Vec<ActBlock>], outs: &mut [f32]) {
    simd.vectorize(
        #[inline(always)]
        || {
            for (o, &(p, r)) in outs.chunks_mut(acts.len().max(1)).zip(which) {
                let m = &parts[p];
                let row = m.row(r);
                for (y, a) in o.iter_mut().zip(acts) {
                    *y = dot_here(simd, m.ty(), row, a);
                }
            }
        },
    )
}

#[inline(always)]
fn dot_here(simd: V3, ty: GgmlType, row: &[u8], x: &[ActBlock]) -> f32 {
    let (avx, avx2, fma) = (simd.avx, simd.avx2, simd.fma);
    let low4 = avx._mm256_set1_epi8(0x0F);
    let mut acc = avx._mm256_setzero_ps();
    let mut offset = 0f32;
    let bytes = ty.block_bytes();
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let low4_128 = simd.sse2._mm_set1_epi8(0x0F);
            for (b, a) in row.chunks_exact(bytes).zip(x) {
                let d = f16_at(b, 0);
                let (m, qs) = match ty {
                    GgmlType::Q4_1 => (f16_at(b, 2), &b[4..20]),
                    _ => (-8.0 * d, &b[2..18]),
                };
                let packed = load16(qs);
                let lo = simd.sse2._mm_and_si128(packed, low4_128);
                let hi = simd.sse2._mm_and_si128(simd.sse2._mm_srli_epi16::<4>(packed), low4_128);
                let u = avx._mm256_set_m128i(hi, lo);
                let p = byte_dots(simd, u, pulp::cast(a.q));
                acc = fma._mm256_fmadd_ps(p, avx._mm256_set1_ps(d * a.d), acc);
                offset += a.d * m * (a.sums[0] + a.sums[1]) as f32;
            }
        }
        GgmlType::Q8_0 => {
            for (b, a) in row.chunks_exact(bytes).zip(x) {
                let w = load32(&b[2..2 + BLOCK]);
                let q: __m256i = pulp::cast(a.q);
                // Unsigned × signed: |w| times q with w's sign.
                let p = byte_dots(simd, avx2._mm256_sign_epi8(w, w), avx2._mm256_sign_epi8(q, w));
                acc = fma._mm256_fmadd_ps(p, avx._mm256_set1_ps(f16_at(b, 0) * a.d), acc);
            }
        }
        GgmlType::Q4K => {
            for (b, xs) in row.chunks_exact(bytes).zip(x.chunks_exact(8)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let sc = &b[4..16];
                for g in 0..4 {
                    let packed = load32(&b[16 + 32 * g..]);
                    let halves = [
                        avx2._mm256_and_si256(packed, low4),
                        avx2._mm256_and_si256(avx2._mm256_srli_epi16::<4>(packed), low4),
                    ];
                    for (j, u) in halves.into_iter().enumerate() {
                        let a = &xs[2 * g + j];
                        let (s, m) = scale_min_k4(2 * g + j, sc);
                        let p = byte_dots(simd, u, pulp::cast(a.q));
                        acc = fma._mm256_fmadd_ps(p, avx._mm256_set1_ps(d * s * a.d), acc);
                        offset -= a.d * dmin * m * (a.sums[0] + a.sums[1]) as f32;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            let low2 = avx._mm256_set1_epi8(0x03);
            for (b, xs) in row.chunks_exact(bytes).zip(x.chunks_exact(8)) {
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let ql0 = load32(&b[64 * half..]);
                    let ql1 = load32(&b[64 * half + 32..]);
                    let qh = load32(&b[128 + 32 * half..]);
                    let high = |shifted: __m256i| avx2._mm256_slli_epi16::<4>(avx2._mm256_and_si256(shifted, low2));
                    let chunks = [
                        avx2._mm256_or_si256(avx2._mm256_and_si256(ql0, low4), high(qh)),
                        avx2._mm256_or_si256(
                            avx2._mm256_and_si256(ql1, low4),
                            high(avx2._mm256_srli_epi16::<2>(qh)),
                        ),
                        avx2._mm256_or_si256(
                            avx2._mm256_and_si256(avx2._mm256_srli_epi16::<4>(ql0), low4),
                            high(avx2._mm256_srli_epi16::<4>(qh)),
                        ),
                        avx2._mm256_or_si256(
                            avx2._mm256_and_si256(avx2._mm256_srli_epi16::<4>(ql1), low4),
                            high(avx2._mm256_srli_epi16::<6>(qh)),
                        ),
                    ];
                    let sc = &b[192 + 8 * half..];
                    for (k, u) in chunks.into_iter().enumerate() {
                        let a = &xs[4 * half + k];
                        let s = [d * (sc[2 * k] as i8) as f32, d * (sc[2 * k + 1] as i8) as f32];
                        let p = byte_dots(simd, u, pulp::cast(a.q));
                        acc = fma._mm256_fmadd_ps(p, scales(simd, s, a.d), acc);
                        offset -= 32.0 * a.d * (s[0] * a.sums[0] as f32 + s[1] * a.sums[1] as f32);
                    }
                }
            }
        }
        _ => return scalar::dot(ty, row, x),
    }
    sum8(acc) + offset
}
