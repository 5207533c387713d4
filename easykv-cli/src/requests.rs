//! `easykv generate --requests-file FILE.jsonl`: several requests through the batched engine,
//! each with its own settings, one JSON line out per request in input order.

use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::Backend;
use easykv_core::{Budget, Mode};
use easykv_models::{CausalLm, Engine, EngineConfig, Event, Request, SamplingConfig};
use serde::Deserialize;
use serde_json::json;

use crate::common::{outln, CliError, CliResult};
use crate::generate::GenerateArgs;

/// The largest requests file read (a bound on memory, not a limit anyone should meet).
const MAX_FILE_BYTES: u64 = 64 << 20;

/// One line of the file; what it leaves out comes from the command's flags.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    prompt: Option<String>,
    prompt_ids: Option<Vec<u32>>,
    max_new_tokens: Option<usize>,
    policy: Option<String>,
    budget: Option<String>,
    mode: Option<String>,
    stride: Option<usize>,
    temperature: Option<f32>,
    seed: Option<u64>,
}

/// Reads and checks every line before a model is loaded.
fn read_lines(path: &Path) -> CliResult<Vec<Line>> {
    let meta = std::fs::metadata(path).map_err(|e| CliError(format!("{}: {e}", path.display())))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(CliError(format!(
            "{}: larger than {} MiB",
            path.display(),
            MAX_FILE_BYTES >> 20
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| CliError(format!("{}: {e}", path.display())))?;
    let mut lines = Vec::new();
    for (n, raw) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let line: Line =
            serde_json::from_str(raw).map_err(|e| CliError(format!("{}:{}: {e}", path.display(), n + 1)))?;
        if line.prompt.is_some() == line.prompt_ids.is_some() {
            return Err(CliError(format!(
                "{}:{}: give exactly one of prompt and prompt_ids",
                path.display(),
                n + 1
            )));
        }
        lines.push(line);
    }
    if lines.is_empty() {
        return Err(CliError(format!("{}: no requests", path.display())));
    }
    Ok(lines)
}

pub fn run_on<B: Backend>(device: &B::Device, args: &GenerateArgs, path: &Path) -> CliResult {
    let lines = read_lines(path)?;
    let pool = crate::bench::kv_pool(args.kv_pool.as_deref())?;
    let loaded = args.model.load_for_batches::<B>(device)?;
    let mut requests = Vec::with_capacity(lines.len());
    for (n, line) in lines.iter().enumerate() {
        let at = |e: String| CliError(format!("{}: request {}: {e}", path.display(), n + 1));
        let mut eviction = args.eviction.config()?;
        if let Some(b) = &line.budget {
            eviction.budget = b.parse::<Budget>().map_err(|e| at(e.to_string()))?;
        }
        if let Some(m) = &line.mode {
            eviction.mode = m.parse::<Mode>().map_err(|e| at(e.to_string()))?;
        }
        if let Some(s) = line.stride {
            eviction.stride = s;
        }
        eviction.validate().map_err(|e| at(e.to_string()))?;
        let policy = match &line.policy {
            Some(p) => easykv_policies::canonical_policy_name(p).map_err(|e| at(e.to_string()))?,
            None => args.eviction.policy.name(),
        };
        let sampling = SamplingConfig {
            temperature: line.temperature.unwrap_or(args.temperature),
            top_k: args.top_k,
            top_p: args.top_p,
            seed: line.seed.unwrap_or(args.seed),
        };
        sampling.validate().map_err(|e| at(e.to_string()))?;
        let prompt = match (&line.prompt, &line.prompt_ids) {
            (Some(text), _) => loaded.tokenizer.encode(text)?,
            (None, Some(ids)) => ids.clone(),
            (None, None) => Vec::new(),
        };
        requests.push(Request {
            prompt,
            max_new_tokens: line.max_new_tokens.unwrap_or(args.max_new_tokens),
            policy: policy.to_string(),
            eviction,
            sampling,
            stop_ids: loaded.tokenizer.stop_ids.clone(),
            logprobs: None,
        });
    }
    let (config, dtype, tokenizer) = (loaded.config.clone(), loaded.dtype, loaded.tokenizer);
    let model: Box<dyn CausalLm<B>> = loaded.model;
    let pool_bytes = crate::bench::pool_bytes(pool, model.as_ref());
    let mut engine = Engine::new(
        model,
        config,
        dtype,
        EngineConfig {
            pool_bytes,
            max_running: args.concurrency,
            chunk_size: args.chunk_size,
            max_queued: None,
            mixed_passes: crate::common::PrefillPasses::mixed(args.prefill_passes),
        },
    )?;
    let mut ids = Vec::with_capacity(requests.len());
    for (n, r) in requests.iter().enumerate() {
        let id = engine
            .submit(r.clone())
            .map_err(|e| CliError(format!("{}: request {}: {e}", path.display(), n + 1)))?;
        ids.push(id);
    }
    let mut out: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    let mut stops = BTreeMap::new();
    engine.run(&mut |e| match e {
        Event::Token { id, token, .. } => out.entry(*id).or_default().push(*token),
        Event::Finished { id, stop } => {
            stops.insert(*id, *stop);
        }
    })?;
    for (n, (id, r)) in ids.iter().zip(&requests).enumerate() {
        let generated = out.remove(id).unwrap_or_default();
        let line = json!({
            "request": n + 1,
            "text": tokenizer.decode(&generated, true)?,
            "ids": generated,
            "stop": stops.get(id),
            "prompt_tokens": r.prompt.len(),
            "max_new_tokens": r.max_new_tokens,
            "policy": r.policy,
            "budget": r.eviction.budget,
            "mode": r.eviction.mode,
            "stride": r.eviction.stride,
            "temperature": r.sampling.temperature,
            "seed": r.sampling.seed,
        });
        outln!("{line}")?;
    }
    Ok(())
}
