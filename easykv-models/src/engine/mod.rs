//! The batched engine: many sequences at once, each under its own policy and budget, their
//! key/value caches drawn from one memory pool of a fixed size.
//!
//! A request is admitted when the pool can set aside its cache's peak footprint (what its
//! budget lets it hold at most, or prompt + new tokens for the full cache; see
//! [`KvCache::peak_slots`]); its cache then allocates exactly that, once. Every
//! [`step`](Engine::step) advances every decoding sequence by one token and prefills up to one
//! chunk's tokens of the oldest waiting prompts (so a long prompt never stalls the others for
//! more than a chunk, and short prompts start together): on GPUs in one batched pass, a chunk
//! of each prompt beside the decode rows, which reads the weights once for all of them; on the
//! CPU a decode pass, then each prompt's chunk group in passes of its own (layer by layer).
//! Finished and cancelled sequences hand their memory back at once.
//!
//! Why one contiguous range of slots per sequence rather than fixed-size blocks: a budgeted
//! sequence's peak is known when it is admitted, and eviction compacts a sequence's slots within
//! its own range, so a block table would add an indirection to every attention read without
//! freeing more memory; the pool accounts whole reservations, which is what admission needs.
//! On GPUs the ranges lie in one tensor per layer ([`arena`]), so a decode step attends every
//! sequence in one launch per layer; on the CPU each sequence's cache holds its own buffers
//! (host kernels have no launches to save) and the pool only accounts them.

pub(crate) mod arena;
mod handle;

use std::collections::VecDeque;

use burn::prelude::*;
use easykv_core::{EvictionConfig, KvCache};

use crate::backend::BackendProfile;
use crate::cache::build_cache;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::{check_ids, chunk_groups, row, token_tensor, top_logprobs, StopReason};
use crate::linear::WeightDType;
use crate::llama::{BatchPart, Logits};
use crate::model::CausalLm;
use crate::sampling::{Sampler, SamplingConfig};

pub use handle::{EngineHandle, EventSink, Rejection, Update};

/// The most alternatives a token's log-probabilities list (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One generation asked of the engine.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    /// A policy of the built-in table (`full` never evicts).
    pub policy: String,
    pub eviction: EvictionConfig,
    pub sampling: SamplingConfig,
    /// Ids that end the generation (not emitted).
    pub stop_ids: Vec<u32>,
    /// Report each token's log-probability, and this many most likely alternatives (at most
    /// [`MAX_TOP_LOGPROBS`]); `None`: neither.
    pub logprobs: Option<usize>,
}

/// Identifies a submitted request.
pub type RequestId = u64;

/// A generated token's log-probability (natural log, of the model's distribution before
/// temperature and truncation) and the most likely alternatives at its step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What a step produced for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        id: RequestId,
        token: u32,
        /// Present when the request asked for log-probabilities.
        logprobs: Option<TokenLogprobs>,
    },
    Finished {
        id: RequestId,
        stop: StopReason,
    },
}

/// The engine's settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Bytes of keys and values all running sequences may hold together.
    pub pool_bytes: u64,
    /// Sequences running at once, at most.
    pub max_running: usize,
    /// Prompt tokens per prefill pass (a policy's strides inside it are its own).
    pub chunk_size: usize,
    /// Requests waiting for room, at most (a full queue refuses new ones); `None`: no limit.
    pub max_queued: Option<usize>,
    /// Prompt chunks ride in the decode step's pass — one product over both, each prompt one
    /// chunk per pass — instead of passes of their own after it, where whole chunk groups run
    /// layer by layer. `None`: on GPUs (where a pass's launches and weight reads dominate), not
    /// on the CPU (whose strided prefill shares its products layer by layer).
    pub mixed_passes: Option<bool>,
}

/// The share of the memory available now that a pool takes when no size is given.
pub const DEFAULT_POOL_SHARE: f64 = 0.5;

/// A default pool size for caches in host memory: [`DEFAULT_POOL_SHARE`] of the memory the
/// system reports available (Linux's `MemAvailable`, read after the model is loaded); `None`
/// where that cannot be read (the caller then asks for an explicit size).
pub fn default_host_pool_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib.saturating_mul(1024) as f64 * DEFAULT_POOL_SHARE) as u64)
}

/// Where the engine stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineStats {
    pub queued: usize,
    pub running: usize,
    /// Bytes set aside for the running sequences' caches.
    pub reserved_bytes: u64,
    /// Bytes their caches hold now.
    pub kv_bytes: u64,
    pub pool_bytes: u64,
    pub finished: u64,
    /// Prompt tokens prefilled and tokens generated, since the engine started.
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Slots evicted per (layer, KV head), summed over every sequence so far.
    pub evicted_slots: u64,
}

/// A running sequence.
struct Sequence<B: Backend> {
    id: RequestId,
    request: Request,
    cache: Box<dyn KvCache<B>>,
    sampler: Sampler,
    footprint: u64,
    /// The first of the `slots` pool slots it holds in the engine's arena, if it has one.
    region: Option<(usize, usize)>,
    /// Prefill groups not run yet, and where the next starts in the prompt.
    groups: VecDeque<Vec<usize>>,
    prefilled: usize,
    /// The token to feed at the next decode step.
    pending: Option<u32>,
    generated: usize,
}

/// A request waiting for room in the pool.
struct Queued<B: Backend> {
    id: RequestId,
    request: Request,
    cache: Box<dyn KvCache<B>>,
    footprint: u64,
    /// Slots per layer it needs at most.
    slots: usize,
}

/// Sequences at once under one pool (see the module's documentation).
pub struct Engine<B: Backend> {
    model: Box<dyn CausalLm<B>>,
    model_config: ModelConfig,
    kv_dtype: WeightDType,
    config: EngineConfig,
    /// Requests waiting, each with its cache (built at submit, allocated at admission) and the
    /// bytes to set aside for it.
    queue: VecDeque<Queued<B>>,
    running: Vec<Sequence<B>>,
    /// On GPUs: every sequence's slots in one tensor per layer.
    arena: Option<arena::SlotArena<B>>,
    next_id: RequestId,
    reserved: u64,
    /// Counters of [`EngineStats`]; `evicted` counts sequences that have left.
    finished: u64,
    prompt_tokens: u64,
    generated_tokens: u64,
    evicted: u64,
}

impl<B: Backend> Engine<B> {
    /// An engine over `model` (of shape `model_config`, caching keys and values in `kv_dtype`).
    pub fn new(
        model: Box<dyn CausalLm<B>>,
        model_config: ModelConfig,
        kv_dtype: WeightDType,
        config: EngineConfig,
    ) -> Result<Self> {
        if config.max_running == 0 || config.chunk_size == 0 || config.pool_bytes == 0 {
            return Err(Error::InvalidInput(
                "the engine needs a pool, a chunk size and room for at least one sequence".into(),
            ));
        }
        let arena = Self::arena_for(model.as_ref(), &model_config, kv_dtype, &config);
        Ok(Self {
            model,
            model_config,
            kv_dtype,
            config,
            queue: VecDeque::new(),
            running: Vec::new(),
            arena,
            next_id: 0,
            reserved: 0,
            finished: 0,
            prompt_tokens: 0,
            generated_tokens: 0,
            evicted: 0,
        })
    }

    pub fn model(&self) -> &dyn CausalLm<B> {
        self.model.as_ref()
    }

    /// The pool as one tensor per layer, where the backend attends pooled sequences in one
    /// launch (GPUs with easykv's kernels) and the pool has a size that can be allocated;
    /// `None` elsewhere (each cache then allocates its own buffers).
    fn arena_for(
        model: &dyn CausalLm<B>,
        config: &ModelConfig,
        kv_dtype: WeightDType,
        engine: &EngineConfig,
    ) -> Option<arena::SlotArena<B>> {
        let per_token = config.kv_bytes_per_token(kv_dtype.size()).max(1);
        let slots = usize::try_from(engine.pool_bytes / per_token).ok()?;
        arena::SlotArena::for_model(model, config, kv_dtype, slots)
    }

    fn profile(&self) -> BackendProfile {
        *self.model.profile()
    }

    /// The most tokens `request` can hold: prompt and new tokens, never past the context.
    fn tokens_for(&self, request: &Request) -> usize {
        (request.prompt.len().saturating_add(request.max_new_tokens)).min(self.model.context_length())
    }

    /// A cache for `request`, and the bytes the pool must set aside for it.
    fn cache_for(&self, request: &Request) -> Result<(Box<dyn KvCache<B>>, u64)> {
        let profile = self.profile();
        let cache = build_cache::<B>(
            &request.policy,
            &request.eviction,
            &self.model_config,
            &profile,
            self.kv_dtype,
            request.prompt.len(),
            self.config.chunk_size,
        )?;
        let tokens = self.tokens_for(request);
        let per_token = self.model_config.kv_bytes_per_token(self.kv_dtype.size());
        let footprint = (cache.peak_slots(tokens) as u64).saturating_mul(per_token);
        Ok((cache, footprint))
    }

    /// Slots per layer a cache of `footprint` bytes holds.
    fn slots_of(&self, footprint: u64) -> usize {
        let per_token = self.model_config.kv_bytes_per_token(self.kv_dtype.size()).max(1);
        usize::try_from(footprint / per_token).unwrap_or(usize::MAX)
    }

    /// Queues `request`; refused at once if it could never run (an empty prompt or one past
    /// the context, a bad policy or budget, a footprint larger than the whole pool).
    pub fn submit(&mut self, request: Request) -> Result<RequestId> {
        let context = self.model.context_length();
        if request.prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        if request.prompt.len() > context {
            return Err(Error::InvalidInput(format!(
                "the prompt has {} tokens, more than the model's context of {context}",
                request.prompt.len()
            )));
        }
        if let Some(limit) = self.config.max_queued {
            if self.queue.len() >= limit {
                return Err(Error::Busy(format!("{limit} requests are already waiting")));
            }
        }
        check_ids(self.model.as_ref(), &request.prompt)?;
        Sampler::new(request.sampling.clone())?;
        if request.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(Error::InvalidInput(format!(
                "at most {MAX_TOP_LOGPROBS} alternatives per token"
            )));
        }
        let (cache, footprint) = self.cache_for(&request)?;
        if footprint > self.config.pool_bytes {
            return Err(Error::InvalidInput(format!(
                "the request's cache needs {footprint} bytes, more than the pool's {}",
                self.config.pool_bytes
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        let slots = self.slots_of(footprint);
        self.queue.push_back(Queued {
            id,
            request,
            cache,
            footprint,
            slots,
        });
        Ok(id)
    }

    /// Drops request `id`, queued or running, and frees its memory; `false` if unknown.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.queue.iter().position(|q| q.id == id) {
            self.queue.remove(i);
            return true;
        }
        match self.running.iter().position(|s| s.id == id) {
            Some(i) => {
                self.release(i);
                true
            }
            None => false,
        }
    }

    /// Removes running sequence `i`, returning its memory to the pool.
    fn release(&mut self, i: usize) {
        let seq = self.running.swap_remove(i);
        self.reserved -= seq.footprint;
        if let (Some(arena), Some((start, slots))) = (self.arena.as_mut(), seq.region) {
            arena.give_back(start, slots);
        }
        self.evicted += seq.cache.evicted() as u64;
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            queued: self.queue.len(),
            running: self.running.len(),
            reserved_bytes: self.reserved,
            kv_bytes: self.running.iter().map(|s| s.cache.bytes()).sum(),
            pool_bytes: self.config.pool_bytes,
            finished: self.finished,
            prompt_tokens: self.prompt_tokens,
            generated_tokens: self.generated_tokens,
            evicted_slots: self.evicted + self.running.iter().map(|s| s.cache.evicted() as u64).sum::<u64>(),
        }
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.running.is_empty()
    }

    /// Running sequences' ids with their cache bytes and the bytes set aside for them.
    pub fn running(&self) -> Vec<(RequestId, u64, u64)> {
        self.running
            .iter()
            .map(|s| (s.id, s.cache.bytes(), s.footprint))
            .collect()
    }

    /// Admits queued requests in order while the pool and `max_running` allow.
    fn admit(&mut self) -> Result<()> {
        while self.running.len() < self.config.max_running {
            match self.queue.front() {
                Some(q) if self.reserved + q.footprint <= self.config.pool_bytes => {}
                _ => break,
            }
            // On GPUs the sequence needs a range of the arena as long as its peak.
            let profile = self.profile();
            let region = match (self.arena.as_mut(), self.queue.front()) {
                (Some(arena), Some(q)) => match arena.take(q.slots) {
                    Some(start) => Some((start, q.slots)),
                    // Longer than the whole arena (capped by the device's binding limit):
                    // buffers of its own rather than a wait that never ends.
                    None if q.slots > arena.capacity() => None,
                    None => break,
                },
                _ => None,
            };
            let Some(Queued {
                id,
                request,
                mut cache,
                footprint,
                ..
            }) = self.queue.pop_front()
            else {
                break;
            };
            // A cache that cannot take the range keeps its own buffers; the range goes back.
            let region = match (self.arena.as_mut(), region) {
                (Some(arena), Some((start, slots))) => {
                    let placed = arena.region(&profile, start, slots).is_some_and(|r| cache.place_in(r));
                    if !placed {
                        arena.give_back(start, slots);
                    }
                    placed.then_some((start, slots))
                }
                _ => None,
            };
            cache.reserve(self.tokens_for(&request));
            let groups = chunk_groups(
                &cache.prefill_chunks(request.prompt.len(), self.config.chunk_size),
                self.config.chunk_size,
            );
            self.reserved += footprint;
            self.running.push(Sequence {
                id,
                sampler: Sampler::new(request.sampling.clone())?,
                request,
                cache,
                footprint,
                region,
                groups: groups.into(),
                prefilled: 0,
                pending: None,
                generated: 0,
            });
        }
        Ok(())
    }

    /// Admits what fits, prefills up to one chunk's tokens of the oldest prompts still
    /// prefilling, and decodes one token for every other running sequence — in one batched
    /// pass where prompt chunks ride with the decode step ([`EngineConfig::mixed_passes`]),
    /// else a decode pass, then the prompts' chunk groups.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        self.admit()?;
        let mut events = Vec::new();
        match self.mixed_passes() {
            true => self.mixed_pass(&mut events)?,
            false => {
                self.decode_pass(&mut events)?;
                self.prefill_groups(&mut events)?;
            }
        }
        // Finished sequences return their memory now.
        let finished: Vec<RequestId> = events
            .iter()
            .filter_map(|e| match e {
                Event::Finished { id, .. } => Some(*id),
                Event::Token { .. } => None,
            })
            .collect();
        for id in finished {
            if let Some(i) = self.running.iter().position(|s| s.id == id) {
                self.release(i);
                self.finished += 1;
            }
        }
        self.generated_tokens += events.iter().filter(|e| matches!(e, Event::Token { .. })).count() as u64;
        Ok(events)
    }

    /// Whether prompt chunks ride with decode steps in one pass (see [`EngineConfig`]).
    fn mixed_passes(&self) -> bool {
        self.config
            .mixed_passes
            .unwrap_or_else(|| !self.model.profile().host_resident())
    }

    /// One token for every sequence whose prefill finished in an earlier step, in one pass.
    fn decode_pass(&mut self, events: &mut Vec<Event>) -> Result<()> {
        let context = self.model.context_length();
        let (mut decoding, mut tokens, mut caches) = (Vec::new(), Vec::new(), Vec::<&mut dyn KvCache<B>>::new());
        for (i, seq) in self.running.iter_mut().enumerate() {
            if let Some(token) = seq.pending {
                decoding.push(i);
                tokens.push(token);
                caches.push(seq.cache.as_mut());
            }
        }
        if decoding.is_empty() {
            return Ok(());
        }
        let logits = self.model.decode_batch(&tokens, &mut caches)?;
        drop(caches);
        let vocab = logits.dims()[1];
        let rows = row(logits)?;
        for (r, &i) in decoding.iter().enumerate() {
            let seq = &mut self.running[i];
            seq.pending = None;
            Self::next_token(seq, &rows[r * vocab..(r + 1) * vocab], context, events);
        }
        Ok(())
    }

    /// Prefill groups of the oldest prompts still prefilling, in order, up to `chunk_size`
    /// tokens in all (at least one group), each through its own passes: several short prompts
    /// start decoding together instead of one per step, and the others never wait longer than
    /// one chunk.
    fn prefill_groups(&mut self, events: &mut Vec<Event>) -> Result<()> {
        let context = self.model.context_length();
        let device = self.model.device();
        let mut room = self.config.chunk_size;
        let mut any = false;
        'prefill: for seq in self.running.iter_mut() {
            while let Some(len) = seq.groups.front().map(|g| g.iter().sum::<usize>()) {
                if any && len > room {
                    break 'prefill;
                }
                let Some(group) = seq.groups.pop_front() else { break };
                let ids = &seq.request.prompt[seq.prefilled..seq.prefilled + len];
                let tokens = token_tensor::<B>(ids, &device);
                seq.prefilled += len;
                self.prompt_tokens += len as u64;
                room = room.saturating_sub(len);
                any = true;
                if seq.groups.is_empty() {
                    let logits = self
                        .model
                        .forward_chunks(tokens, &group, seq.cache.as_mut(), Logits::Last)?;
                    Self::next_token(seq, &row(logits)?, context, events);
                } else {
                    self.model.fill_cache_chunks(tokens, &group, seq.cache.as_mut())?;
                }
            }
        }
        Ok(())
    }

    /// One pass: a token for every decoding sequence, and the next chunk of the oldest prompts
    /// still prefilling (one chunk each: the next waits for the cache to end this one), up to
    /// `chunk_size` prompt tokens in all (at least one chunk). The weights are read once for
    /// both, and a prompt never stalls the decoding sequences for longer than that pass.
    fn mixed_pass(&mut self, events: &mut Vec<Event>) -> Result<()> {
        let context = self.model.context_length();
        // Per part: the sequence, and the prompt tokens it feeds (0: a decode step).
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let mut room = self.config.chunk_size;
        let mut prefilling = false;
        for (i, seq) in self.running.iter().enumerate() {
            if seq.pending.is_some() {
                plan.push((i, 0));
                continue;
            }
            let Some(&len) = seq.groups.front().and_then(|g| g.first()) else {
                continue;
            };
            if prefilling && len > room {
                // The oldest prompts go first; decoding sequences after them still step.
                room = 0;
                continue;
            }
            plan.push((i, len));
            room = room.saturating_sub(len);
            prefilling = true;
        }
        if plan.is_empty() {
            return Ok(());
        }
        let mut parts = Vec::with_capacity(plan.len());
        let mut caches = Vec::<&mut dyn KvCache<B>>::with_capacity(plan.len());
        let mut planned = plan.iter().peekable();
        for (i, seq) in self.running.iter_mut().enumerate() {
            let Some(&(_, len)) = planned.next_if(|&&(j, _)| j == i) else {
                continue;
            };
            let tokens = match (len, &seq.pending) {
                (0, Some(token)) => std::slice::from_ref(token),
                _ => &seq.request.prompt[seq.prefilled..seq.prefilled + len],
            };
            // A decode step wants its logits, and so does a prompt's last chunk.
            let last = seq.groups.len() == 1 && seq.groups.front().is_some_and(|g| g.len() == 1);
            parts.push(BatchPart {
                tokens,
                logits: len == 0 || last,
            });
            caches.push(seq.cache.as_mut());
        }
        let logits = self.model.forward_batch(&parts, &mut caches)?;
        let wanted: Vec<bool> = parts.iter().map(|part| part.logits).collect();
        drop((parts, caches));
        let (rows, vocab) = match logits {
            Some(logits) => {
                let vocab = logits.dims()[1];
                (row(logits)?, vocab)
            }
            None => (Vec::new(), 1),
        };
        let mut next_row = 0;
        for (&(i, len), wants) in plan.iter().zip(wanted) {
            let seq = &mut self.running[i];
            if len > 0 {
                if let Some(group) = seq.groups.front_mut() {
                    group.remove(0);
                    if group.is_empty() {
                        seq.groups.pop_front();
                    }
                }
                seq.prefilled += len;
                self.prompt_tokens += len as u64;
            }
            seq.pending = None;
            if wants {
                let Some(logits) = rows.get(next_row * vocab..(next_row + 1) * vocab) else {
                    return Err(Error::InvalidInput("a batched pass returned too few logits".into()));
                };
                next_row += 1;
                Self::next_token(seq, logits, context, events);
            }
        }
        Ok(())
    }

    /// Samples `seq`'s next token from `logits` as [`crate::generate`] does: a stop id ends it
    /// unemitted; a token is emitted, and ends it at the token limit or the context's end;
    /// otherwise it is fed at the next step.
    fn next_token(seq: &mut Sequence<B>, logits: &[f32], context: usize, events: &mut Vec<Event>) {
        let id = seq.id;
        let finish = |stop| Event::Finished { id, stop };
        if seq.generated >= seq.request.max_new_tokens {
            events.push(finish(StopReason::MaxTokens));
            return;
        }
        let token = seq.sampler.sample(logits);
        if seq.request.stop_ids.contains(&token) {
            events.push(finish(StopReason::StopToken));
            return;
        }
        seq.generated += 1;
        let logprobs = seq.request.logprobs.map(|k| {
            let mut top = top_logprobs(logits, k.max(1));
            let logprob = match top.first() {
                Some(&(best, lp)) if best == token => lp,
                _ => log_probability(logits, token),
            };
            top.truncate(k);
            TokenLogprobs { logprob, top }
        });
        events.push(Event::Token { id, token, logprobs });
        if seq.generated >= seq.request.max_new_tokens {
            events.push(finish(StopReason::MaxTokens));
        } else if seq.cache.next_position() >= context {
            events.push(finish(StopReason::ContextFull));
        } else {
            seq.pending = Some(token);
        }
    }

    /// Steps until every request has finished, handing each event to `on_event`.
    pub fn run(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        while !self.is_idle() {
            for e in self.step()? {
                on_event(&e);
            }
        }
        Ok(())
    }
}

/// The natural-log probability of `token` under `logits`' softmax.
fn log_probability(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
    logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| l - log_z)
}
