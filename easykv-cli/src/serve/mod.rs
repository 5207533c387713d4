//! `easykv serve`: an OpenAI-compatible HTTP server over the batched engine, where each request
//! may choose its own eviction policy and budget (`kv_policy`, `kv_budget`, `kv_mode`,
//! `kv_stride`).
//!
//! Layout (after mistral.rs' server core): `openai` holds the API's bodies and errors,
//! `routes` the endpoints, `generation` one request's life in the engine (text, stop strings,
//! cancellation), `metrics` the Prometheus counters. The engine runs on a thread of its own
//! ([`EngineHandle`]); the HTTP side runs on a small tokio runtime and never waits on a step.

mod generation;
mod metrics;
mod openai;
mod routes;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use burn::prelude::Backend;
use clap::Args;
use easykv_core::EvictionConfig;
use easykv_models::{ChatTemplate, EngineConfig, EngineHandle, TextTokenizer};

use crate::backend::with_backend;
use crate::common::{CliError, CliResult, EvictionArgs, ModelArgs};
use metrics::Metrics;
use openai::ApiError;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// IP address to listen on (loopback by default; put a proxy with TLS in front of anything
    /// wider).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (the address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Bytes of KV cache all running sequences may hold together (e.g. 4GiB); default: half
    /// the memory available on the CPU, unlimited on a GPU.
    #[arg(long, value_name = "SIZE")]
    pub kv_pool: Option<String>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 32)]
    pub max_concurrent: usize,
    /// How prompts share passes with decode steps: mixed (a chunk of each prompt rides in the
    /// decode step's pass, one product for both) or separate (passes of their own after it);
    /// default: mixed on GPUs, separate on the CPU.
    #[arg(long, value_enum, value_name = "HOW")]
    pub prefill_passes: Option<crate::common::PrefillPasses>,
    /// Requests waiting for room at most; more get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Longest prompt taken, in tokens (default: the model's context).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Tokens generated when a request gives no max_tokens (never past the context).
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Prompt tokens per prefill pass.
    #[arg(long, default_value_t = 512)]
    pub chunk_size: usize,
    /// Require `Authorization: Bearer KEY` on /v1/ endpoints.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// On SIGINT/SIGTERM, seconds given to requests in flight before the server exits.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// The model's name in the API (default: the loaded model's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Instead of --model, a model of this shape with seeded random weights (llama2-7b,
    /// llama3-8b, qwen2.5-1.5b, smollm2): for load tests of speed and memory. Its tokens are
    /// the words t0, t1, …; send prompts as token ids or such words.
    #[arg(long, value_name = "SHAPE")]
    pub random_weights: Option<String>,
    /// The default eviction settings (a request's kv_* fields override them).
    #[command(flatten)]
    pub eviction: EvictionArgs,
}

/// What every handler shares.
pub struct AppState {
    engine: EngineHandle,
    tokenizer: Arc<TextTokenizer>,
    chat_template: Option<ChatTemplate>,
    /// The served name first, then other names accepted for it.
    model_names: Vec<String>,
    vocab_size: usize,
    context: usize,
    max_prompt_tokens: usize,
    default_max_tokens: usize,
    policy: String,
    eviction: EvictionConfig,
    api_key: Option<String>,
    metrics: Metrics,
    started: u64,
    requests: AtomicU64,
    seeds: AtomicU64,
    draining: AtomicBool,
}

impl AppState {
    fn next_request_id(&self) -> u64 {
        self.requests.fetch_add(1, Ordering::Relaxed)
    }

    /// A seed for a request that gives none: different for every request.
    fn next_seed(&self) -> u64 {
        let n = self.seeds.fetch_add(1, Ordering::Relaxed);
        (self.started ^ 0x9e37_79b9_7f4a_7c15)
            .wrapping_mul(n.wrapping_add(1))
            .rotate_left(17)
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

pub fn run(args: ServeArgs) -> CliResult {
    let device = args.model.device.clone();
    with_backend!(&device, run_on(&args))
}

/// Checks the flags that need no model.
fn check_flags(args: &ServeArgs) -> CliResult<Option<u64>> {
    args.eviction.validate()?;
    for (name, v) in [
        ("--max-concurrent", args.max_concurrent),
        ("--max-queue", args.max_queue),
        ("--chunk-size", args.chunk_size),
        ("--default-max-tokens", args.default_max_tokens),
        ("--max-body-bytes", args.max_body_bytes),
    ] {
        if v == 0 {
            return Err(CliError(format!("{name} must be ≥ 1")));
        }
    }
    if args.max_prompt_tokens == Some(0) {
        return Err(CliError("--max-prompt-tokens must be ≥ 1".into()));
    }
    if args.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        return Err(CliError("--api-key is empty".into()));
    }
    crate::bench::kv_pool(args.kv_pool.as_deref())
}

fn run_on<B: Backend>(device: &B::Device, args: &ServeArgs) -> CliResult {
    let pool = check_flags(args)?;
    // An IP address (IPv4 or IPv6), not a name: nothing is resolved.
    let ip: std::net::IpAddr = args.host.parse().map_err(|e| {
        CliError(format!(
            "--host '{}': {e} (give an IP address, e.g. 127.0.0.1 or ::1)",
            args.host
        ))
    })?;
    let addr = SocketAddr::new(ip, args.port);
    let loaded = match &args.random_weights {
        Some(shape) => random_model::<B>(shape, args, device)?,
        None => args.model.load_for_batches::<B>(device)?,
    };
    let context = loaded.model.context_length();
    let pool_bytes = crate::bench::pool_bytes(pool, loaded.model.as_ref());
    let model_names = match &args.random_weights {
        Some(shape) => vec![args.served_model_name.clone().unwrap_or_else(|| shape.clone())],
        None => model_names(args, &loaded.name, &loaded.path),
    };
    let vocab_size = loaded.config.vocab_size;
    let engine = EngineHandle::spawn::<B>(
        loaded.model,
        loaded.config,
        loaded.dtype,
        EngineConfig {
            pool_bytes,
            max_running: args.max_concurrent,
            chunk_size: args.chunk_size,
            max_queued: Some(args.max_queue),
            mixed_passes: crate::common::PrefillPasses::mixed(args.prefill_passes),
        },
    )?;
    let state = Arc::new(AppState {
        engine,
        tokenizer: Arc::new(loaded.tokenizer),
        chat_template: loaded.chat_template,
        model_names,
        vocab_size,
        context,
        max_prompt_tokens: args.max_prompt_tokens.unwrap_or(context).min(context),
        default_max_tokens: args.default_max_tokens,
        policy: args.eviction.policy.name().to_string(),
        eviction: args.eviction.config()?,
        api_key: args.api_key.clone(),
        metrics: Metrics::default(),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        requests: AtomicU64::new(0),
        seeds: AtomicU64::new(0),
        draining: AtomicBool::new(false),
    });
    // The engine's thread does the work; two threads answer HTTP.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError(format!("starting the HTTP runtime: {e}")))?;
    let served = runtime.block_on(serve(state.clone(), addr, args));
    state.engine.drain();
    served
}

/// A model of `shape` with seeded random weights and a numbered stand-in tokenizer.
fn random_model<B: Backend>(
    shape: &str,
    args: &ServeArgs,
    device: &B::Device,
) -> CliResult<easykv_models::LoadedModel<B>> {
    let shape = easykv_models::RandomModel::by_name(shape)?;
    let config = shape.config();
    let mut model: Box<dyn easykv_models::CausalLm<B>> =
        Box::new(shape.build::<B>(args.model.batch_dtype(), 0, device)?);
    args.model.kernels.apply(model.as_mut())?;
    Ok(easykv_models::LoadedModel {
        model,
        tokenizer: TextTokenizer::numbered(config.vocab_size)?,
        config,
        chat_template: None,
        path: std::path::PathBuf::new(),
        name: shape.name.to_string(),
        dtype: args.model.batch_dtype(),
    })
}

/// The name the API shows (`--served-model-name`, else `--model` as given when it is a known
/// name, else the file's stem), then the other names a request may use.
fn model_names(args: &ServeArgs, loaded_name: &str, path: &std::path::Path) -> Vec<String> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let given = &args.model.model;
    let shown = match &args.served_model_name {
        Some(n) => n.clone(),
        None if std::path::Path::new(given).exists() => stem.clone(),
        None => given.clone(),
    };
    let mut names = vec![shown];
    for n in [loaded_name.to_string(), stem, given.clone()] {
        if !n.is_empty() && !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/models", get(routes::models))
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

async fn serve(state: Arc<AppState>, addr: SocketAddr, args: &ServeArgs) -> CliResult {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError(format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr().map_err(|e| CliError(e.to_string()))?;
    eprintln!(
        "easykv serve: listening on http://{local} (model {})",
        state.model_names[0]
    );
    let deadline = Duration::from_secs(args.shutdown_timeout);
    let draining = state.clone();
    let shutdown = async move {
        stop_signal().await;
        draining.draining.store(true, Ordering::Relaxed);
        eprintln!(
            "easykv serve: shutting down (requests in flight get {} s)",
            deadline.as_secs()
        );
        // Past the deadline the process ends whatever still runs.
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            eprintln!("easykv serve: deadline reached, exiting");
            std::process::exit(0);
        });
    };
    axum::serve(listener, router(state, args.max_body_bytes))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| CliError(format!("server: {e}")))
}

/// SIGINT or SIGTERM.
async fn stop_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// Every request: the API key on /v1/, 503 while shutting down, the response counted and
/// logged.
async fn guard(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = match check_access(&state, &request, &path) {
        Err(e) => e.into_response(),
        Ok(()) => next.run(request).await,
    };
    let status = response.status().as_u16();
    state.metrics.count_response(status);
    tracing::info!(target: "easykv::serve", %method, %path, status, ms = started.elapsed().as_millis() as u64);
    response
}

fn check_access(state: &AppState, request: &Request, path: &str) -> Result<(), ApiError> {
    if !path.starts_with("/v1/") {
        return Ok(());
    }
    if state.is_draining() {
        return Err(ApiError::server("the server is shutting down")
            .with_status(StatusCode::SERVICE_UNAVAILABLE, "shutting_down"));
    }
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let unauthorized = |m: &str| {
        let mut e = ApiError::invalid(m, None).with_status(StatusCode::UNAUTHORIZED, "invalid_api_key");
        e.kind = "authentication_error";
        e
    };
    match given {
        None => Err(unauthorized("missing API key: send Authorization: Bearer KEY")),
        Some(g) if same_bytes(g.as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => Err(unauthorized("incorrect API key")),
    }
}

/// Equality whose time does not depend on where the inputs first differ.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
