//! `easykv bench serve`: a load test of a running `easykv serve` — N clients streaming
//! completions back to back for T seconds on loopback, measuring what their users see (time to
//! first token, inter-token latency, tokens/s, errors) and the server's memory over time.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::bench::BENCH_TEXT;
use crate::common::{add_latencies, outln, print_json, CliError, CliResult};

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// The server's address.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Clients sending requests at once, each one after the other.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds to run (requests in flight at the end are waited for).
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Words of English text per prompt (about 1.3 tokens each).
    #[arg(long, default_value_t = 96)]
    pub prompt_words: usize,
    /// Instead of text, prompts of this many token ids drawn over the vocabulary (what a
    /// server of `--random-weights` takes; the vocabulary's size comes from /v1/models).
    #[arg(long, conflicts_with = "prompt_words")]
    pub prompt_tokens: Option<usize>,
    /// max_tokens of every request (an answer may end earlier, at a stop token).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u64,
    /// Seconds at the start left out of the memory figures (allocations settle).
    #[arg(long, default_value_t = 10.0)]
    pub warmup: f64,
    /// The model name sent (default: the first of /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    /// `kv_policy` and `kv_budget` sent with every request.
    #[arg(long)]
    pub kv_policy: Option<String>,
    #[arg(long)]
    pub kv_budget: Option<String>,
    #[arg(long)]
    pub api_key: Option<String>,
    /// Seconds to wait for the server to answer at the start.
    #[arg(long, default_value_t = 120.0)]
    pub wait: f64,
    #[arg(long)]
    pub json: bool,
}

/// The most clients (one thread each).
const MAX_CLIENTS: usize = 4096;

/// What one request saw.
#[derive(Default)]
struct Outcome {
    ok: bool,
    ttft: Option<f64>,
    gaps: Vec<f64>,
    tokens: u64,
}

pub fn run(args: &LoadArgs) -> CliResult {
    if args.clients == 0 || args.clients > MAX_CLIENTS {
        return Err(CliError(format!("--clients must be 1 to {MAX_CLIENTS}")));
    }
    if !(args.duration.is_finite() && args.duration > 0.0 && args.duration <= 86_400.0) {
        return Err(CliError("--duration must be a number of seconds in (0, 86400]".into()));
    }
    if !(args.wait.is_finite() && args.wait >= 0.0) {
        return Err(CliError("--wait must be a number of seconds ≥ 0".into()));
    }
    if args.prompt_words == 0 || args.prompt_words > 100_000 || args.max_tokens == 0 {
        return Err(CliError(
            "--prompt-words (≤ 100000) and --max-tokens must be ≥ 1".into(),
        ));
    }
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(600)).build();
    let url = args.url.trim_end_matches('/').to_string();
    let get = |path: &str| -> CliResult<String> {
        let mut r = agent.get(&format!("{url}{path}"));
        if let Some(k) = &args.api_key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        r.call()
            .map_err(|e| CliError(e.to_string()))?
            .into_string()
            .map_err(|e| CliError(e.to_string()))
    };
    // A server just started may still be loading its model: wait for it a while.
    let waited = Instant::now();
    let models = loop {
        match get("/v1/models") {
            Ok(text) => break text,
            Err(e) if waited.elapsed() > Duration::from_secs_f64(args.wait) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    };
    let models: Value = serde_json::from_str(&models).map_err(|e| CliError(e.to_string()))?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => models["data"][0]["id"]
            .as_str()
            .ok_or_else(|| CliError(format!("{url}/v1/models lists no model")))?
            .to_string(),
    };
    let vocab = models["data"][0]["vocab_size"].as_u64().unwrap_or(32_000).max(1);
    if args.prompt_tokens.is_some_and(|n| n == 0 || n > 1 << 20) {
        return Err(CliError("--prompt-tokens must be 1 to 1048576".into()));
    }
    let words: Vec<&str> = BENCH_TEXT.split_whitespace().collect();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.duration);
    let stop = AtomicBool::new(false);
    let (outcomes, rss) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            // The server's resident memory, once a second, from its /metrics.
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(v) = get("/metrics")
                    .ok()
                    .and_then(|t| metric(&t, "easykv_process_resident_memory_bytes"))
                {
                    samples.push((start.elapsed().as_secs_f64(), v));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            samples
        });
        let clients: Vec<_> = (0..args.clients)
            .map(|c| {
                let (agent, url, model, words) = (&agent, &url, &model, &words);
                s.spawn(move || {
                    let mut outcomes = Vec::new();
                    let mut i = 0;
                    while Instant::now() < deadline {
                        // Each request's prompt starts elsewhere in the text (or the ids).
                        let at = c * 31 + i * 7;
                        let prompt = match args.prompt_tokens {
                            Some(n) => json!((0..n as u64)
                                .map(
                                    |k| ((at as u64 + k) * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407) >> 33
                                )
                                .map(|x| x % vocab)
                                .collect::<Vec<_>>()),
                            None => {
                                let text: Vec<&str> = words
                                    .iter()
                                    .cycle()
                                    .skip(at % words.len())
                                    .take(args.prompt_words)
                                    .copied()
                                    .collect();
                                json!(text.join(" "))
                            }
                        };
                        outcomes.push(one_request(agent, url, model, prompt, args));
                        i += 1;
                    }
                    outcomes
                })
            })
            .collect();
        let outcomes: Vec<Outcome> = clients.into_iter().flat_map(|t| t.join().unwrap_or_default()).collect();
        stop.store(true, Ordering::Relaxed);
        (outcomes, sampler.join().unwrap_or_default())
    });
    report(args, &model, start.elapsed().as_secs_f64(), &outcomes, &rss)
}

/// One streamed completion, timed.
fn one_request(agent: &ureq::Agent, url: &str, model: &str, prompt: Value, args: &LoadArgs) -> Outcome {
    let mut body = json!({"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                          "stream": true, "stream_options": {"include_usage": true}});
    if let Some(p) = &args.kv_policy {
        body["kv_policy"] = json!(p);
    }
    if let Some(b) = &args.kv_budget {
        body["kv_budget"] = json!(b);
    }
    let mut req = agent.post(&format!("{url}/v1/completions"));
    if let Some(k) = &args.api_key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let sent = Instant::now();
    let Ok(response) = req.send_string(&body.to_string()) else {
        return Outcome::default();
    };
    let mut out = Outcome::default();
    let mut last = sent;
    for line in BufReader::new(response.into_reader()).lines() {
        let Ok(line) = line else {
            return Outcome::default();
        };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            out.ok = true;
            break;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            return Outcome::default();
        };
        if chunk.get("error").is_some() {
            return Outcome::default();
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            out.tokens = n;
        }
        if chunk["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
            let now = Instant::now();
            match out.ttft {
                None => out.ttft = Some((now - sent).as_secs_f64()),
                Some(_) => out.gaps.push((now - last).as_secs_f64()),
            }
            last = now;
        }
    }
    out
}

/// A sample's value in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

fn report(args: &LoadArgs, model: &str, wall: f64, outcomes: &[Outcome], rss: &[(f64, f64)]) -> CliResult {
    let done: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    let errors = outcomes.len() - done.len();
    let tokens: u64 = done.iter().map(|o| o.tokens).sum();
    let mut ttft: Vec<f64> = done.iter().filter_map(|o| o.ttft).collect();
    let mut gaps: Vec<f64> = done.iter().flat_map(|o| o.gaps.iter().copied()).collect();
    let settled: Vec<f64> = rss.iter().filter(|(t, _)| *t >= args.warmup).map(|s| s.1).collect();
    let mib = |b: f64| b / (1 << 20) as f64;
    let rss_after_warmup = settled.first().copied().unwrap_or(0.0);
    let rss_max = settled.iter().copied().fold(0.0, f64::max);
    let rss_last = settled.last().copied().unwrap_or(0.0);
    let mut report = json!({
        "url": args.url,
        "model": model,
        "clients": args.clients,
        "seconds": wall,
        "requests": done.len(),
        "errors": errors,
        "requests_per_second": done.len() as f64 / wall,
        "output_tokens": tokens,
        "output_tokens_per_second": tokens as f64 / wall,
        "rss_mib_after_warmup": mib(rss_after_warmup),
        "rss_mib_max": mib(rss_max),
        "rss_mib_last": mib(rss_last),
        "rss_mib_samples": rss.iter().map(|(t, b)| json!([(*t * 10.0).round() / 10.0, (mib(*b) * 10.0).round() / 10.0])).collect::<Vec<_>>(),
    });
    add_latencies(&mut report, &mut ttft, &mut gaps);
    if args.json {
        return print_json(&report);
    }
    let f = |k: &str| report[k].as_f64().unwrap_or(0.0);
    outln!(
        "server: {} ({model}), {} clients for {wall:.1} s\nrequests: {} ({:.2}/s), errors: {errors}\n\
         output: {tokens} tokens = {:.1} tokens/s\ntime to first token: p50 {:.0} ms, p99 {:.0} ms\n\
         inter-token latency: p50 {:.1} ms, p99 {:.1} ms\nserver RSS: {:.0} MiB after warm-up, max {:.0}, last {:.0}",
        args.url,
        args.clients,
        done.len(),
        f("requests_per_second"),
        f("output_tokens_per_second"),
        f("ttft_ms_p50"),
        f("ttft_ms_p99"),
        f("itl_ms_p50"),
        f("itl_ms_p99"),
        mib(rss_after_warmup),
        mib(rss_max),
        mib(rss_last),
    )?;
    Ok(())
}
