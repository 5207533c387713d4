//! Integer dot products with AVX-VNNI (`vpdpbusd`: 32 unsigned × signed byte products summed
//! in fours into eight 32-bit lanes, one instruction where AVX2 needs two) and F16C (block
//! scales converted by one instruction instead of bit manipulation), for the block types of
//! the supported GGUF files: Q4_0, Q4_1, Q8_0, Q4_K and Q6_K. Other types use [`super::avx2`].
//!
//! The workspace's one `unsafe` module: the kernels are `#[target_feature]` functions, which
//! may only be called where the CPU has those features. [`Vnni::detect`] checks them at run
//! time and is the only way to obtain the token that [`dots`] takes, so the single `unsafe`
//! call below is sound; everything inside the kernels is safe code (loads go through
//! bounds-checked slices). Each kernel is tested against [`super::scalar`] in `tests.rs`.
//!
//! [`gemm`] holds the AVX-512 kernel for products of many activation rows (prefill chunks),
//! [`kquants`] the AVX-512 dots of Q4_K and Q6_K rows with activations quantized per 256,
//! [`interleaved`] and [`interleaved_kquants`] the AVX-512 decode dots of Q4_0, Q4_1, Q8_0,
//! Q4_K and Q6_K rows stored sixteen to a group.

use core::arch::x86_64::{
    __m128i, __m256, __m256i, _mm256_add_epi32, _mm256_add_ps, _mm256_and_si256, _mm256_castps256_ps128,
    _mm256_castsi256_si128, _mm256_cvtepi32_ps, _mm256_cvtepi8_epi16, _mm256_cvtepu8_epi16, _mm256_dpbusd_avx_epi32,
    _mm256_dpwssd_avx_epi32, _mm256_extractf128_ps, _mm256_extracti128_si256, _mm256_fmadd_ps, _mm256_or_si256,
    _mm256_packus_epi16, _mm256_permute2x128_si256, _mm256_permute4x64_epi64, _mm256_set1_epi16, _mm256_set1_epi8,
    _mm256_set1_ps, _mm256_set_m128, _mm256_set_m128i, _mm256_setzero_ps, _mm256_setzero_si256, _mm256_sign_epi8,
    _mm256_slli_epi16, _mm256_srli_epi16, _mm256_sub_epi8, _mm_add_ps, _mm_and_si128, _mm_cvtph_ps, _mm_cvtsi32_si128,
    _mm_cvtss_f32, _mm_hadd_ps, _mm_set1_epi8, _mm_set1_ps, _mm_srli_epi16,
};

pub mod gemm;
pub mod interleaved;
pub mod interleaved_kquants;
pub mod kquants;

use super::chunks::scale_min_k4;
use super::{ActBlock, ActInt, QuantMatrix, BLOCK};
use crate::gguf::GgmlType;

/// Proof that this CPU runs the kernels (AVX2, FMA, F16C and AVX-VNNI): only
/// [`detect`](Self::detect) makes one.
#[derive(Debug, Clone, Copy)]
pub struct Vnni {
    _checked: (),
}

impl Vnni {
    /// `Some` where the CPU reports every feature the kernels are compiled for.
    pub fn detect() -> Option<Self> {
        let all = std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
            && std::is_x86_feature_detected!("avxvnni");
        all.then_some(Self { _checked: () })
    }
}

/// Whether these kernels multiply `ty`.
pub fn handles(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4K | GgmlType::Q6K
    )
}

/// The dots of every weight row `which` yields (a matrix of a type [`handles`] accepts, and
/// its row) with every activation row, into `outs` (`[rows, acts.len()]`).
pub fn dots<'a, Q: ActInt>(
    token: Vnni,
    which: impl Iterator<Item = (&'a QuantMatrix, usize)>,
    acts: &[Vec<ActBlock<Q>>],
    outs: &mut [f32],
) {
    let _ = token;
    // SAFETY: `dots_on` needs AVX2, FMA, F16C and AVX-VNNI; a `Vnni` token exists only where
    // `Vnni::detect` found all four on this CPU.
    unsafe { dots_on(which, acts, outs) }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
fn dots_on<'a, Q: ActInt>(
    which: impl Iterator<Item = (&'a QuantMatrix, usize)>,
    acts: &[Vec<ActBlock<Q>>],
    outs: &mut [f32],
) {
    let acts: Vec<&[ActBlock<Q>]> = acts.iter().map(Vec::as_slice).collect();
    for (o, (m, r)) in outs.chunks_mut(acts.len().max(1)).zip(which) {
        let (ty, row) = (m.ty(), m.row(r));
        let row = &*row;
        // Up to four activation rows per pass over the weight row.
        for (y, a) in o.chunks_mut(4).zip(acts.chunks(4)) {
            match *a {
                [x] => y[0] = row_dots::<1, Q>(ty, row, [x])[0],
                [x0, x1] => y.copy_from_slice(&row_dots::<2, Q>(ty, row, [x0, x1])),
                [x0, x1, x2] => y.copy_from_slice(&row_dots::<3, Q>(ty, row, [x0, x1, x2])),
                [x0, x1, x2, x3] => y.copy_from_slice(&row_dots::<4, Q>(ty, row, [x0, x1, x2, x3])),
                _ => {}
            }
        }
    }
}

/// A chunk's 32 weights as a kernel holds them.
#[derive(Clone, Copy)]
enum Weights {
    /// Unsigned bytes `u` (`w = a·u + b`).
    Bytes(__m256i),
    /// Signed bytes `w` (Q8_0: `w = a·w`).
    Signed(__m256i),
    /// Unsigned `u` already widened to 16-bit lanes: weights 0–15, then 16–31 (for 16-bit
    /// activations, where a 4-bit format widens its packed bytes once, in one instruction).
    Words(__m256i, __m256i),
}

/// Partial accumulators per activation row: consecutive chunks alternate between them, so
/// one chunk's addition need not wait for the previous one's.
const U: usize = 2;

/// `N` running sums of [`U`] partial accumulators each: `Σ a·x.d·(u·q)` in f32 lanes and
/// `Σ b·x.dsum`. The accumulator is a const parameter `K` of each addition, so they stay in
/// registers (indexed at run time, they went through the stack).
struct Sums<const N: usize> {
    acc: [[__m256; U]; N],
    off: [[f32; U]; N],
}

impl<const N: usize> Sums<N> {
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    fn new() -> Self {
        Self {
            acc: [[_mm256_setzero_ps(); U]; N],
            off: [[0.0; U]; N],
        }
    }

    /// Adds chunk `c` of the row (`w = a·u + b`) for every activation row, into partial sum `K`.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    #[inline]
    fn add<const K: usize, Q: ActInt>(&mut self, c: usize, w: Weights, a: f32, b: f32, xs: &[&[ActBlock<Q>]; N]) {
        for ((acc, off), x) in self.acc.iter_mut().zip(&mut self.off).zip(xs) {
            let Some(x) = x.get(c) else {
                continue;
            };
            let p = _mm256_cvtepi32_ps(products(w, x, false));
            acc[K] = _mm256_fmadd_ps(p, _mm256_set1_ps(a * x.d), acc[K]);
            off[K] += b * x.dsum;
        }
    }

    /// [`add`](Self::add) for a chunk of signed weights `w` (no offset) whose halves (weights
    /// 0–15 and 16–31) have scales of their own: `a[h]·w`.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    #[inline]
    fn add_halves<const K: usize, Q: ActInt>(&mut self, c: usize, w: __m256i, a: [f32; 2], xs: &[&[ActBlock<Q>]; N]) {
        for (acc, x) in self.acc.iter_mut().zip(xs) {
            let Some(x) = x.get(c) else {
                continue;
            };
            // Lanes 0–3 hold sums over the first half's weights, 4–7 over the second's.
            let p = _mm256_cvtepi32_ps(products(Weights::Signed(w), x, true));
            let scale = _mm256_set_m128(_mm_set1_ps(a[1] * x.d), _mm_set1_ps(a[0] * x.d));
            acc[K] = _mm256_fmadd_ps(p, scale, acc[K]);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    fn total(&self) -> [f32; N] {
        let mut out = [0f32; N];
        for (o, (acc, off)) in out.iter_mut().zip(self.acc.iter().zip(&self.off)) {
            let mut v = _mm256_setzero_ps();
            for a in acc {
                v = _mm256_add_ps(v, *a);
            }
            let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let pair = _mm_hadd_ps(half, half);
            *o = _mm_cvtss_f32(_mm_hadd_ps(pair, pair)) + off.iter().sum::<f32>();
        }
        out
    }
}

/// `w·q` of a chunk (`w` before its scale and offset) summed into eight 32-bit lanes. With
/// `split`, lanes 0–3 sum the first 16 weights and lanes 4–7 the second 16 (as one `vpdpbusd`
/// leaves them); otherwise any lane may hold either.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
#[inline]
fn products<Q: ActInt>(w: Weights, x: &ActBlock<Q>, split: bool) -> __m256i {
    let q: &[u8] = pulp::bytemuck::cast_slice(&x.q);
    let zero = _mm256_setzero_si256();
    if !Q::WIDE {
        let q: __m256i = bytes::<32, _>(q);
        return match w {
            Weights::Bytes(u) => _mm256_dpbusd_avx_epi32(zero, u, q),
            // vpdpbusd multiplies unsigned by signed bytes: |w| by q with w's sign.
            Weights::Signed(w) => _mm256_dpbusd_avx_epi32(zero, _mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w)),
            // Packing works per 128-bit lane: the quarters back in order.
            Weights::Words(w0, w1) => {
                let u = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi16(w0, w1));
                _mm256_dpbusd_avx_epi32(zero, u, q)
            }
        };
    }
    // 16-bit activations: 16-bit weights, `vpdpwssd` per half of the chunk.
    let widen = |w: __m256i, signed: bool| {
        let (lo, hi) = (_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
        match signed {
            true => (_mm256_cvtepi8_epi16(lo), _mm256_cvtepi8_epi16(hi)),
            false => (_mm256_cvtepu8_epi16(lo), _mm256_cvtepu8_epi16(hi)),
        }
    };
    let (w0, w1) = match w {
        Weights::Bytes(u) => widen(u, false),
        Weights::Signed(w) => widen(w, true),
        Weights::Words(w0, w1) => (w0, w1),
    };
    let (q0, q1): (__m256i, __m256i) = (bytes::<32, _>(q), bytes::<32, _>(q.get(32..).unwrap_or(&[])));
    if !split {
        return _mm256_dpwssd_avx_epi32(_mm256_dpwssd_avx_epi32(zero, w0, q0), w1, q1);
    }
    let (h0, h1) = (
        _mm256_dpwssd_avx_epi32(zero, w0, q0),
        _mm256_dpwssd_avx_epi32(zero, w1, q1),
    );
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(h0, h1),
        _mm256_permute2x128_si256::<0x31>(h0, h1),
    )
}

/// How far ahead of the block being read [`prefetch`] asks, where it asks a fixed distance
/// (rows and groups are read in order, one thread's contiguous in memory: each thread's stream
/// from memory keeps more requests in flight than the hardware prefetcher alone).
const AHEAD: usize = 1024;

/// Whether the K-quant decode kernels ask for each next group block while they read one. On
/// an Intel Xeon (family 6 model 207) that took Qwen2.5-1.5B's decode from 14.4–15.2 to
/// 20.1–20.9 tok/s; on an AMD EPYC (Zen 4, family 25 model 17), whose hardware prefetcher keeps
/// up with blocks read front to back, the same prefetches cost half the speed (15.4–16.2 against
/// 26.8–34.5 tok/s). So: everywhere but on AMD's CPUs.
fn prefetch_next_blocks() -> bool {
    static AHEAD_OF_HARDWARE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AHEAD_OF_HARDWARE.get_or_init(|| {
        let v = core::arch::x86_64::__cpuid(0);
        let vendor = [v.ebx.to_le_bytes(), v.edx.to_le_bytes(), v.ecx.to_le_bytes()].concat();
        vendor != b"AuthenticAMD"
    })
}

/// Asks for `lines` cache lines from `skip` bytes past `b`'s start.
#[inline(always)]
fn prefetch(b: &[u8], skip: usize, lines: usize) {
    let at = b.as_ptr().wrapping_add(skip);
    for line in 0..lines {
        // SAFETY: a prefetch is a hint: it never faults and reads nothing into the program, so
        // any address (here possibly past the matrix) is sound.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(at.wrapping_add(64 * line).cast())
        }
    }
}

/// `[f16 at b[0..2], f16 at b[2..4]]` as f32 (a block's scale and minimum; zeros past `b`'s end).
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
#[inline]
fn two_f16(b: &[u8]) -> (f32, f32) {
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    let bits = i32::from_le_bytes([at(0), at(1), at(2), at(3)]);
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
    let lanes: [f32; 4] = pulp::cast(v);
    (lanes[0], lanes[1])
}

/// `N` bytes from the start of `b` as a register (zeros where `b` is shorter).
#[inline(always)]
fn bytes<const N: usize, V: pulp::bytemuck::AnyBitPattern>(b: &[u8]) -> V
where
    [u8; N]: pulp::bytemuck::Pod,
{
    pulp::cast(match b.first_chunk::<N>() {
        Some(a) => *a,
        None => [0u8; N],
    })
}

/// 16 bytes of packed 4-bit weights (low nibbles weights 0–15, high nibbles 16–31) as bytes,
/// or for 16-bit activations as 16-bit lanes (one widening, then a mask and a shift).
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
#[inline]
fn nibbles<Q: ActInt>(qs: &[u8]) -> Weights {
    let packed: __m128i = bytes::<16, _>(qs);
    if Q::WIDE {
        let x = _mm256_cvtepu8_epi16(packed);
        return Weights::Words(_mm256_and_si256(x, _mm256_set1_epi16(0x0F)), _mm256_srli_epi16::<4>(x));
    }
    let low = _mm_set1_epi8(0x0F);
    Weights::Bytes(_mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16::<4>(packed), low),
        _mm_and_si128(packed, low),
    ))
}

/// Adds chunk `c`, one block of Q4_0, Q4_1 or Q8_0, into partial sum `k`.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
#[inline]
fn small_block<const K: usize, const N: usize, Q: ActInt>(
    ty: GgmlType,
    s: &mut Sums<N>,
    c: usize,
    blk: &[u8],
    xs: &[&[ActBlock<Q>]; N],
) {
    let (d, m) = two_f16(blk);
    let after = |at: usize| blk.get(at..).unwrap_or(&[]);
    match ty {
        GgmlType::Q4_1 => s.add::<K, Q>(c, nibbles::<Q>(after(4)), d, m, xs),
        GgmlType::Q4_0 => s.add::<K, Q>(c, nibbles::<Q>(after(2)), d, -8.0 * d, xs),
        _ => s.add::<K, Q>(c, Weights::Signed(bytes::<32, _>(after(2))), d, 0.0, xs),
    }
}

/// `Σ w·x_j` of one weight row of `ty` with `N` activation rows.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
fn row_dots<const N: usize, Q: ActInt>(ty: GgmlType, row: &[u8], xs: [&[ActBlock<Q>]; N]) -> [f32; N] {
    let mut s = Sums::<N>::new();
    let size = ty.block_bytes();
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            // One block per chunk of 32: pairs of blocks, then the last one if odd.
            let pairs = row.chunks_exact(2 * size);
            let rest = pairs.remainder();
            for (i, pair) in pairs.enumerate() {
                prefetch(pair, AHEAD, 1);
                let (first, second) = pair.split_at(size);
                small_block::<0, N, Q>(ty, &mut s, 2 * i, first, &xs);
                small_block::<1, N, Q>(ty, &mut s, 2 * i + 1, second, &xs);
            }
            if rest.len() == size {
                small_block::<0, N, Q>(ty, &mut s, row.len() / size - 1, rest, &xs);
            }
        }
        GgmlType::Q4K => {
            // 256 weights per block: four groups of 32 bytes, whose low nibbles are one chunk
            // and high nibbles the next, each chunk with a 6-bit scale and minimum.
            let (low4, low4_16) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(0x0F));
            for (n, blk) in row.chunks_exact(size).enumerate() {
                let (d, dmin) = two_f16(blk);
                let sc = &blk[4..16];
                for g in 0..4 {
                    let at = 16 + 32 * g;
                    let halves = match Q::WIDE {
                        // Each byte widened once serves both chunks: masked, then shifted.
                        true => {
                            let x0 = _mm256_cvtepu8_epi16(bytes::<16, _>(&blk[at..]));
                            let x1 = _mm256_cvtepu8_epi16(bytes::<16, _>(&blk[at + 16..]));
                            [
                                Weights::Words(_mm256_and_si256(x0, low4_16), _mm256_and_si256(x1, low4_16)),
                                Weights::Words(_mm256_srli_epi16::<4>(x0), _mm256_srli_epi16::<4>(x1)),
                            ]
                        }
                        false => {
                            let packed: __m256i = bytes::<32, _>(&blk[at..]);
                            [
                                Weights::Bytes(_mm256_and_si256(packed, low4)),
                                Weights::Bytes(_mm256_and_si256(_mm256_srli_epi16::<4>(packed), low4)),
                            ]
                        }
                    };
                    let ((s0, m0), (s1, m1)) = (scale_min_k4(2 * g, sc), scale_min_k4(2 * g + 1, sc));
                    let c = 8 * n + 2 * g;
                    s.add::<0, Q>(c, halves[0], d * s0, -dmin * m0, &xs);
                    s.add::<1, Q>(c + 1, halves[1], d * s1, -dmin * m1, &xs);
                }
            }
        }
        GgmlType::Q6K => {
            // 256 weights per block: per half, 64 bytes of low four bits and 32 of high two
            // bits make four chunks; a signed 8-bit scale per 16 weights, `w = d·sc·(u − 32)`.
            let (low4, low2, centre) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x03), _mm256_set1_epi8(32));
            for (n, blk) in row.chunks_exact(size).enumerate() {
                let (d, _) = two_f16(blk.get(208..).unwrap_or(&[]));
                for half in 0..2 {
                    let ql0: __m256i = bytes::<32, _>(&blk[64 * half..]);
                    let ql1: __m256i = bytes::<32, _>(&blk[64 * half + 32..]);
                    let qh: __m256i = bytes::<32, _>(&blk[128 + 32 * half..]);
                    // The high bits of chunk `k` are bits 2k, 2k+1 of `qh`, moved to bits 4–5.
                    let high = |shift: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(shift, low2));
                    let chunks = [
                        _mm256_or_si256(_mm256_and_si256(ql0, low4), high(qh)),
                        _mm256_or_si256(_mm256_and_si256(ql1, low4), high(_mm256_srli_epi16::<2>(qh))),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4),
                            high(_mm256_srli_epi16::<4>(qh)),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
                            high(_mm256_srli_epi16::<6>(qh)),
                        ),
                    ];
                    let sc = blk.get(192 + 8 * half..200 + 8 * half).unwrap_or(&[0; 8]);
                    let a = |k: usize| [d * (sc[2 * k] as i8) as f32, d * (sc[2 * k + 1] as i8) as f32];
                    // `u − 32` as signed bytes: the products need no offset.
                    let w = |u: __m256i| _mm256_sub_epi8(u, centre);
                    let c = 8 * n + 4 * half;
                    s.add_halves::<0, Q>(c, w(chunks[0]), a(0), &xs);
                    s.add_halves::<1, Q>(c + 1, w(chunks[1]), a(1), &xs);
                    s.add_halves::<0, Q>(c + 2, w(chunks[2]), a(2), &xs);
                    s.add_halves::<1, Q>(c + 3, w(chunks[3]), a(3), &xs);
                }
            }
        }
        _ => {}
    }
    debug_assert_eq!(BLOCK, 32);
    s.total()
}
