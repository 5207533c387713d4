//! Dot products of Q4_K and Q6_K rows with 16-bit activations quantized per 256 values
//! ([`SuperBlock`], one scale per K-quant block) on AVX-512 VNNI: a decode step's products.
//!
//! With activation blocks of 32 every chunk of 32 weights needs its own float conversion and
//! scaling, and unpacking the K-quants' 6-bit sub-block scales one at a time took most of the
//! row kernel's instructions. With one activation scale per 256 values the sub-block scales
//! multiply the widened weights as 16-bit integers (`u·sc` fits: Q4_K ≤ 15·63, Q6_K
//! ≤ 32·128), the products of a whole block add up in 32-bit lanes (each lane holds two
//! products per chunk, so eight chunks stay far from overflow), and a block costs one float
//! conversion. This is llama.cpp's order of operations for these types.

use core::arch::x86_64::{
    __m256i, __m512i, _mm512_add_epi32, _mm512_and_si512, _mm512_cvtepi32_ps, _mm512_cvtepu8_epi16,
    _mm512_dpwssd_epi32, _mm512_fmadd_ps, _mm512_loadu_si512, _mm512_mask_blend_epi16, _mm512_mullo_epi16,
    _mm512_or_si512, _mm512_reduce_add_ps, _mm512_set1_epi16, _mm512_set1_ps, _mm512_setzero_ps, _mm512_setzero_si512,
    _mm512_slli_epi16, _mm512_srli_epi16, _mm512_sub_epi16,
};

use super::super::chunks::f16_at;
use super::super::QuantMatrix;
use super::gemm::Avx512Vnni;
use crate::gguf::GgmlType;

/// Values per K-quant block (and per activation block here).
pub const SUPER: usize = 256;

/// 256 activations as `d·q`, `q` in −32767..=32767, and the sums of `q` over each run of 32.
#[derive(Debug, Clone, PartialEq)]
pub struct SuperBlock {
    pub q: [i16; SUPER],
    pub d: f32,
    pub sums: [i32; SUPER / 32],
}

/// A row of activations (a whole number of 256-value blocks) quantized per block, with the
/// scalar quantizer's rounding.
pub fn quantize_row(x: &[f32]) -> Vec<SuperBlock> {
    x.chunks_exact(SUPER)
        .map(|v| {
            let (d, inv) = super::super::block_scale(v, 32767.0);
            let q: [i16; SUPER] =
                std::array::from_fn(|i| super::super::round(v[i] * inv).clamp(-32767.0, 32767.0) as i16);
            let sums = std::array::from_fn(|j| q[32 * j..32 * j + 32].iter().map(|&v| v as i32).sum());
            SuperBlock { q, d, sums }
        })
        .collect()
}

/// Whether these kernels multiply `ty`.
pub fn handles(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4K | GgmlType::Q6K)
}

/// `Σ w·x` of row `r` of `m` (Q4_K or Q6_K; 0 otherwise) and a row quantized by
/// [`quantize_row`].
pub fn dot(token: Avx512Vnni, m: &QuantMatrix, r: usize, x: &[SuperBlock]) -> f32 {
    let _ = token;
    let row = m.row(r);
    // SAFETY: the kernels need AVX-512 F, BW and VNNI; an `Avx512Vnni` token exists only where
    // `Avx512Vnni::detect` found all three on this CPU.
    unsafe {
        match m.ty() {
            GgmlType::Q4K => q4k_on(&row, x),
            GgmlType::Q6K => q6k_on(&row, x),
            _ => 0.0,
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn q4k_on(row: &[u8], x: &[SuperBlock]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut offset = 0f32;
    let low4 = _mm512_set1_epi16(0x0F);
    for (blk, a) in row.chunks_exact(GgmlType::Q4K.block_bytes()).zip(x) {
        super::prefetch(blk, super::AHEAD, 3);
        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let sc = scales_mins(blk.get(4..16).and_then(|s| s.first_chunk::<12>()).unwrap_or(&[0; 12]));
        let mut dots = _mm512_setzero_si512();
        let mut mins = 0i32;
        for g in 0..4 {
            // 32 bytes: weights 64g..64g+32 in the low nibbles, the next 32 in the high ones.
            let w = _mm512_cvtepu8_epi16(bytes32(blk.get(16 + 32 * g..).unwrap_or(&[])));
            let ((s0, m0), (s1, m1)) = (sc[2 * g], sc[2 * g + 1]);
            let lo = _mm512_mullo_epi16(_mm512_and_si512(w, low4), _mm512_set1_epi16(s0));
            let hi = _mm512_mullo_epi16(_mm512_srli_epi16::<4>(w), _mm512_set1_epi16(s1));
            dots = _mm512_dpwssd_epi32(dots, lo, words(&a.q, 64 * g));
            dots = _mm512_dpwssd_epi32(dots, hi, words(&a.q, 64 * g + 32));
            mins += m0 as i32 * a.sums[2 * g] + m1 as i32 * a.sums[2 * g + 1];
        }
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_set1_ps(d * a.d), acc);
        offset += dmin * a.d * mins as f32;
    }
    _mm512_reduce_add_ps(acc) - offset
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn q6k_on(row: &[u8], x: &[SuperBlock]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let (low4, low2, centre) = (_mm512_set1_epi16(0x0F), _mm512_set1_epi16(0x03), _mm512_set1_epi16(32));
    for (blk, a) in row.chunks_exact(GgmlType::Q6K.block_bytes()).zip(x) {
        super::prefetch(blk, super::AHEAD, 3);
        let d = f16_at(blk, 208);
        // Two accumulators: a lane gains up to 2·32·128·32767 per chunk.
        let mut dots = [_mm512_setzero_si512(); 2];
        for half in 0..2 {
            let at = |i: usize| blk.get(i..).unwrap_or(&[]);
            let ql0 = _mm512_cvtepu8_epi16(bytes32(at(64 * half)));
            let ql1 = _mm512_cvtepu8_epi16(bytes32(at(64 * half + 32)));
            let qh = _mm512_cvtepu8_epi16(bytes32(at(128 + 32 * half)));
            let sc = blk.get(192 + 8 * half..200 + 8 * half).unwrap_or(&[0; 8]);
            let high = |bits: __m512i| _mm512_slli_epi16::<4>(_mm512_and_si512(bits, low2));
            let chunks = [
                _mm512_or_si512(_mm512_and_si512(ql0, low4), high(qh)),
                _mm512_or_si512(_mm512_and_si512(ql1, low4), high(_mm512_srli_epi16::<2>(qh))),
                _mm512_or_si512(_mm512_srli_epi16::<4>(ql0), high(_mm512_srli_epi16::<4>(qh))),
                _mm512_or_si512(_mm512_srli_epi16::<4>(ql1), high(_mm512_srli_epi16::<6>(qh))),
            ];
            for (k, u) in chunks.into_iter().enumerate() {
                // Weights 0–15 of the chunk take scale 2k, 16–31 scale 2k + 1.
                let scale = _mm512_mask_blend_epi16(
                    0xFFFF_0000,
                    _mm512_set1_epi16(sc[2 * k] as i8 as i16),
                    _mm512_set1_epi16(sc[2 * k + 1] as i8 as i16),
                );
                let w = _mm512_mullo_epi16(_mm512_sub_epi16(u, centre), scale);
                dots[k % 2] = _mm512_dpwssd_epi32(dots[k % 2], w, words(&a.q, 128 * half + 32 * k));
            }
        }
        let dots = _mm512_add_epi32(dots[0], dots[1]);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_set1_ps(d * a.d), acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// The eight 6-bit scales and minimums of a Q4_K block's twelve packed bytes, as integers
/// (`chunks::scale_min_k4`'s unpacking, without its conversions to f32).
#[inline(always)]
fn scales_mins(s: &[u8; 12]) -> [(i16, i16); 8] {
    std::array::from_fn(|j| {
        let (sc, m) = if j < 4 {
            (s[j] & 63, s[j + 4] & 63)
        } else {
            (
                (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
                (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
            )
        };
        (sc as i16, m as i16)
    })
}

/// 32 bytes from the start of `b` (zeros where `b` is shorter).
#[inline(always)]
fn bytes32(b: &[u8]) -> __m256i {
    pulp::cast(match b.first_chunk::<32>() {
        Some(a) => *a,
        None => [0u8; 32],
    })
}

/// 32 activations from `at` as sixteen pairs of 16 bits (zeros past the end).
#[target_feature(enable = "avx512f")]
#[inline]
fn words(q: &[i16; SUPER], at: usize) -> __m512i {
    match q.get(at..).and_then(|q| q.first_chunk::<32>()) {
        // SAFETY: 64 readable bytes; the load has no alignment requirement.
        Some(v) => unsafe { _mm512_loadu_si512(v.as_ptr().cast()) },
        None => _mm512_setzero_si512(),
    }
}

/// `Σ w·x` in plain Rust over the same quantized activations: what the kernels are tested
/// against (the integer products are exact, so the two differ only in the order of f32 sums).
pub fn scalar_dot(ty: GgmlType, row: &[u8], x: &[SuperBlock]) -> f32 {
    let mut acc = 0f64;
    super::super::chunks::for_each_chunk(ty, row, |c, chunk| {
        let Some(a) = x.get(c * 32 / SUPER) else {
            return;
        };
        let at = c * 32 % SUPER;
        let half = |h: usize| -> i64 {
            (0..16)
                .map(|i| chunk.u[16 * h + i] as i64 * a.q[at + 16 * h + i] as i64)
                .sum()
        };
        let qsum = |h: usize| -> i64 { (0..16).map(|i| a.q[at + 16 * h + i] as i64).sum() };
        for h in 0..2 {
            acc += a.d as f64 * (chunk.a[h] as f64 * half(h) as f64 + chunk.b[h] as f64 * qsum(h) as f64);
        }
    });
    acc as f32
}
