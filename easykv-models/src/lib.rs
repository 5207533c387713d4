//! easykv-models: GGUF loading, tokenizer, chat template, backend-generic Llama-family models,
//! sampling and generation. Models receive their KV cache as `&mut impl KvCache<B>`.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod atomic;
pub mod backend;
pub mod cache;
pub mod chat;
pub mod config;
pub mod convert;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod gpu_kernels;
pub mod hf;
pub mod host_kernels;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod model;
pub mod ops;
pub mod quantized;
pub mod random_weights;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use backend::{BackendProfile, Kernel, KernelSet};
pub use cache::{build_cache, build_cache_from};
pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig, RopeLayout};
pub use engine::{
    default_host_pool_bytes, Engine, EngineConfig, EngineHandle, EngineStats, Event, EventSink, Rejection, Request,
    RequestId, TokenLogprobs, Update, MAX_TOP_LOGPROBS,
};
pub use error::{Error, Result};
pub use generate::{generate, prefill, score, top_logprobs, GenerateConfig, Generation, Score, StopReason};
pub use linear::WeightDType;
pub use llama::{BatchPart, Llama, Logits};
pub use loader::LoadedModel;
pub use model::{load_model, CausalLm};
pub use random_weights::{RandomModel, RANDOM_MODELS};
pub use sampling::{Sampler, SamplingConfig};
pub use tokenizer::{TextStream, TextTokenizer};
pub use weights::WeightSource;
