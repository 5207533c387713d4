//! Llama-family decoder (Llama, SmolLM, Qwen2, Mistral), generic over the burn backend.
//!
//! Attention is computed explicitly — softmax(QKᵀ/√d + mask) — so the probabilities can be
//! handed to the [`KvCache`], which is what eviction policies score. The files: `rope` (rotary
//! positions), `attention`, `block` (a decoder layer: attention, then the SwiGLU feed-forward
//! block), `weights` (building the modules from a weight source) and this one (the model and
//! its forward passes). Every operation goes through [`crate::ops`].

mod attention;
mod batch;
mod block;
mod pooled;
pub(crate) mod rope;
mod weights;

pub use attention::Attention;
pub use batch::BatchPart;
pub use block::{DecoderLayer, FeedForward};
pub use rope::{Rope, RopeAngles, RopeLayoutAxes};
pub(crate) use weights::{deinterleave_rows, ParamSource};

use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use easykv_core::KvCache;

use crate::backend::BackendProfile;
use crate::error::{Error, Result};
use crate::host_kernels::{join_positions_first, HeadsFirstChunks};
use crate::linear::EmbeddingTable;
use crate::ops;

/// Which positions need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position (scoring).
    All,
}

/// Which positions' hidden states leave the last layer. Every position's keys and values
/// (and, for evicting caches, attention) are needed in every layer, but after the last
/// layer's attention only the positions someone reads need the output projection and the
/// feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needed {
    All,
    /// The last position (generation: its logits).
    Last,
    /// None (prefill chunks before the last fill the cache only).
    Nothing,
}

impl From<Logits> for Needed {
    fn from(logits: Logits) -> Self {
        match logits {
            Logits::All => Needed::All,
            Logits::Last => Needed::Last,
        }
    }
}
/// A decoder-only transformer of the Llama family.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    pub embed: EmbeddingTable<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// The output projection; `None` when tied to the embedding.
    pub lm_head: Option<EmbeddingTable<B>>,
    pub rope: Rope<B>,
    /// What the backend offers: the ops layer picks each operation's path from it.
    #[module(skip)]
    pub profile: BackendProfile,
}

impl<B: Backend> Llama<B> {
    /// The precision of the residual stream: the weights' on backends that multiply half
    /// precision natively (GPUs; as Hugging Face runs f16 models), f32 elsewhere. Keeping it
    /// in half precision there drops the casts around every matrix product.
    pub fn activation_dtype(&self) -> DType {
        match self.profile.half_products {
            true => self.embed.weight.val().dtype(),
            false => DType::F32,
        }
    }

    /// An empty full cache for this model, with the device kernels its backend offers.
    pub fn full_cache(&self) -> easykv_core::FullCache<B> {
        easykv_core::FullCache::new(self.layers.len(), self.profile.cache_kernels())
    }

    /// Replaces the backend profile (to narrow the kernels or change their launch shapes for
    /// a comparison on one build).
    pub fn set_profile(&mut self, profile: BackendProfile) {
        self.profile = profile;
    }

    /// Runs one chunk of tokens through the model, appending it to `cache`.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, s]`
    /// - returns `[batch, s, vocab]` for [`Logits::All`], `[batch, 1, vocab]` for [`Logits::Last`]
    pub fn forward<C: KvCache<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut C,
        logits: Logits,
    ) -> Result<Tensor<B, 3>> {
        let x = self.run_layers(tokens, cache, logits.into())?;
        self.project_logits(x, logits)
    }

    /// Runs one chunk through every layer (appending it to `cache`) without the output
    /// projection: prefill chunks whose logits nobody reads skip the vocabulary-sized matmul.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, s]` → hidden states `[batch, s, hidden]` before the final norm
    pub fn forward_hidden<C: KvCache<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut C,
    ) -> Result<Tensor<B, 3>> {
        self.run_layers(tokens, cache, Needed::All)
    }

    /// [`forward_hidden`](Self::forward_hidden) returning the last layer's output for the
    /// positions `needed` says (for [`Needed::Nothing`], whatever is at hand: nobody reads it).
    fn run_layers<C: KvCache<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut C,
        needed: Needed,
    ) -> Result<Tensor<B, 3>> {
        let [b, s] = tokens.dims();
        let start = self.first_position(cache, s)?;
        let p = &self.profile;
        let device = tokens.device();
        let mut x = self.embed.embed(tokens).cast(self.activation_dtype());
        // Angles once per chunk, shared by every layer.
        let slots = cache.compact_positions().then(|| cache.slots(0) + s);
        let angles = self.chunk_angles(b, start, s, slots);
        // Every layer holds the same number of slots before this chunk, so one mask serves all.
        let mask = self.attention_mask(b, s, cache.slots(0) + s, &device);
        let last = self.layers.len().saturating_sub(1);
        let trace = ChunkTrace::<B>::start(&device);
        // A decode step's residual stream times the next norm's γ, where the product that
        // wrote the stream wrote that too (the next product then normalizes without a wait).
        let mut scaled = None;
        for (l, layer) in self.layers.iter().enumerate() {
            let attn = layer.attn.forward(
                p,
                l,
                x.clone(),
                scaled.take(),
                &layer.attn_norm,
                &angles,
                mask.as_ref(),
                cache,
            )?;
            let next = self.layers.get(l + 1).map(|n| &n.attn_norm);
            (x, scaled) = layer.finish(p, x, attn, if l == last { needed } else { Needed::All }, next);
        }
        let layers_done = trace.as_ref().map(|t| t.lap());
        cache.end_chunk()?;
        if let (Some(t), Some(layers_ms)) = (trace, layers_done) {
            let cache_ms = t.lap();
            tracing::debug!(target: "easykv::chunks", tokens = s, slots = cache.slots(0), layers_ms, cache_ms, "chunk");
        }
        Ok(x)
    }

    /// The position of the first of `len` new tokens, if all of them fit in the context.
    fn first_position<C: KvCache<B> + ?Sized>(&self, cache: &C, len: usize) -> Result<usize> {
        let start = cache.next_position();
        let windowed = self.layers.first().is_some_and(|l| l.attn.window > 0);
        if windowed && (cache.evicted() > 0 || cache.compact_positions()) {
            return Err(Error::Unsupported(
                "a sliding-window model needs the full cache (slots must be positions)".into(),
            ));
        }
        if start + len > self.rope.max_positions() {
            return Err(Error::InvalidInput(format!(
                "position {} is past the model's context of {} tokens",
                start + len,
                self.rope.max_positions()
            )));
        }
        Ok(start)
    }

    /// The additive mask of `s` new queries over `slots` slots in the shape attention takes it
    /// ([`ops::chunk_mask`]): causal, plus the sliding window of windowed models; `None` when it
    /// hides nothing.
    fn attention_mask(&self, b: usize, s: usize, slots: usize, device: &B::Device) -> Option<Tensor<B, 4>> {
        let rows = self.layers.first().map_or(1, |l| l.attn.n_heads);
        let heads = self.layers.first().map_or(1, |l| l.attn.n_kv_heads);
        let window = self.layers.first().map_or(0, |l| l.attn.window);
        // One query hides nothing unless the window has slid past the first slots.
        if s == 1 && (window == 0 || slots <= window) {
            return None;
        }
        let mask = causal_mask::<B>(s, slots, window, device);
        Some(ops::chunk_mask(&self.profile, mask, b, (rows, heads)))
    }

    /// Runs consecutive chunks of tokens through the model, evicting between chunks exactly as
    /// one [`forward_hidden`](Self::forward_hidden) per chunk would, but **layer by layer**:
    /// each layer projects all the chunks' tokens at once (a few large matrix products instead
    /// of many thin ones), then attends and lets the cache evict chunk by chunk. A layer's cache
    /// depends only on its own attention, so the result is the same.
    ///
    /// StreamingLLM caches (positions that depend on the slot count) run chunk by chunk, and so
    /// does everything on GPU backends, where the per-layer evictions would cost more than
    /// the thin products save.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, Σ chunks]` → hidden states `[batch, Σ chunks, hidden]` before the
    ///   final norm
    pub fn forward_hidden_chunks<C: KvCache<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        chunks: &[usize],
        cache: &mut C,
    ) -> Result<Tensor<B, 3>> {
        self.run_layers_chunked(tokens, chunks, cache, Needed::All)
    }

    /// Runs consecutive chunks through the model only to fill `cache` (as
    /// [`forward_hidden_chunks`](Self::forward_hidden_chunks), without the last layer's output
    /// projection and feed-forward block, whose results nobody would read).
    pub fn fill_cache_chunks<C: KvCache<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        chunks: &[usize],
        cache: &mut C,
    ) -> Result<()> {
        self.run_layers_chunked(tokens, chunks, cache, Needed::Nothing)
            .map(|_| ())
    }

    /// [`forward_hidden_chunks`](Self::forward_hidden_chunks) returning the last layer's output
    /// for the positions `needed` says.
    fn run_layers_chunked<C: KvCache<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        chunks: &[usize],
        cache: &mut C,
        needed: Needed,
    ) -> Result<Tensor<B, 3>> {
        let [b, total] = tokens.dims();
        let p = &self.profile;
        if chunks.iter().sum::<usize>() != total || chunks.contains(&0) {
            return Err(Error::InvalidInput(format!(
                "chunks {chunks:?} do not split {total} tokens"
            )));
        }
        // On GPUs chunk by chunk: one eviction per chunk for all layers at once (a few dozen
        // kernels) instead of one per layer and chunk, and thin products cost little there.
        let chunk_major = !p.host_resident();
        if chunks.len() <= 1 || cache.compact_positions() || chunk_major {
            let mut outs = Vec::with_capacity(chunks.len());
            let mut start = 0;
            for (i, &s) in chunks.iter().enumerate() {
                // Only the last chunk holds the last position.
                let here = match needed {
                    Needed::Last if i + 1 < chunks.len() => Needed::Nothing,
                    other => other,
                };
                let out = self.run_layers(tokens.clone().slice([0..b, start..start + s]), cache, here)?;
                // Unread outputs are dropped, unless nothing is read at all (something must be
                // returned).
                if here != Needed::Nothing || needed == Needed::Nothing {
                    outs.push(out);
                }
                start += s;
            }
            return Ok(Tensor::cat(outs, 1));
        }
        let start = self.first_position(cache, total)?;
        let device = tokens.device();
        let angles = self.chunk_angles(b, start, total, None);
        let mut x = self.embed.embed(tokens).cast(self.activation_dtype());
        // The mask of the last (chunk length, slot count) seen.
        let (mut mask_for, mut mask) = (None, None);
        let last = self.layers.len().saturating_sub(1);
        for (l, layer) in self.layers.iter().enumerate() {
            // Queries before RoPE for a cache scoring by expected attention.
            let ((q, k, v), prerope) = layer.attn.project_positions_first(
                p,
                ops::rms_norm(p, &layer.attn_norm, x.clone()),
                &angles,
                cache.wants_queries(l),
            );
            let (q, k, v) = (
                HeadsFirstChunks::new(q),
                HeadsFirstChunks::new(k),
                HeadsFirstChunks::new(v),
            );
            let mut outs = Vec::with_capacity(chunks.len());
            let mut off = 0;
            for &s in chunks {
                let part = |t: &HeadsFirstChunks<B>| t.chunk(off, s);
                let slots = cache.slots(l) + s;
                // Chunks of one stride meet the same slot count again and again: reuse the mask.
                if mask_for != Some((s, slots)) {
                    mask = self.attention_mask(b, s, slots, &device);
                    mask_for = Some((s, slots));
                }
                let m = mask.as_ref();
                if let Some(queries) = &prerope {
                    cache.observe_queries(l, queries.chunk(off, s))?;
                }
                outs.push(layer.attn.attend(p, l, part(&q), part(&k), part(&v), None, m, cache)?);
                cache.end_layer_chunk(l)?;
                off += s;
            }
            x = match (l == last, needed) {
                (true, Needed::Nothing) => x,
                // The last chunk holds the last position.
                (true, Needed::Last) => match outs.pop() {
                    Some(out) => layer.finish(p, x, out, Needed::Last, None).0,
                    None => x,
                },
                _ => layer.finish_merged(p, x, join_positions_first(outs)),
            };
        }
        Ok(x)
    }

    /// [`forward_hidden_chunks`](Self::forward_hidden_chunks) followed by the output projection.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, Σ chunks]`
    /// - returns `[batch, Σ chunks, vocab]` for [`Logits::All`], `[batch, 1, vocab]` for
    ///   [`Logits::Last`]
    pub fn forward_chunks<C: KvCache<B> + ?Sized>(
        &self,
        tokens: Tensor<B, 2, Int>,
        chunks: &[usize],
        cache: &mut C,
        logits: Logits,
    ) -> Result<Tensor<B, 3>> {
        let x = self.run_layers_chunked(tokens, chunks, cache, logits.into())?;
        self.project_logits(x, logits)
    }

    fn project_logits(&self, x: Tensor<B, 3>, logits: Logits) -> Result<Tensor<B, 3>> {
        let [b, s, _] = x.dims();
        let x = match logits {
            Logits::All => x,
            Logits::Last => x.slice([0..b, s - 1..s]),
        };
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        Ok(head.logits(&self.profile, ops::rms_norm(&self.profile, &self.norm, x)))
    }
}

#[cfg(test)]
mod tests;

/// Additive causal mask for `s` new queries over `n` slots whose last `s` are the new tokens;
/// with a sliding `window` (> 0) it also hides slots `window` or more positions behind each
/// query (slot j holds position j).
fn causal_mask<B: Backend>(s: usize, n: usize, window: usize, device: &B::Device) -> Tensor<B, 2> {
    let mut m = vec![0f32; s * n];
    for t in 0..s {
        let query = n - s + t;
        let first_visible = if window == 0 {
            0
        } else {
            (query + 1).saturating_sub(window)
        };
        let (behind, rest) = m[t * n..(t + 1) * n].split_at_mut(first_visible);
        let future = &mut rest[query + 1 - first_visible..];
        for v in behind.iter_mut().chain(future) {
            *v = f32::NEG_INFINITY;
        }
    }
    Tensor::from_data(TensorData::new(m, [s, n]), device)
}

/// Where a chunk's time goes, for `RUST_LOG=easykv::chunks=debug`: the device synchronized
/// around the layers and around the cache step (slower; off unless that target logs).
struct ChunkTrace<'a, B: Backend> {
    device: &'a B::Device,
    since: std::cell::Cell<std::time::Instant>,
}

impl<'a, B: Backend> ChunkTrace<'a, B> {
    fn start(device: &'a B::Device) -> Option<Self> {
        if !tracing::enabled!(target: "easykv::chunks", tracing::Level::DEBUG) {
            return None;
        }
        let _ = B::sync(device);
        Some(ChunkTrace {
            device,
            since: std::cell::Cell::new(std::time::Instant::now()),
        })
    }

    /// Milliseconds since the last lap, once the device has caught up.
    fn lap(&self) -> f64 {
        let _ = B::sync(self.device);
        let now = std::time::Instant::now();
        now.duration_since(self.since.replace(now)).as_secs_f64() * 1e3
    }
}
