//! `easykv bench`: prefill and decode throughput.

use std::time::Instant;

use burn::prelude::Backend;
use clap::Args;
use easykv_models::{generate, GenerateConfig, SamplingConfig};
use serde_json::json;

use crate::backend::with_backend;
use crate::common::{print_json, CliError, CliResult, EvictionArgs, ModelArgs};

/// Public-domain text (the opening of Melville's *Moby-Dick*) repeated to build bench prompts.
const BENCH_TEXT: &str = "Call me Ishmael. Some years ago—never mind how long precisely—having little or no money in my purse, and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of the world. It is a way I have of driving off the spleen and regulating the circulation. Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; whenever I find myself involuntarily pausing before coffin warehouses, and bringing up the rear of every funeral I meet; and especially whenever my hypos get such an upper hand of me, that it requires a strong moral principle to prevent me from deliberately stepping into the street, and methodically knocking people's hats off—then, I account it high time to get to sea as soon as I can. ";

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens to decode (stop tokens are ignored so every run decodes this many).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Prompt tokens per prefill pass.
    #[arg(long, default_value_t = 512)]
    pub chunk_size: usize,
    /// Timed repetitions (after one warm-up); the best is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    #[command(flatten)]
    pub eviction: EvictionArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> CliResult {
    let device = args.model.device.clone();
    with_backend!(&device, run_on(&args))
}

fn run_on<B: Backend>(device: &B::Device, args: &BenchArgs) -> CliResult {
    if args.prompt_tokens == 0 || args.new_tokens == 0 || args.repeat == 0 {
        return Err(CliError(
            "--prompt-tokens, --new-tokens and --repeat must be ≥ 1".into(),
        ));
    }
    args.eviction.validate()?;
    let t = Instant::now();
    let loaded = args.model.load::<B>(device)?;
    let load_seconds = t.elapsed().as_secs_f64();
    let unit = loaded.tokenizer.encode(BENCH_TEXT)?;
    let prompt: Vec<u32> = unit.iter().copied().cycle().take(args.prompt_tokens).collect();
    let cfg = GenerateConfig {
        max_new_tokens: args.new_tokens,
        chunk_size: args.chunk_size,
        sampling: SamplingConfig::default(),
        stop_ids: Vec::new(),
        top_logprobs: 0,
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut best: Option<(f64, f64, u64)> = None;
    for run in 0..=args.repeat {
        let mut cache = args
            .eviction
            .cache::<B>(&loaded.config, prompt.len(), args.chunk_size)?;
        let out = generate(&loaded.model, cache.as_mut(), &prompt, &cfg, |_| {
            std::ops::ControlFlow::Continue(())
        })?;
        let prefill = prompt.len() as f64 / out.prefill.as_secs_f64();
        // The first new token comes from the prefill logits; the rest each took one step.
        let decode = (out.ids.len() - 1) as f64 / out.decode.as_secs_f64();
        if run == 0 {
            args.model.log(&format!(
                "warm-up: prefill {prefill:.1} tok/s, decode {decode:.1} tok/s"
            ));
            continue;
        }
        args.model.log(&format!(
            "run {run}: prefill {prefill:.1} tok/s, decode {decode:.1} tok/s"
        ));
        let b = best.get_or_insert((prefill, decode, cache.bytes()));
        *b = (b.0.max(prefill), b.1.max(decode), cache.bytes());
    }
    let (prefill, decode, kv_bytes) = best.unwrap_or_default();
    if args.json {
        print_json(&json!({
            "model": loaded.name,
            "device": args.model.device,
            "threads": threads,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "chunk_size": args.chunk_size,
            "load_seconds": load_seconds,
            "prefill_tokens_per_second": prefill,
            "decode_tokens_per_second": decode,
            "kv_cache_bytes": kv_bytes,
            "policy": args.eviction.policy,
            "budget": args.eviction.budget,
            "mode": args.eviction.mode,
        }))
    } else {
        println!("model: {}\ndevice: {} ({threads} threads)\npolicy: {} (budget {}, mode {}, stride {})\nprompt: {} tokens, chunk {}\nprefill: {prefill:.1} tokens/s\ndecode: {decode:.1} tokens/s ({} tokens)\nKV cache: {:.2} MiB\nload: {load_seconds:.2} s",
            loaded.name, args.model.device, args.eviction.policy, args.eviction.budget, args.eviction.mode, args.eviction.stride, args.prompt_tokens, args.chunk_size, args.new_tokens, kv_bytes as f64 / (1 << 20) as f64);
        Ok(())
    }
}
