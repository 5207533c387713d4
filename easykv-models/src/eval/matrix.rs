//! The policies × budgets matrix of an evaluation: its settings, the samples each task asks
//! for, one cell per (sample, policy, budget), and the results file that lets an interrupted
//! run resume. `easykv eval` parses flags into [`EvalSettings`] and writes reports from
//! [`Results`]; library users can drive the same matrix.

use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::Backend;
use easykv_core::{Budget, EvictionConfig};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{answer_found, bleu, exact_match, fetch_corpus, first_divergence, niah_prompt, passkey_prompt, rouge_l};
use crate::build_cache;
use crate::chat::ChatMessage;
use crate::error::{Error, Result};
use crate::generate::{generate, score, GenerateConfig};
use crate::loader::LoadedModel;
use crate::model::CausalLm;
use crate::sampling::SamplingConfig;

/// JSON has no NaN: metrics that are not finite go out as `null` and come back as NaN, so a
/// results file always reads back.
mod nan_as_null {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(m: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
        let opt: BTreeMap<&String, Option<f64>> = m.iter().map(|(k, v)| (k, v.is_finite().then_some(*v))).collect();
        opt.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
        let opt = BTreeMap::<String, Option<f64>>::deserialize(d)?;
        Ok(opt.into_iter().map(|(k, v)| (k, v.unwrap_or(f64::NAN))).collect())
    }
}

/// The tasks `easykv eval` runs.
pub const TASKS: &[&str] = &["ppl", "passkey", "niah", "fidelity"];

/// What a run was asked to do: results are resumed only under identical settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalSettings {
    pub tasks: Vec<String>,
    pub model: String,
    pub dtype: String,
    pub policies: Vec<String>,
    pub budgets: Vec<String>,
    pub mode: String,
    pub stride: usize,
    pub samples: usize,
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub ppl_tokens: usize,
    pub new_tokens: usize,
    pub text_file: Option<String>,
    pub seed: u64,
}

/// One measured cell: a task sample under one policy and budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub task: String,
    pub sample: String,
    pub policy: String,
    pub budget: String,
    /// A value that is not finite (a NaN perplexity) is written as `null` and read back as NaN.
    #[serde(with = "nan_as_null")]
    pub metrics: BTreeMap<String, f64>,
    /// Full-cache outputs, kept as the fidelity reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<u32>>,
    pub seconds: f64,
}

impl Cell {
    /// `task|sample|policy|budget`: what identifies a cell when resuming.
    pub fn key(&self) -> String {
        format!("{}|{}|{}|{}", self.task, self.sample, self.policy, self.budget)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub easykv_version: String,
    pub model_sha256: String,
    pub settings: EvalSettings,
    pub cells: Vec<Cell>,
}

/// One sample of a task: its prompt (or text) and what scores it.
#[derive(Debug, Clone)]
pub enum Sample {
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
    /// A RULER-style task: scored by the share of `answers` the output holds.
    Ruler {
        ids: Vec<u32>,
        answers: Vec<String>,
        new_tokens: usize,
    },
}

impl EvalSettings {
    /// The full cache first, then the settings' policies.
    pub fn policies_with_full(&self) -> Vec<&str> {
        let mut policies: Vec<&str> = vec!["full"];
        policies.extend(self.policies.iter().map(String::as_str).filter(|p| *p != "full"));
        policies
    }
}

impl Results {
    /// Empty results for `settings`, or the ones at `path` when they were made under the same
    /// settings and model (resuming); an error when `path` holds other results.
    pub fn open(path: &Path, settings: &EvalSettings, model_sha256: &str, fresh: bool) -> Result<Self> {
        if path.is_file() && !fresh {
            let previous =
                Self::load(path).map_err(|e| Error::InvalidInput(format!("{e}; use --force to replace it")))?;
            if previous.settings != *settings || previous.model_sha256 != model_sha256 {
                return Err(Error::InvalidInput(format!(
                    "{} holds results of other settings; use --force to replace them or choose another --out",
                    path.display()
                )));
            }
            return Ok(previous);
        }
        Ok(Results {
            easykv_version: env!("CARGO_PKG_VERSION").into(),
            model_sha256: model_sha256.into(),
            settings: settings.clone(),
            cells: Vec::new(),
        })
    }

    /// The results in `path`, whatever their settings.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::InvalidInput(format!("{}: not an easykv results file ({e})", path.display())))
    }

    /// Writes the results as JSON, atomically (a reader never sees half a file).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::InvalidInput(e.to_string()))?;
        crate::atomic::write_atomic(path, &text)
    }

    /// The finite values of `metric` over the samples of `tasks` under one (policy, budget).
    fn values(&self, tasks: &[&str], metric: &str, policy: &str, budget: &str) -> Vec<f64> {
        self.cells
            .iter()
            .filter(|c| tasks.contains(&c.task.as_str()) && c.policy == policy && c.budget == budget)
            .filter_map(|c| c.metrics.get(metric).copied())
            .filter(|v| v.is_finite())
            .collect()
    }

    /// The mean of `metric` over the samples of one (task, policy, budget), if any were measured.
    pub fn mean(&self, task: &str, metric: &str, policy: &str, budget: &str) -> Option<f64> {
        self.mean_ci95(&[task], metric, policy, budget).map(|m| m.0)
    }

    /// The mean of `metric` over every sample of `tasks` under one (policy, budget), the
    /// half-width of its 95 % confidence interval (normal approximation, 1.96 standard errors;
    /// 0 for one sample) and the number of samples.
    pub fn mean_ci95(&self, tasks: &[&str], metric: &str, policy: &str, budget: &str) -> Option<(f64, f64, usize)> {
        crate::eval::metrics::mean_ci95(&self.values(tasks, metric, policy, budget))
    }
}

/// The metrics each task's main table shows.
pub fn main_metrics(task: &str) -> &'static [&'static str] {
    match task {
        "ppl" => &["perplexity"],
        "passkey" => &["found"],
        "niah" => &["found", "rouge_l_recall"],
        t if crate::eval::ruler::RULER_TASKS.contains(&t) => &["score"],
        _ => &["rouge_l_f1", "bleu", "exact_match", "first_divergence"],
    }
}

/// One cell still to run: (task, sample name, sample index, policy, budget).
pub type PendingCell = (String, String, usize, String, String);

/// The cells of the matrix `results` does not hold yet, full-cache cells of a sample before
/// its policies' (fidelity compares against them).
pub fn pending_cells(
    settings: &EvalSettings,
    samples: &[(String, String, Sample)],
    results: &Results,
) -> Vec<PendingCell> {
    let mut todo = Vec::new();
    for (i, (task, name, _)) in samples.iter().enumerate() {
        for policy in settings.policies_with_full() {
            let budgets: Vec<&str> = match policy {
                "full" => vec!["-"],
                _ => settings.budgets.iter().map(String::as_str).collect(),
            };
            for budget in budgets {
                let key = format!("{task}|{name}|{policy}|{budget}");
                if !results.cells.iter().any(|c| c.key() == key) {
                    todo.push((task.clone(), name.clone(), i, policy.to_string(), budget.to_string()));
                }
            }
        }
    }
    todo
}

/// Runs every pending cell of the matrix into `results`, calling `after_cell` after each (to
/// save and report progress). With `--mode once` the decoding cells of a sample share one
/// prefill where their caches split the prompt alike ([`super::shared`]).
pub fn run_matrix<B: Backend>(
    loaded: &LoadedModel<B>,
    samples: &[(String, String, Sample)],
    results: &mut Results,
    after_cell: &mut dyn FnMut(&Results, &PendingCell) -> Result<()>,
) -> Result<()> {
    let settings = results.settings.clone();
    let once = settings.mode.parse::<easykv_core::Mode>().ok() == Some(easykv_core::Mode::Once);
    let pending = pending_cells(&settings, samples, results);
    // Pending cells come sample by sample.
    for group in pending.chunk_by(|a, b| a.2 == b.2) {
        let Some((_, _, index, ..)) = group.first() else {
            continue;
        };
        let sample = &samples[*index].2;
        if !once || group.len() < 2 || matches!(sample, Sample::Perplexity { .. }) {
            for p in group {
                run_alone(loaded, &settings, sample, p, results, after_cell)?;
            }
            continue;
        }
        // Cells whose caches split the prompt alike, in order of first appearance (the full
        // cache's first: fidelity scores the others against it).
        type Cells<'a, B> = (Vec<usize>, Vec<&'a PendingCell>, Vec<Box<dyn easykv_core::KvCache<B>>>);
        let mut by_chunks: Vec<Cells<'_, B>> = Vec::new();
        for p in group {
            let cache = cell_cache(loaded, &settings, sample, &p.3, &p.4)?;
            let chunks = cache.prefill_chunks(sample_prompt(sample).len(), CHUNK);
            match by_chunks.iter_mut().find(|(c, ..)| *c == chunks) {
                Some((_, cells, caches)) => {
                    cells.push(p);
                    caches.push(cache);
                }
                None => by_chunks.push((chunks, vec![p], vec![cache])),
            }
        }
        for (_, cells, caches) in by_chunks {
            let pairs: Vec<(String, String)> = cells.iter().map(|p| (p.3.clone(), p.4.clone())).collect();
            let shared = match cells.len() {
                1 => None,
                _ => {
                    let reference = full_reference(results, cells[0]);
                    super::shared::run_shared(loaded, &settings, sample, &pairs, caches, reference.as_ref())?
                }
            };
            match shared {
                Some(done) => {
                    for (mut cell, p) in done.into_iter().zip(&cells) {
                        cell.task = p.0.clone();
                        cell.sample = p.1.clone();
                        results.cells.push(cell);
                        after_cell(results, p)?;
                    }
                }
                None => {
                    for p in cells {
                        run_alone(loaded, &settings, sample, p, results, after_cell)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// The full cache's cell of `pending`'s sample, if it has run.
fn full_reference(results: &Results, pending: &PendingCell) -> Option<Cell> {
    let (task, name, ..) = pending;
    results
        .cells
        .iter()
        .find(|c| c.task == *task && c.sample == *name && c.policy == "full")
        .cloned()
}

/// Runs one pending cell on its own into `results`.
fn run_alone<B: Backend>(
    loaded: &LoadedModel<B>,
    settings: &EvalSettings,
    sample: &Sample,
    pending: &PendingCell,
    results: &mut Results,
    after_cell: &mut dyn FnMut(&Results, &PendingCell) -> Result<()>,
) -> Result<()> {
    let (task, name, _, policy, budget) = pending;
    let t = std::time::Instant::now();
    let reference = full_reference(results, pending);
    let mut cell = run_cell(loaded, settings, sample, policy, budget, reference.as_ref())?;
    cell.task = task.clone();
    cell.sample = name.clone();
    cell.seconds = t.elapsed().as_secs_f64();
    results.cells.push(cell);
    after_cell(results, pending)
}

/// Every (task, sample name, sample) the settings ask for.
pub fn build_samples<B: Backend>(
    loaded: &LoadedModel<B>,
    settings: &EvalSettings,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<(String, String, Sample)>> {
    let tok = &loaded.tokenizer;
    let needs_text = settings.tasks.iter().any(|t| t != "passkey");
    let texts: Vec<(String, String)> = match (&settings.text_file, needs_text) {
        (_, false) => Vec::new(),
        (Some(f), true) => {
            let path = Path::new(f);
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            vec![(f.clone(), text)]
        }
        (None, true) => {
            let corpus = fetch_corpus(&crate::fetch::easykv_home(), log)?;
            ["paradise_lost", "tempest", "hamlet", "macbeth", "lear"]
                .iter()
                .map(|n| Ok((n.to_string(), corpus.text(n)?)))
                .collect::<Result<_>>()?
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
                    return Err(Error::InvalidInput(format!("{name}: too little text to score")));
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
                                passkey_prompt(tok, rng.random_range(10_000..100_000), len, depth)?
                            } else {
                                // A different play for each sample.
                                let (_, text) = &texts[(i % (texts.len().max(2) - 1)) + usize::from(texts.len() > 1)];
                                niah_prompt(tok, text, len, depth)?
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
            t if crate::eval::ruler::RULER_TASKS.contains(&t) => {
                // Samples drawn in order (one seeded generator), then each padded to exactly
                // its length on its own thread: a pad costs up to hundreds of tokenizations.
                let mut drawn = Vec::new();
                for &len in &settings.lengths {
                    for i in 0..settings.samples {
                        // The haystack: a different play for each sample.
                        let (_, text) = &texts[i % texts.len()];
                        let r = crate::eval::ruler::ruler_sample(t, tok, text, len, &mut rng)?;
                        let filler = crate::eval::ruler::filler_words(text, len, &mut rng);
                        drawn.push((len, i, r, filler));
                    }
                }
                let template = &loaded.chat_template;
                let padded: Vec<Result<Vec<u32>>> = drawn
                    .par_iter()
                    .map(|(len, _, r, filler)| {
                        let mut render = |pad: &str| -> Result<Vec<u32>> {
                            let question = format!("{pad}{}", r.question);
                            let prompt = match template {
                                Some(template) => template.render(&[ChatMessage::new("user", &question)], true)?,
                                None => format!("{question}\n"),
                            };
                            tok.encode(&format!("{prompt}{}", r.answer_prefix))
                        };
                        // Exactly `len` tokens: one shape for every sample of the length.
                        crate::eval::ruler::pad_to_length(&mut render, filler, *len)
                    })
                    .collect();
                for ((len, i, r, _), ids) in drawn.into_iter().zip(padded) {
                    out.push((
                        task.clone(),
                        format!("len {len} #{i}"),
                        Sample::Ruler {
                            ids: ids?,
                            answers: r.answers,
                            new_tokens: r.new_tokens,
                        },
                    ));
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
) -> Result<Vec<(&'static str, Vec<u32>)>> {
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

/// One cell: the sample run under `policy` at `budget` (`"-"` for the full cache), scored.
/// `reference`: the sample's full-cache cell (fidelity compares against it).
pub fn run_cell<B: Backend>(
    loaded: &LoadedModel<B>,
    settings: &EvalSettings,
    sample: &Sample,
    policy: &str,
    budget: &str,
    reference: Option<&Cell>,
) -> Result<Cell> {
    let mut cache = cell_cache(loaded, settings, sample, policy, budget)?;
    if let Sample::Perplexity { ids } = sample {
        let s = score(&loaded.model, cache.as_mut(), ids, CHUNK)?;
        let mut cell = empty_cell(policy, budget);
        cell.metrics.insert("perplexity".into(), s.perplexity);
        cell.metrics.insert("mean_nll".into(), s.mean_nll);
        return Ok(cell);
    }
    let g = generate(
        &loaded.model,
        cache.as_mut(),
        sample_prompt(sample),
        &decode_config(loaded, settings, sample),
        |_| std::ops::ControlFlow::Continue(()),
    )?;
    scored_cell(loaded, sample, policy, budget, g.ids, reference)
}

/// Prompt tokens per prefill pass in every cell.
pub const CHUNK: usize = 512;

/// The cache a cell runs with.
pub fn cell_cache<B: Backend>(
    loaded: &LoadedModel<B>,
    settings: &EvalSettings,
    sample: &Sample,
    policy: &str,
    budget: &str,
) -> Result<Box<dyn easykv_core::KvCache<B>>> {
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
    let prompt_len = match sample {
        Sample::Perplexity { ids } => ids.len() - 1,
        _ => sample_prompt(sample).len(),
    };
    build_cache::<B>(
        policy,
        &eviction,
        &loaded.config,
        loaded.model.profile(),
        loaded.dtype,
        prompt_len,
        CHUNK,
    )
}

/// The prompt a decoding sample generates from (a perplexity sample's text).
pub fn sample_prompt(sample: &Sample) -> &[u32] {
    match sample {
        Sample::Perplexity { ids }
        | Sample::Retrieval { ids, .. }
        | Sample::Fidelity { ids }
        | Sample::Ruler { ids, .. } => ids,
    }
}

/// Greedy decoding of a sample's answer.
pub(crate) fn decode_config<B: Backend>(
    loaded: &LoadedModel<B>,
    settings: &EvalSettings,
    sample: &Sample,
) -> GenerateConfig {
    let max_new_tokens = match sample {
        Sample::Perplexity { .. } => 0,
        Sample::Retrieval { .. } => 12,
        Sample::Fidelity { .. } => settings.new_tokens,
        Sample::Ruler { new_tokens, .. } => *new_tokens,
    };
    GenerateConfig {
        max_new_tokens,
        chunk_size: CHUNK,
        sampling: SamplingConfig::default(),
        stop_ids: loaded.tokenizer.stop_ids.clone(),
        top_logprobs: 0,
    }
}

fn empty_cell(policy: &str, budget: &str) -> Cell {
    Cell {
        task: String::new(),
        sample: String::new(),
        policy: policy.into(),
        budget: budget.into(),
        metrics: BTreeMap::new(),
        output: None,
        ids: None,
        seconds: 0.0,
    }
}

/// The cell of a decoding sample that generated `out_ids` under `policy` at `budget`.
pub(crate) fn scored_cell<B: Backend>(
    loaded: &LoadedModel<B>,
    sample: &Sample,
    policy: &str,
    budget: &str,
    out_ids: Vec<u32>,
    reference: Option<&Cell>,
) -> Result<Cell> {
    let text = loaded.tokenizer.decode(&out_ids, true)?;
    let mut cell = empty_cell(policy, budget);
    let metrics = &mut cell.metrics;
    match sample {
        Sample::Perplexity { .. } => {}
        Sample::Retrieval { answer, needle, .. } => {
            metrics.insert("found".into(), f64::from(u8::from(answer_found(&text, answer))));
            metrics.insert("rouge_l_recall".into(), rouge_l(&text, needle).recall);
        }
        Sample::Ruler { answers, .. } => {
            metrics.insert("score".into(), crate::eval::ruler::ruler_score(&text, answers));
        }
        Sample::Fidelity { .. } => {
            if policy == "full" {
                cell.ids = Some(out_ids);
            } else {
                let reference =
                    reference.ok_or_else(|| Error::InvalidInput("the full-cache reference cell is missing".into()))?;
                let ref_text = reference.output.clone().unwrap_or_default();
                let ref_ids = reference.ids.clone().unwrap_or_default();
                let r = rouge_l(&text, &ref_text);
                metrics.insert("rouge_l_f1".into(), r.f1);
                metrics.insert("bleu".into(), bleu(&text, &ref_text));
                metrics.insert("exact_match".into(), f64::from(u8::from(exact_match(&text, &ref_text))));
                let diverge = first_divergence(&out_ids, &ref_ids).unwrap_or(out_ids.len().max(ref_ids.len()));
                metrics.insert("first_divergence".into(), diverge as f64);
            }
        }
    }
    cell.output = Some(text);
    Ok(cell)
}

/// Every metric of every cell, one CSV row each.
pub fn to_csv(results: &Results) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EvalSettings {
        EvalSettings {
            tasks: vec!["ppl".into()],
            model: "smollm2".into(),
            dtype: "f32".into(),
            policies: vec!["roco".into(), "full".into()],
            budgets: vec!["0.25".into(), "0.5".into()],
            mode: "encoding".into(),
            stride: 8,
            samples: 1,
            lengths: vec![512],
            depths: vec![0.5],
            ppl_tokens: 64,
            new_tokens: 8,
            text_file: None,
            seed: 0,
        }
    }

    fn cell(policy: &str, budget: &str, value: f64) -> Cell {
        Cell {
            task: "ppl".into(),
            sample: "s".into(),
            policy: policy.into(),
            budget: budget.into(),
            metrics: BTreeMap::from([("perplexity".to_string(), value)]),
            output: None,
            ids: None,
            seconds: 0.0,
        }
    }

    /// The full cache runs first (once, budget `-`), then each policy × budget; finished
    /// cells are not run again; means skip values that are not finite.
    #[test]
    fn the_matrix_plans_full_first_and_resumes() {
        let s = settings();
        let samples = vec![(
            "ppl".to_string(),
            "s".to_string(),
            Sample::Perplexity { ids: vec![1, 2, 3] },
        )];
        let dir = std::env::temp_dir().join(format!("easykv-matrix-{}", std::process::id()));
        let path = dir.join("results.json");
        let _ = std::fs::create_dir_all(&dir);
        let mut results = Results::open(&path, &s, "abc", true).unwrap();
        let plan: Vec<(String, String)> = pending_cells(&s, &samples, &results)
            .into_iter()
            .map(|(_, _, _, p, b)| (p, b))
            .collect();
        let want = [("full", "-"), ("roco", "0.25"), ("roco", "0.5")].map(|(p, b)| (p.to_string(), b.to_string()));
        assert_eq!(plan, want);
        results.cells.push(cell("full", "-", 10.0));
        results.cells.push(cell("roco", "0.25", f64::NAN));
        results.cells.push(cell("roco", "0.25", 12.0));
        assert_eq!(pending_cells(&s, &samples, &results).len(), 1);
        assert_eq!(results.mean("ppl", "perplexity", "roco", "0.25"), Some(12.0));
        results.save(&path).unwrap();
        // Same settings and model: resumed; other settings: refused, naming the way out.
        assert_eq!(Results::open(&path, &s, "abc", false).unwrap().cells.len(), 3);
        let other = EvalSettings {
            stride: 4,
            ..settings()
        };
        let err = Results::open(&path, &other, "abc", false).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        assert!(Results::open(&path, &s, "another model", false).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
