//! Every block format as chunks of 32 weights `w = a·u + b`: the scalar unpacking that the
//! plain-Rust products use and the SIMD kernels are checked against (layouts as in ggml's
//! `ggml-common.h`; the same ones [`crate::gguf`] dequantizes).

use super::BLOCK;
use crate::gguf::GgmlType;

/// 32 weights as `w[i] = a[h]·u[i] + b[h]`, `h` the half (`i / 16`) and `u[i]` in 0..=63.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chunk {
    pub u: [u8; BLOCK],
    pub a: [f32; 2],
    pub b: [f32; 2],
}

/// The little-endian f16 at `at`, widened in a few integer operations: `half`'s conversion
/// checks the CPU's features on every call, which cost a product of Q4_1 blocks (two scales
/// per 32 weights) half its time. Exact for every finite value, subnormals included (the
/// exponent is rebased by an exact multiplication by 2^112); infinities and NaN stay so.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    let h = u16::from_le_bytes([b[at], b[at + 1]]) as u32;
    let magnitude = f32::from_bits((h & 0x7FFF) << 13) * f32::from_bits(0x7780_0000);
    let special = if h & 0x7C00 == 0x7C00 { 0x7F80_0000 } else { 0 };
    f32::from_bits(magnitude.to_bits() | special | ((h & 0x8000) << 16))
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block.
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((s[j] & 63) as f32, (s[j + 4] & 63) as f32)
    } else {
        (
            ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4)) as f32,
            ((s[j + 4] >> 4) | ((s[j] >> 6) << 4)) as f32,
        )
    }
}

/// Calls `f(c, chunk)` for every chunk `c` of a row of `ty` blocks (not Q8_0, whose weights
/// are signed: see [`super::scalar`]).
pub fn for_each_chunk(ty: GgmlType, row: &[u8], mut f: impl FnMut(usize, &Chunk)) {
    let (len, bytes) = (ty.block_len(), ty.block_bytes());
    for (blk, b) in row.chunks_exact(bytes).enumerate() {
        let first = blk * len / BLOCK;
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => f(first, &small_block(ty, b)),
            GgmlType::Q4K | GgmlType::Q5K => {
                let q5 = ty == GgmlType::Q5K;
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let (qh, qs) = match q5 {
                    true => (&b[16..48], &b[48..176]),
                    false => (&b[16..16], &b[16..144]),
                };
                for g in 0..4 {
                    let q = &qs[32 * g..32 * g + 32];
                    for j in 0..2 {
                        let (sc, m) = scale_min_k4(2 * g + j, scales);
                        let mut u = [0u8; BLOCK];
                        for (l, u) in u.iter_mut().enumerate() {
                            let nibble = if j == 0 { q[l] & 0x0F } else { q[l] >> 4 };
                            let high = if q5 && qh[l] & (1 << (2 * g + j)) != 0 { 16 } else { 0 };
                            *u = nibble + high;
                        }
                        let (a, c) = (d * sc, -dmin * m);
                        f(
                            first + 2 * g + j,
                            &Chunk {
                                u,
                                a: [a; 2],
                                b: [c; 2],
                            },
                        );
                    }
                }
            }
            GgmlType::Q6K => {
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let ql = &b[64 * half..64 * half + 64];
                    let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                    for k in 0..4 {
                        let mut u = [0u8; BLOCK];
                        for (l, u) in u.iter_mut().enumerate() {
                            let low = match k {
                                0 => ql[l] & 0x0F,
                                1 => ql[l + 32] & 0x0F,
                                2 => ql[l] >> 4,
                                _ => ql[l + 32] >> 4,
                            };
                            *u = low | (((qh[l] >> (2 * k)) & 3) << 4);
                        }
                        let a = [d * (sc[2 * k] as i8) as f32, d * (sc[2 * k + 1] as i8) as f32];
                        f(
                            first + 4 * half + k,
                            &Chunk {
                                u,
                                a,
                                b: [-32.0 * a[0], -32.0 * a[1]],
                            },
                        );
                    }
                }
            }
            _ => {}
        }
    }
}

/// A Q4_0, Q4_1, Q5_0 or Q5_1 block (32 weights) as a chunk.
fn small_block(ty: GgmlType, b: &[u8]) -> Chunk {
    let (d, m, qh, qs) = match ty {
        GgmlType::Q4_0 => (f16_at(b, 0), None, 0, &b[2..18]),
        GgmlType::Q4_1 => (f16_at(b, 0), Some(f16_at(b, 2)), 0, &b[4..20]),
        GgmlType::Q5_0 => (
            f16_at(b, 0),
            None,
            u32::from_le_bytes([b[2], b[3], b[4], b[5]]),
            &b[6..22],
        ),
        _ => (
            f16_at(b, 0),
            Some(f16_at(b, 2)),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            &b[8..24],
        ),
    };
    let five = matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1);
    let mut u = [0u8; BLOCK];
    for (j, &q) in qs.iter().enumerate() {
        let high = |bit: usize| if five && (qh >> bit) & 1 != 0 { 16 } else { 0 };
        u[j] = (q & 0x0F) + high(j);
        u[j + 16] = (q >> 4) + high(j + 16);
    }
    // Symmetric formats centre u on 8 (Q4_0) or 16 (Q5_0); the others add a minimum.
    let b = match (m, five) {
        (Some(m), _) => m,
        (None, false) => -8.0 * d,
        (None, true) => -16.0 * d,
    };
    Chunk {
        u,
        a: [d; 2],
        b: [b; 2],
    }
}
