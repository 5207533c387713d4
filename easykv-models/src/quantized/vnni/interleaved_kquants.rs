//! Decode products against Q4_K and Q6_K weights stored sixteen rows interleaved (as
//! [`super::interleaved`] does for the 32-weight types), with 16-bit activations quantized per
//! 256 values ([`super::kquants::SuperBlock`]): one 32-bit lane per weight row, the sub-block
//! scales multiplied in as integers, one float conversion per block of 256.
//!
//! # Layout
//! A group block holds one 256-weight block of each of sixteen rows:
//! - Q4_K: `d` × 16, `dmin` × 16 (f16); the 6-bit sub-block scales and minimums unpacked to
//!   bytes, `[sub-block][row]` (8 × 16 each: 64 bytes more than the packed 12 per row, +2.8 %);
//!   then the codes in 64-byte words, word `8g + t` lane `r` = bytes `32g + 4t..+4` of row
//!   `r`'s `qs` (low nibbles weights `64g + i`, high nibbles `64g + 32 + i`).
//! - Q6_K (same size as its blocks): `d` × 16; the signed scales `[k][row]` (16 × 16); then
//!   the codes in the order the kernel reads them ([`k6_code_byte`]): for each half `n` and
//!   step `t` < 8, three words — `ql` bytes `64n + 4t..+4`, `ql` bytes `64n + 32 + 4t..+4`,
//!   `qh` bytes `32n + 4t..+4` — so a block is read front to back (with `qh` after all of
//!   `ql`, its first reads missed the cache in every block: about 40 % of this kernel's Q6_K
//!   samples in a Qwen2.5 decode on a Zen 4 EPYC).
//!
//! # Arithmetic
//! Each 16-bit activation is split into a signed high byte and an unsigned low byte, as in
//! [`super::interleaved`]; per sub-block the two `vpdpbusd` sums are multiplied by the rows'
//! integer scales and added up over the block in 32-bit lanes (bounds in the kernels), then
//! converted once: `256·high + low`.

use core::arch::x86_64::{
    __m128i, __m256i, __m512, __m512i, _mm512_add_epi32, _mm512_and_si512, _mm512_cvtepi32_ps, _mm512_cvtepi8_epi32,
    _mm512_cvtepu8_epi32, _mm512_cvtph_ps, _mm512_dpbusd_epi32, _mm512_fmadd_ps, _mm512_mul_ps, _mm512_mullo_epi32,
    _mm512_or_si512, _mm512_set1_epi32, _mm512_set1_epi8, _mm512_set1_ps, _mm512_setzero_ps, _mm512_setzero_si512,
    _mm512_slli_epi16, _mm512_srli_epi16, _mm512_sub_ps,
};

use super::super::chunks::scale_min_k4;
use super::bytes;
use super::gemm::Avx512Vnni;
use super::interleaved::{lane_bytes, store_lanes, word_byte, GROUP};
use super::kquants::{SuperBlock, SUPER};
use crate::gguf::GgmlType;

/// Whether `ty` can be interleaved here.
pub fn handles(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4K | GgmlType::Q6K)
}

/// Bytes of one group block of `ty` (sixteen rows' blocks, interleaved).
pub fn group_block_bytes(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4K => GROUP * (ty.block_bytes() + 4),
        _ => GROUP * ty.block_bytes(),
    }
}

// Offsets in a Q4_K group block.
const K4_SC: usize = 64;
const K4_MIN: usize = K4_SC + 8 * GROUP;
const K4_CODES: usize = K4_MIN + 8 * GROUP;
// Offsets in a Q6_K group block.
const K6_SC: usize = 2 * GROUP;
const K6_CODES: usize = K6_SC + 16 * GROUP;

/// Where lane `l`'s code byte `i` of a Q6_K block (`ql` 0..128, then `qh` 128..192, GGUF's
/// order) lies in its group block: words in the kernel's reading order, three per step.
fn k6_code_byte(l: usize, i: usize) -> usize {
    let (word, step) = match i {
        // `ql` word `m`: half `m / 16`, step `m mod 8`; the first or second of the step.
        0..128 => {
            let m = i / 4;
            (m % 16 / 8, 8 * (m / 16) + m % 8)
        }
        // `qh` word `m`: half `m / 8`, step `m mod 8`; the third of the step.
        _ => {
            let m = (i - 128) / 4;
            (2, m)
        }
    };
    K6_CODES + 64 * (3 * step + word) + 4 * l + i % 4
}

/// `rows` rows of `ty` (a whole number of groups; `bytes` row-major GGUF blocks) interleaved.
pub fn interleave(ty: GgmlType, rows: usize, bytes: &[u8]) -> Vec<u8> {
    let blocks = match rows {
        0 => 0,
        _ => bytes.len() / rows / ty.block_bytes(),
    };
    let mut out = vec![0u8; rows / GROUP * blocks * group_block_bytes(ty)];
    if rows == 0 || !rows.is_multiple_of(GROUP) || !handles(ty) {
        return out;
    }
    for (r, row) in bytes.chunks_exact(blocks * ty.block_bytes()).enumerate() {
        for (c, blk) in row.chunks_exact(ty.block_bytes()).enumerate() {
            let at = ((r / GROUP) * blocks + c) * group_block_bytes(ty);
            let (gb, l) = (&mut out[at..at + group_block_bytes(ty)], r % GROUP);
            match ty {
                GgmlType::Q4K => {
                    gb[2 * l..2 * l + 2].copy_from_slice(&blk[0..2]);
                    gb[32 + 2 * l..34 + 2 * l].copy_from_slice(&blk[2..4]);
                    for j in 0..8 {
                        let (sc, m) = scale_min_k4(j, &blk[4..16]);
                        gb[K4_SC + GROUP * j + l] = sc as u8;
                        gb[K4_MIN + GROUP * j + l] = m as u8;
                    }
                    for i in 0..128 {
                        gb[word_byte(K4_CODES, l, i)] = blk[16 + i];
                    }
                }
                _ => {
                    gb[2 * l..2 * l + 2].copy_from_slice(&blk[208..210]);
                    for k in 0..16 {
                        gb[K6_SC + GROUP * k + l] = blk[192 + k];
                    }
                    for (i, &b) in blk[..192].iter().enumerate() {
                        gb[k6_code_byte(l, i)] = b;
                    }
                }
            }
        }
    }
    out
}

/// Row `r` of an interleaved matrix (`blocks` blocks per row) back in GGUF blocks.
pub fn row(ty: GgmlType, data: &[u8], blocks: usize, r: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks * ty.block_bytes());
    let l = r % GROUP;
    for c in 0..blocks {
        let at = ((r / GROUP) * blocks + c) * group_block_bytes(ty);
        let Some(gb) = data.get(at..at + group_block_bytes(ty)) else {
            out.resize(blocks * ty.block_bytes(), 0);
            return out;
        };
        match ty {
            GgmlType::Q4K => {
                out.extend_from_slice(&gb[2 * l..2 * l + 2]);
                out.extend_from_slice(&gb[32 + 2 * l..34 + 2 * l]);
                let sc: [u8; 8] = std::array::from_fn(|j| gb[K4_SC + GROUP * j + l]);
                let m: [u8; 8] = std::array::from_fn(|j| gb[K4_MIN + GROUP * j + l]);
                out.extend_from_slice(&pack_scales(&sc, &m));
                lane_bytes(&mut out, gb, K4_CODES, l, 128);
            }
            _ => {
                for i in (0..192).step_by(4) {
                    let at = k6_code_byte(l, i);
                    out.extend_from_slice(&gb[at..at + 4]);
                }
                out.extend((0..16).map(|k| gb[K6_SC + GROUP * k + l]));
                out.extend_from_slice(&gb[2 * l..2 * l + 2]);
            }
        }
    }
    out
}

/// The 12 bytes Q4_K packs eight 6-bit scales and minimums into ([`scale_min_k4`]'s inverse).
fn pack_scales(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    q
}

/// A block of 256 activations split for the kernels: `q = 256·hi + lo` (`hi` signed, `lo`
/// unsigned), `d`, and the sums of `q` over each run of 32 and of 16.
#[derive(Debug, Clone)]
pub struct SplitSuper {
    hi: [u8; SUPER],
    lo: [u8; SUPER],
    d: f32,
    sums32: [i32; SUPER / 32],
    sums16: [i32; SUPER / 16],
}

/// An activation row quantized per 256 ([`super::kquants::quantize_row`]) as the kernels take it.
pub fn split_row(row: &[SuperBlock]) -> Vec<SplitSuper> {
    row.iter()
        .map(|a| SplitSuper {
            hi: std::array::from_fn(|i| (a.q[i] >> 8) as u8),
            lo: std::array::from_fn(|i| (a.q[i] & 0xFF) as u8),
            d: a.d,
            sums32: a.sums,
            sums16: std::array::from_fn(|k| a.q[16 * k..16 * k + 16].iter().map(|&v| v as i32).sum()),
        })
        .collect()
}

/// The sixteen dots of one group (its group blocks, `ty`) with each activation row of `acts`:
/// `outs[r·acts.len() + j]` for weight row `r` of the group and activation row `j`.
pub fn group_dots(token: Avx512Vnni, ty: GgmlType, group: &[u8], acts: &[Vec<SplitSuper>], outs: &mut [f32]) {
    let _ = token;
    // SAFETY: the kernels need AVX-512 F, BW and VNNI; an `Avx512Vnni` token exists only where
    // `Avx512Vnni::detect` found them on this CPU.
    unsafe {
        match ty {
            GgmlType::Q4K => group_on::<false>(group, acts, outs),
            GgmlType::Q6K => group_on::<true>(group, acts, outs),
            _ => {}
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn group_on<const Q6: bool>(group: &[u8], acts: &[Vec<SplitSuper>], outs: &mut [f32]) {
    let n = acts.len();
    if outs.len() < GROUP * n {
        return;
    }
    let ty = if Q6 { GgmlType::Q6K } else { GgmlType::Q4K };
    for (j, x) in acts.iter().enumerate() {
        let mut acc = _mm512_setzero_ps();
        for (gb, a) in group.chunks_exact(group_block_bytes(ty)).zip(x) {
            // The whole next group block, where that pays ([`super::prefetch_next_blocks`]): one
            // of 2–3 KiB takes long enough that it arrives in time.
            if super::prefetch_next_blocks() {
                super::prefetch(gb, gb.len(), gb.len().div_ceil(64));
            }
            acc = match Q6 {
                true => q6k_block(gb, a, acc),
                false => q4k_block(gb, a, acc),
            };
        }
        store_lanes(pulp::cast(acc), outs, n, j);
    }
}

/// Four activation bytes from `at` broadcast to every lane.
#[target_feature(enable = "avx512f")]
#[inline]
fn word(b: &[u8; SUPER], at: usize) -> __m512i {
    let v = b
        .get(at..)
        .and_then(|s| s.first_chunk::<4>())
        .copied()
        .unwrap_or([0; 4]);
    _mm512_set1_epi32(i32::from_le_bytes(v))
}

/// Sixteen bytes from `at` widened to 32-bit lanes (unsigned or signed).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
fn lanes<const SIGNED: bool>(gb: &[u8], at: usize) -> __m512i {
    let v: __m128i = bytes::<16, _>(gb.get(at..).unwrap_or(&[]));
    match SIGNED {
        true => _mm512_cvtepi8_epi32(v),
        false => _mm512_cvtepu8_epi32(v),
    }
}

/// `acc` plus one Q4_K group block's sixteen dots with `a`. Integer bounds per lane: the high
/// bytes' `Σ sc·Σu·h` ≤ 8·63·32·15·128, the low bytes' ≤ 8·63·32·15·255, `Σ m·Σq` ≤
/// 8·63·32·32767 (all under 2³¹).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
fn q4k_block(gb: &[u8], a: &SplitSuper, acc: __m512) -> __m512 {
    let d = _mm512_cvtph_ps(bytes::<32, __m256i>(gb));
    let dmin = _mm512_cvtph_ps(bytes::<32, __m256i>(gb.get(32..).unwrap_or(&[])));
    let low4 = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    let (mut high, mut low, mut mins) = (zero, zero, zero);
    for g in 0..4 {
        // Sub-blocks 2g (low nibbles) and 2g + 1 (high nibbles).
        let (mut h0, mut h1, mut l0, mut l1) = (zero, zero, zero, zero);
        for t in 0..8 {
            let z: __m512i = bytes::<64, _>(gb.get(K4_CODES + 64 * (8 * g + t)..).unwrap_or(&[]));
            let u0 = _mm512_and_si512(z, low4);
            let u1 = _mm512_and_si512(_mm512_srli_epi16::<4>(z), low4);
            let (at0, at1) = (64 * g + 4 * t, 64 * g + 32 + 4 * t);
            h0 = _mm512_dpbusd_epi32(h0, u0, word(&a.hi, at0));
            h1 = _mm512_dpbusd_epi32(h1, u1, word(&a.hi, at1));
            l0 = _mm512_dpbusd_epi32(l0, word(&a.lo, at0), u0);
            l1 = _mm512_dpbusd_epi32(l1, word(&a.lo, at1), u1);
        }
        let (s0, s1) = (
            lanes::<false>(gb, K4_SC + GROUP * 2 * g),
            lanes::<false>(gb, K4_SC + GROUP * (2 * g + 1)),
        );
        let (m0, m1) = (
            lanes::<false>(gb, K4_MIN + GROUP * 2 * g),
            lanes::<false>(gb, K4_MIN + GROUP * (2 * g + 1)),
        );
        high = _mm512_add_epi32(
            high,
            _mm512_add_epi32(_mm512_mullo_epi32(h0, s0), _mm512_mullo_epi32(h1, s1)),
        );
        low = _mm512_add_epi32(
            low,
            _mm512_add_epi32(_mm512_mullo_epi32(l0, s0), _mm512_mullo_epi32(l1, s1)),
        );
        let (q0, q1) = (
            _mm512_set1_epi32(a.sums32[2 * g]),
            _mm512_set1_epi32(a.sums32[2 * g + 1]),
        );
        mins = _mm512_add_epi32(
            mins,
            _mm512_add_epi32(_mm512_mullo_epi32(m0, q0), _mm512_mullo_epi32(m1, q1)),
        );
    }
    let xd = _mm512_set1_ps(a.d);
    let prods = _mm512_fmadd_ps(_mm512_cvtepi32_ps(high), _mm512_set1_ps(256.0), _mm512_cvtepi32_ps(low));
    let acc = _mm512_fmadd_ps(prods, _mm512_mul_ps(d, xd), acc);
    _mm512_sub_ps(acc, _mm512_mul_ps(_mm512_cvtepi32_ps(mins), _mm512_mul_ps(dmin, xd)))
}

/// `acc` plus one Q6_K group block's sixteen dots with `a` (`w = d·sc·(u − 32)`). Bounds per
/// lane: `Σ sc·Σu·h` ≤ 16·128·16·63·128, the low bytes' ≤ 16·128·16·63·255, `Σ sc·Σq` ≤
/// 16·128·16·32767 (all under 2³¹).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
fn q6k_block(gb: &[u8], a: &SplitSuper, acc: __m512) -> __m512 {
    let d = _mm512_cvtph_ps(bytes::<32, __m256i>(gb));
    let (low4, low2) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x03));
    let zero = _mm512_setzero_si512();
    let (mut high, mut low, mut sums) = (zero, zero, zero);
    let word_at = |w: usize| -> __m512i { bytes::<64, _>(gb.get(K6_CODES + 64 * w..).unwrap_or(&[])) };
    for half in 0..2 {
        // Quarter `s` of the half's 32 `ql`/`qh` byte offsets: sixteen weights of each of the
        // four runs of 32, one scale each.
        for s in 0..2 {
            let mut h = [zero; 4];
            let mut l = [zero; 4];
            for t in 4 * s..4 * s + 4 {
                // The step's three words ([`k6_code_byte`]).
                let step = 3 * (8 * half + t);
                let (qa, qb, qh) = (word_at(step), word_at(step + 1), word_at(step + 2));
                let top = |shift: __m512i| _mm512_slli_epi16::<4>(_mm512_and_si512(shift, low2));
                let u = [
                    _mm512_or_si512(_mm512_and_si512(qa, low4), top(qh)),
                    _mm512_or_si512(_mm512_and_si512(qb, low4), top(_mm512_srli_epi16::<2>(qh))),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(qa), low4),
                        top(_mm512_srli_epi16::<4>(qh)),
                    ),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(qb), low4),
                        top(_mm512_srli_epi16::<6>(qh)),
                    ),
                ];
                for (i, u) in u.into_iter().enumerate() {
                    let at = 128 * half + 32 * i + 4 * t;
                    h[i] = _mm512_dpbusd_epi32(h[i], u, word(&a.hi, at));
                    l[i] = _mm512_dpbusd_epi32(l[i], word(&a.lo, at), u);
                }
            }
            for i in 0..4 {
                // Weights 128·half + 32i + 16s.. share scale k.
                let k = 8 * half + 2 * i + s;
                let sc = lanes::<true>(gb, K6_SC + GROUP * k);
                high = _mm512_add_epi32(high, _mm512_mullo_epi32(h[i], sc));
                low = _mm512_add_epi32(low, _mm512_mullo_epi32(l[i], sc));
                sums = _mm512_add_epi32(sums, _mm512_mullo_epi32(sc, _mm512_set1_epi32(a.sums16[k])));
            }
        }
    }
    let prods = _mm512_fmadd_ps(_mm512_cvtepi32_ps(high), _mm512_set1_ps(256.0), _mm512_cvtepi32_ps(low));
    let centred = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(-32.0), prods);
    _mm512_fmadd_ps(centred, _mm512_mul_ps(d, _mm512_set1_ps(a.d)), acc)
}
