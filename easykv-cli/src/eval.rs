//! `easykv eval`: perplexity, passkey, needle-in-a-haystack, fidelity to the full cache and
//! the RULER-style tasks, for every policy × budget, written to results.json / results.csv /
//! results.md (means with 95 % confidence intervals).
//!
//! Cells are saved as they finish (written to a temporary file, then renamed), so an
//! interrupted run resumes where it stopped; `--force` recomputes.

use std::path::{Path, PathBuf};

use burn::prelude::Backend;
use clap::Args;
use easykv_core::{Budget, Mode};
use easykv_models::eval::{self, main_metrics, run_matrix, to_csv, EvalSettings, Results, RULER_TASKS, TASKS};
use easykv_models::fetch;
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::with_backend;
use crate::common::{outln, CliError, CliResult, ModelArgs, PolicyName};

/// The library's tasks, `suite` (the first four) and `ruler` (the RULER-style ones).
fn task_names() -> Vec<&'static str> {
    TASKS
        .iter()
        .chain(RULER_TASKS)
        .copied()
        .chain(["suite", "ruler"])
        .collect()
}

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// ppl, passkey, niah, fidelity, or suite (those four; with a preset: quick or full); ruler
    /// (RULER-style synthetic tasks generated from --seed over the texts: niah_single,
    /// niah_multikey, niah_multivalue, niah_multiquery, vt, cwe, fwe — or one of them).
    pub task: String,
    /// For `suite`: quick (a few minutes on 2 CPU cores with SmolLM2) or full.
    pub preset: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Policies to compare (the full cache always runs as the reference); default: every
    /// evicting policy (the ada-* ones only with --mode once, the only mode where their
    /// per-head budgets apply).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub policies: Vec<PolicyName>,
    /// KV budgets: ratios of the prompt (0.5) or tokens (512).
    #[arg(long, default_value = "0.25,0.5,0.75", value_delimiter = ',')]
    pub budgets: Vec<String>,
    /// encoding, decoding, auto or once (see `easykv generate --help`).
    #[arg(long, default_value = "encoding")]
    pub mode: String,
    #[arg(long, default_value_t = 8)]
    pub stride: usize,
    /// Samples per setting (passkey keys, fidelity documents, RULER samples per task and length).
    #[arg(long, default_value_t = 2)]
    pub samples: usize,
    /// Prompt lengths in tokens (passkey, niah, fidelity, ruler).
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
    /// Only write results.md, results.csv and the plots from the results.json already in
    /// --out (a run copied from another machine, or cut short): no model is loaded, no cell
    /// runs, and the task and size flags are ignored (the file's settings hold).
    #[arg(long, conflicts_with = "force")]
    pub report: bool,
}

pub fn run(args: EvalArgs) -> CliResult {
    if args.report {
        return report(&args.out);
    }
    let settings = validate(&args)?;
    let device = args.model.device.clone();
    with_backend!(&device, run_on(&args, settings))
}

/// Checks every flag before a model is loaded.
fn validate(args: &EvalArgs) -> CliResult<EvalSettings> {
    if !task_names().contains(&args.task.as_str()) {
        return Err(CliError(format!(
            "unknown task '{}' (valid: {})",
            args.task,
            task_names().join(", ")
        )));
    }
    let mut args = args.clone();
    let tasks: Vec<String> = match (args.task.as_str(), args.preset.as_deref()) {
        ("suite", None | Some("quick") | Some("full")) => TASKS.iter().map(|t| t.to_string()).collect(),
        ("suite", Some(p)) => return Err(CliError(format!("unknown suite preset '{p}' (valid: quick, full)"))),
        ("ruler", None) => RULER_TASKS.iter().map(|t| t.to_string()).collect(),
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
        let text = crate::common::read_text(f)?;
        if text.trim().is_empty() {
            return Err(CliError(format!("{}: the text is empty", f.display())));
        }
    }
    if args.out.exists() && !args.out.is_dir() {
        return Err(CliError(format!(
            "--out {} exists and is not a directory",
            args.out.display()
        )));
    }
    std::fs::create_dir_all(&args.out).map_err(|e| CliError(format!("{}: {e}", args.out.display())))?;
    let probe = args.out.join(".easykv-write-test");
    std::fs::write(&probe, b"").map_err(|e| CliError(format!("{} is not writable: {e}", args.out.display())))?;
    let _ = std::fs::remove_file(probe);
    Ok(EvalSettings {
        tasks,
        model: args.model.model.clone(),
        dtype: format!("{:?}", args.model.dtype()).to_lowercase(),
        policies: match args.policies.is_empty() {
            true => PolicyName::evicting()
                .into_iter()
                .filter(|p| args.mode == "once" || !p.per_head_budgets())
                .map(|p| p.name().to_string())
                .collect(),
            false => args.policies.iter().map(|p| p.name().to_string()).collect(),
        },
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

fn run_on<B: Backend>(device: &B::Device, args: &EvalArgs, settings: EvalSettings) -> CliResult {
    let results_path = args.out.join("results.json");
    let loaded = args.model.load::<B>(device)?;
    // Before any prompt is built: a length past the context could never run (and building a
    // prompt of a billion tokens would take hours).
    let context = loaded.model.context_length();
    if let Some(&too_long) = settings.lengths.iter().find(|&&l| l > context) {
        return Err(CliError(format!(
            "--lengths {too_long} is longer than the model's context of {context} tokens"
        )));
    }
    let model_sha256 = fetch::sha256_file(&loaded.path)?;
    let mut results = Results::open(&results_path, &settings, &model_sha256, args.force)?;
    if !results.cells.is_empty() {
        args.model
            .log(&format!("resuming: {} finished cells kept", results.cells.len()));
    }
    let quiet = args.model.quiet;
    let started = std::time::Instant::now();
    let samples = eval::matrix::build_samples(&loaded, &settings, &mut |m| {
        if !quiet {
            eprintln!("{m}")
        }
    })?;
    args.model.log(&format!(
        "{} samples built in {:.1} s",
        samples.len(),
        started.elapsed().as_secs_f64()
    ));
    let pending = eval::matrix::pending_cells(&settings, &samples, &results).len();
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(pending as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} cells, {elapsed} elapsed, ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    run_matrix(
        &loaded,
        &samples,
        &mut results,
        &mut |results, (task, _, _, policy, budget)| {
            bar.set_message(format!("{task} {policy} {budget}"));
            bar.inc(1);
            results.save(&results_path)
        },
    )?;
    bar.finish_and_clear();
    results.save(&results_path)?;
    let plots = write_tables(&results, &loaded.name, &args.out)?;
    args.model.log(&format!("{plots} plots"));
    args.model.log(&format!("results in {}", args.out.display()));
    Ok(())
}

/// `--report`: the tables and plots of `out`'s results.json.
fn report(out: &Path) -> CliResult {
    let path = out.join("results.json");
    let results = Results::load(&path)?;
    // The model as the run named it (a file's name without its folders).
    let model = Path::new(&results.settings.model)
        .file_name()
        .map_or_else(|| results.settings.model.clone(), |n| n.to_string_lossy().into_owned());
    let plots = write_tables(&results, &model, out)?;
    eprintln!(
        "{} cells, {plots} plots; results in {}",
        results.cells.len(),
        out.display()
    );
    Ok(())
}

/// Writes results.csv, results.md (printed too) and the plots of `results` into `out`;
/// returns how many plots.
fn write_tables(results: &Results, model: &str, out: &Path) -> CliResult<usize> {
    let settings = &results.settings;
    let policies = settings.policies_with_full();
    write_atomic(&out.join("results.csv"), &to_csv(results))?;
    let md = to_markdown(results, &policies, &settings.budgets, model);
    write_atomic(&out.join("results.md"), &md)?;
    let plots = plot(results, &policies, &settings.budgets, out)?;
    outln!("{md}")?;
    Ok(plots.len())
}

/// Writes `text` next to `path` and renames it into place: a reader never sees half a file.
fn write_atomic(path: &Path, text: &str) -> CliResult {
    Ok(easykv_models::atomic::write_atomic(path, text)?)
}

/// One table per task and metric: rows policies, columns budgets, cells means over samples.
fn to_markdown(results: &Results, policies: &[&str], budgets: &[String], model: &str) -> String {
    let s = &results.settings;
    let mut md = format!(
        "# easykv eval — {model}\n\nmode {}, stride {}, seed {}, easykv {}; values are means over samples, ± the half-width of their 95 % confidence interval (1.96 standard errors) where there are several.\n",
        s.mode, s.stride, s.seed, results.easykv_version
    );
    for task in &s.tasks {
        for metric in main_metrics(task) {
            // A cell that is not a number (a NaN perplexity) has no point to draw.
            let mean =
                |policy: &str, budget: &str| results.mean(task, metric, policy, budget).filter(|v| v.is_finite());
            if policies.iter().all(|p| budgets.iter().all(|b| mean(p, b).is_none())) && mean("full", "-").is_none() {
                continue;
            }
            table(&mut md, &format!("{task}: {metric}"), policies, budgets, |p, b| {
                results.mean_ci95(&[task.as_str()], metric, p, b)
            });
        }
    }
    let ruler: Vec<&str> = s
        .tasks
        .iter()
        .map(String::as_str)
        .filter(|t| RULER_TASKS.contains(t) && results.cells.iter().any(|c| c.task == *t))
        .collect();
    if ruler.len() > 1 {
        let title = format!(
            "RULER average ({} tasks with results, every sample counted once): score",
            ruler.len()
        );
        table(&mut md, &title, policies, budgets, |p, b| {
            results.mean_ci95(&ruler, "score", p, b)
        });
    }
    md
}

/// A table of `stat(policy, budget)` under `## title`: rows policies, columns budgets (the
/// full cache's one value, budget `-`, in every column).
fn table(
    md: &mut String,
    title: &str,
    policies: &[&str],
    budgets: &[String],
    stat: impl Fn(&str, &str) -> Option<(f64, f64, usize)>,
) {
    md.push_str(&format!("\n## {title}\n\n| policy |"));
    for b in budgets {
        md.push_str(&format!(" {b} |"));
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(budgets.len()));
    md.push('\n');
    for &p in policies {
        md.push_str(&format!("| {p} |"));
        for b in budgets {
            md.push_str(&cell_text(stat(p, if p == "full" { "-" } else { b.as_str() })));
        }
        md.push('\n');
    }
}

/// A table cell: the mean, ± the 95 % interval's half-width where there are several samples.
fn cell_text(stat: Option<(f64, f64, usize)>) -> String {
    match stat {
        Some((m, _, 1)) if m.is_finite() => format!(" {m:.4} |"),
        Some((m, half, _)) if m.is_finite() => format!(" {m:.4} ± {half:.4} |"),
        _ => " – |".into(),
    }
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
            // A cell that is not a number (a NaN perplexity) has no point to draw.
            let mean =
                |policy: &str, budget: &str| results.mean(task, metric, policy, budget).filter(|v| v.is_finite());
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
