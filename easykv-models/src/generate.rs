//! Chunked prefill, the decode loop, and perplexity scoring.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::TensorData;

use easykv_core::KvCache;

use crate::error::{Error, Result};
use crate::llama::Logits;
use crate::model::CausalLm;
use crate::sampling::{Sampler, SamplingConfig};

/// Settings of one generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    /// Prompt tokens per prefill forward pass; a policy can act between chunks.
    pub chunk_size: usize,
    pub sampling: SamplingConfig,
    /// Ids that end generation (not included in the output).
    pub stop_ids: Vec<u32>,
    /// Record the `top_logprobs` most likely tokens (natural-log probabilities) at every step.
    pub top_logprobs: usize,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    StopToken,
    MaxTokens,
    ContextFull,
    Cancelled,
}

/// What a generation produced, with its timings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub prefill: Duration,
    pub decode: Duration,
    /// Per step, the most likely `(id, log-probability)` pairs (empty unless asked for).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
}

/// The `k` most likely tokens of a logits row with their natural-log probabilities.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(order.len());
    order.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
        logits[b as usize].total_cmp(&logits[a as usize])
    });
    order.truncate(k);
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    order.into_iter().map(|i| (i, logits[i as usize] - log_z)).collect()
}

pub(crate) fn token_tensor<B: Backend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), device)
}

/// Logits (any rank) as f32 values on the host, row after row.
pub(crate) fn row<const D: usize>(logits: Tensor<impl Backend, D>) -> Result<Vec<f32>> {
    logits
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| Error::InvalidInput(format!("reading logits: {e:?}")))
}

pub(crate) fn check_ids<B: Backend>(model: &(impl CausalLm<B> + ?Sized), ids: &[u32]) -> Result<()> {
    let vocab = model.vocab_size();
    match ids.iter().find(|&&i| i as usize >= vocab) {
        Some(bad) => Err(Error::InvalidInput(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

/// Feeds `prompt` in chunks of `chunk_size` and returns the logits of its last position.
pub fn prefill<B: Backend>(
    model: &(impl CausalLm<B> + ?Sized),
    cache: &mut dyn KvCache<B>,
    prompt: &[u32],
    chunk_size: usize,
) -> Result<Vec<f32>> {
    if prompt.is_empty() {
        return Err(Error::InvalidInput("the prompt is empty".into()));
    }
    if chunk_size == 0 {
        return Err(Error::InvalidInput("chunk size must be ≥ 1".into()));
    }
    check_ids(model, prompt)?;
    let device = model.device();
    let groups = chunk_groups(&cache.prefill_chunks(prompt.len(), chunk_size), chunk_size);
    let (mut start, n_groups) = (0, groups.len());
    let mut last = None;
    for (i, group) in groups.iter().enumerate() {
        let len: usize = group.iter().sum();
        let tokens = token_tensor::<B>(&prompt[start..start + len], &device);
        start += len;
        if i + 1 < n_groups {
            model.fill_cache_chunks(tokens, group, cache)?;
        } else {
            last = Some(model.forward_chunks(tokens, group, cache, Logits::Last)?);
        }
    }
    row(last.ok_or_else(|| Error::InvalidInput("the prompt is empty".into()))?)
}

/// Consecutive chunks gathered into groups of at most `max_tokens` tokens (a longer chunk is a
/// group of its own). The model runs each group layer by layer, so the strides of an evicting
/// prefill share large matrix products while activations stay bounded by `max_tokens`.
pub fn chunk_groups(chunks: &[usize], max_tokens: usize) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut total = 0;
    for &c in chunks {
        match groups.last_mut() {
            Some(g) if total + c <= max_tokens => {
                g.push(c);
                total += c;
            }
            _ => {
                groups.push(vec![c]);
                total = c;
            }
        }
    }
    groups
}

/// Generates a continuation of `prompt`, calling `on_token` with each new id as it is chosen;
/// `on_token` may stop early with `ControlFlow::Break`.
pub fn generate<B: Backend>(
    model: &(impl CausalLm<B> + ?Sized),
    cache: &mut dyn KvCache<B>,
    prompt: &[u32],
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Generation> {
    let mut sampler = Sampler::new(cfg.sampling.clone())?;
    reserve_for(model, cache, prompt, cfg)?;
    let t0 = Instant::now();
    let logits = prefill(model, cache, prompt, cfg.chunk_size)?;
    let prefill_time = t0.elapsed();
    let t1 = Instant::now();
    let decoded = decode_from(model, cache, logits, cfg, &mut sampler, &mut on_token)?;
    Ok(Generation {
        ids: decoded.ids,
        stop: decoded.stop,
        prompt_tokens: prompt.len(),
        prefill: prefill_time,
        decode: t1.elapsed(),
        top_logprobs: decoded.top_logprobs,
    })
}

/// Refuses a prompt longer than the model's context, and tells `cache` how many tokens the
/// generation will hold (generation stops at the context's end, however many were asked for).
pub(crate) fn reserve_for<B: Backend>(
    model: &(impl CausalLm<B> + ?Sized),
    cache: &mut dyn KvCache<B>,
    prompt: &[u32],
    cfg: &GenerateConfig,
) -> Result<()> {
    let context = model.context_length();
    if prompt.len() > context {
        return Err(Error::InvalidInput(format!(
            "the prompt has {} tokens, more than the model's context of {context}",
            prompt.len()
        )));
    }
    cache.reserve(prompt.len().saturating_add(cfg.max_new_tokens).min(context));
    Ok(())
}

/// What [`decode_from`] produced.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub ids: Vec<u32>,
    pub stop: StopReason,
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
}

/// One sequence's decode loop: what [`decode_from`] runs for one cache and [`decode_together`]
/// for several.
#[derive(Default)]
struct Decoding {
    ids: Vec<u32>,
    top: Vec<Vec<(u32, f32)>>,
    stop: Option<StopReason>,
}

impl Decoding {
    /// Takes a step's `logits`: the token to feed next, or `None` once the loop has ended
    /// (a stop id, `cfg.max_new_tokens`, the context's end at `position`, `on_token`'s `Break`).
    fn next(
        &mut self,
        logits: &[f32],
        cfg: &GenerateConfig,
        sampler: &mut Sampler,
        position: usize,
        context: usize,
        on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
    ) -> Option<u32> {
        let stop = 'step: {
            if self.ids.len() >= cfg.max_new_tokens {
                break 'step StopReason::MaxTokens;
            }
            if cfg.top_logprobs > 0 {
                self.top.push(top_logprobs(logits, cfg.top_logprobs));
            }
            let next = sampler.sample(logits);
            if cfg.stop_ids.contains(&next) {
                break 'step StopReason::StopToken;
            }
            self.ids.push(next);
            if on_token(next).is_break() {
                break 'step StopReason::Cancelled;
            }
            if self.ids.len() >= cfg.max_new_tokens {
                break 'step StopReason::MaxTokens;
            }
            if position >= context {
                break 'step StopReason::ContextFull;
            }
            return Some(next);
        };
        self.stop = Some(stop);
        None
    }

    fn decoded(self) -> Decoded {
        Decoded {
            ids: self.ids,
            stop: self.stop.unwrap_or(StopReason::MaxTokens),
            top_logprobs: self.top,
        }
    }
}

/// The decode loop of [`generate`] from a prefilled `cache` and its prompt's last `logits`:
/// sample, stop or feed the token back, until a stop id, `cfg.max_new_tokens`, the context's
/// end or `on_token`'s `Break`.
pub fn decode_from<B: Backend>(
    model: &(impl CausalLm<B> + ?Sized),
    cache: &mut dyn KvCache<B>,
    mut logits: Vec<f32>,
    cfg: &GenerateConfig,
    sampler: &mut Sampler,
    on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
) -> Result<Decoded> {
    let context = model.context_length();
    let device = model.device();
    let mut d = Decoding::default();
    while let Some(next) = d.next(&logits, cfg, sampler, cache.next_position(), context, on_token) {
        logits = row(model.forward(token_tensor::<B>(&[next], &device), cache, Logits::Last)?)?;
    }
    Ok(d.decoded())
}

/// [`decode_from`] for several prefilled caches at once, each from its own prompt's last
/// `logits` with its own sampler: one batched step ([`CausalLm::decode_batch`]) for every
/// sequence still decoding, which reads the weights once for all of them. Where the
/// backend's products are the same sums at any row count (the CPU), each sequence decodes
/// what it decodes alone.
pub fn decode_together<B: Backend>(
    model: &(impl CausalLm<B> + ?Sized),
    caches: &mut [Box<dyn KvCache<B>>],
    mut logits: Vec<Vec<f32>>,
    cfg: &GenerateConfig,
    samplers: &mut [Sampler],
) -> Result<Vec<Decoded>> {
    let context = model.context_length();
    let mut states: Vec<Decoding> = caches.iter().map(|_| Decoding::default()).collect();
    loop {
        let mut tokens = Vec::new();
        let mut feeding = vec![false; caches.len()];
        for (i, ((d, sampler), cache)) in states
            .iter_mut()
            .zip(samplers.iter_mut())
            .zip(caches.iter())
            .enumerate()
        {
            let Some(logits) = logits.get(i).filter(|_| d.stop.is_none()) else {
                continue;
            };
            let position = cache.next_position();
            if let Some(next) = d.next(logits, cfg, sampler, position, context, &mut |_| {
                ControlFlow::Continue(())
            }) {
                tokens.push(next);
                feeding[i] = true;
            }
        }
        if tokens.is_empty() {
            break;
        }
        let mut fed: Vec<&mut dyn KvCache<B>> = Vec::with_capacity(tokens.len());
        for (cache, _) in caches.iter_mut().zip(&feeding).filter(|(_, &f)| f) {
            fed.push(cache.as_mut());
        }
        let out = row(model.decode_batch(&tokens, &mut fed)?)?;
        let vocab = out.len() / tokens.len();
        let rows = (0..caches.len()).filter(|&i| feeding[i]);
        for (r, i) in rows.enumerate() {
            logits[i] = out[r * vocab..(r + 1) * vocab].to_vec();
        }
    }
    Ok(states.into_iter().map(Decoding::decoded).collect())
}

/// Per-token negative log-likelihood of a text.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Score {
    /// NLL (natural log) of token i+1 given tokens 0..=i.
    pub nll: Vec<f32>,
    pub mean_nll: f64,
    pub perplexity: f64,
}

/// Scores `ids` (teacher forcing), feeding chunks of `chunk_size` through `cache`.
pub fn score<B: Backend>(
    model: &(impl CausalLm<B> + ?Sized),
    cache: &mut dyn KvCache<B>,
    ids: &[u32],
    chunk_size: usize,
) -> Result<Score> {
    if ids.len() < 2 {
        return Err(Error::InvalidInput(format!(
            "scoring needs at least 2 tokens, got {}",
            ids.len()
        )));
    }
    if chunk_size == 0 {
        return Err(Error::InvalidInput("chunk size must be ≥ 1".into()));
    }
    let context = model.context_length();
    if ids.len() > context {
        return Err(Error::InvalidInput(format!(
            "the text has {} tokens, more than the model's context of {context}",
            ids.len()
        )));
    }
    check_ids(model, ids)?;
    let device = model.device();
    let mut nll = Vec::with_capacity(ids.len() - 1);
    let mut start = 0;
    for group in chunk_groups(&cache.prefill_chunks(ids.len() - 1, chunk_size), chunk_size) {
        let end = start + group.iter().sum::<usize>();
        let logits = model.forward_chunks(token_tensor::<B>(&ids[start..end], &device), &group, cache, Logits::All)?;
        let targets: Vec<i32> = ids[start + 1..end + 1].iter().map(|&i| i as i32).collect();
        let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [1, end - start, 1]), &device);
        let picked = log_softmax(logits, 2).gather(2, targets);
        nll.extend(row(picked)?.into_iter().map(|lp| -lp));
        start = end;
    }
    let mean_nll = nll.iter().map(|&v| v as f64).sum::<f64>() / nll.len() as f64;
    Ok(Score {
        nll,
        mean_nll,
        perplexity: mean_nll.exp(),
    })
}

#[cfg(test)]
mod tests {
    use super::{chunk_groups, top_logprobs};

    #[test]
    fn chunks_are_grouped_up_to_the_limit() {
        assert_eq!(
            chunk_groups(&[512, 125, 8, 8, 8], 512),
            vec![vec![512], vec![125, 8, 8, 8]]
        );
        assert_eq!(chunk_groups(&[600, 8, 8], 16), vec![vec![600], vec![8, 8]]);
        assert_eq!(chunk_groups(&[3, 3, 3], 6), vec![vec![3, 3], vec![3]]);
        assert!(chunk_groups(&[], 6).is_empty());
    }

    #[test]
    fn top_logprobs_are_sorted_normalized_log_probabilities() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let top = top_logprobs(&logits, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((top[0].1 - (3.0f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(top_logprobs(&logits, 10).len(), 5);
    }
}
