//! Grouped-query self-attention with an explicit softmax, whose probabilities the cache sees.

use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::DType;

use easykv_core::{CachedKv, KvCache};

use crate::gpu_kernels::PoolRows;

use super::pooled::PooledStep;

use super::rope::{ChunkAngles, Rope, RopeAngles};
use crate::backend::BackendProfile;
use crate::error::Result;
use crate::gpu_kernels::HeadShape;
use crate::host_kernels::HeadsFirstChunks;
use crate::linear::Linear;
use crate::ops;

/// Grouped-query self-attention with an explicit softmax.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Queries, keys and values stacked into one product (one pass over `x`, one kernel
    /// instead of three): `[(n_heads + 2·n_kv_heads)·head_dim, hidden]`.
    pub qkv: Linear<B>,
    pub o: Linear<B>,
    pub(super) n_heads: usize,
    pub(super) n_kv_heads: usize,
    pub(super) head_dim: usize,
    /// Positions attention reaches back (the query's own included); 0: the whole context.
    pub(super) window: usize,
}

impl<B: Backend> Attention<B> {
    /// Queries (rotated, attention scale folded in), keys (rotated unless `angles.slots` says
    /// StreamingLLM rotates them by slot after caching) and values of the stacked projection
    /// `qkv`.
    ///
    /// # Shapes
    /// - `qkv`: `[batch, s, (n_heads + 2·n_kv_heads)·head_dim]`; `angles`: for the `s` positions
    /// - returns `[batch, heads, s, head_dim]` with `n_heads`, `n_kv_heads`, `n_kv_heads` heads
    fn project(
        &self,
        p: &BackendProfile,
        qkv: Tensor<B, 3>,
        angles: &ChunkAngles<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let heads = HeadShape {
            q_heads: self.n_heads,
            kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        };
        let (q_rows, k_rows) = (&angles.queries.rows, &angles.keys.rows);
        let keys = angles.slots.is_none().then_some((&k_rows.0, &k_rows.1));
        // One kernel where there is one (CUDA), instead of copies, rotations and transposes.
        match ops::split_rope(p, qkv, heads, (&q_rows.0, &q_rows.1), keys) {
            Ok(qkv) => qkv,
            Err(qkv) => {
                let (q, k, v) = self.split_positions_first(qkv, angles);
                (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2))
            }
        }
    }

    /// The queries of the stacked projection `qkv` (`[batch, s, (hq + 2·hkv)·d]`) before RoPE,
    /// handed out heads first, `[batch, hq, s, d]` (what a cache scoring by expected attention
    /// gathers). In host memory the chunks are copied out once, contiguous: the strided view
    /// cost every cache's statistics flex's element-by-element path.
    pub(super) fn prerope_queries(&self, p: &BackendProfile, qkv: &Tensor<B, 3>) -> HeadsFirstChunks<B> {
        let [b, s, _] = qkv.dims();
        let (hq, d) = (self.n_heads, self.head_dim);
        let q = qkv.clone().slice_dim(2, 0..hq * d).reshape([b, s, hq, d]);
        match p.host_resident() {
            true => HeadsFirstChunks::new(q),
            false => HeadsFirstChunks::Device(q.swap_dims(1, 2)),
        }
    }

    /// [`project`](Self::project) in the projections' own layout, `[batch, s, heads, head_dim]`,
    /// with the queries before RoPE (`[batch, hq, s, d]`) where `prerope` asks for them.
    #[allow(clippy::type_complexity)]
    pub(super) fn project_positions_first(
        &self,
        p: &BackendProfile,
        x: Tensor<B, 3>,
        angles: &ChunkAngles<B>,
        prerope: bool,
    ) -> ((Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>), Option<HeadsFirstChunks<B>>) {
        let qkv = self.qkv.forward(p, x);
        let queries = prerope.then(|| self.prerope_queries(p, &qkv));
        (self.split_positions_first(qkv, angles), queries)
    }

    /// The stacked projection `qkv` (`[batch, s, (hq + 2·hkv)·d]`) as q, k, v in the
    /// projections' layout, rotated as [`project`](Self::project) says.
    pub(super) fn split_positions_first(
        &self,
        qkv: Tensor<B, 3>,
        angles: &ChunkAngles<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, s, _] = qkv.dims();
        let (d, hq, hkv) = (self.head_dim, self.n_heads, self.n_kv_heads);
        // `h` heads from head `first` of the stacked projection, rotated (where asked) in the
        // projection's own layout.
        let heads = |first: usize, h: usize| {
            qkv.clone()
                .slice_dim(2, first * d..(first + h) * d)
                .reshape([b, s, h, d])
        };
        let q = Rope::apply(heads(0, hq), &angles.queries);
        let k = match angles.slots {
            None => Rope::apply(heads(hq, hkv), &angles.keys),
            Some(_) => heads(hq, hkv),
        };
        let v = heads(hq + hkv, hkv);
        (q, k, v)
    }

    /// Appends `k`, `v` to the cache and attends `q` over everything it holds, handing the
    /// probabilities to the cache when it wants them.
    ///
    /// # Shapes
    /// - `q`: `[batch, n_heads, s, head_dim]`; `k`, `v`: `[batch, n_kv_heads, s, head_dim]`
    /// - `mask`: `[batch, kv_heads, group·s, slots]` additive (0 or −∞), `None` when it
    ///   hides nothing
    /// - returns `[batch, n_heads, s, head_dim]`
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend<C: KvCache<B> + ?Sized>(
        &self,
        p: &BackendProfile,
        layer: usize,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        slot_angles: Option<&RopeAngles<B>>,
        mask: Option<&Tensor<B, 4>>,
        cache: &mut C,
    ) -> Result<Tensor<B, 4>> {
        // Keys and values are cached in the weights' precision (f16 halves the cache).
        let kv_dtype = self.qkv.weight.val().dtype();
        let (k, v) = (k.cast(kv_dtype), v.cast(kv_dtype));
        if let Some(out) =
            self.attend_per_head(p, layer, &q, (&k, &v), slot_angles.is_some() || mask.is_some(), cache)?
        {
            return Ok(out);
        }
        let cached = cache.append_in_place(layer, k, v)?;
        self.attend_cached(p, layer, q, &cached, slot_angles, mask, cache)
    }

    /// A host decode step over a layer whose heads keep slot counts of their own (per-head
    /// budgets): the key and value appended to each head's buffers and each head attended over
    /// its own slots — not over the heads padded side by side, which costs a copy of the layer
    /// every step. `None`, with nothing appended, where that does not apply (a GPU, several
    /// tokens, a mask, an observing cache, uniform heads).
    fn attend_per_head<C: KvCache<B> + ?Sized>(
        &self,
        p: &BackendProfile,
        layer: usize,
        q: &Tensor<B, 4>,
        (k, v): (&Tensor<B, 4>, &Tensor<B, 4>),
        masked: bool,
        cache: &mut C,
    ) -> Result<Option<Tensor<B, 4>>> {
        let [b, hq, s, d] = q.dims();
        if s != 1 || masked || !p.host_resident() || cache.head_slots(layer).is_none() || cache.wants_attention(layer) {
            return Ok(None);
        }
        let Some(heads) = cache.append_per_head(layer, k.clone(), v.clone())? else {
            return Ok(None);
        };
        let hkv = self.n_kv_heads;
        let g = hq / hkv;
        let kv_dtype = k.dtype();
        let rows = q.clone().reshape([b * hkv, 1, g, d]).cast(kv_dtype);
        let qs: Vec<Tensor<B, 4>> = (0..b * hkv).map(|i| rows.clone().slice_dim(0, i..i + 1)).collect();
        let kv: Vec<_> = heads.iter().map(|h| (&h.keys, &h.values, h.len)).collect();
        let out = match ops::decode_attention_batch(p, qs, &kv) {
            Ok(out) => out,
            // Not f32: burn's products head by head (cheap on the host, no launches).
            Err(qs) => {
                let outs = qs
                    .into_iter()
                    .zip(&heads)
                    .map(|(qh, h)| {
                        let scores = ops::attention_scores(p, qh, &h.keys, h.len, true);
                        let probs = ops::softmax_last(p, scores).cast(kv_dtype);
                        ops::attention_values(p, probs, &h.values, h.len, true)
                    })
                    .collect();
                Tensor::cat(outs, 0)
            }
        };
        Ok(Some(out.cast(q.dtype()).reshape([b, hq, s, d])))
    }

    /// A decode step's attention for every sequence of a batch in host memory: each sequence's
    /// key and value appended to its cache, then all of those that nobody observes or masks
    /// attended in one call split over the threads ([`ops::decode_attention_batch`]),
    /// the others one at a time. `None`, with nothing appended, where the tensors are not f32
    /// in host memory or a cache rotates keys by slot (the caller attends one at a time).
    ///
    /// # Shapes
    /// - `q`: `[1, sequences, n_heads, head_dim]`; `k`, `v`: `[1, sequences, n_kv_heads,
    ///   head_dim]` (positions first); `caches[i]` the cache of sequence `i`
    /// - returns `[sequences, n_heads, 1, head_dim]`
    pub(super) fn attend_batch_on_host(
        &self,
        p: &BackendProfile,
        layer: usize,
        (q, k, v): (&Tensor<B, 4>, &Tensor<B, 4>, &Tensor<B, 4>),
        masks: &[Option<Tensor<B, 4>>],
        caches: &mut [&mut dyn KvCache<B>],
    ) -> Result<Option<Tensor<B, 4>>> {
        let kv_dtype = self.qkv.weight.val().dtype();
        let n = caches.len();
        if !p.host_resident()
            || kv_dtype != DType::F32
            || q.dtype() != DType::F32
            || masks.len() != n
            || caches.iter().any(|c| c.compact_positions())
        {
            return Ok(None);
        }
        let (hq, hkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let row = sequence_row::<B>;
        // Caches whose heads keep slot counts of their own attend head by head (`attend`).
        let per_head: Vec<bool> = caches.iter().map(|c| c.head_slots(layer).is_some()).collect();
        let mut cached = Vec::with_capacity(n);
        for (i, cache) in caches.iter_mut().enumerate() {
            cached.push(match per_head[i] {
                true => None,
                false => Some(cache.append_in_place(layer, row(k, i), row(v, i))?),
            });
        }
        // Whether a cache observes the step is known once its slot is in (an eviction may
        // follow it).
        let alone: Vec<bool> = (0..n)
            .map(|i| {
                per_head[i]
                    || masks[i].is_some()
                    || caches[i].wants_attention(layer)
                    || caches[i].slot_bias(layer).is_some()
            })
            .collect();
        let together: Vec<usize> = (0..n).filter(|&i| !alone[i]).collect();
        let qs = together
            .iter()
            .map(|&i| row(q, i).reshape([1, hkv, hq / hkv, d]))
            .collect();
        let kv: Vec<_> = together
            .iter()
            .filter_map(|&i| cached[i].as_ref().map(|c| (&c.keys, &c.values, c.len)))
            .collect();
        let batched = match together.is_empty() {
            true => None,
            false => ops::decode_attention_batch(p, qs, &kv).ok(),
        };
        if let (Some(out), true) = (&batched, together.len() == n) {
            return Ok(Some(out.clone().reshape([n, hq, 1, d])));
        }
        let mut outs = Vec::with_capacity(n);
        let mut next = 0;
        for (i, cache) in caches.iter_mut().enumerate() {
            let out = match (&batched, alone[i], &cached[i]) {
                (Some(all), false, _) => {
                    next += 1;
                    all.clone().slice_dim(0, next - 1..next).reshape([1, hq, 1, d])
                }
                (_, _, Some(c)) => self.attend_cached(p, layer, row(q, i), c, None, masks[i].as_ref(), &mut **cache)?,
                (_, _, None) => {
                    let (qi, ki, vi) = (row(q, i), row(k, i), row(v, i));
                    self.attend(p, layer, qi, ki, vi, None, masks[i].as_ref(), &mut **cache)?
                }
            };
            outs.push(out);
        }
        Ok(Some(Tensor::cat(outs, 0)))
    }

    /// [`attend`](Self::attend) once the chunk's keys and values are in the cache (`cached`).
    #[allow(clippy::too_many_arguments)]
    fn attend_cached<C: KvCache<B> + ?Sized>(
        &self,
        p: &BackendProfile,
        layer: usize,
        q: Tensor<B, 4>,
        cached: &CachedKv<B>,
        slot_angles: Option<&RopeAngles<B>>,
        mask: Option<&Tensor<B, 4>>,
        cache: &mut C,
    ) -> Result<Tensor<B, 4>> {
        let [b, _, s, d] = q.dims();
        let activation = q.dtype();
        let (hq, hkv) = (self.n_heads, self.n_kv_heads);
        let g = hq / hkv;
        // The products run in the cache's precision where the backend is fast at it (and for
        // single decode steps everywhere: widening the whole cache every step cost flex more
        // than the f16 products, 20 → 15 tok/s); the softmax and what the cache observes stay
        // in f32.
        let kv_dtype = self.qkv.weight.val().dtype();
        let product = if p.half_products || s == 1 {
            kv_dtype
        } else {
            DType::F32
        };
        let n = cached.len;
        // Kernels read the cache's buffers in place; burn's products need the slots in use
        // cut out (StreamingLLM: keys are stored unrotated and rotated by their slot index).
        let in_place = slot_angles.is_none() && product == kv_dtype;
        // Slots the cache evicted but has not compacted away yet.
        let bias = cache.slot_bias(layer);
        let wants = cache.wants_attention(layer);
        // Query heads h·g..h·g+g share KV head h: fold them into the row axis instead of
        // repeating K and V.
        let q = q.reshape([b, hkv, g * s, d]).cast(product);
        // Nothing to mask and nobody observing: one pass that never writes the scores out.
        let q = match in_place && mask.is_none() && !wants && bias.is_none() {
            true => match ops::decode_attention(p, q, &cached.keys, &cached.values, n) {
                Ok(out) => return Ok(out.cast(activation).reshape([b, hq, s, d])),
                Err(q) => q,
            },
            false => q,
        };
        // The scale 1/√d is already in the queries.
        let scores = match in_place {
            true => ops::attention_scores(p, q, &cached.keys, n, true),
            false => {
                let keys = cached.used().0;
                let keys = match slot_angles {
                    Some(a) => Rope::apply(keys.cast(DType::F32), a).cast(product),
                    None => keys.cast(product),
                };
                ops::attention_scores(p, q, &keys, n, false)
            }
        };
        let (probs, product_probs) = ops::attention_softmax(p, scores, mask, bias.as_ref(), product, wants);
        if let Some(probs) = probs {
            let grouped = match g {
                1 => probs,
                _ => probs.reshape([b, hkv, g, s, n]).mean_dim(2).reshape([b, hkv, s, n]),
            };
            cache.observe(layer, grouped)?;
        }
        let out = match in_place {
            true => ops::attention_values(p, product_probs, &cached.values, n, true),
            false => ops::attention_values(p, product_probs, &cached.used().1.cast(product), n, false),
        };
        Ok(out.cast(activation).reshape([b, hq, s, d]))
    }

    /// `[batch, n_heads, s, head_dim]` → the heads side by side, `[batch, s, n_heads·head_dim]`
    /// (the output projection's input). A whole one-position output (a decode step) is that
    /// already; `view`: `out` is a cut of a larger tensor (the last position of a prefill
    /// chunk), which is copied instead — reshaping such a strided view directly gave wrong
    /// products on cubecl backends.
    pub(super) fn merge_heads(out: Tensor<B, 4>, view: bool) -> Tensor<B, 3> {
        let [b, h, s, d] = out.dims();
        match s == 1 && !view {
            true => out.reshape([b, s, h * d]),
            false => out.swap_dims(1, 2).reshape([b, s, h * d]),
        }
    }

    /// Attention of `norm(x)` before the output projection (see [`merge`](Self::merge)).
    ///
    /// # Shapes
    /// - `x`: `[batch, s, hidden]`; `mask`: `[batch, kv_heads, group·s, slots]` additive (0 or −∞),
    ///   `None` when it hides nothing; `scaled`: `x·γ` of `norm` (`x`'s shape) where the product
    ///   that wrote `x` wrote it too
    /// - returns `[batch, n_heads, s, head_dim]`
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward<C: KvCache<B> + ?Sized>(
        &self,
        p: &BackendProfile,
        layer: usize,
        x: Tensor<B, 3>,
        scaled: Option<Tensor<B, 3>>,
        norm: &RmsNorm<B>,
        angles: &ChunkAngles<B>,
        mask: Option<&Tensor<B, 4>>,
        cache: &mut C,
    ) -> Result<Tensor<B, 4>> {
        let qkv = self.qkv.forward_normed(p, x, scaled, norm);
        self.attend_projected(p, layer, qkv, angles, mask, cache)
    }

    /// [`forward`](Self::forward) from the stacked projection `qkv` (`[batch, s, (hq + 2·hkv)·d]`)
    /// on: a batched decode step projects every sequence's row at once, then attends each over
    /// its own cache.
    pub(super) fn attend_projected<C: KvCache<B> + ?Sized>(
        &self,
        p: &BackendProfile,
        layer: usize,
        qkv: Tensor<B, 3>,
        angles: &ChunkAngles<B>,
        mask: Option<&Tensor<B, 4>>,
        cache: &mut C,
    ) -> Result<Tensor<B, 4>> {
        // A policy scoring by expected attention gathers the queries before RoPE.
        if cache.wants_queries(layer) {
            let s = qkv.dims()[1];
            cache.observe_queries(layer, self.prerope_queries(p, &qkv).chunk(0, s))?;
        }
        // Where a kernel can, keys and values go straight into the cache's buffers.
        let qkv = match self.project_into_cache(p, layer, qkv, angles, cache)? {
            Ok((q, cached)) => return self.attend_cached(p, layer, q, &cached, None, mask, cache),
            Err(qkv) => qkv,
        };
        let (q, k, v) = self.project(p, qkv, angles);
        self.attend(p, layer, q, k, v, angles.slots.as_ref(), mask, cache)
    }

    /// A decode step of `n` sequences whose caches of `layer` lie in one memory pool (`pool`,
    /// `rows`): one launch writes every sequence's key and value into its slots of the pool
    /// and one attends each over its own slots — instead of launches per sequence — writing
    /// what it paid each slot into `step`'s observation where a cache wants it. `qkv` back
    /// where the split kernel does not run (nothing was written then).
    ///
    /// # Shapes
    /// - `qkv`: `[n, 1, (hq + 2·hkv)·d]`; `angles`: one row per sequence
    /// - returns `[n, n_heads, 1, head_dim]`
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend_pool(
        &self,
        p: &BackendProfile,
        layer: usize,
        qkv: Tensor<B, 3>,
        angles: &ChunkAngles<B>,
        pool: (&Tensor<B, 4>, &Tensor<B, 4>),
        rows: &PoolRows<'_, B>,
        step: &PooledStep<B>,
        caches: &mut [&mut dyn KvCache<B>],
    ) -> Result<std::result::Result<Tensor<B, 4>, Tensor<B, 3>>> {
        let (hq, hkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads = HeadShape {
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
        };
        let (q_rows, k_rows) = (&angles.queries.rows, &angles.keys.rows);
        let q = match ops::split_rope_pool(
            p,
            qkv,
            heads,
            (&q_rows.0, &q_rows.1),
            (&k_rows.0, &k_rows.1),
            pool,
            rows,
        ) {
            Ok(q) => q,
            Err(qkv) => return Ok(Err(qkv)),
        };
        let mut cached = Vec::with_capacity(caches.len());
        for cache in caches.iter_mut() {
            cached.push(cache.commit_slots(layer, 1)?);
        }
        let n = q.dims()[0];
        let q = q.reshape([n, hkv, hq / hkv, d]);
        // Slots evicted but not compacted away are masked one sequence at a time; the
        // attention a cache observes is written by the launch.
        let masked = caches.iter().any(|c| c.slot_bias(layer).is_some());
        let observe = match caches.iter().any(|c| c.wants_attention(layer)) {
            true => step.observation(layer),
            false => None,
        };
        let pooled = match masked {
            true => Err(q),
            false => ops::decode_attention_pool(p, q, pool.0, pool.1, rows, observe),
        };
        match pooled {
            Ok(out) => {
                if observe.is_some() {
                    step.observed(layer);
                }
                Ok(Ok(out.reshape([n, hq, 1, d])))
            }
            // Each sequence on its own over the slots just committed.
            Err(q) => {
                let mut outs = Vec::with_capacity(n);
                for (i, (cache, cached)) in caches.iter_mut().zip(&cached).enumerate() {
                    let qi = q.clone().slice_dim(0, i..i + 1).reshape([1, hq, 1, d]);
                    outs.push(self.attend_cached(p, layer, qi, cached, None, None, &mut **cache)?);
                }
                Ok(Ok(Tensor::cat(outs, 0)))
            }
        }
    }

    /// Rotated queries of the stacked projection `qkv`, its keys and values written into
    /// `layer`'s cache buffers by one kernel, and the cache after the append; `qkv` back where
    /// there is no such kernel (or the cache offers no room, or keys are rotated after caching).
    #[allow(clippy::type_complexity)]
    fn project_into_cache<C: KvCache<B> + ?Sized>(
        &self,
        p: &BackendProfile,
        layer: usize,
        qkv: Tensor<B, 3>,
        angles: &ChunkAngles<B>,
        cache: &mut C,
    ) -> Result<std::result::Result<(Tensor<B, 4>, CachedKv<B>), Tensor<B, 3>>> {
        let [b, s, _] = qkv.dims();
        if angles.slots.is_some() || !p.runs(crate::backend::Kernel::SplitRope) {
            return Ok(Err(qkv));
        }
        let (hkv, d) = (self.n_kv_heads, self.head_dim);
        // The cache keeps the weights' precision (the kernel declines if the projection's differs).
        let kv_dtype = self.qkv.weight.val().dtype();
        let Some(room) = cache.reserve_slots(layer, [b, hkv, s, d], kv_dtype, &qkv.device())? else {
            return Ok(Err(qkv));
        };
        let heads = HeadShape {
            q_heads: self.n_heads,
            kv_heads: hkv,
            head_dim: d,
        };
        let (q_rows, k_rows) = (&angles.queries.rows, &angles.keys.rows);
        let buffers = (&room.keys, &room.values);
        let at = room.len;
        match ops::split_rope_into(
            p,
            qkv,
            heads,
            (&q_rows.0, &q_rows.1),
            (&k_rows.0, &k_rows.1),
            buffers,
            at,
        ) {
            Ok(q) => Ok(Ok((q, cache.commit_slots(layer, s)?))),
            Err(qkv) => Ok(Err(qkv)),
        }
    }
}

/// Sequence `i` of a batched step's projections laid out positions first (`[1, sequences,
/// heads, head_dim]`), heads first as attention takes it: `[1, heads, 1, head_dim]`.
pub(super) fn sequence_row<B: Backend>(t: &Tensor<B, 4>, i: usize) -> Tensor<B, 4> {
    t.clone().slice_dim(1, i..i + 1).swap_dims(1, 2)
}
