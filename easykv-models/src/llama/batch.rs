//! Batched passes: several sequences, each with its own cache (its own policy, budget, slot
//! count and position), through the model at once. Every product runs once over all the
//! sequences' rows — the weights are read once per pass for all of them — and attention runs
//! per sequence over its own cache, except one-token rows whose caches lie in one memory pool,
//! which one launch per layer attends together. A pass may mix decode steps (one token) with
//! prompt chunks, so a prompt's prefill rides along the decode steps of running sequences.

use std::cell::OnceCell;

use burn::prelude::*;
use burn::tensor::TensorData;
use easykv_core::KvCache;

use super::attention::{sequence_row, Attention};
use super::pooled::PooledStep;
use super::rope::ChunkAngles;
use super::{DecoderLayer, Llama, Needed};
use crate::backend::Kernel;
use crate::error::{Error, Result};
use crate::ops;

/// One sequence's part of a batched pass.
#[derive(Debug, Clone, Copy)]
pub struct BatchPart<'a> {
    /// Its next tokens: a decode step's one, or a chunk of its prompt as
    /// [`KvCache::prefill_chunks`] cuts it (the cache ends a chunk after the pass, as after a
    /// pass of that chunk alone).
    pub tokens: &'a [u32],
    /// Whether its last position's logits are wanted.
    pub logits: bool,
}

/// The one-token rows of a pass: each sequence's position, rotation and mask, and the plan
/// that attends caches of one pool together.
struct SingleRows<B: Backend> {
    positions: Vec<usize>,
    rotated_slots: Vec<Option<usize>>,
    masks: Vec<Option<Tensor<B, 4>>>,
    /// A sequence's own rotation, made only where a layer attends it alone.
    angles: Vec<OnceCell<ChunkAngles<B>>>,
    /// Queries and keys of all the rows split and rotated at once (each at its own position),
    /// where no kernel writes keys and values into each cache.
    shared: Option<ChunkAngles<B>>,
    pooled: Option<(PooledStep<B>, ChunkAngles<B>)>,
}

impl<B: Backend> SingleRows<B> {
    fn plan(model: &Llama<B>, caches: &[&mut dyn KvCache<B>]) -> Result<Self> {
        let p = &model.profile;
        let device = model.embed.weight.device();
        let n = caches.len();
        let (mut positions, mut rotated_slots, mut masks) = (Vec::new(), Vec::new(), Vec::new());
        for cache in caches {
            positions.push(model.first_position(&**cache, 1)?);
            rotated_slots.push(cache.compact_positions().then(|| cache.slots(0) + 1));
            // A sliding window may hide a sequence's first slots.
            masks.push(model.attention_mask(1, 1, cache.slots(0) + 1, &device));
        }
        let shared = (!p.runs(Kernel::SplitRope) && caches.iter().all(|c| !c.compact_positions()))
            .then(|| model.decode_angles(&positions));
        let pooled = match n > 0 && masks.iter().all(Option::is_none) && caches.iter().all(|c| !c.compact_positions()) {
            true => PooledStep::plan(caches, model.layers.len(), &device),
            false => None,
        };
        let pooled = pooled.map(|step| {
            let members: Vec<usize> = step.members().iter().map(|&i| positions[i]).collect();
            (step, model.decode_angles(&members))
        });
        Ok(Self {
            angles: (0..n).map(|_| OnceCell::new()).collect(),
            positions,
            rotated_slots,
            masks,
            shared,
            pooled,
        })
    }

    /// Layer `l`'s attention of the rows, their keys and values appended to their caches.
    ///
    /// # Shapes
    /// - `qkv`: `[n, 1, (hq + 2·hkv)·d]`, row `i` of `caches[i]`
    /// - returns `[n, n_heads, 1, head_dim]`
    fn attend(
        &self,
        model: &Llama<B>,
        l: usize,
        layer: &DecoderLayer<B>,
        mut qkv: Tensor<B, 3>,
        caches: &mut [&mut dyn KvCache<B>],
    ) -> Result<Tensor<B, 4>> {
        let p = &model.profile;
        if let Some((step, angles)) = &self.pooled {
            if let Some((pool, rows)) = step.layer(l) {
                let members = step.members();
                if members.len() == caches.len() {
                    match layer
                        .attn
                        .attend_pool(p, l, qkv, angles, (&pool.0, &pool.1), &rows, step, caches)?
                    {
                        Ok(out) => return Ok(out),
                        Err(back) => qkv = back,
                    }
                } else {
                    return self.attend_members_apart(model, l, layer, qkv, caches, (step, angles));
                }
            }
        }
        let n = caches.len();
        let mut outs = Vec::with_capacity(n);
        match &self.shared {
            Some(all) => {
                let width = qkv.dims()[2];
                let (q, k, v) = layer.attn.split_positions_first(qkv.reshape([1, n, width]), all);
                if let Some(out) = layer
                    .attn
                    .attend_batch_on_host(p, l, (&q, &k, &v), &self.masks, caches)?
                {
                    return Ok(out);
                }
                for (i, cache) in caches.iter_mut().enumerate() {
                    let (qi, ki, vi) = (sequence_row(&q, i), sequence_row(&k, i), sequence_row(&v, i));
                    outs.push(
                        layer
                            .attn
                            .attend(p, l, qi, ki, vi, None, self.masks[i].as_ref(), &mut **cache)?,
                    );
                }
            }
            None => {
                for (i, cache) in caches.iter_mut().enumerate() {
                    outs.push(self.attend_alone(model, l, layer, &qkv, i, &mut **cache)?);
                }
            }
        }
        Ok(Tensor::cat(outs, 0))
    }

    /// Layer `l`'s attention where only some caches lie in the pool: the members in one
    /// launch, each other cache on its own, the rows put back in the caches' order.
    ///
    /// # Shapes
    /// - `qkv`: `[n, 1, (hq + 2·hkv)·d]`, row `i` of `caches[i]`
    /// - returns `[n, n_heads, 1, head_dim]`
    fn attend_members_apart(
        &self,
        model: &Llama<B>,
        l: usize,
        layer: &DecoderLayer<B>,
        qkv: Tensor<B, 3>,
        caches: &mut [&mut dyn KvCache<B>],
        (step, angles): (&PooledStep<B>, &ChunkAngles<B>),
    ) -> Result<Tensor<B, 4>> {
        let p = &model.profile;
        let device = qkv.device();
        let n = caches.len();
        let members = step.members();
        let is_member = |i: usize| members.binary_search(&i).is_ok();
        let others: Vec<usize> = (0..n).filter(|&i| !is_member(i)).collect();
        let rows_of = |ids: &[usize]| {
            let rows: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
            Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [ids.len()]), &device)
        };
        let (mut pooled, mut apart) = (Vec::<&mut dyn KvCache<B>>::new(), Vec::<&mut dyn KvCache<B>>::new());
        for (i, cache) in caches.iter_mut().enumerate() {
            match is_member(i) {
                true => pooled.push(&mut **cache),
                false => apart.push(&mut **cache),
            }
        }
        let mut outs = Vec::with_capacity(1 + others.len());
        let own = qkv.clone().select(0, rows_of(members));
        let (pool, rows) = step
            .layer(l)
            .ok_or_else(|| Error::InvalidInput(format!("layer {l} has no pool")))?;
        match layer
            .attn
            .attend_pool(p, l, own, angles, (&pool.0, &pool.1), &rows, step, &mut pooled)?
        {
            Ok(out) => outs.push(out),
            // No pooled kernel: every member on its own as well.
            Err(_) => {
                for (&i, cache) in members.iter().zip(pooled.iter_mut()) {
                    outs.push(self.attend_alone(model, l, layer, &qkv, i, &mut **cache)?);
                }
            }
        }
        for (&i, cache) in others.iter().zip(apart.iter_mut()) {
            outs.push(self.attend_alone(model, l, layer, &qkv, i, &mut **cache)?);
        }
        // Rows now lie members first, then the others: back to the caches' order.
        let order: Vec<usize> = members.iter().chain(&others).copied().collect();
        let mut back = vec![0; n];
        for (at, &i) in order.iter().enumerate() {
            back[i] = at;
        }
        Ok(Tensor::cat(outs, 0).select(0, rows_of(&back)))
    }

    /// Row `i` of `qkv` attended over `cache` alone.
    fn attend_alone(
        &self,
        model: &Llama<B>,
        l: usize,
        layer: &DecoderLayer<B>,
        qkv: &Tensor<B, 3>,
        i: usize,
        cache: &mut dyn KvCache<B>,
    ) -> Result<Tensor<B, 4>> {
        let angles = self.angles[i].get_or_init(|| model.chunk_angles(1, self.positions[i], 1, self.rotated_slots[i]));
        let row = qkv.clone().slice_dim(0, i..i + 1);
        layer
            .attn
            .attend_projected(&model.profile, l, row, angles, self.masks[i].as_ref(), cache)
    }

    /// After the last layer: the attention the pooled launches observed, to each cache.
    fn hand_observations(&self, caches: &mut [&mut dyn KvCache<B>]) -> Result<()> {
        match &self.pooled {
            Some((step, _)) => step.hand_observations(caches),
            None => Ok(()),
        }
    }
}

/// A prompt chunk of a pass: its rotation and causal mask.
struct ChunkRows<B: Backend> {
    len: usize,
    angles: ChunkAngles<B>,
    mask: Option<Tensor<B, 4>>,
}

impl<B: Backend> Llama<B> {
    /// One decode step of several sequences, each with its own cache:
    /// [`forward_batch`](Self::forward_batch) of one token each, every one's logits wanted.
    ///
    /// # Shapes
    /// - `tokens`: one id per sequence, `caches[i]` the cache of sequence `i`
    /// - returns the logits `[sequences, vocab]` (f32)
    pub fn decode_batch(&self, tokens: &[u32], caches: &mut [&mut dyn KvCache<B>]) -> Result<Tensor<B, 2>> {
        let parts: Vec<BatchPart<'_>> = tokens
            .chunks(1)
            .map(|t| BatchPart {
                tokens: t,
                logits: true,
            })
            .collect();
        self.forward_batch(&parts, caches)?
            .ok_or_else(|| Error::InvalidInput("a batched step needs at least one token".into()))
    }

    /// One pass of several sequences, each with its own cache: every product runs once over
    /// all the parts' rows, attention runs per sequence over its own cache, and each cache ends
    /// its chunk (and may evict) as after a pass of its part alone.
    ///
    /// # Shapes
    /// - `parts[i]`: sequence `i`'s tokens, `caches[i]` its cache
    /// - returns the logits of the parts that want them, in order, `[wanted, vocab]` (f32);
    ///   `None` when none does
    pub fn forward_batch(
        &self,
        parts: &[BatchPart<'_>],
        caches: &mut [&mut dyn KvCache<B>],
    ) -> Result<Option<Tensor<B, 2>>> {
        let n = parts.len();
        if n == 0 || caches.len() != n || parts.iter().any(|part| part.tokens.is_empty()) {
            return Err(Error::InvalidInput(format!(
                "a batched pass needs one cache per part and tokens in each, got {n} parts and {} caches",
                caches.len()
            )));
        }
        let p = &self.profile;
        let device = self.embed.weight.device();
        // One-token rows first, in the parts' order, then the chunks.
        let single: Vec<bool> = parts.iter().map(|part| part.tokens.len() == 1).collect();
        let (mut singles, mut chunks) = (Vec::<&mut dyn KvCache<B>>::new(), Vec::<&mut dyn KvCache<B>>::new());
        for (cache, &one) in caches.iter_mut().zip(&single) {
            match one {
                true => singles.push(&mut **cache),
                false => chunks.push(&mut **cache),
            }
        }
        let rows = SingleRows::plan(self, &singles)?;
        let mut chunk_rows = Vec::with_capacity(chunks.len());
        for (part, cache) in parts.iter().filter(|part| part.tokens.len() > 1).zip(&chunks) {
            let s = part.tokens.len();
            let start = self.first_position(&**cache, s)?;
            let slots = cache.compact_positions().then(|| cache.slots(0) + s);
            chunk_rows.push(ChunkRows {
                len: s,
                angles: self.chunk_angles(1, start, s, slots),
                mask: self.attention_mask(1, s, cache.slots(0) + s, &device),
            });
        }
        let n_single = singles.len();
        let ids: Vec<i32> = parts
            .iter()
            .filter(|part| part.tokens.len() == 1)
            .chain(parts.iter().filter(|part| part.tokens.len() > 1))
            .flat_map(|part| part.tokens.iter().map(|&t| t as i32))
            .collect();
        let total = ids.len();
        // A decode step alone keeps a row per sequence (`[n, 1]`), as the decode kernels expect;
        // with chunks every row lies along the positions (`[1, total]`).
        let shape = match chunk_rows.is_empty() {
            true => [n, 1],
            false => [1, total],
        };
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, shape), &device);
        let mut x = self.embed.embed(ids).cast(self.activation_dtype());
        for (l, layer) in self.layers.iter().enumerate() {
            let qkv = layer.attn.qkv.forward_normed(p, x.clone(), None, &layer.attn_norm);
            if chunk_rows.is_empty() {
                let out = rows.attend(self, l, layer, qkv, &mut singles)?;
                x = layer.finish(p, x, out, Needed::All, None).0;
                continue;
            }
            let width = qkv.dims()[2];
            let mut merged = Vec::with_capacity(1 + chunk_rows.len());
            if n_single > 0 {
                let one = qkv.clone().slice_dim(1, 0..n_single).reshape([n_single, 1, width]);
                let out = rows.attend(self, l, layer, one, &mut singles)?;
                let hidden = out.dims()[1] * out.dims()[3];
                merged.push(Attention::merge_heads(out, false).reshape([1, n_single, hidden]));
            }
            let mut at = n_single;
            for (chunk, cache) in chunk_rows.iter().zip(chunks.iter_mut()) {
                let own = qkv.clone().slice_dim(1, at..at + chunk.len);
                let out = layer
                    .attn
                    .attend_projected(p, l, own, &chunk.angles, chunk.mask.as_ref(), &mut **cache)?;
                merged.push(Attention::merge_heads(out, false));
                at += chunk.len;
            }
            x = layer.finish_merged(p, x, Tensor::cat(merged, 1));
        }
        rows.hand_observations(&mut singles)?;
        for cache in singles.iter_mut().chain(chunks.iter_mut()) {
            cache.end_chunk()?;
        }
        // Where each wanted part's last position lies among the rows.
        let (mut next_single, mut next_chunk) = (0, n_single);
        let mut wanted = Vec::new();
        for part in parts {
            let last = match part.tokens.len() {
                1 => {
                    next_single += 1;
                    next_single - 1
                }
                s => {
                    next_chunk += s;
                    next_chunk - 1
                }
            };
            if part.logits {
                wanted.push(last as i32);
            }
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        if chunk_rows.is_empty() && wanted.len() == n {
            let logits = head.logits(p, ops::rms_norm(p, &self.norm, x));
            let vocab = logits.dims()[2];
            return Ok(Some(logits.reshape([n, vocab])));
        }
        if wanted.is_empty() {
            return Ok(None);
        }
        let m = wanted.len();
        let hidden = x.dims()[2];
        let x = x.reshape([1, total, hidden]);
        let picked = x.select(1, Tensor::<B, 1, Int>::from_data(TensorData::new(wanted, [m]), &device));
        let logits = head.logits(p, ops::rms_norm(p, &self.norm, picked));
        let vocab = logits.dims()[2];
        Ok(Some(logits.reshape([m, vocab])))
    }
}
