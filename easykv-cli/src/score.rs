//! `easykv score`

use std::path::PathBuf;

use burn::prelude::Backend;
use clap::Args;
use easykv_models::score;
use serde_json::json;

use crate::backend::with_backend;
use crate::common::{encode_prefix, outln, print_json, read_text, CliError, CliResult, EvictionArgs, ModelArgs};

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score.
    #[arg(long)]
    pub text_file: PathBuf,
    /// Score only the first N tokens.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Tokens per forward pass.
    #[arg(long, default_value_t = 512)]
    pub chunk_size: usize,
    #[command(flatten)]
    pub eviction: EvictionArgs,
    /// Print one JSON document with every token's NLL.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ScoreArgs) -> CliResult {
    let device = args.model.device.clone();
    with_backend!(&device, run_on(&args))
}

fn run_on<B: Backend>(device: &B::Device, args: &ScoreArgs) -> CliResult {
    let text = read_text(&args.text_file)?;
    if text.trim().is_empty() {
        return Err(CliError(format!("{} is empty", args.text_file.display())));
    }
    if args.max_tokens.is_some_and(|n| n < 2) {
        return Err(CliError("--max-tokens must be ≥ 2".into()));
    }
    args.eviction.validate()?;
    let loaded = args.model.load::<B>(device)?;
    // Past the context a text cannot be scored: tokenize no more than that.
    let context = loaded.model.context_length();
    let ids = encode_prefix(
        &loaded.tokenizer,
        &text,
        args.max_tokens.unwrap_or(usize::MAX).min(context + 2),
    )?;
    if ids.len() < 2 {
        return Err(CliError(format!(
            "{} has fewer than 2 tokens",
            args.text_file.display()
        )));
    }
    // The last token is only predicted, never fed: the schedule covers the tokens fed.
    let mut cache = args.eviction.cache::<B>(
        &loaded.config,
        loaded.model.profile(),
        loaded.dtype,
        ids.len() - 1,
        args.chunk_size,
    )?;
    let s = score(&loaded.model, cache.as_mut(), &ids, args.chunk_size)?;
    if args.json {
        print_json(&json!({
            "model": loaded.name,
            "tokens": ids.len(),
            "scored": s.nll.len(),
            "policy": args.eviction.policy.name(),
            "budget": args.eviction.budget,
            "mean_nll": s.mean_nll,
            "perplexity": s.perplexity,
            "nll": s.nll,
        }))
    } else {
        outln!(
            "tokens: {}\nscored: {}\nmean NLL: {:.6}\nperplexity: {:.4}",
            ids.len(),
            s.nll.len(),
            s.mean_nll,
            s.perplexity
        )?;
        Ok(())
    }
}
