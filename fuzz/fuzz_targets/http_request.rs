//! `easykv serve`'s request bodies: arbitrary bytes parsed as `/v1/completions` and
//! `/v1/chat/completions` bodies (with the shared fields and easykv's extensions), and every
//! error turned into the OpenAI-style body the server answers.
#![no_main]

#[path = "../../easykv-cli/src/serve/openai.rs"]
#[allow(dead_code)]
mod openai;

use axum::body::Bytes;
use libfuzzer_sys::fuzz_target;
use openai::{parse, ChatRequest, CommonParams, CompletionRequest};

fuzz_target!(|data: &[u8]| {
    let body = || Ok(Bytes::copy_from_slice(data));
    match parse::<CompletionRequest>(body()) {
        Ok((_, common)) => budget(&common),
        Err(e) => drop(e.body().to_string()),
    }
    match parse::<ChatRequest>(body()) {
        Ok((_, common)) => budget(&common),
        Err(e) => drop(e.body().to_string()),
    }
});

/// The extension budget as the server reads it.
fn budget(common: &CommonParams) {
    if let Some(b) = &common.kv_budget {
        let _ = b.as_text().parse::<easykv_core::Budget>();
    }
}
