//! The endpoints: completions and chat completions (whole or streamed as server-sent events),
//! models, health and metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use easykv_core::{Budget, EvictionConfig, Mode};
use easykv_models::{ChatMessage, Request, SamplingConfig, MAX_TOP_LOGPROBS};
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};

use super::generation::{FinishReason, Generation, Piece, TokenInfo};
use super::openai::{parse, ApiError, ChatRequest, CommonParams, CompletionRequest, Content, PromptInput, Usage};
use super::AppState;
use crate::common::encode_prefix;

/// The most alternatives per token `/v1/completions` lists (OpenAI's limit).
const MAX_COMPLETION_LOGPROBS: u64 = 5;
/// Stop strings per request, and bytes per stop string.
const MAX_STOPS: usize = 4;
const MAX_STOP_BYTES: usize = 256;

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A request ready for the engine, and how its answer is shaped.
struct Prepared {
    request: Request,
    stops: Vec<String>,
    /// The eviction settings that run, echoed in the answer.
    kv: Value,
    stream: bool,
    include_usage: bool,
    model: String,
}

/// Checks the settings both endpoints share and builds the engine's request for `prompt`.
fn prepare(
    state: &AppState,
    common: &CommonParams,
    prompt: Vec<u32>,
    max_tokens: Option<u64>,
    logprobs: Option<usize>,
    prompt_param: &str,
) -> Result<Prepared, ApiError> {
    let bad = |m: String, p: &str| ApiError::invalid(m, Some(p));
    let model = match &common.model {
        None => return Err(bad("you must provide a model parameter".into(), "model")),
        Some(m) if state.model_names.iter().any(|n| n == m) => m.clone(),
        Some(m) => {
            return Err(ApiError::invalid(
                format!(
                    "the model '{m}' does not exist; this server has '{}'",
                    state.model_names[0]
                ),
                Some("model"),
            )
            .with_status(StatusCode::NOT_FOUND, "model_not_found"))
        }
    };
    for (name, value) in [("n", common.n), ("best_of", common.best_of)] {
        if value.is_some_and(|v| v != 1) {
            return Err(bad(
                format!("{name} > 1 is not supported: send one request per answer"),
                name,
            ));
        }
    }
    for (name, value) in [
        ("presence_penalty", common.presence_penalty),
        ("frequency_penalty", common.frequency_penalty),
    ] {
        if value.is_some_and(|v| v != 0.0) {
            return Err(bad(format!("{name} is not supported"), name));
        }
    }
    if common.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(bad("logit_bias is not supported".into(), "logit_bias"));
    }
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(
            format!("temperature must be in [0, 2], got {temperature}"),
            "temperature",
        ));
    }
    if let Some(p) = common.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(bad(format!("top_p must be in (0, 1], got {p}"), "top_p"));
        }
    }
    let top_k = match common.top_k {
        Some(0) => return Err(bad("top_k must be ≥ 1".into(), "top_k")),
        Some(k) => Some(usize::try_from(k).unwrap_or(usize::MAX)),
        None => None,
    };
    // Without a seed, sampled answers differ from request to request.
    let seed = common.seed.map_or_else(|| state.next_seed(), |s| s as u64);
    let stops = common.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > MAX_STOPS {
        return Err(bad(format!("at most {MAX_STOPS} stop sequences"), "stop"));
    }
    if stops.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Err(bad(
            format!("stop sequences must be 1 to {MAX_STOP_BYTES} bytes"),
            "stop",
        ));
    }
    if prompt.is_empty() {
        return Err(bad("the prompt is empty".into(), prompt_param));
    }
    let context = state.context;
    if prompt.len() > state.max_prompt_tokens {
        return Err(bad(
            // Only a prefix was tokenized: its count is a lower bound.
            format!(
                "the prompt has more than {} tokens, the most this server takes",
                state.max_prompt_tokens
            ),
            prompt_param,
        )
        .with_status(StatusCode::BAD_REQUEST, "context_length_exceeded"));
    }
    let room = context.saturating_sub(prompt.len());
    let max_new = match max_tokens {
        Some(0) => return Err(bad("max_tokens must be ≥ 1".into(), "max_tokens")),
        Some(n) if n > room as u64 => {
            return Err(bad(
                format!(
                    "this model's context is {context} tokens; the prompt has {} and max_tokens asks for {n} more",
                    prompt.len()
                ),
                "max_tokens",
            )
            .with_status(StatusCode::BAD_REQUEST, "context_length_exceeded"))
        }
        Some(n) => n as usize,
        None => state.default_max_tokens.min(room),
    };
    if max_new == 0 {
        return Err(bad(
            format!("the prompt fills the model's context of {context} tokens"),
            prompt_param,
        )
        .with_status(StatusCode::BAD_REQUEST, "context_length_exceeded"));
    }
    let (policy, eviction) = kv_settings(state, common)?;
    let sampling = SamplingConfig {
        temperature: temperature as f32,
        top_k,
        top_p: common.top_p.map(|p| p as f32),
        seed,
    };
    let kv = json!({
        "policy": policy,
        "budget": eviction.budget.to_string(),
        "mode": eviction.mode,
        "stride": eviction.stride,
    });
    Ok(Prepared {
        request: Request {
            prompt,
            max_new_tokens: max_new,
            policy,
            eviction,
            sampling,
            stop_ids: state.tokenizer.stop_ids.clone(),
            logprobs,
        },
        stops,
        kv,
        stream: common.stream,
        include_usage: common.stream_options.as_ref().is_some_and(|o| o.include_usage),
        model,
    })
}

/// The request's eviction policy and settings: its `kv_*` fields over the server's flags.
fn kv_settings(state: &AppState, common: &CommonParams) -> Result<(String, EvictionConfig), ApiError> {
    let mut eviction = state.eviction.clone();
    let policy = match &common.kv_policy {
        Some(p) => easykv_policies::canonical_policy_name(p)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("kv_policy")))?
            .to_string(),
        None => state.policy.clone(),
    };
    if let Some(b) = &common.kv_budget {
        eviction.budget = b
            .as_text()
            .parse::<Budget>()
            .map_err(|e| ApiError::invalid(e.to_string(), Some("kv_budget")))?;
    }
    if let Some(m) = &common.kv_mode {
        eviction.mode = m
            .parse::<Mode>()
            .map_err(|e| ApiError::invalid(e.to_string(), Some("kv_mode")))?;
    }
    if let Some(s) = common.kv_stride {
        eviction.stride = usize::try_from(s).unwrap_or(usize::MAX);
    }
    eviction
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string(), None))?;
    Ok((policy, eviction))
}

/// `POST /v1/completions`
pub async fn completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match completion(state, body).await {
        Ok(r) | Err(r) => r,
    }
}

async fn completion(state: Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, Response> {
    let (req, common): (CompletionRequest, CommonParams) = parse(body).map_err(IntoResponse::into_response)?;
    let fail = |e: ApiError| e.into_response();
    if req.echo {
        return Err(fail(ApiError::invalid("echo is not supported", Some("echo"))));
    }
    if req.suffix.is_some() {
        return Err(fail(ApiError::invalid("suffix is not supported", Some("suffix"))));
    }
    let several = || {
        fail(ApiError::invalid(
            "send one prompt per request (a list of several is not supported)",
            Some("prompt"),
        ))
    };
    let prompt = match req.prompt {
        PromptInput::Text(t) => tokenize(&state, "prompt", move |_| Ok(t)).await.map_err(fail)?,
        PromptInput::Ids(ids) => ids,
        PromptInput::Texts(mut t) => match (t.pop(), t.is_empty()) {
            (Some(only), true) => tokenize(&state, "prompt", move |_| Ok(only)).await.map_err(fail)?,
            _ => return Err(several()),
        },
        PromptInput::IdLists(mut l) => match (l.pop(), l.is_empty()) {
            (Some(ids), true) => ids,
            _ => return Err(several()),
        },
    };
    let logprobs = match req.logprobs {
        Some(n) if n > MAX_COMPLETION_LOGPROBS => {
            return Err(fail(ApiError::invalid(
                format!("logprobs must be 0 to {MAX_COMPLETION_LOGPROBS}"),
                Some("logprobs"),
            )))
        }
        Some(n) => Some(n as usize),
        None => None,
    };
    let prepared = prepare(&state, &common, prompt, common.max_tokens, logprobs, "prompt").map_err(fail)?;
    answer(state, prepared, Kind::Completion).await
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match chat(state, body).await {
        Ok(r) | Err(r) => r,
    }
}

async fn chat(state: Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, Response> {
    let (req, common): (ChatRequest, CommonParams) = parse(body).map_err(IntoResponse::into_response)?;
    let fail = |e: ApiError| e.into_response();
    if state.chat_template.is_none() {
        return Err(fail(ApiError::invalid(
            "this model has no chat template: use /v1/completions",
            Some("messages"),
        )));
    }
    if req.tools.is_some() {
        return Err(fail(ApiError::invalid("tools are not supported", Some("tools"))));
    }
    if req.messages.is_empty() {
        return Err(fail(ApiError::invalid("messages is empty", Some("messages"))));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        _ => {
                            return Err(fail(ApiError::invalid(
                                format!("only text content is supported, got '{}'", p.kind),
                                Some(&format!("messages[{i}].content")),
                            )))
                        }
                    }
                }
                text
            }
        };
        messages.push(ChatMessage::new(&m.role, &content));
    }
    let prompt = tokenize(&state, "messages", move |s| match &s.chat_template {
        Some(template) => template
            .render(&messages, true)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("messages"))),
        None => Err(ApiError::server("the chat template is gone")),
    })
    .await
    .map_err(fail)?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (_, Some(n)) if n > MAX_TOP_LOGPROBS as u64 => {
            return Err(fail(ApiError::invalid(
                format!("top_logprobs must be 0 to {MAX_TOP_LOGPROBS}"),
                Some("top_logprobs"),
            )))
        }
        (false, Some(_)) => {
            return Err(fail(ApiError::invalid(
                "top_logprobs needs logprobs: true",
                Some("top_logprobs"),
            )))
        }
        (true, n) => Some(n.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let max_tokens = req.max_completion_tokens.or(common.max_tokens);
    let prepared = prepare(&state, &common, prompt, max_tokens, logprobs, "messages").map_err(fail)?;
    answer(state, prepared, Kind::Chat).await
}

/// Prompt ids of the text `prompt` makes (the text itself, or the chat template's rendering),
/// computed off the async threads so that a long prompt or a slow template holds up no other
/// request; only the prefix the server could take is tokenized (as the CLI does).
async fn tokenize(
    state: &Arc<AppState>,
    param: &'static str,
    prompt: impl FnOnce(&AppState) -> Result<String, ApiError> + Send + 'static,
) -> Result<Vec<u32>, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let text = prompt(&state)?;
        encode_prefix(&state.tokenizer, &text, state.max_prompt_tokens + 1)
            .map_err(|e| ApiError::invalid(e.0, Some(param)))
    })
    .await
    .map_err(|e| ApiError::server(format!("tokenizing: {e}")))?
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// What every chunk or answer of one request repeats.
#[derive(Clone)]
struct Header {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    kv: Value,
    /// Whether the request asked for log-probabilities.
    logprobs: bool,
}

impl Header {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// One choice (index 0) with `text`, `tokens`' log-probabilities and `finish`.
    fn choice(&self, text: Option<&str>, tokens: &[TokenInfo], finish: Option<FinishReason>, chunk: bool) -> Value {
        let logprobs = match self.logprobs {
            false => Value::Null,
            true => logprobs_json(self.kind, tokens),
        };
        let finish = finish.map(FinishReason::as_str);
        match (self.kind, chunk) {
            (Kind::Completion, _) => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
            }
            (Kind::Chat, false) => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text.unwrap_or("")},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            (Kind::Chat, true) => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    fn body(&self, choices: Vec<Value>, usage: Option<Usage>, chunk: bool) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = json!(u);
        }
        // Whole answers carry the settings that ran; a stream's last chunk adds them itself.
        if !chunk {
            v["kv"] = self.kv.clone();
        }
        v
    }
}

fn logprobs_json(kind: Kind, tokens: &[TokenInfo]) -> Value {
    match kind {
        Kind::Completion => {
            let mut offset = 0;
            let offsets: Vec<usize> = tokens
                .iter()
                .map(|t| {
                    let at = offset;
                    offset += t.text.len();
                    at
                })
                .collect();
            json!({
                "tokens": tokens.iter().map(|t| &t.text).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": tokens
                    .iter()
                    .map(|t| t.top.iter().map(|(s, p)| (s.clone(), json!(p))).collect::<serde_json::Map<_, _>>())
                    .collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
        Kind::Chat => {
            let entry = |text: &str, logprob: f32| json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()});
            json!({"content": tokens.iter().map(|t| {
                let mut e = entry(&t.text, t.logprob);
                e["top_logprobs"] = Value::Array(t.top.iter().map(|(s, p)| entry(s, *p)).collect());
                e
            }).collect::<Vec<_>>()})
        }
    }
}

/// Runs `prepared` and answers whole, or as a stream of server-sent events.
async fn answer(state: Arc<AppState>, prepared: Prepared, kind: Kind) -> Result<Response, Response> {
    let header = Header {
        id: format!(
            "{}-{}",
            if kind == Kind::Chat { "chatcmpl" } else { "cmpl" },
            state.next_request_id()
        ),
        created: unix_now(),
        model: prepared.model.clone(),
        kind,
        kv: prepared.kv.clone(),
        logprobs: prepared.request.logprobs.is_some(),
    };
    let (stream, include_usage) = (prepared.stream, prepared.include_usage);
    let mut generation = Generation::start(state, prepared.request, prepared.stops)
        .await
        .map_err(IntoResponse::into_response)?;
    if stream {
        return Ok(Sse::new(sse_stream(generation, header, include_usage))
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut all = Piece::default();
    while let Some(piece) = generation.next().await.map_err(IntoResponse::into_response)? {
        all.text.push_str(&piece.text);
        all.tokens.extend(piece.tokens);
    }
    let usage = Usage::new(generation.prompt_tokens, generation.completion_tokens);
    let choice = header.choice(Some(&all.text), &all.tokens, generation.finish_reason(), false);
    Ok(Json(header.body(vec![choice], Some(usage), false)).into_response())
}

/// Where a stream stands.
enum Phase {
    /// The chat role's opening chunk is next.
    Start,
    Body,
    Usage,
    Done,
    End,
}

fn sse_stream(
    generation: Generation,
    header: Header,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let first = match header.kind {
        Kind::Chat => Phase::Start,
        Kind::Completion => Phase::Body,
    };
    stream::unfold((generation, header, first), move |(mut g, h, phase)| async move {
        match phase {
            Phase::Start => {
                let choice = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                Some((Ok(data(h.body(vec![choice], None, true))), (g, h, Phase::Body)))
            }
            Phase::Body => match g.next().await {
                Ok(Some(piece)) => {
                    let finish = g.finish_reason();
                    let text = (!piece.text.is_empty()).then_some(piece.text.as_str());
                    let choice = h.choice(text, &piece.tokens, finish, true);
                    // The last chunk carries the settings that ran (and the usage unless a
                    // separate usage chunk follows).
                    let usage =
                        (finish.is_some() && !include_usage).then(|| Usage::new(g.prompt_tokens, g.completion_tokens));
                    let mut body = h.body(vec![choice], usage, true);
                    if finish.is_some() {
                        body["kv"] = h.kv.clone();
                    }
                    Some((Ok(data(body)), (g, h, Phase::Body)))
                }
                Ok(None) => {
                    let next = if include_usage { Phase::Usage } else { Phase::Done };
                    Some((Ok(SseEvent::default().comment("end")), (g, h, next)))
                }
                Err(e) => Some((Ok(data(e.body())), (g, h, Phase::Done))),
            },
            Phase::Usage => {
                let usage = Usage::new(g.prompt_tokens, g.completion_tokens);
                Some((Ok(data(h.body(Vec::new(), Some(usage), true))), (g, h, Phase::Done)))
            }
            Phase::Done => Some((Ok(SseEvent::default().data("[DONE]")), (g, h, Phase::End))),
            Phase::End => None,
        }
    })
}

/// `GET /v1/models`
pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_names[0],
            "object": "model",
            "created": state.started,
            "owned_by": "easykv",
            "max_model_len": state.context,
            "vocab_size": state.vocab_size,
        }],
    }))
}

/// `GET /health`: 200 while serving, 503 while shutting down.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.is_draining() {
        false => Json(json!({"status": "ok"})).into_response(),
        true => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        )
            .into_response(),
    }
}

/// `GET /metrics`
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&state.engine.stats()),
    )
        .into_response()
}

/// Any other path.
pub async fn not_found() -> Response {
    ApiError::invalid("no such endpoint", None)
        .with_status(StatusCode::NOT_FOUND, "not_found")
        .into_response()
}

pub async fn method_not_allowed() -> Response {
    ApiError::invalid("method not allowed on this endpoint", None)
        .with_status(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
        .into_response()
}
