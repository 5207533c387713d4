//! Flags and steps shared by the subcommands.

use std::time::Instant;

use burn::prelude::Backend;
use clap::builder::PossibleValue;
use clap::{Args, ValueEnum};
use easykv_core::{Budget, EvictionConfig, KvCache, Mode, Ranking};
use easykv_models::{build_cache, fetch, BackendProfile, CausalLm, KernelSet, LoadedModel, ModelConfig, WeightDType};
use easykv_policies::{builtin_policies, PolicyInfo};

/// The error every subcommand returns: printed as one line, exit code 2.
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<easykv_models::Error> for CliError {
    fn from(e: easykv_models::Error) -> Self {
        CliError(e.to_string())
    }
}

impl From<easykv_core::Error> for CliError {
    fn from(e: easykv_core::Error) -> Self {
        CliError(e.to_string())
    }
}

pub type CliResult<T = ()> = Result<T, CliError>;

/// Which model, and where it runs.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A known model name (smollm2, qwen2.5-coder-1.5b), a .gguf file, or a Hugging Face model
    /// directory (config.json, safetensors, tokenizer.json).
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Where to run: cpu, or cuda[:N] / cuda-fused[:N] / wgpu[:N] in builds with those features.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Storage precision of weight matrices and the KV cache: f32 (exact), f16 or bf16 (half
    /// the memory and memory traffic), native (CPU: a GGUF file's quantized matrices kept in
    /// their blocks — 4–5 bits per weight in memory — and multiplied with f32 activations, each
    /// block widened in registers: the f32 result up to rounding), q16 (as native, activations
    /// quantized to 16 bits for integer dots on CPUs with AVX-VNNI or AVX-512 VNNI: native's
    /// greedy tokens at about q8's decode speed; native's kernels elsewhere) or q8 (activations
    /// quantized to 8 bits, llama.cpp's way: the fastest prefill, slightly different results;
    /// a decode step's K-quant products take q16's kernel). With native, q16 and q8 the KV
    /// cache is f32. Norms and softmax run in f32, and so does the residual stream on the CPU
    /// (on GPUs it is half precision too). Default: q16 on the CPU for one sequence at a time
    /// (generate, score, eval, bench), f32 for batches (serve, --requests-file, bench
    /// --requests: f32's products batch faster) and on GPUs.
    #[arg(long)]
    pub dtype: Option<WeightDType>,
    /// Quiet: no progress or statistics on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub kernels: KernelArgs,
}

/// Which GPU kernels run, and their launch shapes: for comparisons on one build (GPU builds;
/// elsewhere no kernel runs).
#[derive(Args, Debug, Clone)]
pub struct KernelArgs {
    /// GPU kernels allowed to run: all, none, a list (gemv,softmax) or all but a list
    /// (-gemv,-softmax). Names: matmul, rows, gather, observe, rms_norm, softmax, swiglu,
    /// split_rope, gemv, attention, rank.
    #[arg(long, default_value = "all", value_parser = parse_kernels)]
    pub kernels: KernelSet,
    /// GEMV launch shape ROWS,PLANE,NORM: output rows per cube (1–8), plane reduction (0/1),
    /// where the RMS norm runs (0 separate, 1 staged, 2 inline). Empty fields keep the default.
    #[arg(long, value_name = "ROWS,PLANE,NORM")]
    pub gemv: Option<String>,
    /// Few-row product launch shape PLANES,UNROLL,COL_BLOCKS,PLANES_PER_CUBE,MAX_OUT,STAGED
    /// (STAGED 1: weights staged in shared memory through whole-line loads).
    #[arg(long, value_name = "PLANES,UNROLL,COLS,PER_CUBE,MAX_OUT,STAGED")]
    pub rows: Option<String>,
}

fn parse_kernels(s: &str) -> Result<KernelSet, String> {
    s.parse()
}

impl KernelArgs {
    /// `base` with these settings applied.
    pub fn profile(&self, base: BackendProfile) -> CliResult<BackendProfile> {
        let mut tuning = base.tuning;
        if let Some(spec) = &self.gemv {
            tuning = tuning.with_gemv(spec).map_err(CliError)?;
        }
        if let Some(spec) = &self.rows {
            tuning = tuning.with_rows(spec).map_err(CliError)?;
        }
        Ok(BackendProfile {
            kernels: self.kernels,
            tuning,
            ..base
        })
    }

    /// Applies these settings to `model`'s backend profile.
    pub fn apply<B: Backend>(&self, model: &mut dyn CausalLm<B>) -> CliResult {
        let profile = self.profile(*model.profile())?;
        model.set_profile(profile);
        Ok(())
    }
}

impl ModelArgs {
    pub fn log(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }

    /// `--dtype`, else `cpu_default` on the CPU and f32 on other devices.
    pub fn dtype_or(&self, cpu_default: WeightDType) -> WeightDType {
        self.dtype.unwrap_or(match self.device.as_str() {
            "cpu" => cpu_default,
            _ => WeightDType::F32,
        })
    }

    /// The precision for one sequence at a time: q16 on the CPU (faster than f32 there, the
    /// same greedy tokens on the reference prompts, a fraction of the memory).
    pub fn dtype(&self) -> WeightDType {
        self.dtype_or(WeightDType::Q16)
    }

    /// The precision for batches of sequences: f32 on the CPU, whose products batch faster.
    pub fn batch_dtype(&self) -> WeightDType {
        self.dtype_or(WeightDType::F32)
    }

    /// Resolves the model (fetching a known one on first use) and loads it onto `device` in
    /// [`dtype`](Self::dtype).
    pub fn load<B: Backend>(&self, device: &B::Device) -> CliResult<LoadedModel<B>> {
        self.load_as(device, self.dtype())
    }

    /// [`load`](Self::load) for batches ([`batch_dtype`](Self::batch_dtype)).
    pub fn load_for_batches<B: Backend>(&self, device: &B::Device) -> CliResult<LoadedModel<B>> {
        self.load_as(device, self.batch_dtype())
    }

    fn load_as<B: Backend>(&self, device: &B::Device, dtype: WeightDType) -> CliResult<LoadedModel<B>> {
        let quiet = self.quiet;
        let path = fetch::resolve_model(&self.model, &mut |m| {
            if !quiet {
                eprintln!("{m}");
            }
        })?;
        let t = Instant::now();
        let mut loaded = LoadedModel::open(&path, dtype, device)?;
        self.kernels.apply(loaded.model.as_mut())?;
        self.log(&format!(
            "loaded {} ({} layers, {} KV heads × {}) in {:.2}s",
            loaded.name,
            loaded.config.n_layers,
            loaded.config.n_kv_heads,
            loaded.config.head_dim,
            t.elapsed().as_secs_f64()
        ));
        Ok(loaded)
    }
}

/// Adds time to first token and inter-token latency (seconds) to `report` as p50/p99 fields in ms.
pub fn add_latencies(report: &mut serde_json::Value, ttft: &mut [f64], gaps: &mut [f64]) {
    let pct = |v: &mut [f64], q: f64| -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
            * 1e3
    };
    [
        ("ttft_ms_p50", pct(ttft, 0.5)),
        ("ttft_ms_p99", pct(ttft, 0.99)),
        ("itl_ms_p50", pct(gaps, 0.5)),
        ("itl_ms_p99", pct(gaps, 0.99)),
    ]
    .into_iter()
    .for_each(|(k, v)| report[k] = serde_json::json!(v));
}

/// The text of a panic (its first line) and where it happened, for a one-line error.
pub fn panic_text(info: &std::panic::PanicHookInfo<'_>) -> String {
    let text = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown failure".into());
    text.lines().next().unwrap_or_default().to_string()
}

/// `println!` that returns an error instead of panicking (see [`write_line`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::common::write_line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Writes JSON to stdout, one document.
pub fn print_json(value: &serde_json::Value) -> CliResult {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError(e.to_string()))?;
    outln!("{text}")
}

/// The most bytes read from a text file (a prompt, a text to score): beyond any context, and
/// the end of reading an endless file (`/dev/urandom`).
pub const MAX_TEXT_BYTES: u64 = 64 << 20;

/// Bytes one token spans at most in any text a tokenizer is given here (real text averages 3–5).
const MAX_BYTES_PER_TOKEN: usize = 64;

/// A text file's contents, read up to [`MAX_TEXT_BYTES`].
pub fn read_text(path: &std::path::Path) -> CliResult<String> {
    use std::io::Read;
    let name = path.display();
    let file = std::fs::File::open(path).map_err(|e| CliError(format!("{name}: {e}")))?;
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        return Err(CliError(format!("{name} is a directory")));
    }
    let mut bytes = Vec::new();
    file.take(MAX_TEXT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| CliError(format!("{name}: {e}")))?;
    if bytes.len() as u64 > MAX_TEXT_BYTES {
        return Err(CliError(format!("{name} is larger than {} MiB", MAX_TEXT_BYTES >> 20)));
    }
    String::from_utf8(bytes).map_err(|e| CliError(format!("{name} is not UTF-8 text ({e})")))
}

/// The first `max_tokens` tokens of `text` (fewer if it is shorter), tokenizing only a prefix
/// long enough for them: a long file costs no more than its first tokens.
pub fn encode_prefix(tokenizer: &easykv_models::TextTokenizer, text: &str, max_tokens: usize) -> CliResult<Vec<u32>> {
    let cut = max_tokens.saturating_add(1).saturating_mul(MAX_BYTES_PER_TOKEN);
    if text.len() > cut {
        let mut end = cut;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        // One token past the limit proves the cut did not change the first `max_tokens`.
        let mut ids = tokenizer.encode(&text[..end])?;
        if ids.len() > max_tokens {
            ids.truncate(max_tokens);
            return Ok(ids);
        }
    }
    let mut ids = tokenizer.encode(text)?;
    ids.truncate(max_tokens);
    Ok(ids)
}

/// Writes a line to stdout (what `outln!` expands to). A closed pipe (`| head`) is the reader's
/// choice: the process ends quietly with exit 0, as a Unix tool killed by SIGPIPE would. Any
/// other failure (a full disk) is an error, never a panic.
pub fn write_line(args: std::fmt::Arguments) -> CliResult {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(CliError(format!("writing output: {e}"))),
    }
}

/// A policy of the built-in table, by its name or an alias: clap lists the table's names and
/// summaries in `--help` and its error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyName(pub PolicyInfo);

impl PolicyName {
    pub fn name(&self) -> &'static str {
        self.0.name
    }

    /// Every evicting policy of the table (eval's default).
    pub fn evicting() -> Vec<PolicyName> {
        all_policies().iter().copied().filter(|p| p.0.evicts).collect()
    }

    /// Whether this is a score with per-head budgets (`ada-*`), which differ from the plain
    /// score only at `--mode once`'s cut.
    pub fn per_head_budgets(&self) -> bool {
        self.0.name.starts_with("ada-")
    }
}

fn all_policies() -> &'static [PolicyName] {
    static ALL: std::sync::OnceLock<Vec<PolicyName>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| builtin_policies().into_iter().map(PolicyName).collect())
}

impl ValueEnum for PolicyName {
    fn value_variants<'a>() -> &'a [Self] {
        all_policies()
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(
            PossibleValue::new(self.0.name)
                .help(self.0.summary)
                .aliases(self.0.aliases.iter().copied()),
        )
    }
}

impl std::fmt::Display for PolicyName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name)
    }
}

/// Which eviction policy, under which budget.
#[derive(Args, Debug, Clone)]
pub struct EvictionArgs {
    /// Eviction policy (full: no eviction).
    #[arg(long, default_value = "full", value_enum)]
    pub policy: PolicyName,
    /// KV budget: a ratio of the prompt (0.5), tokens (512) or bytes (64MiB).
    #[arg(long, default_value = "0.5", allow_hyphen_values = true)]
    pub budget: String,
    /// encoding (evict while prefilling), decoding (budget bounds generated tokens), auto
    /// (budget bounds prompt + generation) or once (prefill the whole prompt, then evict down
    /// to the budget once, as kvpress compresses).
    #[arg(long, default_value = "encoding")]
    pub mode: String,
    /// Prefill stride once eviction starts (tokens per chunk = slots evicted per chunk).
    #[arg(long, default_value_t = 8)]
    pub stride: usize,
    /// Attention-sink slots at the start that are never evicted.
    #[arg(long, default_value_t = 4)]
    pub sinks: usize,
    /// Share of the budget kept as a recent window during prefill.
    #[arg(long, default_value_t = 0.1)]
    pub recent_ratio: f64,
    /// Also score the attention of the prompt prefix prefilled before eviction starts.
    #[arg(long)]
    pub keep_attention: bool,
    /// Seed of the random policy.
    #[arg(long, default_value_t = 0)]
    pub policy_seed: u64,
    /// Cache keys before RoPE and re-rotate them with compact positions (StreamingLLM style).
    #[arg(long)]
    pub streaming: bool,
    /// While decoding, evict N slots every N steps instead of one per step (faster; the cache
    /// may exceed its budget by N − 1 slots). 1 reproduces EasyKV.
    #[arg(long, default_value_t = 1)]
    pub decode_stride: usize,
    /// How evictions pick the k smallest slots: auto (host on the CPU; on GPUs pairwise for
    /// small caches, host above 2^24 compared pairs), host (read back and select on the CPU),
    /// pairwise (on the device: faster on GPUs, but materializes heads × slots² comparisons) or
    /// sort (burn's sort). Same answers; only speed and memory differ.
    #[arg(long, default_value = "auto")]
    pub ranking: String,
}

impl EvictionArgs {
    pub fn config(&self) -> CliResult<EvictionConfig> {
        Ok(EvictionConfig {
            budget: self.budget.parse::<Budget>()?,
            mode: self.mode.parse::<Mode>()?,
            stride: self.stride,
            sinks: self.sinks,
            recent_ratio: self.recent_ratio,
            keep_attention: self.keep_attention,
            seed: self.policy_seed,
            streaming: self.streaming,
            decode_stride: self.decode_stride,
            ranking: match self.ranking.as_str() {
                "auto" => None,
                other => Some(other.parse::<Ranking>().map_err(CliError)?),
            },
        })
    }

    /// Checks the flags before a model is loaded, so bad input fails fast.
    pub fn validate(&self) -> CliResult {
        let cfg = self.config()?;
        if cfg.streaming && !self.policy.0.evicts {
            return Err(CliError(
                "--streaming needs an evicting --policy (with full, positions are already compact)".into(),
            ));
        }
        cfg.validate()?;
        Ok(())
    }

    /// The cache for a prompt of `prompt_len` tokens, for `model` (its shape, backend and
    /// weights' precision).
    pub fn cache<B: Backend>(
        &self,
        model: &ModelConfig,
        profile: &BackendProfile,
        kv_dtype: WeightDType,
        prompt_len: usize,
        chunk_size: usize,
    ) -> CliResult<Box<dyn KvCache<B>>> {
        Ok(build_cache::<B>(
            self.policy.name(),
            &self.config()?,
            model,
            profile,
            kv_dtype,
            prompt_len,
            chunk_size,
        )?)
    }
}

/// How prompts share the batched engine's passes with decode steps (`--prefill-passes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrefillPasses {
    /// A chunk of each prompt rides in the decode step's pass: one product for both.
    Mixed,
    /// Prompts in passes of their own after the decode step, chunk groups layer by layer.
    Separate,
}

impl PrefillPasses {
    /// The engine's setting (`None`: the backend's default).
    pub fn mixed(choice: Option<Self>) -> Option<bool> {
        choice.map(|c| c == Self::Mixed)
    }
}
