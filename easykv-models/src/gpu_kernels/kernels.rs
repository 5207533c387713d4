//! The CubeCL kernels themselves. Each replaces a run of burn tensor operations, every one of
//! which is a kernel launch with its own host-side cost; arithmetic runs in `A` (f32) whatever
//! the storage precision `F`.

use cubecl::prelude::*;

/// Threads of the row-wise kernels (one cube per row).
pub const ROW_BLOCK: u32 = 256;

/// Sum of `value` over the cube's `ROW_BLOCK` threads (any cube shape), returned to every thread.
#[cube]
fn cube_sum<A: Float>(value: A) -> A {
    let tid = UNIT_POS as usize;
    let mut shared = SharedMemory::<A>::new(256usize);
    shared[tid] = value;
    sync_cube();
    let mut stride = 128usize;
    while stride > 0 {
        if tid < stride {
            shared[tid] = shared[tid] + shared[tid + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
}

/// Maximum of `value` over the cube's `ROW_BLOCK` threads (any cube shape), returned to every
/// thread.
#[cube]
fn cube_max<A: Float>(value: A) -> A {
    let tid = UNIT_POS as usize;
    let mut shared = SharedMemory::<A>::new(256usize);
    shared[tid] = value;
    sync_cube();
    let mut stride = 128usize;
    while stride > 0 {
        if tid < stride {
            let other = shared[tid + stride];
            if other > shared[tid] {
                shared[tid] = other;
            }
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
}

/// `x / rms(x) · γ` per row of `cols` values (cube = row).
#[cube(launch)]
pub fn rms_norm<F: Float, W: Float, A: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<W>,
    out: &mut Tensor<F>,
    cols: u32,
    eps: f32,
    #[define(F, W, A)] _dtypes: [StorageType; 3],
) {
    let n = cols as usize;
    let base = CUBE_POS_X as usize * n;
    let tid = UNIT_POS_X as usize;
    let mut acc = A::new(0.0);
    let mut i = tid;
    while i < n {
        let v = A::cast_from(x[base + i]);
        acc += v * v;
        i += 256usize;
    }
    let total = cube_sum::<A>(acc);
    let inv = A::new(1.0) / (total / A::cast_from(cols) + A::cast_from(eps)).sqrt();
    let mut j = tid;
    while j < n {
        out[base + j] = F::cast_from(A::cast_from(x[base + j]) * inv * A::cast_from(gamma[j]));
        j += 256usize;
    }
}

/// Score `at` of a row plus its mask and bias where given.
#[cube]
#[allow(clippy::too_many_arguments)]
fn masked_score<F: Float, A: Float>(
    scores: &Tensor<F>,
    mask: &Tensor<A>,
    bias: &Tensor<A>,
    base: usize,
    mask_base: usize,
    bias_base: usize,
    at: usize,
    #[comptime] has_mask: bool,
    #[comptime] has_bias: bool,
) -> A {
    let mut v = A::cast_from(scores[base + at]);
    if has_mask {
        v += mask[mask_base + at];
    }
    if has_bias {
        v += bias[bias_base + at];
    }
    v
}

/// Softmax of each row of `n` scores (cube = row of 256 threads), after adding an optional mask
/// (score row `r` takes mask row `r % mask_rows`: a chunk's `[s, n]` causal mask serves every
/// head and query group; `mask_rows` divides the rows, and cubes visit the rows that share a
/// mask row one after another) and an optional bias shared by `rows_per_bias` consecutive rows.
/// Writes the probabilities in `A` when `write_f32` (what a cache observes) and in `P` when
/// `write_product` (the precision the next product runs in). A row with nothing visible
/// becomes zeros. With `held` > 0 (rows of at most `256·held` scores) each thread keeps its
/// `held` values in registers and the row is read once; with 0 it is read three times.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn softmax_rows<F: Float, A: Float, P: Float>(
    scores: &Tensor<F>,
    mask: &Tensor<A>,
    bias: &Tensor<A>,
    probs: &mut Tensor<A>,
    probs_product: &mut Tensor<P>,
    n: u32,
    rows_per_bias: u32,
    mask_rows: u32,
    #[comptime] held: usize,
    #[comptime] has_mask: bool,
    #[comptime] has_bias: bool,
    #[comptime] write_f32: bool,
    #[comptime] write_product: bool,
    #[define(F, A, P)] _dtypes: [StorageType; 3],
) {
    let len = n as usize;
    // Cubes taken in turn walk the rows that share a mask row (one per head and query group of
    // a chunk's `[s, n]` mask) before the next: a mask row is then read from the cache by all
    // of them, not fetched again from memory for each (a 4,096-token chunk's f32 mask is
    // 64 MiB, more than an H100's L2). Rows of their own mask or none keep their order.
    let sharing = CUBE_COUNT_X / mask_rows;
    let row = (CUBE_POS_X % sharing) * mask_rows + CUBE_POS_X / sharing;
    let base = row as usize * len;
    let mask_base = (row % mask_rows) as usize * len;
    let bias_base = (row / rows_per_bias) as usize * len;
    let tid = UNIT_POS_X as usize;
    // Below every finite score; a row whose maximum stays here shows nothing.
    let floor = A::new(-3.0e38);
    let mut values = Array::<A>::new(comptime![if held > 0 { held } else { 1usize }]);
    let mut m = floor;
    if comptime![held > 0] {
        #[unroll]
        for k in 0..held {
            let i = tid + k * 256usize;
            let mut v = floor;
            if i < len {
                v = masked_score::<F, A>(scores, mask, bias, base, mask_base, bias_base, i, has_mask, has_bias);
            }
            values[k] = v;
            if v > m {
                m = v;
            }
        }
    } else {
        let mut i = tid;
        while i < len {
            let v = masked_score::<F, A>(scores, mask, bias, base, mask_base, bias_base, i, has_mask, has_bias);
            if v > m {
                m = v;
            }
            i += 256usize;
        }
    }
    let max = cube_max::<A>(m);
    let visible = max > A::new(-1.0e38);
    let mut acc = A::new(0.0);
    if comptime![held > 0] {
        #[unroll]
        for k in 0..held {
            let e = (values[k] - max).exp();
            values[k] = e;
            if tid + k * 256usize < len {
                acc += e;
            }
        }
    } else {
        let mut j = tid;
        while j < len {
            acc += (masked_score::<F, A>(scores, mask, bias, base, mask_base, bias_base, j, has_mask, has_bias) - max)
                .exp();
            j += 256usize;
        }
    }
    let sum = cube_sum::<A>(acc);
    // Nothing visible: zeros (the exponentials are then meaningless).
    let scale = if visible { A::new(1.0) / sum } else { A::new(0.0) };
    if comptime![held > 0] {
        #[unroll]
        for k in 0..held {
            let i = tid + k * 256usize;
            if i < len {
                write_probability::<A, P>(
                    probs,
                    probs_product,
                    base + i,
                    values[k] * scale,
                    write_f32,
                    write_product,
                );
            }
        }
    } else {
        let mut i = tid;
        while i < len {
            let e = (masked_score::<F, A>(scores, mask, bias, base, mask_base, bias_base, i, has_mask, has_bias) - max)
                .exp();
            write_probability::<A, P>(probs, probs_product, base + i, e * scale, write_f32, write_product);
            i += 256usize;
        }
    }
}

/// A probability written in f32 and/or the product's precision.
#[cube]
fn write_probability<A: Float, P: Float>(
    probs: &mut Tensor<A>,
    probs_product: &mut Tensor<P>,
    at: usize,
    p: A,
    #[comptime] write_f32: bool,
    #[comptime] write_product: bool,
) {
    if write_f32 {
        probs[at] = p;
    }
    if write_product {
        probs_product[at] = P::cast_from(p);
    }
}

/// SwiGLU over rows of `2·i` values (gate, then up): `silu(g)·u` (thread = output element).
#[cube(launch)]
pub fn swiglu<F: Float, A: Float>(
    x: &Tensor<F>,
    out: &mut Tensor<F>,
    inner: u32,
    total: u32,
    #[define(F, A)] _dtypes: [StorageType; 2],
) {
    let idx = ABSOLUTE_POS as usize;
    if idx >= total as usize {
        terminate!();
    }
    let i = inner as usize;
    let row = idx / i;
    let col = idx % i;
    let g = A::cast_from(x[row * 2 * i + col]);
    let u = A::cast_from(x[row * 2 * i + i + col]);
    out[idx] = F::cast_from(g / (A::new(1.0) + (A::new(0.0) - g).exp()) * u);
}

/// Splits a stacked q|k|v projection `[tokens, (hq + 2·hkv)·d]` into heads-first `q`
/// `[batch, hq, s, d]` and `k`, `v` (`[batch, hkv, ·, d]` with the given strides, positions
/// written from slot `at`: new tensors, or a cache's buffers), rotating q (and k, when `rotate_keys`)
/// by rotate-half RoPE: `x·cos + x[(j + d/2) mod d]·sin` with the sign in `sin` and, for the
/// queries, the attention scale in both (thread = input element).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn split_rope<F: Float, C: Float, A: Float, I: Int>(
    qkv: &Tensor<F>,
    q_cos: &Tensor<C>,
    q_sin: &Tensor<C>,
    k_cos: &Tensor<C>,
    k_sin: &Tensor<C>,
    q: &mut Tensor<F>,
    k: &mut Tensor<F>,
    v: &mut Tensor<F>,
    table: &Tensor<I>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    kv_batch_stride: u32,
    kv_head_stride: u32,
    kv_slot_stride: u32,
    at: u32,
    starts_at: u32,
    lens_at: u32,
    total: u32,
    #[comptime] rotate_keys: bool,
    #[comptime] ragged: bool,
    #[define(F, C, A, I)] _dtypes: [StorageType; 4],
) {
    let idx = ABSOLUTE_POS as usize;
    if idx >= total as usize {
        terminate!();
    }
    let d = head_dim as usize;
    let s = seq as usize;
    let hq = q_heads as usize;
    let hkv = kv_heads as usize;
    let width = (hq + 2 * hkv) * d;
    let token = idx / width;
    let col = idx % width;
    let head = col / d;
    let j = col % d;
    let pos = token % s;
    let batch = token / s;
    let partner = token * width + head * d + (j + d / 2) % d;
    let mut angle = pos * d + j;
    // Ragged (one token per sequence of a pool): angle rows per token, and each sequence's
    // key and value go to its next slot in the pool, `start + len − 1`.
    let mut kv_base = batch * kv_batch_stride as usize + (at as usize + pos) * kv_slot_stride as usize;
    if ragged {
        angle = token * d + j;
        let start = u32::cast_from(table[starts_at as usize + batch]) as usize;
        let len = u32::cast_from(table[lens_at as usize + batch]) as usize;
        kv_base = (start + len - 1) * kv_slot_stride as usize;
    }
    if head < hq {
        let x = A::cast_from(qkv[idx]);
        let xp = A::cast_from(qkv[partner]);
        let r = x * A::cast_from(q_cos[angle]) + xp * A::cast_from(q_sin[angle]);
        q[((batch * hq + head) * s + pos) * d + j] = F::cast_from(r);
    } else {
        let h = (head - hq) % hkv;
        let out = kv_base + h * kv_head_stride as usize + j;
        if head < hq + hkv {
            if rotate_keys {
                let x = A::cast_from(qkv[idx]);
                let xp = A::cast_from(qkv[partner]);
                let r = x * A::cast_from(k_cos[angle]) + xp * A::cast_from(k_sin[angle]);
                k[out] = F::cast_from(r);
            } else {
                k[out] = qkv[idx];
            }
        } else {
            v[out] = qkv[idx];
        }
    }
}

/// `y = W·x` for one activation row: `W` `[rows, cols]` row-major, read as vectors of `N`
/// (16 bytes for half precision). 32 threads per output row, `CUBE_DIM_Y` rows per cube; each
/// group streams its row once, which is what bounds decoding. The 32 partial sums meet by a
/// plane reduction where planes are 32 wide (`plane_reduce`), else in shared memory.
/// The output's element type `O` is the inputs' `F` under another name: a scalar buffer of
/// the type the vectorized inputs use was laid out as vectors too (measured on lavapipe).
///
/// Epilogues fold the next operation in: `add_residual` returns `residual + W·x` (the
/// residual stream's addition), `swiglu` reads `W` as `[2·rows, cols]` (gate rows, then up
/// rows) and returns `silu(W_g·x)·(W_u·x)` (the feed-forward block's activation).
/// `scale_out` also writes `out·γ` into `out_scaled` (`γ` `[rows]`: the next norm's), which a
/// later launch takes as `x_scaled` with `norm_inline`. `gamma` is that next norm's `γ`, or
/// with `norm_vectors > 0` this product's own norm's (`[cols]`, staged in shared memory).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn gemv<F: Float, A: Float, O: Float, G: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    x_scaled: &Tensor<Vector<F, N>>,
    w: &Tensor<Vector<F, N>>,
    residual: &Tensor<O>,
    gamma: &Tensor<G>,
    out: &mut Tensor<O>,
    out_scaled: &mut Tensor<O>,
    rows: u32,
    vectors_per_row: u32,
    eps: f32,
    #[comptime] add_residual: bool,
    #[comptime] swiglu: bool,
    #[comptime] plane_reduce: bool,
    #[comptime] norm_vectors: usize,
    #[comptime] norm_inline: bool,
    #[comptime] scale_out: bool,
    #[define(F, A, O, G)] _dtypes: [StorageType; 4],
) {
    let lane = UNIT_POS_X as usize;
    let group = UNIT_POS_Y as usize;
    let r = (CUBE_POS_X * CUBE_DIM_Y) as usize + group;
    let live = r < rows as usize;
    let per_row = vectors_per_row as usize;
    let base = r * per_row;
    let up_base = (r + rows as usize) * per_row;
    // With `norm_vectors > 0`, `x` is first RMS-normalized (`x / rms(x) · γ`, rounded to `F` as
    // the norm kernel rounds it) into shared memory by the whole cube: the norm costs no launch
    // of its own (each cube rereads the row of `x`, a few KB from cache).
    let norm = norm_vectors > 0;
    let mut xs = SharedMemory::<Vector<F, N>>::new(comptime![if norm_vectors > 0 { norm_vectors } else { 1usize }]);
    if norm {
        let units = (CUBE_DIM_Y * 32) as usize;
        let tid = group * 32 + lane;
        let mut sq = A::new(0.0);
        let mut c = tid;
        while c < per_row {
            let v = x[c];
            #[unroll]
            for e in 0..N::value() {
                sq += A::cast_from(v[e]) * A::cast_from(v[e]);
            }
            c += units;
        }
        let mut partial = SharedMemory::<A>::new(256usize);
        partial[tid] = sq;
        sync_cube();
        let mut stride = units / 2;
        while stride > 0 {
            if tid < stride {
                partial[tid] = partial[tid] + partial[tid + stride];
            }
            sync_cube();
            stride /= 2;
        }
        let cols = A::cast_from(per_row * N::value());
        let inv = A::new(1.0) / (partial[0] / cols + A::cast_from(eps)).sqrt();
        let mut k = tid;
        while k < per_row {
            let v = x[k];
            let mut normed = v;
            #[unroll]
            for e in 0..N::value() {
                normed[e] = F::cast_from(A::cast_from(v[e]) * inv * A::cast_from(gamma[k * N::value() + e]));
            }
            xs[k] = normed;
            k += units;
        }
        sync_cube();
    }
    let mut acc = A::new(0.0);
    let mut acc_up = A::new(0.0);
    // With `norm_inline`, every plane normalizes on its own, with no shared memory and no
    // wait for the cube: it sums the squares of the `x` it reads anyway, multiplies `W` by
    // `x_scaled` (`x·γ`, written by the product that made `x`: see `scale_out`) and scales
    // its finished sums by `1/rms(x)`.
    let mut sq = A::new(0.0);
    if live {
        let mut c = lane;
        // Four independent loads in flight per thread (a 4096-wide f16 row is 16 loads per
        // lane): one at a time leaves the memory system idle between them.
        while c + 96usize < per_row {
            let w0 = w[base + c];
            let w1 = w[base + c + 32usize];
            let w2 = w[base + c + 64usize];
            let w3 = w[base + c + 96usize];
            let mut x0 = x[c];
            let mut x1 = x[c + 32usize];
            let mut x2 = x[c + 64usize];
            let mut x3 = x[c + 96usize];
            if norm {
                x0 = xs[c];
                x1 = xs[c + 32usize];
                x2 = xs[c + 64usize];
                x3 = xs[c + 96usize];
            }
            let mut a0 = Vector::<A, N>::cast_from(x0);
            let mut a1 = Vector::<A, N>::cast_from(x1);
            let mut a2 = Vector::<A, N>::cast_from(x2);
            let mut a3 = Vector::<A, N>::cast_from(x3);
            if norm_inline {
                #[unroll]
                for e in 0..N::value() {
                    sq += a0[e] * a0[e] + a1[e] * a1[e] + a2[e] * a2[e] + a3[e] * a3[e];
                }
                a0 = Vector::<A, N>::cast_from(x_scaled[c]);
                a1 = Vector::<A, N>::cast_from(x_scaled[c + 32usize]);
                a2 = Vector::<A, N>::cast_from(x_scaled[c + 64usize]);
                a3 = Vector::<A, N>::cast_from(x_scaled[c + 96usize]);
            }
            #[unroll]
            for e in 0..N::value() {
                acc += A::cast_from(w0[e]) * a0[e];
                acc += A::cast_from(w1[e]) * a1[e];
                acc += A::cast_from(w2[e]) * a2[e];
                acc += A::cast_from(w3[e]) * a3[e];
            }
            if swiglu {
                let u0 = w[up_base + c];
                let u1 = w[up_base + c + 32usize];
                let u2 = w[up_base + c + 64usize];
                let u3 = w[up_base + c + 96usize];
                #[unroll]
                for e in 0..N::value() {
                    acc_up += A::cast_from(u0[e]) * a0[e];
                    acc_up += A::cast_from(u1[e]) * a1[e];
                    acc_up += A::cast_from(u2[e]) * a2[e];
                    acc_up += A::cast_from(u3[e]) * a3[e];
                }
            }
            c += 128usize;
        }
        while c < per_row {
            let mut xv = x[c];
            if norm {
                xv = xs[c];
            }
            let mut av = Vector::<A, N>::cast_from(xv);
            if norm_inline {
                #[unroll]
                for e in 0..N::value() {
                    sq += av[e] * av[e];
                }
                av = Vector::<A, N>::cast_from(x_scaled[c]);
            }
            let wv = w[base + c];
            #[unroll]
            for e in 0..N::value() {
                acc += A::cast_from(wv[e]) * av[e];
            }
            if swiglu {
                let uv = w[up_base + c];
                #[unroll]
                for e in 0..N::value() {
                    acc_up += A::cast_from(uv[e]) * av[e];
                }
            }
            c += 32usize;
        }
    }
    // The 32 lanes' partial sums: a plane reduction where planes are 32 wide (CUDA), else
    // through shared memory.
    let mut total = acc;
    let mut total_up = acc_up;
    let mut total_sq = sq;
    if plane_reduce {
        total = plane_sum(total);
        if swiglu {
            total_up = plane_sum(total_up);
        }
        if norm_inline {
            total_sq = plane_sum(total_sq);
        }
    } else {
        let mut shared = SharedMemory::<A>::new(256usize);
        let mut shared_up = SharedMemory::<A>::new(256usize);
        let mut shared_sq = SharedMemory::<A>::new(256usize);
        let slot = group * 32 + lane;
        shared[slot] = total;
        if swiglu {
            shared_up[slot] = total_up;
        }
        if norm_inline {
            shared_sq[slot] = total_sq;
        }
        sync_cube();
        let mut stride = 16usize;
        while stride > 0 {
            if lane < stride {
                shared[slot] = shared[slot] + shared[slot + stride];
                if swiglu {
                    shared_up[slot] = shared_up[slot] + shared_up[slot + stride];
                }
                if norm_inline {
                    shared_sq[slot] = shared_sq[slot] + shared_sq[slot + stride];
                }
            }
            sync_cube();
            stride /= 2;
        }
        total = shared[slot];
        if swiglu {
            total_up = shared_up[slot];
        }
        if norm_inline {
            total_sq = shared_sq[slot];
        }
    }
    if norm_inline {
        let cols = A::cast_from(per_row * N::value());
        let inv = A::new(1.0) / (total_sq / cols + A::cast_from(eps)).sqrt();
        total = total * inv;
        total_up = total_up * inv;
    }
    if live && lane == 0 {
        let mut y = total;
        if add_residual {
            y += A::cast_from(residual[r]);
        }
        if swiglu {
            y = y / (A::new(1.0) + (A::new(0.0) - y).exp()) * total_up;
        }
        let rounded = O::cast_from(y);
        out[r] = rounded;
        // `scale_out`: also the output times `γ` (of the norm the next product applies),
        // from the rounded output, as that norm would read it.
        if scale_out {
            out_scaled[r] = O::cast_from(A::cast_from(rounded) * A::cast_from(gamma[r]));
        }
    }
}

/// Decode attention scores in f32: `out[bh, r, j] = q[bh, r, ·] · keys[bh, j, ·]` with `q`
/// contiguous `[batch·kv_heads, rows, d]` and `keys` a strided view of the cache's buffer
/// (strides in vectors of `N`), so the cache is read in place (thread = score).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn attention_scores<F: Float, A: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    keys: &Tensor<Vector<F, N>>,
    out: &mut Tensor<A>,
    rows: u32,
    slots: u32,
    kv_heads: u32,
    vectors: u32,
    batch_stride: u32,
    head_stride: u32,
    slot_stride: u32,
    total: u32,
    #[define(F, A)] _dtypes: [StorageType; 2],
) {
    let idx = ABSOLUTE_POS as usize;
    if idx >= total as usize {
        terminate!();
    }
    let n = slots as usize;
    let r = rows as usize;
    let dv = vectors as usize;
    let j = idx % n;
    let row = (idx / n) % r;
    let bh = idx / (n * r);
    let batch = bh / kv_heads as usize;
    let head = bh % kv_heads as usize;
    let k_base = batch * batch_stride as usize + head * head_stride as usize + j * slot_stride as usize;
    let q_base = (bh * r + row) * dv;
    let mut acc = A::new(0.0);
    for c in 0..dv {
        let kv = keys[k_base + c];
        let qv = q[q_base + c];
        #[unroll]
        for e in 0..N::value() {
            acc += A::cast_from(kv[e]) * A::cast_from(qv[e]);
        }
    }
    out[idx] = acc;
}

/// Decode attention output: `out[bh, r, ·] = Σ_j probs[bh, r, j] · values[bh, j, ·]` with
/// `values` a strided view of the cache's buffer (strides in vectors of `N`). One cube of
/// `VALUE_GROUPS × vectors` threads per (bh, r) and slot range (`CUBE_POS_Y`, `slots_per_split`
/// slots each): each thread sums one vector of the head dimension over every `groups`-th slot
/// of its range, then the groups are added up. With `split`, each range's sum goes to
/// `partial` `[bh·r, splits, d]` in `A` for [`sum_splits`] to add (a long cache spread over
/// many cubes instead of one per head); without, straight to `out`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn attention_values<F: Float, P: Float, A: Float, N: Size>(
    probs: &Tensor<P>,
    values: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    partial: &mut Tensor<A>,
    rows: u32,
    slots: u32,
    kv_heads: u32,
    batch_stride: u32,
    head_stride: u32,
    slot_stride: u32,
    slots_per_split: u32,
    #[comptime] groups: u32,
    #[comptime] split: bool,
    #[define(F, P, A)] _dtypes: [StorageType; 3],
) {
    let dv = CUBE_DIM_X as usize;
    let c = UNIT_POS_X as usize;
    let group = UNIT_POS_Y as usize;
    let bh_row = CUBE_POS_X as usize;
    let range = CUBE_POS_Y as usize;
    let first = range * slots_per_split as usize;
    let mut end = first + slots_per_split as usize;
    if end > slots as usize {
        end = slots as usize;
    }
    let bh = bh_row / rows as usize;
    let batch = bh / kv_heads as usize;
    let head = bh % kv_heads as usize;
    let v_base = batch * batch_stride as usize + head * head_stride as usize + c;
    let p_base = bh_row * slots as usize;
    let mut acc = Vector::<A, N>::new(A::new(0.0));
    let mut j = first + group;
    while j < end {
        let p = A::cast_from(probs[p_base + j]);
        let v = Vector::<A, N>::cast_from(values[v_base + j * slot_stride as usize]);
        acc += v * Vector::new(p);
        j += groups as usize;
    }
    let mut shared = SharedMemory::<Vector<A, N>>::new(256usize);
    shared[group * dv + c] = acc;
    sync_cube();
    if group == 0 {
        let mut sum = acc;
        for g in 1..groups as usize {
            sum += shared[g * dv + c];
        }
        if split {
            let base = ((bh_row * CUBE_COUNT_Y as usize + range) * dv + c) * N::value();
            #[unroll]
            for e in 0..N::value() {
                partial[base + e] = sum[e];
            }
        } else {
            out[bh_row * dv + c] = Vector::<F, N>::cast_from(sum);
        }
    }
}

/// `out[row, k] = Σ_s partial[row, s, k]` over `splits` ranges of [`attention_values`], in
/// `F` (thread = output element).
#[cube(launch)]
pub fn sum_splits<F: Float, A: Float>(
    partial: &Tensor<A>,
    out: &mut Tensor<F>,
    splits: u32,
    width: u32,
    total: u32,
    #[define(F, A)] _dtypes: [StorageType; 2],
) {
    let idx = ABSOLUTE_POS as usize;
    if idx >= total as usize {
        terminate!();
    }
    let w = width as usize;
    let row = idx / w;
    let k = idx % w;
    let mut sum = A::new(0.0);
    for s in 0..splits as usize {
        sum += partial[(row * splits as usize + s) * w + k];
    }
    out[idx] = F::cast_from(sum);
}

/// Slots per range of [`decode_attention`] (one per thread while scoring).
pub const DECODE_SPLIT: u32 = 256;

/// Decode attention in one pass over a range of `DECODE_SPLIT` slots (`CUBE_POS_Y`) for one
/// query row (`CUBE_POS_X` = bh·rows + r): scores (thread = slot, the query in shared memory),
/// their maximum and the sum of exponentials, and the exponentials' weighted sum of values
/// (`groups` slot groups × the head dimension's vectors). Writes the range's maximum, sum and
/// unnormalized output to `partial` (`[bh·rows, splits, 2 + d]`, f32) for [`combine_ranges`]:
/// where nobody reads the probabilities, the scores never reach memory. `observe` (pools
/// only): the scores are also written to `scores_out` (`[kv_heads·rows, score_row]`, a row per
/// query head, each slot at its place in the pool) for [`observe_pool`].
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn decode_attention<F: Float, A: Float, I: Int, N: Size>(
    q: &Tensor<Vector<F, N>>,
    keys: &Tensor<Vector<F, N>>,
    values: &Tensor<Vector<F, N>>,
    partial: &mut Tensor<A>,
    table: &Tensor<I>,
    scores_out: &mut Tensor<A>,
    rows: u32,
    slots: u32,
    kv_heads: u32,
    batch_stride: u32,
    head_stride: u32,
    slot_stride: u32,
    starts_at: u32,
    lens_at: u32,
    score_row: u32,
    #[comptime] groups: u32,
    #[comptime] ragged: bool,
    #[comptime] coalesced: bool,
    #[comptime] observe: bool,
    #[define(F, A, I)] _dtypes: [StorageType; 3],
) {
    let tid = UNIT_POS as usize;
    let dv = CUBE_DIM_X as usize;
    let c = UNIT_POS_X as usize;
    let group = UNIT_POS_Y as usize;
    let bh_row = CUBE_POS_X as usize;
    let range = CUBE_POS_Y as usize;
    let split = DECODE_SPLIT as usize;
    let first = range * split;
    let bh = bh_row / rows as usize;
    let batch = bh / kv_heads as usize;
    let head = bh % kv_heads as usize;
    let mut kv_base = batch * batch_stride as usize + head * head_stride as usize;
    let mut n = slots as usize;
    // Where this row's scores go when observed: its query head's row, at the pool's slots.
    let mut score_base = 0usize;
    // Ragged (sequences of a pool): batch `batch` holds `len` slots from the pool's `start`;
    // ranges past its slots write an empty partial (its maximum the floor, its sums 0).
    if ragged {
        let start = u32::cast_from(table[starts_at as usize + batch]) as usize;
        n = u32::cast_from(table[lens_at as usize + batch]) as usize;
        kv_base = head * head_stride as usize + start * slot_stride as usize;
        score_base = (head * rows as usize + bh_row % rows as usize) * score_row as usize + start + first;
    }
    let mut count = 0usize;
    if n > first {
        count = n - first;
    }
    if count > split {
        count = split;
    }
    // The query row, shared by every thread.
    let mut qs = SharedMemory::<Vector<F, N>>::new(64usize);
    if tid < dv {
        qs[tid] = q[bh_row * dv + tid];
    }
    sync_cube();
    let floor = A::new(-3.0e38);
    let mut score = floor;
    if coalesced {
        // The `dv` lanes of a group read one key together (consecutive vectors: a key's bytes
        // in one request per plane, where one key per thread reads 16 bytes of 32 keys per
        // request) and add their parts by shuffles; a plane holds whole groups (`dv` divides
        // 32). Every round's loads are independent, so all of a thread's are in flight at once.
        let mut scores = SharedMemory::<A>::new(256usize);
        let qv = Vector::<A, N>::cast_from(qs[c]);
        #[unroll]
        for round in 0..comptime![256 / groups] {
            let j = round as usize * groups as usize + group;
            let mut part = A::new(0.0);
            if j < count {
                let kv = Vector::<A, N>::cast_from(keys[kv_base + (first + j) * slot_stride as usize + c]);
                #[unroll]
                for e in 0..N::value() {
                    part += kv[e] * qv[e];
                }
            }
            let mut mask = dv as u32 / 2;
            while mask > 0 {
                part += plane_shuffle_xor(part, mask);
                mask /= 2;
            }
            if c == 0 {
                scores[j] = part;
            }
        }
        sync_cube();
        if tid < count {
            score = scores[tid];
        }
    } else if tid < count {
        let k_base = kv_base + (first + tid) * slot_stride as usize;
        let mut acc = A::new(0.0);
        for v in 0..dv {
            let kv = keys[k_base + v];
            let qv = qs[v];
            #[unroll]
            for e in 0..N::value() {
                acc += A::cast_from(kv[e]) * A::cast_from(qv[e]);
            }
        }
        score = acc;
    }
    if observe && tid < count {
        scores_out[score_base + tid] = score;
    }
    let max = cube_max::<A>(score);
    let mut p = A::new(0.0);
    if tid < count {
        p = (score - max).exp();
    }
    let sum = cube_sum::<A>(p);
    let mut ps = SharedMemory::<A>::new(256usize);
    ps[tid] = p;
    sync_cube();
    let mut acc = Vector::<A, N>::new(A::new(0.0));
    let mut j = group;
    let g = groups as usize;
    let ss = slot_stride as usize;
    // Four slots' loads in flight per thread, then one at a time for the rest.
    while j + 3 * g < count {
        let at = kv_base + (first + j) * ss + c;
        let v0 = Vector::<A, N>::cast_from(values[at]);
        let v1 = Vector::<A, N>::cast_from(values[at + g * ss]);
        let v2 = Vector::<A, N>::cast_from(values[at + 2 * g * ss]);
        let v3 = Vector::<A, N>::cast_from(values[at + 3 * g * ss]);
        acc += v0 * Vector::new(ps[j]);
        acc += v1 * Vector::new(ps[j + g]);
        acc += v2 * Vector::new(ps[j + 2 * g]);
        acc += v3 * Vector::new(ps[j + 3 * g]);
        j += 4 * g;
    }
    while j < count {
        let v = Vector::<A, N>::cast_from(values[kv_base + (first + j) * ss + c]);
        acc += v * Vector::new(ps[j]);
        j += g;
    }
    let mut shared = SharedMemory::<Vector<A, N>>::new(256usize);
    shared[group * dv + c] = acc;
    sync_cube();
    let width = 2 + dv * N::value();
    let base = (bh_row * CUBE_COUNT_Y as usize + range) * width;
    if group == 0 {
        let mut total = acc;
        for g in 1..groups as usize {
            total += shared[g * dv + c];
        }
        #[unroll]
        for e in 0..N::value() {
            partial[base + 2 + c * N::value() + e] = total[e];
        }
        if c == 0 {
            partial[base] = max;
            partial[base + 1] = sum;
        }
    }
}

/// The largest of row `row`'s `n` range maxima in [`decode_attention`]'s `partial` (ranges of
/// `width` values, the maximum first).
#[cube]
fn ranges_max<A: Float>(partial: &Tensor<A>, row: usize, n: usize, width: usize) -> A {
    let mut m = A::new(-3.0e38);
    for s in 0..n {
        let ms = partial[(row * n + s) * width];
        if ms > m {
            m = ms;
        }
    }
    m
}

/// Joins [`decode_attention`]'s ranges: `out[row, k] = Σ_s e^(m_s − M)·acc_s[k] / Σ_s
/// e^(m_s − M)·l_s` with `M` the largest range maximum (thread = output element).
#[cube(launch)]
pub fn combine_ranges<F: Float, A: Float>(
    partial: &Tensor<A>,
    out: &mut Tensor<F>,
    splits: u32,
    d: u32,
    total: u32,
    #[define(F, A)] _dtypes: [StorageType; 2],
) {
    let idx = ABSOLUTE_POS as usize;
    if idx >= total as usize {
        terminate!();
    }
    let dd = d as usize;
    let width = 2 + dd;
    let row = idx / dd;
    let k = idx % dd;
    let n = splits as usize;
    let m = ranges_max::<A>(partial, row, n, width);
    let mut num = A::new(0.0);
    let mut den = A::new(0.0);
    for s in 0..n {
        let base = (row * n + s) * width;
        let w = (partial[base] - m).exp();
        num += w * partial[base + 2 + k];
        den += w * partial[base + 1];
    }
    out[idx] = F::cast_from(num / den);
}

/// What a pooled decode step's attention paid each slot, as the cache observes it: for
/// sequence `batch` and KV head `head` (`CUBE_POS_X` = batch·kv_heads + head) and slot `j` of
/// its own (`CUBE_POS_Y`·256 + thread), the mean over the head's `rows` query rows of
/// `e^(score − M)/L`, with `M` and `L` the row's maximum and sum of exponentials joined from
/// [`decode_attention`]'s `partial` ranges (`splits` of `width` values) and the score from its
/// `scores_out`; written to `obs[obs_at + head·obs_row + start + j]` (the pool's slot).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn observe_pool<A: Float, I: Int>(
    scores: &Tensor<A>,
    partial: &Tensor<A>,
    table: &Tensor<I>,
    obs: &mut Tensor<A>,
    rows: u32,
    kv_heads: u32,
    splits: u32,
    width: u32,
    score_row: u32,
    obs_row: u32,
    obs_at: u32,
    starts_at: u32,
    lens_at: u32,
    #[define(A, I)] _dtypes: [StorageType; 2],
) {
    let bh = CUBE_POS_X as usize;
    let batch = bh / kv_heads as usize;
    let head = bh % kv_heads as usize;
    let j = CUBE_POS_Y as usize * 256 + UNIT_POS as usize;
    let len = u32::cast_from(table[lens_at as usize + batch]) as usize;
    if j >= len {
        terminate!();
    }
    let start = u32::cast_from(table[starts_at as usize + batch]) as usize;
    let n = splits as usize;
    let w = width as usize;
    let mut p = A::new(0.0);
    for r in 0..rows as usize {
        let row = bh * rows as usize + r;
        let m = ranges_max::<A>(partial, row, n, w);
        let mut l = A::new(0.0);
        for s in 0..n {
            let base = (row * n + s) * w;
            l += (partial[base] - m).exp() * partial[base + 1];
        }
        let score = scores[(head * rows as usize + r) * score_row as usize + start + j];
        p += (score - m).exp() / l;
    }
    obs[obs_at as usize + head * obs_row as usize + start + j] = p / A::cast_from(rows);
}

/// For every slot of every row of `n` keys, how many slots of its row come before it in
/// (key, slot) order, as f32 (cube = 256 slots of one row, `blocks` cubes per row; the row
/// streams through shared memory 256 keys at a time). What eviction ranks by, without the
/// `n²` comparisons in memory that burn's operations need.
#[cube(launch)]
pub fn row_ranks(keys: &Tensor<f32>, ranks: &mut Tensor<f32>, n: u32, blocks: u32) {
    let row = (CUBE_POS_X / blocks) as usize;
    let block = (CUBE_POS_X % blocks) as usize;
    let tid = UNIT_POS_X as usize;
    let len = n as usize;
    let base = row * len;
    let i = block * 256usize + tid;
    let live = i < len;
    let mut mine = f32::new(0.0);
    if live {
        mine = keys[base + i];
    }
    let mut rank = u32::new(0);
    let mut shared = SharedMemory::<f32>::new(256usize);
    let mut start = 0usize;
    while start < len {
        let j = start + tid;
        if j < len {
            shared[tid] = keys[base + j];
        }
        sync_cube();
        let remaining = len - start;
        let mut count = 256usize;
        if remaining < 256usize {
            count = remaining;
        }
        for u in 0..count {
            let other = shared[u];
            if other < mine {
                rank += u32::new(1);
            } else if other == mine {
                if start + u < i {
                    rank += u32::new(1);
                }
            }
        }
        sync_cube();
        start += 256usize;
    }
    if live {
        ranks[base + i] = f32::cast_from(rank);
    }
}

/// [`row_ranks`] by sorting: each row (cube) is padded to `padded` (a power of two) with keys
/// above every real one and sorted by (key, slot) in shared memory with a bitonic network;
/// a slot's rank is where it lands. `log²(padded)/2` steps of `padded/2` comparisons instead of
/// `n²`: for the few thousand slots of a prefill's evictions, an order of magnitude less work.
#[cube(launch)]
pub fn sort_ranks(keys: &Tensor<f32>, ranks: &mut Tensor<f32>, n: u32, #[comptime] padded: usize) {
    let row = CUBE_POS_X as usize;
    let tid = UNIT_POS_X as usize;
    let threads = CUBE_DIM_X as usize;
    let len = n as usize;
    let base = row * len;
    let mut sk = SharedMemory::<f32>::new(padded);
    let mut si = SharedMemory::<u32>::new(padded);
    let mut i = tid;
    while i < padded {
        // Padding sorts after every real key (real keys stay below 3.1e38).
        let mut key = f32::new(3.4e38);
        if i < len {
            key = keys[base + i];
        }
        sk[i] = key;
        si[i] = u32::cast_from(i);
        i += threads;
    }
    sync_cube();
    let half = padded / 2;
    let mut k = 2usize;
    while k <= padded {
        let mut j = k / 2;
        while j > 0 {
            let mut t = tid;
            while t < half {
                let a = 2 * j * (t / j) + t % j;
                let b = a + j;
                let ascending = (a / k) % 2 == 0;
                let (ka, kb) = (sk[a], sk[b]);
                let (ia, ib) = (si[a], si[b]);
                let a_after_b = ka > kb || (ka == kb && ia > ib);
                if a_after_b == ascending {
                    sk[a] = kb;
                    sk[b] = ka;
                    si[a] = ib;
                    si[b] = ia;
                }
                t += threads;
            }
            sync_cube();
            j /= 2;
        }
        k *= 2;
    }
    let mut p = tid;
    while p < len {
        ranks[base + si[p] as usize] = f32::cast_from(p);
        p += threads;
    }
}

/// Column statistics of a chunk's attention `probs` (`[bh, s, n]`, contiguous): for every
/// (bh, slot) the sum over the `s` queries, the sum of squares and the last query's value,
/// written to row `row·heads + bh` of three `[rows·heads, n]` buffers with row stride
/// `row_stride` (thread = (bh, slot); neighbouring threads read neighbouring slots).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn observe_columns(
    probs: &Tensor<f32>,
    sum: &mut Tensor<f32>,
    sum_sq: &mut Tensor<f32>,
    last: &mut Tensor<f32>,
    queries: u32,
    slots: u32,
    first_row: u32,
    row_stride: u32,
    total: u32,
) {
    let idx = ABSOLUTE_POS as usize;
    if idx >= total as usize {
        terminate!();
    }
    let n = slots as usize;
    let s = queries as usize;
    let bh = idx / n;
    let j = idx % n;
    let mut acc = f32::new(0.0);
    let mut acc_sq = f32::new(0.0);
    let mut p = f32::new(0.0);
    for q in 0..s {
        p = probs[(bh * s + q) * n + j];
        acc += p;
        acc_sq += p * p;
    }
    let out = (first_row as usize + bh) * row_stride as usize + j;
    sum[out] = acc;
    sum_sq[out] = acc_sq;
    last[out] = p;
}

/// `out[z] = a[z]·b[z]` in f32 without tensor cores (burn's CUDA products of f32 run as TF32):
/// `a` contiguous `[z, m, k]`, element `(kk, j)` of `b[z]` at `z·b_batch + kk·b_row + j·b_col`
/// (a transposed or partly used buffer needs no copy), 16×16 output tiles through shared memory
/// (thread = output element).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn matmul_f32(
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    out: &mut Tensor<f32>,
    m: u32,
    k: u32,
    n: u32,
    b_batch: u32,
    b_row: u32,
    b_col: u32,
) {
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let col = CUBE_POS_X as usize * 16usize + tx;
    let row = CUBE_POS_Y as usize * 16usize + ty;
    let z = CUBE_POS_Z as usize;
    let (rows, inner, cols) = (m as usize, k as usize, n as usize);
    let mut tile_a = SharedMemory::<f32>::new(256usize);
    let mut tile_b = SharedMemory::<f32>::new(256usize);
    let mut acc = f32::new(0.0);
    let mut start = 0usize;
    while start < inner {
        let mut va = f32::new(0.0);
        if row < rows {
            if start + tx < inner {
                va = a[(z * rows + row) * inner + start + tx];
            }
        }
        let mut vb = f32::new(0.0);
        if col < cols {
            if start + ty < inner {
                vb = b[z * b_batch as usize + (start + ty) * b_row as usize + col * b_col as usize];
            }
        }
        tile_a[ty * 16usize + tx] = va;
        tile_b[ty * 16usize + tx] = vb;
        sync_cube();
        for i in 0..16usize {
            acc += tile_a[ty * 16usize + i] * tile_b[i * 16usize + tx];
        }
        sync_cube();
        start += 16usize;
    }
    if row < rows {
        if col < cols {
            out[(z * rows + row) * cols + col] = acc;
        }
    }
}

/// A product with few rows on tensor cores: `partial[split] = x·Wᵀ` over the split's share of
/// the inner axis, `x` `[16·m_blocks, k]` and `W` `[n, k]` contiguous in `F` (f16 or bf16),
/// `partial` `[splits, 16·m_blocks, n]` in f32, summed by [`sum_partials`].
///
/// A prefill stride of 64 tokens reads every weight once for 64 rows: bound by the weights'
/// bytes like a decode step, while tiled matrix products of outputs only 4096 wide leave most
/// of the GPU idle. Here a plane (32 threads) owns `16·col_blocks` output columns for all rows
/// and one range of the inner axis (`CUBE_POS_Y`), loading its weight tiles straight from
/// memory, `unroll` steps of 16 ahead so several loads are in flight; the few rows of `x` come
/// from cache. (Staging them in shared memory for the cube's planes measured slower.)
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows<F: Float, A: Float>(
    x: &Tensor<F>,
    w: &Tensor<F>,
    partial: &mut Tensor<A>,
    k: u32,
    n: u32,
    steps_per_split: u32,
    #[comptime] m_blocks: usize,
    #[comptime] col_blocks: usize,
    #[comptime] unroll: usize,
    #[define(F, A)] _dtypes: [StorageType; 2],
) {
    let inner = k as usize;
    let cols = n as usize;
    let col0 = ((CUBE_POS_X * CUBE_DIM_Y) as usize + UNIT_POS_Y as usize) * 16usize * col_blocks;
    if col0 >= cols {
        terminate!();
    }
    let split = CUBE_POS_Y as usize;
    let begin = split * steps_per_split as usize * 16usize;
    let mut end = begin + steps_per_split as usize * 16usize;
    if end > inner {
        end = inner;
    }
    let mut acc = Sequence::<cmma::Matrix<A>>::new();
    #[unroll]
    for _ in 0..m_blocks * col_blocks {
        acc.push(cmma::Matrix::<A>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            A::new(0.0),
        ));
    }
    let a = cmma::Matrix::<F>::from_value(
        cmma::MatrixIdent::A,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::RowMajor,
        F::new(0.0),
    );
    let mut b = Sequence::<cmma::Matrix<F>>::new();
    #[unroll]
    for _ in 0..unroll * col_blocks {
        b.push(cmma::Matrix::<F>::from_value(
            cmma::MatrixIdent::B,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::ColMajor,
            F::new(0.0),
        ));
    }
    let x_len = x.len();
    let w_len = w.len();
    let mut kk = begin;
    // `unroll` steps at a time (split lengths are whole multiples): all their weight tiles
    // requested before the first product.
    while kk < end {
        #[unroll]
        for u in 0..unroll {
            #[unroll]
            for c in 0..col_blocks {
                let start = (col0 + c * 16usize) * inner + kk + u * 16usize;
                cmma::load(b.index(u * col_blocks + c), &w.slice(start, w_len), k);
            }
        }
        #[unroll]
        for u in 0..unroll {
            #[unroll]
            for mb in 0..m_blocks {
                cmma::load(&a, &x.slice(mb * 16usize * inner + kk + u * 16usize, x_len), k);
                #[unroll]
                for c in 0..col_blocks {
                    let tile = acc.index(mb * col_blocks + c);
                    cmma::execute::<F, F, A, A>(&a, b.index(u * col_blocks + c), tile, tile);
                }
            }
        }
        kk += 16usize * unroll;
    }
    let rows = m_blocks * 16usize;
    let p_len = partial.len();
    #[unroll]
    for mb in 0..m_blocks {
        #[unroll]
        for c in 0..col_blocks {
            let start = (split * rows + mb * 16usize) * cols + col0 + c * 16usize;
            cmma::store(
                &mut partial.slice_mut(start, p_len),
                acc.index(mb * col_blocks + c),
                n,
                cmma::MatrixLayout::RowMajor,
            );
        }
    }
}

/// Inner-axis elements a [`matmul_rows_staged`] plane stages per step.
pub const STAGED_CHUNK: usize = 64;

/// [`matmul_rows`] with the weights read as whole cache lines: each plane owns 32 output
/// columns and, per step, loads their next [`STAGED_CHUNK`] inputs (32 rows × 128 bytes in
/// f16) as 16-byte vectors, eight lanes per row — every load instruction of the plane reads
/// four full lines — into its own region of shared memory, from where the tensor cores' tiles
/// are loaded. The next step's loads are issued before this step's products, so a plane always
/// has its next 4 KB in flight. (Loading the fragments straight from memory, as
/// [`matmul_rows`] does, reads 16 bytes of 8 rows per instruction: twice the requests.)
/// `w` is `[n, k]` read as vectors of `N` = 8; `n` a multiple of 32, `k` of [`STAGED_CHUNK`].
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows_staged<F: Float, A: Float, N: Size>(
    x: &Tensor<F>,
    w: &Tensor<Vector<F, N>>,
    partial: &mut Tensor<A>,
    k: u32,
    n: u32,
    chunks_per_split: u32,
    #[comptime] m_blocks: usize,
    #[comptime] planes_per_cube: usize,
    #[comptime] row_vectors: usize,
    #[define(F, A)] _dtypes: [StorageType; 2],
) {
    let inner = k as usize;
    let cols = n as usize;
    let lane = UNIT_POS_X as usize;
    let plane = UNIT_POS_Y as usize;
    let col0 = ((CUBE_POS_X * CUBE_DIM_Y) as usize + plane) * 32usize;
    if col0 >= cols {
        terminate!();
    }
    // A row of the stage (`row_vectors` = STAGED_CHUNK / N vectors) plus one vector of
    // padding: its pitch, 72 halves, is a multiple of 8 as the tensor cores' loads need and
    // spreads the rows over the banks.
    let pitch = comptime![row_vectors + 1];
    let ldm = comptime![((row_vectors + 1) * (STAGED_CHUNK / row_vectors)) as u32];
    let region = comptime![32 * (row_vectors + 1)];
    let loads = row_vectors;
    let rows_per_load = comptime![32 / row_vectors];
    let mut stage =
        SharedMemory::<Vector<F, N>>::new_aligned(comptime![planes_per_cube * 32 * (row_vectors + 1)], 32usize);
    let base = plane * region;
    let w_row_vectors = inner / N::value();
    // This lane's vectors of a chunk: row `lane / row_vectors + rows_per_load·i`, vector
    // `lane % row_vectors` of the row's chunk.
    let my_row = lane / row_vectors;
    let my_vec = lane % row_vectors;
    let split = CUBE_POS_Y as usize;
    let begin = split * chunks_per_split as usize;
    let mut end = begin + chunks_per_split as usize;
    let chunks = inner / STAGED_CHUNK;
    if end > chunks {
        end = chunks;
    }
    let mut acc = Sequence::<cmma::Matrix<A>>::new();
    #[unroll]
    for _ in 0..m_blocks * 2 {
        acc.push(cmma::Matrix::<A>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            A::new(0.0),
        ));
    }
    let a = cmma::Matrix::<F>::from_value(
        cmma::MatrixIdent::A,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::RowMajor,
        F::new(0.0),
    );
    let b0 = cmma::Matrix::<F>::from_value(
        cmma::MatrixIdent::B,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::ColMajor,
        F::new(0.0),
    );
    let b1 = cmma::Matrix::<F>::from_value(
        cmma::MatrixIdent::B,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::ColMajor,
        F::new(0.0),
    );
    let mut held = Array::<Vector<F, N>>::new(loads);
    let first = (col0 + my_row) * w_row_vectors + my_vec;
    let row_step = rows_per_load * w_row_vectors;
    if begin < end {
        #[unroll]
        for i in 0..loads {
            held[i] = w[first + i * row_step + begin * row_vectors];
        }
    }
    let x_len = x.len();
    let stage_len = stage.len();
    let mut t = begin;
    while t < end {
        #[unroll]
        for i in 0..loads {
            stage[base + (my_row + i * rows_per_load) * pitch + my_vec] = held[i];
        }
        sync_plane();
        if t + 1 < end {
            #[unroll]
            for i in 0..loads {
                held[i] = w[first + i * row_step + (t + 1) * row_vectors];
            }
        }
        #[unroll]
        for s in 0..comptime![STAGED_CHUNK / 16] {
            // 16 inputs are `row_vectors / 4` vectors.
            let step = comptime![row_vectors / 4];
            cmma::load(&b0, &stage.slice(base + s * step, stage_len), ldm);
            cmma::load(&b1, &stage.slice(base + 16 * pitch + s * step, stage_len), ldm);
            #[unroll]
            for mb in 0..m_blocks {
                cmma::load(
                    &a,
                    &x.slice(mb * 16usize * inner + t * STAGED_CHUNK + s * 16usize, x_len),
                    k,
                );
                let t0 = acc.index(mb * 2);
                cmma::execute::<F, F, A, A>(&a, &b0, t0, t0);
                let t1 = acc.index(mb * 2 + 1);
                cmma::execute::<F, F, A, A>(&a, &b1, t1, t1);
            }
        }
        sync_plane();
        t += 1;
    }
    let rows = m_blocks * 16usize;
    let p_len = partial.len();
    #[unroll]
    for mb in 0..m_blocks {
        #[unroll]
        for c in 0..2usize {
            let start = (split * rows + mb * 16usize) * cols + col0 + c * 16usize;
            cmma::store(
                &mut partial.slice_mut(start, p_len),
                acc.index(mb * 2 + c),
                n,
                cmma::MatrixLayout::RowMajor,
            );
        }
    }
}

/// The sum of [`matmul_rows`]' splits for the first `rows` rows (`partial` `[splits,
/// padded_rows, n]`), then the epilogue: plus `residual` (`[rows, out_cols]`), or SwiGLU of
/// the gate columns `j` and up columns `out_cols + j`; in `O` (thread = output element).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sum_partials<A: Float, O: Float>(
    partial: &Tensor<A>,
    residual: &Tensor<O>,
    out: &mut Tensor<O>,
    splits: u32,
    padded_rows: u32,
    n: u32,
    out_cols: u32,
    total: u32,
    #[comptime] add_residual: bool,
    #[comptime] swiglu: bool,
    #[define(A, O)] _dtypes: [StorageType; 2],
) {
    let idx = ABSOLUTE_POS as usize;
    if idx >= total as usize {
        terminate!();
    }
    let width = out_cols as usize;
    let row = idx / width;
    let j = idx % width;
    let plane = padded_rows as usize * n as usize;
    let base = row * n as usize + j;
    let mut y = A::new(0.0);
    let mut up = A::new(0.0);
    for s in 0..splits as usize {
        y += partial[s * plane + base];
        if swiglu {
            up += partial[s * plane + base + width];
        }
    }
    if swiglu {
        y = y / (A::new(1.0) + (A::new(0.0) - y).exp()) * up;
    }
    if add_residual {
        y += A::cast_from(residual[idx]);
    }
    out[idx] = O::cast_from(y);
}

/// One layer's keys and values compacted: slot `keep[bh, j]` of `keys`/`values` to slot `j`
/// of `new_keys`/`new_values` (all `[bh, capacity, lanes]` vectors; thread = vector of both).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn gather_slots<F: Float, I: Int, N: Size>(
    keys: &Tensor<Vector<F, N>>,
    values: &Tensor<Vector<F, N>>,
    keep: &Tensor<I>,
    new_keys: &mut Tensor<Vector<F, N>>,
    new_values: &mut Tensor<Vector<F, N>>,
    capacity: u32,
    kept: u32,
    lanes: u32,
    total: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let idx = ABSOLUTE_POS as usize;
    if idx >= total as usize {
        terminate!();
    }
    let l = lanes as usize;
    let lane = idx % l;
    let t = idx / l;
    let j = t % kept as usize;
    let bh = t / kept as usize;
    let slot = u32::cast_from(keep[bh * kept as usize + j]) as usize;
    let from = (bh * capacity as usize + slot) * l + lane;
    let to = (bh * capacity as usize + j) * l + lane;
    new_keys[to] = keys[from];
    new_values[to] = values[from];
}

/// `src` (`[batch, heads, s, lanes]` vectors) into slots `at..at + s` of `dst`
/// (`[batch, heads, capacity, lanes]`), each indexed by its own batch, head and slot strides
/// (in vectors; thread = vector): a pool region's view written in place.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn write_slots<F: Float, N: Size>(
    src: &Tensor<Vector<F, N>>,
    dst: &mut Tensor<Vector<F, N>>,
    heads: u32,
    s: u32,
    lanes: u32,
    src_batch_stride: u32,
    src_head_stride: u32,
    src_slot_stride: u32,
    dst_batch_stride: u32,
    dst_head_stride: u32,
    dst_slot_stride: u32,
    at: u32,
    total: u32,
    #[define(F)] _dtype: StorageType,
) {
    let idx = ABSOLUTE_POS as usize;
    if idx >= total as usize {
        terminate!();
    }
    let l = lanes as usize;
    let lane = idx % l;
    let t = idx / l;
    let j = t % s as usize;
    let bh = t / s as usize;
    let b = bh / heads as usize;
    let h = bh % heads as usize;
    let from = b * src_batch_stride as usize + h * src_head_stride as usize + j * src_slot_stride as usize + lane;
    let to = b * dst_batch_stride as usize
        + h * dst_head_stride as usize
        + (at as usize + j) * dst_slot_stride as usize
        + lane;
    dst[to] = src[from];
}

/// The slots of each row of `mask` (`[rows, n]`, 1.0 = true) that are true, ascending, the
/// first `count` of them; a row with fewer fills the rest with 0 (cube = row: each thread
/// counts a run of slots, a prefix sum over the threads places the runs).
#[cube(launch)]
pub fn list_true_slots<I: Int>(
    mask: &Tensor<f32>,
    out: &mut Tensor<I>,
    n: u32,
    count: u32,
    #[define(I)] _dtype: StorageType,
) {
    let row = CUBE_POS_X as usize;
    let tid = UNIT_POS as usize;
    let len = n as usize;
    let chunk = len.div_ceil(256usize);
    let start = tid * chunk;
    let mut end = start + chunk;
    if end > len {
        end = len;
    }
    let base = row * len;
    let mut c = 0u32;
    let mut j = start;
    while j < end {
        if mask[base + j] > 0.5 {
            c += 1u32;
        }
        j += 1usize;
    }
    let mut prefix = SharedMemory::<u32>::new(256usize);
    prefix[tid] = c;
    sync_cube();
    let mut offset = 1usize;
    while offset < 256usize {
        let mut add = 0u32;
        if tid >= offset {
            add = prefix[tid - offset];
        }
        sync_cube();
        prefix[tid] = prefix[tid] + add;
        sync_cube();
        offset *= 2usize;
    }
    let total = prefix[255usize];
    let wanted = count as usize;
    let out_base = row * wanted;
    let mut pos = (prefix[tid] - c) as usize;
    j = start;
    while j < end {
        if mask[base + j] > 0.5 {
            if pos < wanted {
                out[out_base + pos] = I::cast_from(j as u32);
            }
            pos += 1usize;
        }
        j += 1usize;
    }
    let mut p = total as usize + tid;
    while p < wanted {
        out[out_base + p] = I::cast_from(0u32);
        p += 256usize;
    }
}
