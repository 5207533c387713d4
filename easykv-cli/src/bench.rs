//! `easykv bench`: prefill and decode throughput.

use std::time::{Duration, Instant};

use burn::prelude::*;
use burn::tensor::TensorData;
use clap::Args;
use easykv_core::KvCache;
use easykv_models::{
    build_cache, generate, prefill, CausalLm, Engine, EngineConfig, Event, GenerateConfig, Logits, ModelConfig,
    RandomModel, Request, SamplingConfig, WeightDType,
};
use serde_json::json;

use crate::backend::with_backend;
use crate::common::{add_latencies, outln, print_json, CliError, CliResult, EvictionArgs, ModelArgs};

/// Public-domain text (the opening of Melville's *Moby-Dick*) repeated to build bench prompts.
pub const BENCH_TEXT: &str = "Call me Ishmael. Some years ago—never mind how long precisely—having little or no money in my purse, and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of the world. It is a way I have of driving off the spleen and regulating the circulation. Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; whenever I find myself involuntarily pausing before coffin warehouses, and bringing up the rear of every funeral I meet; and especially whenever my hypos get such an upper hand of me, that it requires a strong moral principle to prevent me from deliberately stepping into the street, and methodically knocking people's hats off—then, I account it high time to get to sea as soon as I can. ";

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub target: Option<BenchTarget>,
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
    /// Instead of --model, a model of this shape with seeded random weights drawn on the
    /// device: llama2-7b, llama3-8b, qwen2.5-1.5b or smollm2 (speed and memory only; the prompt
    /// is random token ids).
    #[arg(long, value_name = "SHAPE")]
    pub random_weights: Option<String>,
    /// Also time the full cache, run by run alternating with the policy, and report the
    /// policy's decode overhead. Interleaving cancels the drift of a shared machine that
    /// separate commands would measure.
    #[arg(long)]
    pub against_full: bool,
    /// Serve this many requests through the batched engine (each `--prompt-tokens` long, each
    /// generating `--new-tokens`, prompts rotated so they differ; all queued at the start)
    /// and report throughput, latency and memory instead of one generation's speed.
    #[arg(long, value_name = "M")]
    pub requests: Option<usize>,
    /// With `--requests`: sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// With `--requests`: bytes of KV cache all running sequences may hold together (64MiB,
    /// 40GiB); default: half the memory available on the CPU, unlimited on a GPU.
    #[arg(long, value_name = "SIZE")]
    pub kv_pool: Option<String>,
    /// With `--requests`: requests arrive at this mean rate per second (a Poisson process with
    /// a fixed seed) instead of all at the start; time to first token counts from arrival.
    #[arg(long, value_name = "PER_SECOND")]
    pub arrival_rate: Option<f64>,
    /// With `--requests`: how prompts share passes with decode steps: mixed (a chunk of each prompt rides in the
    /// decode step's pass, one product for both) or separate (passes of their own after it);
    /// default: mixed on GPUs, separate on the CPU.
    #[arg(long, value_enum, value_name = "HOW")]
    pub prefill_passes: Option<crate::common::PrefillPasses>,
    /// With `--requests`: untimed requests (each the prompt's length, 2 new tokens) run
    /// first so kernels are compiled and buffers allocated before the clock starts.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long)]
    pub json: bool,
}

/// The model under test and its prompt.
struct Subject<B: Backend> {
    model: Box<dyn CausalLm<B>>,
    config: ModelConfig,
    dtype: WeightDType,
    name: String,
    prompt: Vec<u32>,
}

impl<B: Backend> Subject<B> {
    /// `--random-weights` (random prompt ids) or `--model` (a prompt of English text).
    fn load(args: &BenchArgs, device: &B::Device) -> CliResult<Self> {
        // The engine's batches run best in f32 on the CPU; one sequence in native.
        let dtype = match args.requests {
            Some(_) => args.model.batch_dtype(),
            None => args.model.dtype(),
        };
        if let Some(shape) = &args.random_weights {
            let shape = RandomModel::by_name(shape)?;
            let config = shape.config();
            let mut model: Box<dyn CausalLm<B>> = Box::new(shape.build::<B>(dtype, 0, device)?);
            args.model.kernels.apply(model.as_mut())?;
            // Ids from a fixed LCG: the same prompt every run, spread over the vocabulary.
            let prompt = (0..args.prompt_tokens as u64)
                .map(|i| ((i * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407) >> 33) % config.vocab_size as u64)
                .map(|id| id as u32)
                .collect();
            args.model.log(&format!(
                "random weights: {} ({:.2} B parameters, {dtype:?})",
                shape.description,
                shape.parameters() as f64 / 1e9
            ));
            return Ok(Self {
                model,
                config,
                dtype,
                name: format!("{} (random weights)", shape.name),
                prompt,
            });
        }
        let loaded = match args.requests {
            Some(_) => args.model.load_for_batches::<B>(device)?,
            None => args.model.load::<B>(device)?,
        };
        let unit = loaded.tokenizer.encode(BENCH_TEXT)?;
        let prompt = unit.iter().copied().cycle().take(args.prompt_tokens).collect();
        Ok(Self {
            model: loaded.model,
            config: loaded.config,
            dtype: loaded.dtype,
            name: loaded.name,
            prompt,
        })
    }
}

impl<B: Backend> Subject<B> {
    /// A fresh cache of the policy the flags name, for this subject's prompt.
    fn policy_cache(&self, args: &BenchArgs) -> CliResult<Box<dyn KvCache<B>>> {
        args.eviction.cache::<B>(
            &self.config,
            self.model.profile(),
            self.dtype,
            self.prompt.len(),
            args.chunk_size,
        )
    }
}

/// Throughput of one timed generation.
#[derive(Debug, Clone, Copy, Default)]
struct Speed {
    prefill: f64,
    decode: f64,
    kv_bytes: u64,
}

/// What else `bench` measures.
#[derive(clap::Subcommand, Debug)]
pub enum BenchTarget {
    /// Load-test a running `easykv serve`: N streaming clients for T seconds; tokens/s, time
    /// to first token, inter-token latency, errors and the server's memory over time.
    Serve(crate::bench_serve::LoadArgs),
}

pub fn run(args: BenchArgs) -> CliResult {
    if let Some(BenchTarget::Serve(load)) = &args.target {
        return crate::bench_serve::run(load);
    }
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
    if args.requests == Some(0) || args.concurrency == 0 {
        return Err(CliError("--requests and --concurrency must be ≥ 1".into()));
    }
    if args.requests.is_some_and(|r| r > MAX_REQUESTS) {
        return Err(CliError(format!("--requests: at most {MAX_REQUESTS}")));
    }
    if args.arrival_rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(CliError("--arrival-rate must be a positive number".into()));
    }
    if args.warmup > MAX_WARMUP {
        return Err(CliError(format!("--warmup: at most {MAX_WARMUP}")));
    }
    let pool = kv_pool(args.kv_pool.as_deref())?;
    let t = Instant::now();
    let loaded = Subject::<B>::load(args, device)?;
    let load_seconds = t.elapsed().as_secs_f64();
    if let Some(requests) = args.requests {
        return serve_requests(loaded, args, requests, pool);
    }
    let prompt = &loaded.prompt;
    let cfg = GenerateConfig {
        max_new_tokens: args.new_tokens,
        chunk_size: args.chunk_size,
        sampling: SamplingConfig::default(),
        stop_ids: Vec::new(),
        top_logprobs: 0,
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let time = || -> CliResult<Speed> {
        let mut cache = loaded.policy_cache(args)?;
        let out = generate(&loaded.model, cache.as_mut(), prompt, &cfg, |_| {
            std::ops::ControlFlow::Continue(())
        })?;
        if out.ids.len() < 2 {
            return Err(CliError(format!(
                "decoding stopped after {} token(s) ({:?}): nothing to time",
                out.ids.len(),
                out.stop
            )));
        }
        Ok(Speed {
            prefill: prompt.len() as f64 / out.prefill.as_secs_f64(),
            // The first new token comes from the prefill logits; the rest each took one step.
            decode: (out.ids.len() - 1) as f64 / out.decode.as_secs_f64(),
            kv_bytes: cache.bytes(),
        })
    };
    let mut best: Option<Speed> = None;
    for run in 0..=args.repeat {
        let speed = time()?;
        if run == 0 {
            args.model.log(&format!(
                "warm-up: prefill {:.1} tok/s, decode {:.1} tok/s",
                speed.prefill, speed.decode
            ));
            continue;
        }
        args.model.log(&format!(
            "run {run}: prefill {:.1} tok/s, decode {:.1} tok/s",
            speed.prefill, speed.decode
        ));
        let b = best.get_or_insert(speed);
        *b = Speed {
            prefill: b.prefill.max(speed.prefill),
            decode: b.decode.max(speed.decode),
            kv_bytes: speed.kv_bytes,
        };
    }
    let Speed {
        prefill,
        decode,
        kv_bytes,
    } = best.unwrap_or_default();
    let versus = if args.against_full && args.eviction.policy.0.evicts {
        Some(against_full(&loaded, prompt, args)?)
    } else {
        None
    };
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
            "policy": args.eviction.policy.name(),
            "budget": args.eviction.budget,
            "mode": args.eviction.mode,
            "stride": args.eviction.stride,
            "ranking": args.eviction.ranking,
            "interleaved": versus.map(|v| json!({
                "steps": v.steps,
                "policy_decode_tokens_per_second": v.policy,
                "full_cache_decode_tokens_per_second": v.full,
                "decode_overhead_percent": v.overhead_percent(),
            })),
        }))
    } else {
        outln!("model: {}\ndevice: {} ({threads} threads)\npolicy: {} (budget {}, mode {}, stride {})\nprompt: {} tokens, chunk {}\nprefill: {prefill:.1} tokens/s\ndecode: {decode:.1} tokens/s ({} tokens)\nKV cache: {:.2} MiB\nload: {load_seconds:.2} s",
            loaded.name, args.model.device, args.eviction.policy, args.eviction.budget, args.eviction.mode, args.eviction.stride, args.prompt_tokens, args.chunk_size, args.new_tokens, kv_bytes as f64 / (1 << 20) as f64)?;
        if let Some(v) = versus {
            outln!(
                "interleaved decode ({} steps each): {} {:.1} tokens/s, full cache {:.1} tokens/s\ndecode overhead vs full cache: {:.1} %",
                v.steps,
                args.eviction.policy,
                v.policy,
                v.full,
                v.overhead_percent()
            )?;
        }
        Ok(())
    }
}

/// Decode speed of the policy and of the full cache, measured step by step in alternation.
#[derive(Debug, Clone, Copy)]
struct Versus {
    steps: usize,
    policy: f64,
    full: f64,
}

impl Versus {
    fn overhead_percent(&self) -> f64 {
        (1.0 - self.policy / self.full) * 100.0
    }
}

/// Prefills the prompt into the policy's cache and into a full cache, then decodes the same
/// greedy tokens through both, alternating step by step (and which goes first): on a shared
/// machine, load that drifts over seconds hits both alike.
fn against_full<B: Backend>(loaded: &Subject<B>, prompt: &[u32], args: &BenchArgs) -> CliResult<Versus> {
    let model = &loaded.model;
    let device = model.device();
    let mut policy = loaded.policy_cache(args)?;
    let mut full = build_cache::<B>(
        "full",
        &args.eviction.config()?,
        &loaded.config,
        model.profile(),
        loaded.dtype,
        prompt.len(),
        args.chunk_size,
    )?;
    let (mut t_policy, mut t_full, mut steps) = (Duration::ZERO, Duration::ZERO, 0);
    for _ in 0..args.repeat {
        policy.clear();
        full.clear();
        policy.reserve(prompt.len() + args.new_tokens);
        full.reserve(prompt.len() + args.new_tokens);
        let logits = prefill(model, policy.as_mut(), prompt, args.chunk_size)?;
        prefill(model, full.as_mut(), prompt, args.chunk_size)?;
        let mut next = argmax(&logits);
        for step in 1..args.new_tokens {
            let token = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![next as i32], [1, 1]), &device);
            let one = |cache: &mut dyn KvCache<B>| -> CliResult<(Vec<f32>, Duration)> {
                let t = Instant::now();
                let logits = model.forward(token.clone(), cache, Logits::Last)?;
                let row: Vec<f32> = logits
                    .into_data()
                    .convert::<f32>()
                    .into_vec()
                    .map_err(|e| CliError(format!("reading logits: {e:?}")))?;
                Ok((row, t.elapsed()))
            };
            let (row, dt) = if step % 2 == 0 {
                let (row, dt) = one(policy.as_mut())?;
                t_full += one(full.as_mut())?.1;
                (row, dt)
            } else {
                t_full += one(full.as_mut())?.1;
                one(policy.as_mut())?
            };
            t_policy += dt;
            steps += 1;
            next = argmax(&row);
        }
    }
    Ok(Versus {
        steps,
        policy: steps as f64 / t_policy.as_secs_f64(),
        full: steps as f64 / t_full.as_secs_f64(),
    })
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

/// The most requests one `bench --requests` run takes (its bookkeeping is sized by the count).
const MAX_REQUESTS: usize = 1 << 16;

/// The most warm-up requests.
const MAX_WARMUP: usize = 64;

/// `--kv-pool` in bytes, `None` when not given.
pub fn kv_pool(size: Option<&str>) -> CliResult<Option<u64>> {
    match size {
        None => Ok(None),
        Some(size) => match size.parse::<easykv_core::Budget>()? {
            easykv_core::Budget::Bytes(b) if b > 0 => Ok(Some(b)),
            _ => Err(CliError(format!("--kv-pool '{size}': give a size (64MiB, 40GiB)"))),
        },
    }
}

/// The pool for an engine over `model`: `--kv-pool`, or by default half the memory available
/// where caches live in host memory, and no limit on a GPU.
pub fn pool_bytes<B: Backend>(given: Option<u64>, model: &dyn CausalLm<B>) -> u64 {
    given.unwrap_or_else(|| match model.profile().host_resident() {
        true => easykv_models::default_host_pool_bytes().unwrap_or(u64::MAX / 2),
        false => u64::MAX / 2,
    })
}

/// Seconds after the start at which each of `n` requests arrives: all at once, or a Poisson
/// process of `rate` per second (seeded, so runs compare).
fn arrivals(n: usize, rate: Option<f64>) -> Vec<f64> {
    let Some(rate) = rate else {
        return vec![0.0; n];
    };
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x5eed);
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            let at = t;
            // Exponential gaps: −ln(U)/rate, U in (0, 1].
            t += -(1.0f64 - rand::Rng::random::<f64>(&mut rng)).ln() / rate;
            at
        })
        .collect()
}

fn serve_requests<B: Backend>(loaded: Subject<B>, args: &BenchArgs, requests: usize, pool: Option<u64>) -> CliResult {
    let Subject {
        model,
        config,
        dtype,
        name,
        prompt,
    } = loaded;
    let pool = pool_bytes(pool, model.as_ref());
    let mut engine = Engine::new(
        model,
        config,
        dtype,
        EngineConfig {
            pool_bytes: pool,
            max_running: args.concurrency,
            chunk_size: args.chunk_size,
            max_queued: None,
            mixed_passes: crate::common::PrefillPasses::mixed(args.prefill_passes),
        },
    )?;
    let eviction = args.eviction.config()?;
    let request = |i: usize, new_tokens: usize| {
        // Each request's prompt starts elsewhere in the text (or the random ids).
        let shift = (i * 7) % prompt.len().max(1);
        Request {
            prompt: prompt[shift..].iter().chain(&prompt[..shift]).copied().collect(),
            max_new_tokens: new_tokens,
            policy: args.eviction.policy.name().to_string(),
            eviction: eviction.clone(),
            sampling: SamplingConfig::default(),
            stop_ids: Vec::new(),
            logprobs: None,
        }
    };
    for i in 0..args.warmup.min(requests) {
        engine.submit(request(requests + i, 2))?;
    }
    engine.run(&mut |_| {})?;
    let at = arrivals(requests, args.arrival_rate);
    let start = Instant::now();
    let mut first: Vec<Option<f64>> = vec![None; requests];
    let mut last: Vec<f64> = vec![0.0; requests];
    let mut gaps: Vec<f64> = Vec::new();
    let mut ids: Vec<u64> = Vec::with_capacity(requests);
    let (mut tokens, mut peak_kv, mut peak_reserved, mut in_flight) = (0usize, 0u64, 0u64, 0usize);
    while ids.len() < requests || !engine.is_idle() {
        let now = start.elapsed().as_secs_f64();
        while ids.len() < requests && at[ids.len()] <= now {
            ids.push(engine.submit(request(ids.len(), args.new_tokens))?);
        }
        if engine.is_idle() {
            // Nothing to do before the next arrival.
            if let Some(&next) = at.get(ids.len()) {
                std::thread::sleep(Duration::from_secs_f64((next - now).max(0.0)));
            }
            continue;
        }
        for e in engine.step()? {
            if let Event::Token { id, .. } = e {
                // Ids are handed out in order from the first timed request on.
                let i = (id - ids[0]) as usize;
                let now = start.elapsed().as_secs_f64();
                match first[i] {
                    None => first[i] = Some(now - at[i]),
                    Some(_) => gaps.push(now - last[i]),
                }
                last[i] = now;
                tokens += 1;
            }
        }
        let s = engine.stats();
        peak_kv = peak_kv.max(s.kv_bytes);
        peak_reserved = peak_reserved.max(s.reserved_bytes);
        in_flight = in_flight.max(s.running);
    }
    let wall = start.elapsed().as_secs_f64();
    let mut ttft: Vec<f64> = first.into_iter().flatten().collect();
    let mut report = json!({
        "model": name,
        "device": args.model.device,
        "policy": args.eviction.policy.name(),
        "budget": args.eviction.budget,
        "requests": requests,
        "concurrency": args.concurrency,
        "arrival_rate": args.arrival_rate,
        "kv_pool_bytes": pool,
        // null: the engine's default (mixed on GPUs, separate on the CPU).
        "prefill_passes": args.prefill_passes.map(|h| format!("{h:?}").to_lowercase()),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "output_tokens": tokens,
        "seconds": wall,
        "output_tokens_per_second": tokens as f64 / wall,
        "peak_kv_bytes": peak_kv,
        "peak_reserved_bytes": peak_reserved,
        "max_in_flight": in_flight,
    });
    add_latencies(&mut report, &mut ttft, &mut gaps);
    if args.json {
        return print_json(&report);
    }
    let f = |k: &str| report[k].as_f64().unwrap_or(0.0);
    outln!(
        "model: {name}\npolicy: {} (budget {})\nrequests: {requests} × ({} prompt + {} new tokens), {} at a time\n\
         output: {tokens} tokens in {wall:.2} s = {:.1} tokens/s\ntime to first token: p50 {:.0} ms, p99 {:.0} ms\n\
         inter-token latency: p50 {:.1} ms, p99 {:.1} ms\npeak KV held: {:.2} MiB (set aside {:.2} MiB), in flight at most {in_flight}",
        args.eviction.policy,
        args.eviction.budget,
        args.prompt_tokens,
        args.new_tokens,
        args.concurrency,
        f("output_tokens_per_second"),
        f("ttft_ms_p50"),
        f("ttft_ms_p99"),
        f("itl_ms_p50"),
        f("itl_ms_p99"),
        peak_kv as f64 / (1 << 20) as f64,
        peak_reserved as f64 / (1 << 20) as f64,
    )?;
    Ok(())
}
