//! One prefill for many cells. With `--mode once` no cache evicts before the prompt's last
//! chunk has been attended, so every policy and budget sees the same keys, values and
//! attention until then, and the prompt's last logits (the first generated token) are the same:
//! the cells of one sample whose caches split the prompt into the same chunks run that prefill
//! once through a [`FanOut`] of their caches, then each cuts, and all decode together in
//! batched steps. A sample then costs one prefill instead of one per policy and budget, and its
//! decode steps read the weights once for all its cells, with the same results on the CPU
//! (tested against running each cell alone).

use burn::prelude::*;
use burn::tensor::TensorCreationOptions;
use easykv_core::{CachedKv, KvCache};

use super::matrix::{decode_config, sample_prompt, scored_cell, Cell, EvalSettings, Sample, CHUNK};
use crate::backend::BackendProfile;
use crate::engine::arena::SlotArena;
use crate::error::Result;
use crate::generate::{decode_together, prefill, reserve_for};
use crate::loader::LoadedModel;
use crate::sampling::Sampler;

/// Caches fed the same chunks: each appends and observes what the model hands over; the
/// model attends over the first one's keys and values (all hold the same until a cut).
pub struct FanOut<B: Backend> {
    caches: Vec<Box<dyn KvCache<B>>>,
}

impl<B: Backend> FanOut<B> {
    /// `None` unless there are caches and they split a prompt of `prompt_len` tokens alike
    /// (and none rotates keys by slot, whose positions would differ after a cut).
    pub fn new(caches: Vec<Box<dyn KvCache<B>>>, prompt_len: usize) -> Option<Self> {
        let first = caches.first()?.prefill_chunks(prompt_len, CHUNK);
        let alike = caches
            .iter()
            .all(|c| !c.compact_positions() && c.prefill_chunks(prompt_len, CHUNK) == first);
        alike.then_some(Self { caches })
    }

    /// The caches, in the order given.
    pub fn into_caches(self) -> Vec<Box<dyn KvCache<B>>> {
        self.caches
    }
}

impl<B: Backend> KvCache<B> for FanOut<B> {
    fn append(
        &mut self,
        layer: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> easykv_core::Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        Ok(self.append_in_place(layer, keys, values)?.used())
    }

    fn append_in_place(
        &mut self,
        layer: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> easykv_core::Result<CachedKv<B>> {
        // Host tensors: the chunk's keys and values arrive as strided views, which every
        // cache would copy element by element; made contiguous once, each cache copies bytes.
        let (keys, values) = match self.caches.len() > 1 && BackendProfile::detect::<B>(&keys.device()).host_resident()
        {
            true => (contiguous(keys), contiguous(values)),
            false => (keys, values),
        };
        let mut first = None;
        for cache in &mut self.caches {
            let cached = cache.append_in_place(layer, keys.clone(), values.clone())?;
            first.get_or_insert(cached);
        }
        first.ok_or(easykv_core::Error::LayerOutOfRange { layer, layers: 0 })
    }

    fn wants_attention(&self, layer: usize) -> bool {
        self.caches.iter().any(|c| c.wants_attention(layer))
    }

    fn wants_queries(&self, layer: usize) -> bool {
        self.caches.iter().any(|c| c.wants_queries(layer))
    }

    fn observe_queries(&mut self, layer: usize, queries: Tensor<B, 4>) -> easykv_core::Result<()> {
        for cache in self.caches.iter_mut().filter(|c| c.wants_queries(layer)) {
            cache.observe_queries(layer, queries.clone())?;
        }
        Ok(())
    }

    fn observe(&mut self, layer: usize, probs: Tensor<B, 4>) -> easykv_core::Result<()> {
        for cache in self.caches.iter_mut().filter(|c| c.wants_attention(layer)) {
            cache.observe(layer, probs.clone())?;
        }
        Ok(())
    }

    fn slot_bias(&self, layer: usize) -> Option<Tensor<B, 4>> {
        self.caches.first()?.slot_bias(layer)
    }

    fn end_chunk(&mut self) -> easykv_core::Result<()> {
        self.caches.iter_mut().try_for_each(|c| c.end_chunk())
    }

    fn end_layer_chunk(&mut self, layer: usize) -> easykv_core::Result<()> {
        self.caches.iter_mut().try_for_each(|c| c.end_layer_chunk(layer))
    }

    fn prefill_chunks(&self, prompt_len: usize, chunk_size: usize) -> Vec<usize> {
        match self.caches.first() {
            Some(c) => c.prefill_chunks(prompt_len, chunk_size),
            None => easykv_core::uniform_chunks(prompt_len, chunk_size),
        }
    }

    fn next_position(&self) -> usize {
        self.caches.first().map_or(0, |c| c.next_position())
    }

    fn reserve(&mut self, tokens: usize) {
        self.caches.iter_mut().for_each(|c| c.reserve(tokens));
    }

    fn tokens_seen(&self) -> usize {
        self.caches.first().map_or(0, |c| c.tokens_seen())
    }

    fn slots(&self, layer: usize) -> usize {
        self.caches.first().map_or(0, |c| c.slots(layer))
    }

    fn bytes(&self) -> u64 {
        self.caches.iter().map(|c| c.bytes()).sum()
    }

    fn clear(&mut self) {
        self.caches.iter_mut().for_each(|c| c.clear());
    }
}

/// On GPUs, the caches placed side by side in one arena sized to their peaks over `tokens`
/// tokens, so that each decode step attends them in one launch per layer rather than one per
/// cache and layer (the launches' host time bounded a sample's cells). Returns the arena (its
/// memory lives as long as the caches' views of it); a cache it cannot hold keeps its own
/// buffers. `None` on host backends.
fn place_in_arena<B: Backend>(
    loaded: &LoadedModel<B>,
    caches: &mut [Box<dyn KvCache<B>>],
    tokens: usize,
) -> Option<SlotArena<B>> {
    let tokens = tokens.min(loaded.model.context_length());
    let peaks: Vec<usize> = caches.iter().map(|c| c.peak_slots(tokens)).collect();
    let total = peaks.iter().try_fold(0usize, |a, &p| a.checked_add(p))?;
    let mut arena = SlotArena::for_model(loaded.model.as_ref(), &loaded.config, loaded.dtype, total)?;
    let profile = *loaded.model.profile();
    for (cache, &slots) in caches.iter_mut().zip(&peaks) {
        let Some(start) = arena.take(slots) else {
            continue;
        };
        if !arena.region(&profile, start, slots).is_some_and(|r| cache.place_in(r)) {
            arena.give_back(start, slots);
        }
    }
    Some(arena)
}

/// `t` with its elements in order in a buffer of its own (a host tensor's strided view copied).
fn contiguous<B: Backend>(t: Tensor<B, 4>) -> Tensor<B, 4> {
    let (device, dtype) = (t.device(), t.dtype());
    Tensor::from_data(t.into_data(), TensorCreationOptions::new(device).with_dtype(dtype))
}

/// Runs the cells `cells` (policy, budget) of one decoding `sample`, whose `caches` (one per
/// cell, same order) split the prompt alike ([`FanOut::new`]): one prefill through all of
/// them, then batched decode steps of all. `reference`: the sample's full-cache cell if it ran
/// before (a full cache among `cells` serves as the reference of the others). `None`, with
/// nothing run, where the caches do not split the prompt alike.
pub fn run_shared<B: Backend>(
    loaded: &LoadedModel<B>,
    settings: &EvalSettings,
    sample: &Sample,
    cells: &[(String, String)],
    mut caches: Vec<Box<dyn KvCache<B>>>,
    reference: Option<&Cell>,
) -> Result<Option<Vec<Cell>>> {
    let prompt = sample_prompt(sample);
    if matches!(sample, Sample::Perplexity { .. }) || caches.len() != cells.len() {
        return Ok(None);
    }
    let cfg = decode_config(loaded, settings, sample);
    let _arena = place_in_arena(loaded, &mut caches, prompt.len().saturating_add(cfg.max_new_tokens));
    let Some(mut fan) = FanOut::new(caches, prompt.len()) else {
        return Ok(None);
    };
    reserve_for(&loaded.model, &mut fan, prompt, &cfg)?;
    let t = std::time::Instant::now();
    let logits = prefill(&loaded.model, &mut fan, prompt, cfg.chunk_size)?;
    let prefill_seconds = t.elapsed().as_secs_f64();
    let prefill_share = prefill_seconds / cells.len() as f64;
    // Then the cells decode together, one batched step for all (the same tokens as one at a
    // time where products are the same sums at any row count: the CPU).
    let t = std::time::Instant::now();
    let mut caches = fan.into_caches();
    let mut samplers = (0..cells.len())
        .map(|_| Sampler::new(cfg.sampling.clone()))
        .collect::<Result<Vec<_>>>()?;
    let decoded = decode_together(
        &loaded.model,
        &mut caches,
        vec![logits; cells.len()],
        &cfg,
        &mut samplers,
    )?;
    let decode_seconds = t.elapsed().as_secs_f64();
    let seconds = prefill_share + decode_seconds / cells.len() as f64;
    // `RUST_LOG=easykv::eval=debug`: where a sample's time goes.
    tracing::debug!(
        target: "easykv::eval",
        cells = cells.len(),
        in_arena = caches.iter().filter(|c| c.region_slots(0).is_some()).count(),
        steps = decoded.iter().map(|d| d.ids.len()).max().unwrap_or(0),
        "a sample's prefill (and cuts) {prefill_seconds:.3} s, decode {decode_seconds:.3} s"
    );
    let outputs: Vec<(Vec<u32>, f64)> = decoded.into_iter().map(|d| (d.ids, seconds)).collect();
    // The full cache's output first: the others' fidelity is scored against it.
    let mut scored: Vec<Option<Cell>> = vec![None; cells.len()];
    let mut reference = reference.cloned();
    for pass in [true, false] {
        for (i, ((policy, budget), (ids, seconds))) in cells.iter().zip(&outputs).enumerate() {
            if (policy == "full") != pass {
                continue;
            }
            let mut cell = scored_cell(loaded, sample, policy, budget, ids.clone(), reference.as_ref())?;
            cell.seconds = *seconds;
            if policy == "full" {
                reference = Some(cell.clone());
            }
            scored[i] = Some(cell);
        }
    }
    Ok(Some(scored.into_iter().flatten().collect()))
}
