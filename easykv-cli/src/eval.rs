//! `easykv eval`: perplexity, passkey, needle-in-a-haystack and fidelity to the full cache,
//! for every policy × budget, written to results.json / results.csv / results.md.
//!
//! Cells are saved as they finish (written to a temporary file, then renamed), so an
//! interrupted run resumes where it stopped; `--force` recomputes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::Backend;
use clap::Args;
use easykv_core::{Budget, EvictionConfig, Mode};
use easykv_models::eval::{self, metrics, tasks};
use easykv_models::{build_cache, fetch, generate, score, ChatMessage, GenerateConfig, LoadedModel, SamplingConfig};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::backend::with_backend;
use crate::common::{CliError, CliResult, ModelArgs, PolicyName};

const TASKS: &[&str] = &["ppl", "passkey", "niah", "fidelity", "suite"];

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// ppl, passkey, niah, fidelity, or suite (all four; with a preset: quick or full).
    pub task: String,
    /// For `suite`: quick (a few minutes on 2 CPU cores with SmolLM2) or full.
    pub preset: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Policies to compare (the full cache always runs as the reference); default: every
    /// evicting policy.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = PolicyName::evicting())]
    pub policies: Vec<PolicyName>,
    /// KV budgets: ratios of the prompt (0.5) or tokens (512).
    #[arg(long, default_value = "0.25,0.5,0.75", value_delimiter = ',')]
    pub budgets: Vec<String>,
    /// encoding, decoding or auto (see `easykv generate --help`).
    #[arg(long, default_value = "encoding")]
    pub mode: String,
    #[arg(long, default_value_t = 8)]
    pub stride: usize,
    /// Samples per setting (passkey keys, fidelity documents).
    #[arg(long, default_value_t = 2)]
    pub samples: usize,
    /// Prompt lengths in tokens (passkey, niah, fidelity).
    #[arg(long, default_value = "1024", value_delimiter = ',')]
    pub lengths: Vec<usize>,
    /// Depths of the key in the prompt, 0 (start) to 1 (end) (passkey, niah).
    #[arg(long, default_value = "0.1,0.5,0.9", value_delimiter = ',')]
    pub depths: Vec<f64>,
    /// Tokens of text scored by `ppl`.
    #[arg(long, default_value_t = 2048)]
    pub ppl_tokens: usize,
    /// Tokens generated per fidelity prompt.
    #[arg(long, default_value_t = 48)]
    pub new_tokens: usize,
    /// Use this text file instead of the fetched public-domain texts (ppl, niah, fidelity).
    #[arg(long)]
    pub text_file: Option<PathBuf>,
    /// Seed of passkeys and of the random policy.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder for results.json, results.csv and results.md.
    #[arg(long)]
    pub out: PathBuf,
    /// Recompute every cell instead of resuming.
    #[arg(long)]
    pub force: bool,
}

/// What a run was asked to do: results are resumed only under identical settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Settings {
    tasks: Vec<String>,
    model: String,
    dtype: String,
    policies: Vec<String>,
    budgets: Vec<String>,
    mode: String,
    stride: usize,
    samples: usize,
    lengths: Vec<usize>,
    depths: Vec<f64>,
    ppl_tokens: usize,
    new_tokens: usize,
    text_file: Option<String>,
    seed: u64,
}

/// One measured cell: a task sample under one policy and budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cell {
    task: String,
    sample: String,
    policy: String,
    budget: String,
    metrics: BTreeMap<String, f64>,
    /// Full-cache outputs, kept as the fidelity reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ids: Option<Vec<u32>>,
    seconds: f64,
}

impl Cell {
    fn key(&self) -> String {
        format!("{}|{}|{}|{}", self.task, self.sample, self.policy, self.budget)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Results {
    easykv_version: String,
    model_sha256: String,
    settings: Settings,
    cells: Vec<Cell>,
}

/// One sample of a task: its prompt (or text) and what scores it.
#[derive(Debug, Clone)]
enum Sample {
    Perplexity {
        ids: Vec<u32>,
    },
    Retrieval {
        ids: Vec<u32>,
        answer: String,
        needle: String,
    },
    Fidelity {
        ids: Vec<u32>,
    },
}

pub fn run(args: EvalArgs) -> CliResult {
    let settings = validate(&args)?;
    let device = args.model.device.clone();
    with_backend!(&device, run_on(&args, settings))
}

/// Checks every flag before a model is loaded.
fn validate(args: &EvalArgs) -> CliResult<Settings> {
    if !TASKS.contains(&args.task.as_str()) {
        return Err(CliError(format!(
            "unknown task '{}' (valid: {})",
            args.task,
            TASKS.join(", ")
        )));
    }
    let mut args = args.clone();
    let tasks: Vec<String> = match (args.task.as_str(), args.preset.as_deref()) {
        ("suite", None | Some("quick") | Some("full")) => {
            ["ppl", "passkey", "niah", "fidelity"].map(String::from).to_vec()
        }
        ("suite", Some(p)) => return Err(CliError(format!("unknown suite preset '{p}' (valid: quick, full)"))),
        (_, Some(p)) => {
            return Err(CliError(format!(
                "unexpected argument '{p}': presets belong to `suite`"
            )))
        }
        (t, None) => vec![t.to_string()],
    };
    if args.task == "suite" {
        apply_preset(&mut args);
    }
    // Budgets follow the one rule set of the core (ratios in (0, 1], tokens, sizes).
    for b in &args.budgets {
        b.parse::<Budget>()?;
    }
    args.mode.parse::<Mode>()?;
    if args.samples == 0 || args.lengths.is_empty() || args.lengths.contains(&0) || args.stride == 0 {
        return Err(CliError(
            "--samples, --stride and every --lengths value must be ≥ 1".into(),
        ));
    }
    if args.depths.iter().any(|d| !(0.0..=1.0).contains(d)) {
        return Err(CliError("every --depths value must be in [0, 1]".into()));
    }
    if args.ppl_tokens < 16 || args.new_tokens == 0 {
        return Err(CliError("--ppl-tokens must be ≥ 16 and --new-tokens ≥ 1".into()));
    }
    if let Some(f) = &args.text_file {
        let text = std::fs::read_to_string(f).map_err(|e| CliError(format!("{}: {e}", f.display())))?;
        if text.trim().is_empty() {
            return Err(CliError(format!("{}: the text is empty", f.display())));
        }
    }
    std::fs::create_dir_all(&args.out).map_err(|e| CliError(format!("{}: {e}", args.out.display())))?;
    let probe = args.out.join(".easykv-write-test");
    std::fs::write(&probe, b"").map_err(|e| CliError(format!("{} is not writable: {e}", args.out.display())))?;
    let _ = std::fs::remove_file(probe);
    Ok(Settings {
        tasks,
        model: args.model.model.clone(),
        dtype: format!("{:?}", args.model.dtype).to_lowercase(),
        policies: args.policies.iter().map(|p| p.name().to_string()).collect(),
        budgets: args.budgets.clone(),
        mode: args.mode.clone(),
        stride: args.stride,
        samples: args.samples,
        lengths: args.lengths.clone(),
        depths: args.depths.clone(),
        ppl_tokens: args.ppl_tokens,
        new_tokens: args.new_tokens,
        text_file: args.text_file.as_ref().map(|p| p.display().to_string()),
        seed: args.seed,
    })
}

/// `suite quick` and `suite full` replace the size flags.
fn apply_preset(args: &mut EvalArgs) {
    if args.preset.as_deref() == Some("full") {
        args.samples = 3;
        args.lengths = vec![1024, 2048];
        args.depths = vec![0.1, 0.3, 0.5, 0.7, 0.9];
        args.ppl_tokens = 4096;
        args.budgets = ["0.1", "0.25", "0.5", "0.75"].map(String::from).to_vec();
    } else {
        args.samples = 1;
        args.lengths = vec![512];
        args.depths = vec![0.5];
        args.ppl_tokens = 1024;
        args.new_tokens = 24;
        args.budgets = ["0.25", "0.5"].map(String::from).to_vec();
    }
}

fn run_on<B: Backend>(device: &B::Device, args: &EvalArgs, settings: Settings) -> CliResult {
    let results_path = args.out.join("results.json");
    let loaded = args.model.load::<B>(device)?;
    let model_sha256 = fetch::sha256_file(&loaded.path)?;
    let mut done: Vec<Cell> = Vec::new();
    if results_path.is_file() && !args.force {
        let text =
            std::fs::read_to_string(&results_path).map_err(|e| CliError(format!("{}: {e}", results_path.display())))?;
        let previous: Results = serde_json::from_str(&text).map_err(|e| {
            CliError(format!(
                "{}: not an easykv results file ({e}); use --force",
                results_path.display()
            ))
        })?;
        if previous.settings != settings || previous.model_sha256 != model_sha256 {
            return Err(CliError(format!(
                "{} holds results of other settings; use --force to replace them or choose another --out",
                results_path.display()
            )));
        }
        done = previous.cells;
        args.model.log(&format!("resuming: {} finished cells kept", done.len()));
    }
    let mut results = Results {
        easykv_version: env!("CARGO_PKG_VERSION").into(),
        model_sha256,
        settings: settings.clone(),
        cells: done,
    };
    let samples = build_samples(&loaded, args, &settings)?;
    let mut policies: Vec<&str> = vec!["full"];
    policies.extend(settings.policies.iter().map(String::as_str).filter(|p| *p != "full"));
    let mut todo = Vec::new();
    for (task, name, sample) in &samples {
        for &policy in &policies {
            let budgets: Vec<&str> = if policy == "full" {
                vec!["-"]
            } else {
                settings.budgets.iter().map(String::as_str).collect()
            };
            for budget in budgets {
                let key = format!("{task}|{name}|{policy}|{budget}");
                if !results.cells.iter().any(|c| c.key() == key) {
                    todo.push((task.clone(), name.clone(), sample, policy, budget));
                }
            }
        }
    }
    let bar = if args.model.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(todo.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} cells, {elapsed} elapsed, ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for (task, name, sample, policy, budget) in todo {
        bar.set_message(format!("{task} {policy} {budget}"));
        let t = Instant::now();
        let reference = results
            .cells
            .iter()
            .find(|c| c.task == task && c.sample == name && c.policy == "full")
            .cloned();
        let mut cell = run_cell(&loaded, &settings, sample, policy, budget, reference.as_ref())?;
        cell.task = task;
        cell.sample = name;
        cell.seconds = t.elapsed().as_secs_f64();
        results.cells.push(cell);
        write_atomic(&results_path, &to_json(&results)?)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    write_atomic(&results_path, &to_json(&results)?)?;
    write_atomic(&args.out.join("results.csv"), &to_csv(&results))?;
    let md = to_markdown(&results, &policies, &settings.budgets, &loaded.name);
    write_atomic(&args.out.join("results.md"), &md)?;
    let plots = plot(&results, &policies, &settings.budgets, &args.out)?;
    args.model.log(&format!("{} plots", plots.len()));
    println!("{md}");
    args.model.log(&format!("results in {}", args.out.display()));
    Ok(())
}

/// Every (task, sample name, sample) the settings ask for.
fn build_samples<B: Backend>(
    loaded: &LoadedModel<B>,
    args: &EvalArgs,
    settings: &Settings,
) -> CliResult<Vec<(String, String, Sample)>> {
    let tok = &loaded.tokenizer;
    let needs_text = settings.tasks.iter().any(|t| t != "passkey");
    let texts: Vec<(String, String)> = match (&args.text_file, needs_text) {
        (_, false) => Vec::new(),
        (Some(f), true) => {
            let text = std::fs::read_to_string(f).map_err(|e| CliError(format!("{}: {e}", f.display())))?;
            vec![(f.display().to_string(), text)]
        }
        (None, true) => {
            let quiet = args.model.quiet;
            let corpus = eval::fetch_corpus(&fetch::easykv_home(), &mut |m| {
                if !quiet {
                    eprintln!("{m}")
                }
            })?;
            ["paradise_lost", "tempest", "hamlet", "macbeth", "lear"]
                .iter()
                .map(|n| Ok((n.to_string(), corpus.text(n)?)))
                .collect::<CliResult<_>>()?
        }
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(settings.seed);
    let mut out = Vec::new();
    for task in &settings.tasks {
        match task.as_str() {
            "ppl" => {
                let (name, text) = &texts[0];
                let ids: Vec<u32> = tok.encode(text)?.into_iter().take(settings.ppl_tokens).collect();
                if ids.len() < 16 {
                    return Err(CliError(format!("{name}: too little text to score")));
                }
                out.push((
                    task.clone(),
                    format!("{name} {} tokens", ids.len()),
                    Sample::Perplexity { ids },
                ));
            }
            "passkey" | "niah" => {
                for &len in &settings.lengths {
                    for &depth in &settings.depths {
                        for i in 0..settings.samples {
                            let p = if task == "passkey" {
                                tasks::passkey_prompt(tok, rng.random_range(10_000..100_000), len, depth)?
                            } else {
                                // A different play for each sample.
                                let (_, text) = &texts[(i % (texts.len().max(2) - 1)) + usize::from(texts.len() > 1)];
                                tasks::niah_prompt(tok, text, len, depth)?
                            };
                            let ids = tok.encode(&p.text)?;
                            out.push((
                                task.clone(),
                                format!("len {len} depth {depth} #{i}"),
                                Sample::Retrieval {
                                    ids,
                                    answer: p.answer,
                                    needle: p.needle,
                                },
                            ));
                        }
                    }
                }
            }
            "fidelity" => {
                for &len in &settings.lengths {
                    for i in 0..settings.samples {
                        let (name, text) = &texts[(i + 1) % texts.len()];
                        for (kind, ids) in fidelity_prompts(loaded, text, len)? {
                            out.push((
                                task.clone(),
                                format!("{kind} {name} len {len}"),
                                Sample::Fidelity { ids },
                            ));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Summarize, answer and continue prompts over a document of about `len` tokens.
fn fidelity_prompts<B: Backend>(
    loaded: &LoadedModel<B>,
    text: &str,
    len: usize,
) -> CliResult<Vec<(&'static str, Vec<u32>)>> {
    let tok = &loaded.tokenizer;
    let all = tok.encode(text)?;
    // Skip the title page; take the document from a quarter of the way in.
    let start = (all.len() / 4).min(all.len().saturating_sub(len));
    let doc_ids = &all[start..(start + len).min(all.len())];
    let doc = tok.decode(doc_ids, true)?;
    let mut prompts = vec![("continue", doc_ids.to_vec())];
    if let Some(template) = &loaded.chat_template {
        for (kind, instruction) in [
            ("summarize", "Summarize the text above in a few sentences."),
            (
                "question",
                "Which characters speak in the text above, and what do they want?",
            ),
        ] {
            let user = format!("{doc}\n\n{instruction}");
            let rendered = template.render(&[ChatMessage::new("user", &user)], true)?;
            prompts.push((kind, tok.encode(&rendered)?));
        }
    }
    Ok(prompts)
}

#[allow(clippy::too_many_arguments)]
fn run_cell<B: Backend>(
    loaded: &LoadedModel<B>,
    settings: &Settings,
    sample: &Sample,
    policy: &str,
    budget: &str,
    reference: Option<&Cell>,
) -> CliResult<Cell> {
    let eviction = EvictionConfig {
        budget: if budget == "-" {
            Budget::Ratio(0.5)
        } else {
            budget.parse()?
        },
        mode: settings.mode.parse()?,
        stride: settings.stride,
        seed: settings.seed,
        ..Default::default()
    };
    let chunk = 512;
    let (prompt_len, new_tokens) = match sample {
        Sample::Perplexity { ids } => (ids.len() - 1, 0),
        Sample::Retrieval { ids, .. } => (ids.len(), 12),
        Sample::Fidelity { ids } => (ids.len(), settings.new_tokens),
    };
    let profile = loaded.model.profile();
    let mut cache = build_cache::<B>(policy, &eviction, &loaded.config, profile, loaded.dtype, prompt_len, chunk)?;
    let mut metrics = BTreeMap::new();
    let mut cell = Cell {
        task: String::new(),
        sample: String::new(),
        policy: policy.into(),
        budget: budget.into(),
        metrics: BTreeMap::new(),
        output: None,
        ids: None,
        seconds: 0.0,
    };
    let mut decode = |ids: &[u32]| -> CliResult<(Vec<u32>, String)> {
        let cfg = GenerateConfig {
            max_new_tokens: new_tokens,
            chunk_size: chunk,
            sampling: SamplingConfig::default(),
            stop_ids: loaded.tokenizer.stop_ids.clone(),
            top_logprobs: 0,
        };
        let g = generate(&loaded.model, cache.as_mut(), ids, &cfg, |_| {
            std::ops::ControlFlow::Continue(())
        })?;
        let text = loaded.tokenizer.decode(&g.ids, true)?;
        Ok((g.ids, text))
    };
    match sample {
        Sample::Perplexity { ids } => {
            let s = score(&loaded.model, cache.as_mut(), ids, chunk)?;
            metrics.insert("perplexity".into(), s.perplexity);
            metrics.insert("mean_nll".into(), s.mean_nll);
        }
        Sample::Retrieval { ids, answer, needle } => {
            let (_, text) = decode(ids)?;
            metrics.insert("found".into(), f64::from(u8::from(tasks::answer_found(&text, answer))));
            metrics.insert("rouge_l_recall".into(), metrics::rouge_l(&text, needle).recall);
            cell.output = Some(text);
        }
        Sample::Fidelity { ids } => {
            let (out_ids, text) = decode(ids)?;
            if policy == "full" {
                cell.ids = Some(out_ids);
            } else {
                let reference =
                    reference.ok_or_else(|| CliError("internal: the full-cache reference is missing".into()))?;
                let ref_text = reference.output.clone().unwrap_or_default();
                let ref_ids = reference.ids.clone().unwrap_or_default();
                let r = metrics::rouge_l(&text, &ref_text);
                metrics.insert("rouge_l_f1".into(), r.f1);
                metrics.insert("bleu".into(), metrics::bleu(&text, &ref_text));
                metrics.insert(
                    "exact_match".into(),
                    f64::from(u8::from(metrics::exact_match(&text, &ref_text))),
                );
                let diverge = metrics::first_divergence(&out_ids, &ref_ids).unwrap_or(out_ids.len().max(ref_ids.len()));
                metrics.insert("first_divergence".into(), diverge as f64);
            }
            cell.output = Some(text);
        }
    }
    cell.metrics = metrics;
    Ok(cell)
}

fn to_json(results: &Results) -> CliResult<String> {
    serde_json::to_string_pretty(results).map_err(|e| CliError(e.to_string()))
}

/// Writes `text` next to `path` and renames it into place: a reader never sees half a file.
fn write_atomic(path: &Path, text: &str) -> CliResult {
    Ok(easykv_models::atomic::write_atomic(path, text)?)
}

fn to_csv(results: &Results) -> String {
    let mut s = String::from("task,sample,policy,budget,metric,value\n");
    for c in &results.cells {
        for (m, v) in &c.metrics {
            s.push_str(&format!(
                "{},\"{}\",{},{},{m},{v}\n",
                c.task, c.sample, c.policy, c.budget
            ));
        }
    }
    s
}

/// The metric each task's main table shows, and how to print it.
fn main_metrics(task: &str) -> &'static [&'static str] {
    match task {
        "ppl" => &["perplexity"],
        "passkey" => &["found"],
        "niah" => &["found", "rouge_l_recall"],
        _ => &["rouge_l_f1", "bleu", "exact_match", "first_divergence"],
    }
}

/// The mean of `metric` over the samples of one (task, policy, budget), if any were measured.
fn cell_mean(results: &Results, task: &str, metric: &str, policy: &str, budget: &str) -> Option<f64> {
    let v: Vec<f64> = results
        .cells
        .iter()
        .filter(|c| c.task == task && c.policy == policy && c.budget == budget)
        .filter_map(|c| c.metrics.get(metric).copied())
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// One table per task and metric: rows policies, columns budgets, cells means over samples.
fn to_markdown(results: &Results, policies: &[&str], budgets: &[String], model: &str) -> String {
    let s = &results.settings;
    let mut md = format!(
        "# easykv eval — {model}\n\nmode {}, stride {}, seed {}, easykv {}; values are means over samples.\n",
        s.mode, s.stride, s.seed, results.easykv_version
    );
    for task in &s.tasks {
        for metric in main_metrics(task) {
            let mean = |policy: &str, budget: &str| cell_mean(results, task, metric, policy, budget);
            if policies.iter().all(|p| budgets.iter().all(|b| mean(p, b).is_none())) && mean("full", "-").is_none() {
                continue;
            }
            md.push_str(&format!("\n## {task}: {metric}\n\n| policy |"));
            for b in budgets {
                md.push_str(&format!(" {b} |"));
            }
            md.push_str("\n|---|");
            md.push_str(&"---:|".repeat(budgets.len()));
            md.push('\n');
            for &p in policies {
                md.push_str(&format!("| {p} |"));
                for b in budgets {
                    let v = if p == "full" { mean("full", "-") } else { mean(p, b) };
                    md.push_str(&match v {
                        Some(v) => format!(" {v:.4} |"),
                        None => " – |".into(),
                    });
                }
                md.push('\n');
            }
        }
    }
    md
}

/// DejaVu Sans (Bitstream Vera license, see assets/): plotters needs a font to lay out text.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// One line chart per task and metric: the metric against the budget, one line per policy,
/// the full cache as a dashed reference. Written as SVG and PNG; returns the files.
fn plot(results: &Results, policies: &[&str], budgets: &[String], out: &Path) -> CliResult<Vec<PathBuf>> {
    use plotters::prelude::*;
    // Registering twice (a second eval in one process) is harmless.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let mut files = Vec::new();
    for task in &results.settings.tasks {
        for metric in main_metrics(task) {
            let mean = |policy: &str, budget: &str| cell_mean(results, task, metric, policy, budget);
            let lines: Vec<(&str, Vec<(f64, f64)>)> = policies
                .iter()
                .filter(|p| **p != "full")
                .map(|p| {
                    let pts = budgets
                        .iter()
                        .enumerate()
                        .filter_map(|(i, b)| mean(p, b).map(|v| (i as f64, v)))
                        .collect();
                    (*p, pts)
                })
                .collect();
            let full = mean("full", "-");
            let values: Vec<f64> = lines
                .iter()
                .flat_map(|(_, l)| l.iter().map(|p| p.1))
                .chain(full)
                .collect();
            if values.is_empty() {
                continue;
            }
            let (lo, hi) = values
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let pad = ((hi - lo) * 0.1).max(1e-3);
            let chart = Chart {
                title: format!("{task}: {metric} vs budget ({})", results.settings.mode),
                metric,
                budgets,
                lines: &lines,
                full,
                y: (lo - pad, hi + pad),
                x1: (budgets.len().max(2) - 1) as f64,
            };
            let stem = format!("{task}_{metric}");
            let svg = out.join(format!("{stem}.svg"));
            let png = out.join(format!("{stem}.png"));
            chart
                .draw(SVGBackend::new(&svg, (800, 500)).into_drawing_area())
                .map_err(|e| CliError(format!("{}: {e}", svg.display())))?;
            chart
                .draw(BitMapBackend::new(&png, (800, 500)).into_drawing_area())
                .map_err(|e| CliError(format!("{}: {e}", png.display())))?;
            files.extend([svg, png]);
        }
    }
    Ok(files)
}

/// What one plot shows.
struct Chart<'a> {
    title: String,
    metric: &'a str,
    budgets: &'a [String],
    /// Per policy, (budget index, mean).
    lines: &'a [(&'a str, Vec<(f64, f64)>)],
    full: Option<f64>,
    y: (f64, f64),
    x1: f64,
}

impl Chart<'_> {
    fn draw<DB: plotters::prelude::DrawingBackend>(
        &self,
        root: plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<(), String>
    where
        DB::ErrorType: 'static,
    {
        use plotters::prelude::*;
        let x1 = self.x1;
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.2..x1 + 0.2, self.y.0..self.y.1)
            .map_err(|e| e.to_string())?;
        let budgets = self.budgets;
        chart
            .configure_mesh()
            .x_labels(budgets.len().max(2))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    budgets.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .x_desc("budget")
            .y_desc(self.metric)
            .draw()
            .map_err(|e| e.to_string())?;
        if let Some(f) = self.full {
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(-0.2, f), (x1 + 0.2, f)],
                    6,
                    4,
                    BLACK.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label("full cache")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
        }
        for (i, (name, pts)) in self.lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
    }
}
