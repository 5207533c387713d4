//! Flags and steps shared by the subcommands.

use std::time::Instant;

use burn::prelude::Backend;
use clap::Args;
use easykv_models::{fetch, LoadedModel, WeightDType};

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
    /// A known model name (smollm2, qwen2.5-coder-1.5b) or a path to a .gguf file.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Where to run: cpu, or cuda[:N] / wgpu[:N] in builds with those features.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Storage precision of weight matrices: f32 (exact) or f16 (half the memory traffic; faster
    /// decoding on memory-bound CPUs).
    #[arg(long, default_value = "f32")]
    pub dtype: WeightDType,
    /// Quiet: no progress or statistics on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

impl ModelArgs {
    pub fn log(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }

    /// Resolves the model (fetching a known one on first use) and loads it onto `device`.
    pub fn load<B: Backend>(&self, device: &B::Device) -> CliResult<LoadedModel<B>> {
        let quiet = self.quiet;
        let path = fetch::resolve_model(&self.model, &mut |m| {
            if !quiet {
                eprintln!("{m}");
            }
        })?;
        let t = Instant::now();
        let loaded = LoadedModel::from_gguf(&path, self.dtype, device)?;
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

/// Writes JSON to stdout, one document.
pub fn print_json(value: &serde_json::Value) -> CliResult {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError(e.to_string()))?;
    println!("{text}");
    Ok(())
}
