//! The `easykv` binary as a user meets it: exit codes, stdout/stderr discipline, real output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Output;

use common::{easykv, shared, stderr};

/// Bad input: exit code 2 and exactly one line on stderr, naming the problem.
fn assert_one_line_error(o: &Output, needle: &str) {
    assert_eq!(o.status.code(), Some(2), "stderr: {}", stderr(o));
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(needle), "expected {needle:?} in {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(o.stdout.is_empty(), "stdout must stay empty on error");
}

#[test]
fn help_shows_examples() {
    let o = easykv(&["--help"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Examples:") && out.contains("easykv generate"), "{out}");
    let o = easykv(&["generate", "--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("--max-new-tokens"));
}

#[test]
fn bad_input_is_a_one_line_error_with_exit_code_2() {
    assert_one_line_error(&easykv(&["generate", "--prompt", "   "]), "prompt is empty");
    assert_one_line_error(&easykv(&["generate"]), "--prompt");
    assert_one_line_error(
        &easykv(&["generate", "--model", "nonexistent-model", "--prompt", "hi"]),
        "unknown model",
    );
    assert_one_line_error(
        &easykv(&["generate", "--model", "/no/such/file.gguf", "--prompt", "hi"]),
        "does not exist",
    );
    assert_one_line_error(
        &easykv(&["generate", "--device", "tpu", "--prompt", "hi"]),
        "unknown device",
    );
    assert_one_line_error(
        &easykv(&["generate", "--temperature=-1", "--prompt", "hi"]),
        "temperature",
    );
    assert_one_line_error(&easykv(&["generate", "--top-p", "2", "--prompt", "hi"]), "top-p");
    assert_one_line_error(
        &easykv(&["score", "--text-file", "/no/such/text.txt"]),
        "/no/such/text.txt",
    );
    // clap's own usage errors also exit with 2.
    assert_eq!(easykv(&["generate", "--max-new-tokens", "many"]).status.code(), Some(2));
    assert_eq!(easykv(&["frobnicate"]).status.code(), Some(2));
}

#[test]
fn corrupt_model_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("easykv-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff").unwrap();
    assert_one_line_error(
        &easykv(&["generate", "--model", bad.to_str().unwrap(), "--prompt", "hi"]),
        "corrupt GGUF",
    );
    std::fs::write(&bad, b"not a model").unwrap();
    assert_one_line_error(
        &easykv(&["generate", "--model", bad.to_str().unwrap(), "--prompt", "hi"]),
        "bad magic",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn prompt_longer_than_the_context_is_rejected() {
    let prompt = "hello ".repeat(9000);
    assert_one_line_error(&easykv(&["generate", "--prompt", &prompt, "-q"]), "context");
}

#[test]
fn chat_generation_answers_on_stdout_and_stats_on_stderr() {
    let o = easykv(&[
        "generate",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "12",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.trim(), "The capital of France is Paris.");
    assert!(stderr(&o).contains("tok/s"));
}

#[test]
fn json_output_and_control_tokens_in_a_raw_prompt() {
    // The same chat prompt written out by hand: control tokens must be recognized.
    let prompt = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let o = easykv(&["generate", "--prompt", prompt, "--max-new-tokens", "12", "--json", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stderr.is_empty(), "-q keeps stderr empty: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["prompt_tokens"], 37);
    assert_eq!(v["ids"], serde_json::json!([504, 3575, 282, 4649, 314, 7042, 30]));
    assert_eq!(v["stop_reason"], "stop_token");
}

#[test]
fn sampling_is_reproducible_for_a_seed() {
    let run = |seed: &str| {
        let o = easykv(&[
            "generate",
            "--prompt",
            "Once upon a time",
            "--temperature",
            "0.9",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--max-new-tokens",
            "10",
            "-q",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        o.stdout
    };
    assert_eq!(run("11"), run("11"));
}

#[test]
fn score_reports_perplexity() {
    let text = shared("data/last_of_the_mohicans.txt");
    let o = easykv(&[
        "score",
        "--text-file",
        text.to_str().unwrap(),
        "--max-tokens",
        "64",
        "--json",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["scored"], 63);
    assert_eq!(v["nll"].as_array().unwrap().len(), 63);
    let ppl = v["perplexity"].as_f64().unwrap();
    assert!(ppl > 1.0 && ppl < 1000.0, "{ppl}");
}

#[test]
fn eviction_flags_are_validated_before_loading() {
    assert_one_line_error(
        &easykv(&["generate", "--prompt", "hi", "--policy", "lru"]),
        "valid: roco, h2o, tova, snapkv, pyramidkv, knorm, expected-attention, ada-snapkv, ada-expected-attention, ada-roco, ada-h2o, ada-knorm, recency, random, full",
    );
    assert_one_line_error(
        &easykv(&["generate", "--prompt", "hi", "--policy", "roco", "--budget", "lots"]),
        "budget",
    );
    assert_one_line_error(
        &easykv(&["generate", "--prompt", "hi", "--policy", "roco", "--budget=-0.5"]),
        "budget",
    );
    assert_one_line_error(
        &easykv(&["generate", "--prompt", "hi", "--policy", "roco", "--mode", "sideways"]),
        "mode",
    );
    assert_one_line_error(
        &easykv(&["generate", "--prompt", "hi", "--policy", "roco", "--stride", "0"]),
        "stride",
    );
    assert_one_line_error(
        &easykv(&["generate", "--prompt", "hi", "--policy", "roco", "--ranking", "bubble"]),
        "unknown ranking 'bubble' (expected auto, host, pairwise or sort)",
    );
    assert_one_line_error(
        &easykv(&[
            "generate",
            "--prompt",
            "hi",
            "--policy",
            "roco",
            "--recent-ratio",
            "1.5",
        ]),
        "recent",
    );
    // A budget that cannot hold sinks + one stride is impossible, and says so.
    assert_one_line_error(
        &easykv(&[
            "generate",
            "--prompt",
            "Tell me a story about a dragon.",
            "--policy",
            "roco",
            "--budget",
            "0.1",
            "-q",
        ]),
        "at least",
    );
}

#[test]
fn decoding_mode_keeps_the_cache_under_budget_with_stats() {
    let o = easykv(&[
        "generate",
        "--chat",
        "--prompt",
        "Write a long story about the sea.",
        "--policy",
        "roco",
        "--mode",
        "decoding",
        "--budget",
        "24",
        "--max-new-tokens",
        "48",
        "--json",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let prompt = v["prompt_tokens"].as_u64().unwrap();
    let generated = v["ids"].as_array().unwrap().len() as u64;
    let slots: Vec<u64> = v["slots_per_layer"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert_eq!(slots.len(), 30);
    assert!(slots.iter().all(|&s| s == slots[0] && s <= prompt + 24), "{slots:?}");
    if generated > 30 {
        assert!(v["evicted_per_head"].as_u64().unwrap() > 0);
    }
    assert!(!v["text"].as_str().unwrap().is_empty());
}

#[test]
fn encoding_mode_stats_and_budgeted_perplexity() {
    let text = shared("data/last_of_the_mohicans.txt");
    let excerpt = std::env::temp_dir().join(format!("easykv-excerpt-{}.txt", std::process::id()));
    let full_text = std::fs::read_to_string(&text).unwrap();
    std::fs::write(&excerpt, &full_text[..full_text.char_indices().nth(3000).unwrap().0]).unwrap();
    let o = easykv(&[
        "generate",
        "--prompt-file",
        excerpt.to_str().unwrap(),
        "--policy",
        "h2o",
        "--budget",
        "0.5",
        "--stride",
        "32",
        "--max-new-tokens",
        "4",
        "--stats",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("[cache: policy h2o") && err.contains("evicted"), "{err}");
    // Perplexity under a budget: the same strided prefill, every token scored.
    let score = |policy: &str| {
        let o = easykv(&[
            "score",
            "--text-file",
            text.to_str().unwrap(),
            "--max-tokens",
            "300",
            "--policy",
            policy,
            "--budget",
            "64",
            "--stride",
            "16",
            "--json",
            "-q",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["scored"], 299);
        v["perplexity"].as_f64().unwrap()
    };
    let _ = std::fs::remove_file(&excerpt);
    let (full, roco) = (score("full"), score("roco"));
    assert!(roco.is_finite() && full.is_finite());
    // Evicting 3/4 of the context cannot help the model predict.
    assert!(roco >= full * 0.99, "roco {roco} vs full {full}");
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("easykv-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn eval_writes_tables_and_resumes() {
    let out = temp_dir("eval");
    let text = shared("data/last_of_the_mohicans.txt");
    let args = |task: &str| -> Vec<String> {
        [
            "eval",
            task,
            "-q",
            "--policies",
            "roco,recency",
            "--budgets",
            "0.5",
            "--lengths",
            "192",
            "--depths",
            "0.5",
            "--samples",
            "1",
            "--ppl-tokens",
            "160",
            "--new-tokens",
            "8",
            "--text-file",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([text.display().to_string(), "--out".into(), out.display().to_string()])
        .collect()
    };
    let run = |task: &str| {
        let a = args(task);
        easykv(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let o = run("ppl");
    assert!(o.status.success(), "{}", stderr(&o));
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("## ppl: perplexity") && md.contains("| roco |") && md.contains("| full |"),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let cells = json["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 3, "full + 2 policies × 1 budget");
    let ppl = |p: &str| {
        cells.iter().find(|c| c["policy"] == p).unwrap()["metrics"]["perplexity"]
            .as_f64()
            .unwrap()
    };
    assert!(ppl("full") > 1.0 && ppl("full").is_finite());
    // Evicting half the context changes the scores, within reason.
    for p in ["roco", "recency"] {
        assert!(
            ppl(p) != ppl("full") && (ppl(p) / ppl("full") - 1.0).abs() < 0.5,
            "{p}: {} vs {}",
            ppl(p),
            ppl("full")
        );
    }
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert!(csv.starts_with("task,sample,policy,budget,metric,value") && csv.lines().count() == 7);
    assert!(!out.join("results.partial").exists());
    // The metric against the budget, as SVG and PNG.
    let svg = std::fs::read_to_string(out.join("ppl_perplexity.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("roco") && svg.contains("full cache"),
        "{svg}"
    );
    let png = std::fs::read(out.join("ppl_perplexity.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");

    // A second run finds every cell done and recomputes nothing.
    let before = std::fs::read_to_string(out.join("results.json")).unwrap();
    let o = easykv(
        &args("ppl")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .iter()
            .filter(|a| **a != "-q")
            .copied()
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming: 3 finished cells kept"), "{}", stderr(&o));
    assert_eq!(before, std::fs::read_to_string(out.join("results.json")).unwrap());

    // `--report` rewrites the tables from results.json alone, whatever the other flags say.
    std::fs::remove_file(out.join("results.md")).unwrap();
    let o = easykv(&["eval", "passkey", "--report", "--out", &out.display().to_string()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The same tables; only the title's model name comes from the settings, not the file.
    let reported = std::fs::read_to_string(out.join("results.md")).unwrap();
    let tables = |md: &str| md.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(tables(&md), tables(&reported));
    assert!(String::from_utf8_lossy(&o.stdout).contains("## ppl: perplexity"));

    // Other settings in the same folder are refused, not mixed.
    let o = run("passkey");
    assert_one_line_error(&o, "other settings");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn eval_bad_input_is_a_one_line_error() {
    let out = temp_dir("eval-bad");
    let o = out.display().to_string();
    assert_one_line_error(&easykv(&["eval", "speed", "--out", &o]), "unknown task");
    assert_one_line_error(
        &easykv(&["eval", "ppl", "--policies", "lru", "--out", &o]),
        "invalid value 'lru' for '--policies <POLICIES>' (valid: roco, h2o, tova, snapkv, pyramidkv, knorm, expected-attention, ada-snapkv, ada-expected-attention, ada-roco, ada-h2o, ada-knorm, recency, random, full)",
    );
    assert_one_line_error(&easykv(&["eval", "ppl", "--budgets", "0", "--out", &o]), "budget");
    assert_one_line_error(&easykv(&["eval", "ppl", "--budgets", "half", "--out", &o]), "budget");
    assert_one_line_error(&easykv(&["eval", "suite", "slow", "--out", &o]), "preset");
    assert_one_line_error(
        &easykv(&["eval", "ppl", "--out", "/proc/easykv-results"]),
        "/proc/easykv-results",
    );
    let empty = out.with_extension("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    assert_one_line_error(
        &easykv(&["eval", "ppl", "--text-file", &empty.display().to_string(), "--out", &o]),
        "empty",
    );
    let _ = std::fs::remove_file(empty);
    // A report needs a results file, and one that is one.
    assert_one_line_error(&easykv(&["eval", "ruler", "--report", "--out", &o]), "results.json");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("results.json"), "{\"cells\": 3}").unwrap();
    assert_one_line_error(
        &easykv(&["eval", "ruler", "--report", "--out", &o]),
        "not an easykv results file",
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `--requests-file`: each line's output (greedy, its own policy) equals `generate` alone with
/// the same settings, printed in input order; a bad line is a one-line error before loading.
#[test]
fn requests_file_runs_together_what_generate_runs_alone() {
    let dir = temp_dir("requests");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("requests.jsonl");
    let long =
        "Once upon a time, in a small village by the sea, there lived an old fisherman who went out every morning";
    std::fs::write(
        &file,
        format!(
            "{}\n\n{}\n",
            r#"{"prompt": "The capital of France is", "max_new_tokens": 8}"#,
            format_args!(
                r#"{{"prompt": "{long}", "max_new_tokens": 6, "policy": "roco", "budget": "0.5", "stride": 2}}"#
            )
        ),
    )
    .unwrap();
    let o = easykv(&["generate", "-q", "--requests-file", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let alone = |args: &[&str]| -> serde_json::Value {
        let o = easykv(&[&["generate", "-q", "--json"], args].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let a = alone(&["--prompt", "The capital of France is", "--max-new-tokens", "8"]);
    let b = alone(&[
        "--prompt",
        long,
        "--max-new-tokens",
        "6",
        "--policy",
        "roco",
        "--budget",
        "0.5",
        "--stride",
        "2",
    ]);
    assert_eq!(lines[0]["ids"], a["ids"]);
    assert_eq!(lines[1]["ids"], b["ids"]);
    assert_eq!(
        (lines[0]["request"].as_u64(), lines[1]["policy"].as_str()),
        (Some(1), Some("roco"))
    );
    std::fs::write(&file, r#"{"prompt": "hi", "prompt_ids": [1]}"#).unwrap();
    assert_one_line_error(
        &easykv(&["generate", "--requests-file", file.to_str().unwrap()]),
        "give exactly one of prompt and prompt_ids",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
