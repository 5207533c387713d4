//! The product of many activation rows (a prefill chunk) and a matrix of GGUF blocks with
//! AVX-512 VNNI, sixteen activation rows per register: `vpdpwssd` over 16-bit activations
//! (`q16`), `vpdpbusd` over 8-bit ones (`q8`, twice the multiply-adds per instruction).
//!
//! Loops of [`super::dots`] take one weight row at a time against four activation rows and
//! spend most of their instructions on each block's scales; this kernel puts sixteen
//! activation rows side by side in a register ([`PackedActs`], lanes are rows) and broadcasts
//! one 32-bit word of a weight row's widened weights (two 16-bit or four 8-bit ones) to all of
//! them, so a block's scales are applied once per [`TILE_ROWS`] weight rows × sixteen
//! activation rows. Weights are widened a tile of rows at a time ([`DecodedTile`]), in the
//! order the file stores them (no transposition).
//!
//! Same arithmetic as [`super::super::scalar::dot`] with the same activation blocks, up to the
//! order of the f32 additions.

use core::arch::x86_64::{
    __m128i, __m256i, __m512, __m512i, _mm512_abs_ps, _mm512_add_ps, _mm512_cmp_ps_mask, _mm512_cvtepi32_epi16,
    _mm512_cvtepi32_epi8, _mm512_cvtepi32_ps, _mm512_cvttps_epi32, _mm512_dpbusd_epi32, _mm512_dpwssd_epi32,
    _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_blend_ps, _mm512_max_ps, _mm512_min_ps,
    _mm512_mul_ps, _mm512_reduce_add_epi32, _mm512_reduce_max_ps, _mm512_roundscale_ps, _mm512_set1_epi32,
    _mm512_set1_ps, _mm512_setzero_ps, _mm512_setzero_si512, _mm512_storeu_ps, _mm512_sub_ps, _CMP_GE_OQ, _CMP_LE_OQ,
    _CMP_UNORD_Q, _MM_FROUND_NO_EXC, _MM_FROUND_TO_ZERO,
};

use super::super::chunks::{f16_at, for_each_chunk};
use super::super::{ActBlock, ActInt, QuantMatrix, BLOCK};
use crate::gguf::GgmlType;

/// Activation rows per register (sixteen 32-bit lanes).
pub const LANES: usize = 16;

/// Weight rows a microkernel call accumulates (with two groups of activation rows, 24 of the
/// 32 registers hold accumulators).
pub const TILE_ROWS: usize = 6;

/// 32-bit words of a chunk of 32 values: pairs of 16-bit values or quads of 8-bit ones.
const fn words(wide: bool) -> usize {
    if wide {
        BLOCK / 2
    } else {
        BLOCK / 4
    }
}

/// Proof that this CPU runs the kernel (AVX-512 F and BW, AVX-512 VNNI): only
/// [`detect`](Self::detect) makes one.
#[derive(Debug, Clone, Copy)]
pub struct Avx512Vnni {
    _checked: (),
}

impl Avx512Vnni {
    /// `Some` where the CPU reports every feature the kernel is compiled for.
    pub fn detect() -> Option<Self> {
        let all = std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni");
        all.then_some(Self { _checked: () })
    }
}

/// A chunk's 32 values as little-endian 32-bit words: pairs of 16-bit values (`wide`) or
/// quads of bytes, each value given by `bits` (its low 16 or 8 bits).
#[inline]
fn pack_words<T: Copy>(v: &[T; BLOCK], wide: bool, bits: impl Fn(T) -> u32, out: &mut [i32]) {
    match wide {
        true => {
            for (o, p) in out.iter_mut().zip(v.chunks_exact(2)) {
                *o = (bits(p[0]) & 0xFFFF | (bits(p[1]) & 0xFFFF) << 16) as i32;
            }
        }
        false => {
            for (o, p) in out.iter_mut().zip(v.chunks_exact(4)) {
                let b = |i: usize| bits(p[i]) & 0xFF;
                *o = (b(0) | b(1) << 8 | b(2) << 16 | b(3) << 24) as i32;
            }
        }
    }
}

/// One row of activations quantized to blocks of 32, equal bit for bit to
/// [`super::super::quantize_row`] (the same products `v·(1/d)`, the same rounding of halves
/// away from zero); a block holding NaN or an infinity takes the scalar path.
pub fn quantize_row<Q: ActInt>(token: Avx512Vnni, x: &[f32]) -> Vec<ActBlock<Q>> {
    let _ = token;
    x.chunks_exact(BLOCK)
        .map(|v| {
            let v = v.first_chunk::<BLOCK>().unwrap_or(&[0.0; BLOCK]);
            // SAFETY: `quantize_block` needs AVX-512 F and BW; the token proves them.
            unsafe { quantize_block::<Q>(v) }.unwrap_or_else(|| super::super::quantize_row::<Q>(v)[0])
        })
        .collect()
}

#[target_feature(enable = "avx512f,avx512bw")]
fn quantize_block<Q: ActInt>(v: &[f32; BLOCK]) -> Option<ActBlock<Q>> {
    let halves = [
        load_ps(v.first_chunk().unwrap_or(&[0.0; LANES])),
        load_ps(v.last_chunk().unwrap_or(&[0.0; LANES])),
    ];
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(halves[0]), _mm512_abs_ps(halves[1])));
    // NaN (which `max` skips) and infinities: the scalar path.
    if !amax.is_finite() || _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(halves[0], halves[1]) != 0 {
        return None;
    }
    let d = amax / Q::MAX;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let (one, max) = (_mm512_set1_ps(1.0), _mm512_set1_ps(Q::MAX));
    let mut q = [Q::from_f32(0.0); BLOCK];
    let mut sums = [0i32; 2];
    for (h, x) in halves.into_iter().enumerate() {
        let x = _mm512_mul_ps(x, _mm512_set1_ps(inv));
        // Halves away from zero: the truncation, one more step where the rest is ±0.5 or more.
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
        let rest = _mm512_sub_ps(x, t);
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(rest, _mm512_set1_ps(0.5));
        let down = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(rest, _mm512_set1_ps(-0.5));
        let t = _mm512_mask_blend_ps(up, t, _mm512_add_ps(t, one));
        let t = _mm512_mask_blend_ps(down, t, _mm512_sub_ps(t, one));
        let n = _mm512_cvttps_epi32(_mm512_max_ps(
            _mm512_min_ps(t, max),
            _mm512_sub_ps(_mm512_setzero_ps(), max),
        ));
        sums[h] = _mm512_reduce_add_epi32(n);
        let bytes: &mut [u8] = pulp::bytemuck::cast_slice_mut(&mut q[h * LANES..(h + 1) * LANES]);
        match Q::WIDE {
            true => bytes.copy_from_slice(&pulp::cast::<__m256i, [u8; 32]>(_mm512_cvtepi32_epi16(n))),
            false => bytes.copy_from_slice(&pulp::cast::<__m128i, [u8; 16]>(_mm512_cvtepi32_epi8(n))),
        }
    }
    Some(ActBlock {
        q,
        d,
        sums,
        dsum: d * (sums[0] + sums[1]) as f32,
    })
}

/// Activation rows quantized to blocks of 32 ([`ActBlock`]), sixteen rows side by side: for
/// group `g` (rows `16g..16g + 16`), chunk `c` and word `p`, sixteen 32-bit lanes each holding
/// that row's activations of word `p` of the chunk; the block scales and their sums likewise.
/// Rows past the end are zeros (their products are zeros and are dropped).
#[derive(Debug)]
pub struct PackedActs {
    rows: usize,
    chunks: usize,
    wide: bool,
    /// `[group][chunk][word][lane]`.
    q: Vec<[i32; LANES]>,
    /// `[group][chunk][lane]`: each block's scale `d`.
    d: Vec<[f32; LANES]>,
    /// `[group][chunk][k][lane]`: `d·Σq` over the block's first half (`k` 0), its second
    /// half (1) and the whole block (2).
    dsum: Vec<[f32; LANES]>,
}

impl PackedActs {
    /// The rows of `blocks` (each `chunks` blocks long), packed.
    pub fn pack<Q: ActInt>(blocks: &[Vec<ActBlock<Q>>], chunks: usize) -> Self {
        let words = words(Q::WIDE);
        let groups = blocks.len().div_ceil(LANES);
        let mut q = vec![[0i32; LANES]; groups * chunks * words];
        let mut d = vec![[0f32; LANES]; groups * chunks];
        let mut dsum = vec![[0f32; LANES]; groups * chunks * 3];
        let mut row_words = vec![0i32; words];
        for (j, row) in blocks.iter().enumerate() {
            let (g, lane) = (j / LANES, j % LANES);
            for (c, a) in row.iter().take(chunks).enumerate() {
                let at = g * chunks + c;
                pack_words(&a.q, Q::WIDE, |v: Q| Into::<i32>::into(v) as u32, &mut row_words);
                for (p, &w) in row_words.iter().enumerate() {
                    q[at * words + p][lane] = w;
                }
                d[at][lane] = a.d;
                dsum[3 * at][lane] = a.d * a.sums[0] as f32;
                dsum[3 * at + 1][lane] = a.d * a.sums[1] as f32;
                dsum[3 * at + 2][lane] = a.d * (a.sums[0] + a.sums[1]) as f32;
            }
        }
        Self {
            rows: blocks.len(),
            chunks,
            wide: Q::WIDE,
            q,
            d,
            dsum,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    fn groups(&self) -> usize {
        self.rows.div_ceil(LANES)
    }
}

/// [`TILE_ROWS`] weight rows widened to the activations' width, `w = a·u + b` per half chunk
/// with `u` unsigned, laid out so that one chunk's word `p` of every tile row is contiguous:
/// `u[chunk·words + p][row]`, `a` and `b` `[chunk][half][row]`. Rows past the matrix are zeros.
#[derive(Debug)]
pub struct DecodedTile {
    chunks: usize,
    wide: bool,
    u: Vec<[i32; TILE_ROWS]>,
    a: Vec<[[f32; TILE_ROWS]; 2]>,
    b: Vec<[[f32; TILE_ROWS]; 2]>,
    /// Whether every chunk's halves share `a` and `b` (all formats but Q6_K): one scaling per
    /// chunk instead of two.
    whole_chunks: bool,
}

impl DecodedTile {
    /// An empty tile for rows of `chunks` chunks, for activations of 16 bits (`wide`) or 8
    /// (reused from tile to tile).
    pub fn new(chunks: usize, wide: bool) -> Self {
        Self {
            chunks,
            wide,
            u: vec![[0; TILE_ROWS]; chunks * words(wide)],
            a: vec![[[0.0; TILE_ROWS]; 2]; chunks],
            b: vec![[[0.0; TILE_ROWS]; 2]; chunks],
            whole_chunks: true,
        }
    }

    /// Rows `first..first + TILE_ROWS` of `m` (those that exist).
    pub fn decode(&mut self, m: &QuantMatrix, first: usize) {
        let rows = TILE_ROWS.min(m.rows().saturating_sub(first));
        // Rows past the matrix stay zeros; the others are overwritten chunk by chunk.
        if rows < TILE_ROWS {
            self.u.fill([0; TILE_ROWS]);
            self.a.fill([[0.0; TILE_ROWS]; 2]);
            self.b.fill([[0.0; TILE_ROWS]; 2]);
        }
        self.whole_chunks = m.ty() != GgmlType::Q6K;
        let (chunks, wide) = (self.chunks, self.wide);
        for t in 0..rows {
            let row = m.row(first + t);
            let (u, a, b) = (&mut self.u, &mut self.a, &mut self.b);
            let mut put = |c: usize, w: &[u8; BLOCK], scale: [f32; 2], offset: [f32; 2]| {
                if c >= chunks {
                    return;
                }
                put_words(&mut u[c * words(wide)..(c + 1) * words(wide)], t, w, wide);
                for h in 0..2 {
                    a[c][h][t] = scale[h];
                    b[c][h][t] = offset[h];
                }
            };
            if m.ty() == GgmlType::Q8_0 {
                // Signed weights made unsigned: `w = d·(u − 128)`.
                for (c, blk) in row.chunks_exact(m.ty().block_bytes()).enumerate() {
                    let d = f16_at(blk, 0);
                    let w: [u8; BLOCK] = std::array::from_fn(|i| (blk[2 + i] as i8 as i16 + 128) as u8);
                    put(c, &w, [d; 2], [-128.0 * d; 2]);
                }
                continue;
            }
            for_each_chunk(m.ty(), &row, |c, chunk| put(c, &chunk.u, chunk.a, chunk.b));
        }
    }
}

/// Tile row `t`'s words of one chunk of unsigned weights `w` into `dst` (`[word][row]`): pairs
/// of 16-bit values (`wide`) or quads of bytes, little-endian.
#[inline]
fn put_words(dst: &mut [[i32; TILE_ROWS]], t: usize, w: &[u8; BLOCK], wide: bool) {
    match wide {
        true => {
            for (d, p) in dst.iter_mut().zip(w.chunks_exact(2)) {
                d[t] = p[0] as i32 | (p[1] as i32) << 16;
            }
        }
        false => {
            for (d, p) in dst.iter_mut().zip(w.chunks_exact(4)) {
                d[t] = i32::from_le_bytes([p[0], p[1], p[2], p[3]]);
            }
        }
    }
}

/// `out[j][t] = Σ w_t·x_j` for every activation row `j` of `acts` (rounded up to [`LANES`]) and
/// the tile's rows `t` (`out`: that many rows of [`TILE_ROWS`]), so that each activation row's
/// outputs are one contiguous run; nothing where the tile and the activations were made for
/// different widths.
pub fn tile_product(token: Avx512Vnni, tile: &DecodedTile, acts: &PackedActs, out: &mut [f32]) {
    let _ = token;
    // SAFETY: `tile_on` needs AVX-512 F, BW and VNNI; an `Avx512Vnni` token exists only where
    // `Avx512Vnni::detect` found all three on this CPU.
    unsafe {
        match (tile.wide, acts.wide) {
            (true, true) => tile_on::<true, { words(true) }>(tile, acts, out),
            (false, false) => tile_on::<false, { words(false) }>(tile, acts, out),
            _ => {}
        }
    }
}

/// The kernel for activations of 16 bits (`WIDE`) or 8, `WORDS` 32-bit words per chunk
/// (constant, so that the loops unroll and the accumulators stay in registers): groups of
/// sixteen activation rows two at a time (each broadcast weight word serves both), then the
/// last one alone.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn tile_on<const WIDE: bool, const WORDS: usize>(tile: &DecodedTile, acts: &PackedActs, out: &mut [f32]) {
    let width = acts.groups() * LANES;
    if out.len() < TILE_ROWS * width || tile.u.len() < tile.chunks.min(acts.chunks) * WORDS {
        return;
    }
    let mut g = 0;
    while g + GROUPS <= acts.groups() {
        groups_on::<WIDE, WORDS, GROUPS>(tile, acts, g, out);
        g += GROUPS;
    }
    if g < acts.groups() {
        groups_on::<WIDE, WORDS, 1>(tile, acts, g, out);
    }
}

/// Groups of sixteen activation rows that one pass over a tile's weights serves.
const GROUPS: usize = 2;

/// Groups `first..first + G` of the activations against the tile.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
fn groups_on<const WIDE: bool, const WORDS: usize, const G: usize>(
    tile: &DecodedTile,
    acts: &PackedActs,
    first: usize,
    out: &mut [f32],
) {
    let chunks = tile.chunks.min(acts.chunks);
    let mut acc = [[_mm512_setzero_ps(); TILE_ROWS]; G];
    for c in 0..chunks {
        let at: [usize; G] = std::array::from_fn(|i| (first + i) * acts.chunks + c);
        let Some(w) = tile.u.get(c * WORDS..).and_then(|u| u.first_chunk::<WORDS>()) else {
            return;
        };
        let mut q = [&[[0i32; LANES]; WORDS]; G];
        for (q, &at) in q.iter_mut().zip(&at) {
            match acts.q.get(at * WORDS..).and_then(|q| q.first_chunk::<WORDS>()) {
                Some(v) => *q = v,
                None => return,
            }
        }
        let (a, b) = (&tile.a[c], &tile.b[c]);
        // One scaling per chunk, or one per half where the halves' scales differ.
        let halves: &[(usize, usize, usize, usize)] = match tile.whole_chunks {
            true => &[(0, 2, 0, WORDS)],
            false => &[(0, 0, 0, WORDS / 2), (1, 1, WORDS / 2, WORDS)],
        };
        for &(h, k, from, to) in halves {
            let dots = dots_over::<WIDE, WORDS, G>(&q, w, from, to);
            for ((acc, dots), &at) in acc.iter_mut().zip(dots).zip(&at) {
                let (d, dsum) = (load_ps(&acts.d[at]), load_ps(&acts.dsum[3 * at + k]));
                scale_into(acc, dots, d, dsum, &a[h], &b[h]);
            }
        }
    }
    // Each group's sixteen rows × the tile's rows, turned to `[row][tile row]` through the
    // stack (the gather into `[row, output]` then copies runs instead of single values).
    for (i, acc) in acc.iter().enumerate() {
        let mut lanes = [[0f32; LANES]; TILE_ROWS];
        for (l, acc) in lanes.iter_mut().zip(acc) {
            store_ps(l, *acc);
        }
        let at = (first + i) * LANES * TILE_ROWS;
        let Some(o) = out.get_mut(at..at + LANES * TILE_ROWS) else {
            continue;
        };
        for (j, o) in o.chunks_exact_mut(TILE_ROWS).enumerate() {
            for (t, o) in o.iter_mut().enumerate() {
                *o = lanes[t][j];
            }
        }
    }
}

/// The integer dots of words `from..to` of a chunk for every tile row and each of `G` groups:
/// `vpdpwssd` (16-bit activations) or `vpdpbusd` (unsigned 8-bit weights, signed 8-bit
/// activations).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
fn dots_over<const WIDE: bool, const WORDS: usize, const G: usize>(
    q: &[&[[i32; LANES]; WORDS]; G],
    w: &[[i32; TILE_ROWS]; WORDS],
    from: usize,
    to: usize,
) -> [[__m512i; TILE_ROWS]; G] {
    let mut dots = [[_mm512_setzero_si512(); TILE_ROWS]; G];
    for p in from..to.min(WORDS) {
        let x: [__m512i; G] = std::array::from_fn(|i| load_si(&q[i][p]));
        for t in 0..TILE_ROWS {
            let wt = _mm512_set1_epi32(w[p][t]);
            for (dots, x) in dots.iter_mut().zip(x) {
                dots[t] = match WIDE {
                    true => _mm512_dpwssd_epi32(dots[t], x, wt),
                    false => _mm512_dpbusd_epi32(dots[t], wt, x),
                };
            }
        }
    }
    dots
}

/// `acc[t] += dots[t]·d·a[t] + dsum·b[t]`: tile row `t`'s scale `a[t]` and offset `b[t]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
fn scale_into(
    acc: &mut [__m512; TILE_ROWS],
    dots: [__m512i; TILE_ROWS],
    d: __m512,
    dsum: __m512,
    a: &[f32; TILE_ROWS],
    b: &[f32; TILE_ROWS],
) {
    for t in 0..TILE_ROWS {
        let scale = _mm512_mul_ps(d, _mm512_set1_ps(a[t]));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[t]), scale, acc[t]);
        acc[t] = _mm512_fmadd_ps(dsum, _mm512_set1_ps(b[t]), acc[t]);
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn load_si(v: &[i32; LANES]) -> __m512i {
    // SAFETY: `v` is 64 readable bytes; the load has no alignment requirement.
    unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn load_ps(v: &[f32; LANES]) -> __m512 {
    // SAFETY: `v` is 64 readable bytes; the load has no alignment requirement.
    unsafe { _mm512_loadu_ps(v.as_ptr()) }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn store_ps(o: &mut [f32; LANES], v: __m512) {
    // SAFETY: `o` is 64 writable bytes; the store has no alignment requirement.
    unsafe { _mm512_storeu_ps(o.as_mut_ptr(), v) }
}
