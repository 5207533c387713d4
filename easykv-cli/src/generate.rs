//! `easykv generate`

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use burn::prelude::Backend;
use clap::Args;
use easykv_models::{generate, ChatMessage, GenerateConfig, SamplingConfig};
use serde_json::json;

use crate::backend::with_backend;
use crate::common::{encode_prefix, print_json, read_text, CliError, CliResult, EvictionArgs, ModelArgs};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text. Control tokens written in it (`<|im_start|>`) are recognized.
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user turn with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (default: the template's own).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 means greedy (the default).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompt tokens per prefill pass.
    #[arg(long, default_value_t = 512)]
    pub chunk_size: usize,
    /// Read the prompt as token ids from a JSON array file (exact reproduction).
    #[arg(long, conflicts_with_all = ["prompt", "prompt_file", "chat"])]
    pub prompt_ids_file: Option<PathBuf>,
    /// Run several requests together through the batched engine: one JSON object per line
    /// with `prompt` (or `prompt_ids`) and optionally `max_new_tokens`, `policy`, `budget`,
    /// `mode`, `stride`, `temperature`, `seed` (the flags give the rest); prints one JSON line
    /// per request, in input order.
    #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = ["prompt", "prompt_file", "prompt_ids_file", "chat", "json", "stats"])]
    pub requests_file: Option<PathBuf>,
    /// With --requests-file: sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// With --requests-file: bytes of KV cache all running sequences may hold together
    /// (64MiB, 40GiB); default: half the memory available on the CPU, unlimited on a GPU (a
    /// size puts every sequence's cache in one pool, attended in one launch per layer).
    #[arg(long, value_name = "SIZE")]
    pub kv_pool: Option<String>,
    /// With --requests-file: how prompts share passes with decode steps: mixed (a chunk of
    /// each prompt rides in the decode step's pass, one product for both) or separate (passes
    /// of their own after it); default: mixed on GPUs, separate on the CPU.
    #[arg(long, value_enum, value_name = "HOW")]
    pub prefill_passes: Option<crate::common::PrefillPasses>,
    #[command(flatten)]
    pub eviction: EvictionArgs,
    /// With --json: the N most likely tokens and their log-probabilities at every step.
    #[arg(long, default_value_t = 0)]
    pub logprobs: usize,
    /// Print cache statistics at the end (prompt tokens, slots per layer, evicted, KV bytes).
    #[arg(long)]
    pub stats: bool,
    /// Print one JSON document (text, ids, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateArgs) -> CliResult {
    let device = args.model.device.clone();
    with_backend!(&device, run_on(&args))
}

fn prompt_text(args: &GenerateArgs) -> CliResult<String> {
    let text = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => read_text(f)?,
        (None, None) => return Err(CliError("give a prompt with --prompt or --prompt-file".into())),
    };
    if text.trim().is_empty() {
        return Err(CliError("the prompt is empty".into()));
    }
    Ok(text)
}

fn prompt_ids_file(path: &std::path::Path) -> CliResult<Vec<u32>> {
    let text = read_text(path)?;
    let ids: Vec<u32> = serde_json::from_str(&text)
        .map_err(|e| CliError(format!("{}: not a JSON array of token ids: {e}", path.display())))?;
    if ids.is_empty() {
        return Err(CliError(format!("{}: the prompt is empty", path.display())));
    }
    Ok(ids)
}

fn run_on<B: Backend>(device: &B::Device, args: &GenerateArgs) -> CliResult {
    args.eviction.validate()?;
    // (clap's `requires` gives way to the prompt flags' conflicts with --requests-file.)
    if args.kv_pool.is_some() && args.requests_file.is_none() {
        return Err(CliError(
            "--kv-pool needs --requests-file (one sequence holds its own cache)".into(),
        ));
    }
    if args.prefill_passes.is_some() && args.requests_file.is_none() {
        return Err(CliError(
            "--prefill-passes needs --requests-file (one sequence has no decode steps to share)".into(),
        ));
    }
    if let Some(path) = &args.requests_file {
        if args.concurrency == 0 {
            return Err(CliError("--concurrency must be ≥ 1".into()));
        }
        return crate::requests::run_on::<B>(device, args, path);
    }
    let given_ids = args.prompt_ids_file.as_deref().map(prompt_ids_file).transpose()?;
    let text = if given_ids.is_some() {
        String::new()
    } else {
        prompt_text(args)?
    };
    if args.max_new_tokens == 0 {
        return Err(CliError("--max-new-tokens must be ≥ 1".into()));
    }
    let sampling = SamplingConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    sampling.validate()?;
    let loaded = args.model.load::<B>(device)?;
    let prompt = if args.chat {
        let template = loaded
            .chat_template
            .as_ref()
            .ok_or_else(|| CliError("this model has no chat template; drop --chat".into()))?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", &text));
        template.render(&messages, true)?
    } else {
        text
    };
    // One token past the context is enough to refuse a prompt: tokenize no more.
    let ids = match given_ids {
        Some(ids) => ids,
        None => encode_prefix(&loaded.tokenizer, &prompt, loaded.model.context_length() + 1)?,
    };
    let cfg = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        chunk_size: args.chunk_size,
        sampling,
        stop_ids: loaded.tokenizer.stop_ids.clone(),
        top_logprobs: args.logprobs,
    };
    let mut cache = args.eviction.cache::<B>(
        &loaded.config,
        loaded.model.profile(),
        loaded.dtype,
        ids.len(),
        args.chunk_size,
    )?;
    let mut stream = loaded.tokenizer.stream(true);
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let out = generate(&loaded.model, cache.as_mut(), &ids, &cfg, |id| {
        if args.json {
            return ControlFlow::Continue(());
        }
        match stream.push(id) {
            Ok(Some(piece)) => {
                if let Err(e) = stdout.write_all(piece.as_bytes()).and_then(|()| stdout.flush()) {
                    write_error = Some(e);
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            }
            Ok(None) => ControlFlow::Continue(()),
            Err(e) => {
                write_error = Some(std::io::Error::other(e.to_string()));
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = write_error {
        // A closed pipe (`| head`) is the reader's choice, not an error worth a message.
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(());
        }
        return Err(CliError(format!("writing output: {e}")));
    }
    let text = loaded.tokenizer.decode(&out.ids, true)?;
    let prefill_tps = out.prompt_tokens as f64 / out.prefill.as_secs_f64().max(1e-9);
    let decode_tps = out.ids.len().saturating_sub(1) as f64 / out.decode.as_secs_f64().max(1e-9);
    if args.json {
        print_json(&json!({
            "model": loaded.name,
            "prompt_tokens": out.prompt_tokens,
            "ids": out.ids,
            "text": text,
            "stop_reason": out.stop,
            "prefill_seconds": out.prefill.as_secs_f64(),
            "decode_seconds": out.decode.as_secs_f64(),
            "prefill_tokens_per_second": prefill_tps,
            "decode_tokens_per_second": decode_tps,
            "kv_cache_bytes": cache.bytes(),
            "policy": args.eviction.policy.name(),
            "slots_per_layer": (0..loaded.config.n_layers).map(|l| cache.slots(l)).collect::<Vec<_>>(),
            // Per-head budgets: each (layer, head)'s own count (null where heads are uniform).
            "slots_per_head": (0..loaded.config.n_layers)
                .map(|l| cache.head_slots(l))
                .collect::<Option<Vec<_>>>(),
            "evicted_per_head": cache.evicted(),
            "top_logprobs": out.top_logprobs,
        }))?;
    } else {
        let _ = writeln!(stdout);
        if args.stats {
            // Heads with budgets of their own hold different counts: the range over every head.
            let slots: Vec<usize> = (0..loaded.config.n_layers)
                .flat_map(|l| cache.head_slots(l).unwrap_or_else(|| vec![cache.slots(l)]))
                .collect();
            let (lo, hi) = (
                slots.iter().min().copied().unwrap_or(0),
                slots.iter().max().copied().unwrap_or(0),
            );
            eprintln!(
                "[cache: policy {}, prompt {} tokens, slots per (layer, head) {}, evicted {} per (layer, head), KV held {} bytes ({:.2} MiB) over {} layers]",
                args.eviction.policy,
                out.prompt_tokens,
                if lo == hi { lo.to_string() } else { format!("{lo}..{hi}") },
                cache.evicted(),
                cache.bytes(),
                cache.bytes() as f64 / (1 << 20) as f64,
                loaded.config.n_layers
            );
        }
        args.model.log(&format!(
            "[{} prompt tokens, prefill {:.1} tok/s; {} new tokens, decode {:.1} tok/s; stop: {:?}; KV cache {:.1} MiB]",
            out.prompt_tokens,
            prefill_tps,
            out.ids.len(),
            decode_tps,
            out.stop,
            cache.bytes() as f64 / (1 << 20) as f64
        ));
    }
    Ok(())
}
