//! Decode products against Q4_0, Q4_1 and Q8_0 weights stored sixteen rows interleaved, with
//! AVX-512 VNNI: one 32-bit lane per weight row, so a block's sixteen dots come out of
//! `vpdpbusd` side by side — no horizontal sums, and the rows' scales are one vector.
//!
//! Stored GGUF-style (a row's blocks one after another), a one-row product takes every
//! block's scales as scalars, widens its weights and sums across lanes at the end of each
//! row: ~15 instructions per block of 32 weights. Interleaved, a block of sixteen rows takes
//! ~2 per row (8-bit activations) or ~3 (16-bit).
//!
//! # Layout
//! Rows `16g..16g + 16` form group `g`; a group holds its blocks in order, each *group block*
//! the same bytes as the sixteen rows' blocks (so the matrix keeps its size):
//! - the rows' scales `d`, 16 × f16; for Q4_1 then their minimums `m`, 16 × f16;
//! - their codes in 64-byte words: word `t`, lane `r` holds bytes `4t..4t + 4` of row `r`'s
//!   codes — Q4_x: the 16 packed bytes (weight `i` in the low nibble of byte `i`, weight
//!   `16 + i` in its high nibble), 4 words; Q8_0: the 32 weights as unsigned `u = w + 128`,
//!   8 words.
//!
//! Every type then reads `w = d·u + m` with `u` unsigned (Q4_0: `m = −8d`; Q8_0: `m = −128d`).
//!
//! # Activations
//! 8-bit activations `q` go straight into `vpdpbusd` (`u` unsigned × `q` signed). 16-bit ones
//! are split into `q = 256·h + l` (`h` signed, `l` unsigned bytes): `Σu·h` as above, `Σl·u`
//! with the roles swapped (`l` unsigned × `u` signed, which Q4's nibbles are; Q8_0's `u − 128`
//! is, and `128·Σl` adds the difference back). Both sums are exact integers: the products
//! equal the row kernels' up to the order of float additions.

use core::arch::x86_64::{
    __m256i, __m512i, _mm512_add_epi32, _mm512_add_ps, _mm512_and_si512, _mm512_cvtepi32_ps, _mm512_cvtph_ps,
    _mm512_dpbusd_epi32, _mm512_fmadd_ps, _mm512_mul_ps, _mm512_set1_epi32, _mm512_set1_epi8, _mm512_set1_ps,
    _mm512_setzero_ps, _mm512_setzero_si512, _mm512_slli_epi32, _mm512_srli_epi16, _mm512_xor_si512,
};

use super::super::{ActBlock, ActInt, BLOCK};
use super::bytes;
use super::gemm::Avx512Vnni;
use crate::gguf::GgmlType;

/// Weight rows per group.
pub const GROUP: usize = 16;

/// Whether `ty` can be interleaved.
pub fn handles(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
}

/// A type's GGUF block: bytes before the codes (scale, minimum) and code bytes.
fn parts(ty: GgmlType) -> (usize, usize) {
    match ty {
        GgmlType::Q4_1 => (4, 16),
        GgmlType::Q4_0 => (2, 16),
        _ => (2, BLOCK),
    }
}

/// `rows` rows of `ty` (a whole number of groups; `bytes` row-major GGUF blocks) interleaved.
pub fn interleave(ty: GgmlType, rows: usize, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    if rows == 0 || !rows.is_multiple_of(GROUP) || !handles(ty) {
        return out;
    }
    let row_bytes = bytes.len() / rows;
    for r in 0..rows {
        let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
        for (c, blk) in row.chunks_exact(ty.block_bytes()).enumerate() {
            place(ty, &mut out, row_bytes, r, c, blk);
        }
    }
    out
}

/// Where byte `i` of lane `r`'s run of code bytes lies in the 64-byte words from `base`:
/// word `i / 4`, lane `r`.
pub(super) fn word_byte(base: usize, r: usize, i: usize) -> usize {
    base + 64 * (i / 4) + 4 * r + i % 4
}

/// Appends lane `r`'s `len` code bytes from the words at `base` of a group block, four at a
/// time (a row handed back in GGUF order).
pub(super) fn lane_bytes(out: &mut Vec<u8>, gb: &[u8], base: usize, r: usize, len: usize) {
    for t in 0..len / 4 {
        let at = word_byte(base, r, 4 * t);
        out.extend_from_slice(&gb[at..at + 4]);
    }
}

/// Writes a group's sixteen dots with activation row `j` (of `n`) to `outs[r·n + j]`.
pub(super) fn store_lanes(sums: [f32; GROUP], outs: &mut [f32], n: usize, j: usize) {
    for (r, s) in sums.iter().enumerate() {
        outs[r * n + j] = *s;
    }
}

/// Where row `r`'s block `c` starts its group block.
fn group_block(ty: GgmlType, row_bytes: usize, r: usize, c: usize) -> usize {
    (r / GROUP) * GROUP * row_bytes + c * GROUP * ty.block_bytes()
}

/// Row `r`'s block `c` (GGUF) into its place: scale at `2l`, minimum at `32 + 2l`, codes
/// in the words after the scales (lane `l = r mod 16`).
fn place(ty: GgmlType, out: &mut [u8], row_bytes: usize, r: usize, c: usize, blk: &[u8]) {
    let at = group_block(ty, row_bytes, r, c);
    let (head, code_bytes) = parts(ty);
    let l = r % GROUP;
    out[at + 2 * l..at + 2 * l + 2].copy_from_slice(&blk[..2]);
    if head == 4 {
        out[at + 2 * GROUP + 2 * l..at + 2 * GROUP + 2 * l + 2].copy_from_slice(&blk[2..4]);
    }
    for i in 0..code_bytes {
        let v = blk[head + i];
        out[at + word_byte(GROUP * head, l, i)] = if ty == GgmlType::Q8_0 { v ^ 0x80 } else { v };
    }
}

/// Row `r` of an interleaved matrix back in GGUF blocks.
pub fn row(ty: GgmlType, data: &[u8], row_bytes: usize, r: usize) -> Vec<u8> {
    let (head, code_bytes) = parts(ty);
    let l = r % GROUP;
    let mut out = Vec::with_capacity(row_bytes);
    for c in 0..row_bytes / ty.block_bytes() {
        let at = group_block(ty, row_bytes, r, c);
        let Some(gb) = data.get(at..at + GROUP * ty.block_bytes()) else {
            out.resize(row_bytes, 0);
            return out;
        };
        out.extend_from_slice(&gb[2 * l..2 * l + 2]);
        if head == 4 {
            out.extend_from_slice(&gb[2 * GROUP + 2 * l..2 * GROUP + 2 * l + 2]);
        }
        let codes = out.len();
        lane_bytes(&mut out, gb, GROUP * head, l, code_bytes);
        if ty == GgmlType::Q8_0 {
            out[codes..].iter_mut().for_each(|b| *b ^= 0x80);
        }
    }
    out
}

/// One block of activations split for the kernel: `hi` the 8-bit `q` (or 16-bit `q`'s high
/// bytes, signed), `lo` 16-bit `q`'s low bytes (unsigned), `d`, `d·Σq` and `128·Σlo`.
#[derive(Debug, Clone, Copy)]
pub struct SplitBlock {
    hi: [u8; BLOCK],
    lo: [u8; BLOCK],
    d: f32,
    dsum: f32,
    lo_sum: i32,
}

/// An activation row's blocks as [`group_dots`] takes them.
pub fn split_row<Q: ActInt>(row: &[ActBlock<Q>]) -> Vec<SplitBlock> {
    row.iter()
        .map(|a| {
            let q: [i32; BLOCK] = std::array::from_fn(|i| a.q[i].into());
            let (hi, lo): ([u8; BLOCK], [u8; BLOCK]) = match Q::WIDE {
                true => (
                    std::array::from_fn(|i| (q[i] >> 8) as u8),
                    std::array::from_fn(|i| (q[i] & 0xFF) as u8),
                ),
                false => (std::array::from_fn(|i| q[i] as u8), [0; BLOCK]),
            };
            SplitBlock {
                hi,
                lo,
                d: a.d,
                dsum: a.dsum,
                lo_sum: 128 * lo.iter().map(|&v| v as i32).sum::<i32>(),
            }
        })
        .collect()
}

/// The sixteen dots of group `group` (its group blocks, `ty`) with each activation row of
/// `acts` (split with [`split_row`], 16-bit when `wide`): `outs[r·acts.len() + j]` for weight
/// row `r` of the group and activation row `j`.
pub fn group_dots(
    token: Avx512Vnni,
    ty: GgmlType,
    group: &[u8],
    acts: &[Vec<SplitBlock>],
    wide: bool,
    outs: &mut [f32],
) {
    let _ = token;
    // SAFETY: the kernels need AVX-512 F, BW and VNNI (and F16C's conversions, which AVX-512 F
    // has in 512 bits); an `Avx512Vnni` token exists only where `Avx512Vnni::detect` found
    // them on this CPU.
    unsafe {
        match (ty, wide) {
            (GgmlType::Q4_0, false) => group_on::<false, false, false>(group, acts, outs),
            (GgmlType::Q4_0, true) => group_on::<true, false, false>(group, acts, outs),
            (GgmlType::Q4_1, false) => group_on::<false, false, true>(group, acts, outs),
            (GgmlType::Q4_1, true) => group_on::<true, false, true>(group, acts, outs),
            (GgmlType::Q8_0, false) => group_on::<false, true, false>(group, acts, outs),
            (GgmlType::Q8_0, true) => group_on::<true, true, false>(group, acts, outs),
            _ => {}
        }
    }
}

/// [`group_dots`] for one type (`Q8`: Q8_0, else Q4_x; `MIN`: Q4_1's minimums) and width.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn group_on<const WIDE: bool, const Q8: bool, const MIN: bool>(
    group: &[u8],
    acts: &[Vec<SplitBlock>],
    outs: &mut [f32],
) {
    let n = acts.len();
    if outs.len() < GROUP * n {
        return;
    }
    let (head, code_bytes) = match (Q8, MIN) {
        (true, _) => (2, BLOCK),
        (false, true) => (4, 16),
        (false, false) => (2, 16),
    };
    let block_bytes = GROUP * (head + code_bytes);
    for (j, x) in acts.iter().enumerate() {
        let mut acc = _mm512_setzero_ps();
        let mut offsets = _mm512_setzero_ps();
        for (gb, a) in group.chunks_exact(block_bytes).zip(x) {
            super::prefetch(gb, super::AHEAD, 5);
            let d = _mm512_cvtph_ps(bytes::<32, __m256i>(gb));
            let m = match (MIN, Q8) {
                (true, _) => _mm512_cvtph_ps(bytes::<32, __m256i>(gb.get(32..).unwrap_or(&[]))),
                (false, true) => _mm512_mul_ps(d, _mm512_set1_ps(-128.0)),
                (false, false) => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
            };
            let codes = gb.get(GROUP * head..).unwrap_or(&[]);
            let p = match Q8 {
                true => codes_dots::<WIDE, true, 8>(codes, a),
                false => codes_dots::<WIDE, false, 4>(codes, a),
            };
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(d, _mm512_set1_ps(a.d)), acc);
            offsets = _mm512_fmadd_ps(m, _mm512_set1_ps(a.dsum), offsets);
        }
        store_lanes(pulp::cast(_mm512_add_ps(acc, offsets)), outs, n, j);
    }
}

/// `Σ u·q` of a group block's codes (`WORDS` 64-byte words) and one activation block, per
/// lane (weight row), exactly.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
fn codes_dots<const WIDE: bool, const Q8: bool, const WORDS: usize>(codes: &[u8], a: &SplitBlock) -> __m512i {
    let word = |b: &[u8; BLOCK], k: usize| {
        _mm512_set1_epi32(i32::from_le_bytes([b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]]))
    };
    let mut high = _mm512_setzero_si512();
    let mut low = _mm512_setzero_si512();
    let mut add = |u: __m512i, k: usize| {
        high = _mm512_dpbusd_epi32(high, u, word(&a.hi, k));
        if WIDE {
            // `l` unsigned × `u` signed: Q8_0's `u − 128` (its top bit flipped).
            let signed = match Q8 {
                true => _mm512_xor_si512(u, _mm512_set1_epi8(-128)),
                false => u,
            };
            low = _mm512_dpbusd_epi32(low, word(&a.lo, k), signed);
        }
    };
    let low4 = _mm512_set1_epi8(0x0F);
    for t in 0..WORDS {
        let z: __m512i = bytes::<64, _>(codes.get(64 * t..).unwrap_or(&[]));
        match Q8 {
            true => add(z, t),
            false => {
                // Bytes 4t..4t+4: weights 4t.. in the low nibbles, 16 + 4t.. in the high ones.
                add(_mm512_and_si512(z, low4), t);
                add(_mm512_and_si512(_mm512_srli_epi16::<4>(z), low4), 4 + t);
            }
        }
    }
    if !WIDE {
        return high;
    }
    let low = match Q8 {
        true => _mm512_add_epi32(low, _mm512_set1_epi32(a.lo_sum)),
        false => low,
    };
    _mm512_add_epi32(_mm512_slli_epi32::<8>(high), low)
}
