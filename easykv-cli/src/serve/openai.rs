//! The OpenAI API's request and response bodies (the parts easykv serves), its error body, and
//! easykv's extension fields (`kv_policy`, `kv_budget`, `kv_mode`, `kv_stride`), and the
//! parsing of a request body into them (which `fuzz/fuzz_targets/http_request.rs` drives: this
//! file depends on axum, serde and serde_json only).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The body as an endpoint's own fields `T` and the shared ones, or a 400 naming the field
/// that is wrong.
pub fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<(T, CommonParams), ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            _ => "invalid_body",
        };
        ApiError::invalid(e.body_text(), None).with_status(status, code)
    })?;
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("malformed JSON: {e}"), None))?;
    Ok((fields(&value)?, fields(&value)?))
}

fn fields<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = (!matches!(path.as_str(), "." | "?" | "")).then_some(path);
        ApiError::invalid(format!("invalid field: {}", e.into_inner()), param.as_deref())
    })
}

/// An error as the OpenAI API writes it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A request the server cannot take as written (400).
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with_status(mut self, status: StatusCode, code: &'static str) -> Self {
        self.status = status;
        self.code = Some(code);
        self
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// A field that takes one string or a list of them (`prompt`, `stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `/v1/completions`' prompt: text, token ids, or a batch of one of either.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

/// A budget given as a JSON number (0.5, 512) or a string ("0.5", "512", "64MiB").
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum BudgetInput {
    Number(serde_json::Number),
    Text(String),
}

impl BudgetInput {
    pub fn as_text(&self) -> String {
        match self {
            BudgetInput::Number(n) => n.to_string(),
            BudgetInput::Text(t) => t.clone(),
        }
    }
}

/// Settings shared by both endpoints, with easykv's extension fields (read from the same body
/// as the endpoint's own fields; separately, so that an error names the field's path).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not in OpenAI's API; vLLM and others take it.
    pub top_k: Option<u64>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany<String>>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u64>,
    pub best_of: Option<u64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub kv_policy: Option<String>,
    pub kv_budget: Option<BudgetInput>,
    pub kv_mode: Option<String>,
    pub kv_stride: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/completions`' own fields (the rest: [`CommonParams`]).
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptInput,
    /// The number of alternatives to list per token (0–5); `None`: no log-probabilities.
    pub logprobs: Option<u64>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
}

/// A chat message's content: text, or a list of parts of which the text parts are read.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

/// `POST /v1/chat/completions`' own fields (the rest: [`CommonParams`]).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u64>,
    pub tools: Option<Value>,
}

/// Token counts of one answer.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}
