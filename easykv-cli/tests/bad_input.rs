//! Bad input as a careless or hostile user gives it — flags, files, devices, output targets —
//! each answered with exit code 2, exactly one line on stderr naming the problem, nothing on
//! stdout, and no panic. The messages are a contract: snapshotted together (insta).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Files the cases read, in one folder whose path is masked in the snapshot.
struct Fixtures {
    dir: PathBuf,
}

impl Fixtures {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("easykv-bad-input-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a-directory")).unwrap();
        let model = easykv_models::fetch::resolve_model("smollm2", &mut |_| {}).unwrap();
        let real = std::fs::read(&model).unwrap();
        let files: Vec<(&str, Vec<u8>)> = vec![
            ("empty.gguf", Vec::new()),
            (
                "noise.gguf",
                (0..4096u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect(),
            ),
            ("truncated.gguf", real[..100_000].to_vec()),
            ("empty.txt", Vec::new()),
            ("blank.txt", b"   \n\n  ".to_vec()),
            ("binary.txt", vec![0xff, 0xfe, 0x00, 0x80, 0x81]),
            ("short.txt", b"word".to_vec()),
            ("long.txt", "many words here ".repeat(4000).into_bytes()),
            ("ids-not-json.json", b"[1, 2,".to_vec()),
            ("ids-empty.json", b"[]".to_vec()),
            ("ids-out-of-vocabulary.json", b"[1, 99999999]".to_vec()),
            ("ids-negative.json", b"[-1]".to_vec()),
            ("requests-empty.jsonl", b"\n\n".to_vec()),
            ("requests-bad-json.jsonl", b"{\"prompt\": \"hi\"\n".to_vec()),
            (
                "requests-both.jsonl",
                b"{\"prompt\": \"hi\", \"prompt_ids\": [1]}\n".to_vec(),
            ),
            ("requests-neither.jsonl", b"{\"max_new_tokens\": 3}\n".to_vec()),
            (
                "requests-one.jsonl",
                b"{\"prompt\": \"hi\", \"max_new_tokens\": 1}\n".to_vec(),
            ),
            (
                "requests-unknown-field.jsonl",
                b"{\"prompt\": \"hi\", \"colour\": \"red\"}\n".to_vec(),
            ),
            (
                "requests-bad-budget.jsonl",
                b"{\"prompt\": \"hi\", \"policy\": \"roco\", \"budget\": \"2.5\"}\n".to_vec(),
            ),
            (
                "requests-bad-policy.jsonl",
                b"{\"prompt\": \"hi\", \"policy\": \"lru\"}\n".to_vec(),
            ),
            (
                "requests-bad-temperature.jsonl",
                b"{\"prompt\": \"hi\", \"temperature\": -3}\n".to_vec(),
            ),
            ("a-file", b"x".to_vec()),
        ];
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        // A Hugging Face directory whose config.json is not JSON.
        std::fs::create_dir_all(dir.join("hf-bad-config")).unwrap();
        std::fs::write(dir.join("hf-bad-config/config.json"), b"{ not json").unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Fixtures {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where a case's stdout goes.
#[derive(Clone, Copy, PartialEq)]
enum Out {
    Captured,
    /// A full disk: writes fail with ENOSPC.
    DevFull,
}

/// Runs one case; returns its error line, with the fixtures' folder masked.
fn run(args: &[String], out: Out, dir: &Path) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_easykv"));
    cmd.args(args).env_remove("RUST_LOG").stdin(Stdio::null());
    if out == Out::DevFull {
        cmd.stdout(std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap());
    }
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    let error_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(error_lines.len(), 1, "{args:?}: {err}");
    let other: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("error") && !l.starts_with("loaded "))
        .collect();
    assert!(other.is_empty(), "{args:?}: more than the error on stderr: {err}");
    if out == Out::Captured {
        assert!(o.stdout.is_empty(), "{args:?}: {}", String::from_utf8_lossy(&o.stdout));
    }
    error_lines[0].replace(&dir.display().to_string(), "<dir>")
}

#[test]
fn every_bad_input_is_one_line_and_exit_2() {
    let f = Fixtures::new();
    let p = |name: &str| f.path(name);
    let q = "-q";
    let gen = |extra: &[&str]| -> Vec<String> {
        ["generate", "--prompt", "hi", q]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let cmd = |args: &[&str]| -> Vec<String> { args.iter().map(|s| s.to_string()).collect() };
    let captured: Vec<Vec<String>> = vec![
        // Prompts and prompt files.
        cmd(&["generate", "--prompt", "   "]),
        cmd(&["generate"]),
        cmd(&["generate", "--prompt", "hi", "--prompt-file", &p("short.txt")]),
        cmd(&["generate", "--prompt-file", "/no/such/prompt.txt"]),
        cmd(&["generate", "--prompt-file", &p("a-directory")]),
        cmd(&["generate", "--prompt-file", &p("binary.txt")]),
        cmd(&["generate", "--prompt-file", &p("empty.txt")]),
        cmd(&["generate", "--prompt-file", &p("blank.txt")]),
        cmd(&["generate", "--prompt-file", "/dev/urandom"]),
        cmd(&["generate", "--prompt-ids-file", &p("ids-not-json.json")]),
        cmd(&["generate", "--prompt-ids-file", &p("ids-empty.json")]),
        cmd(&["generate", "--prompt-ids-file", &p("ids-negative.json")]),
        cmd(&["generate", "-q", "--prompt-ids-file", &p("ids-out-of-vocabulary.json")]),
        cmd(&[
            "generate",
            "-q",
            "--prompt-file",
            &p("long.txt"),
            "--max-new-tokens",
            "4",
        ]),
        cmd(&["generate", "--system", "be brief", "--prompt", "hi"]),
        // Models and devices.
        gen(&["--model", "nonexistent-model"]),
        gen(&["--model", "/no/such/file.gguf"]),
        gen(&["--model", "/dev/null"]),
        gen(&["--model", &p("empty.gguf")]),
        gen(&["--model", &p("noise.gguf")]),
        gen(&["--model", &p("truncated.gguf")]),
        gen(&["--model", &p("a-directory")]),
        gen(&["--model", &p("hf-bad-config")]),
        gen(&["--device", "tpu"]),
        gen(&["--device", "cuda"]),
        gen(&["--device", "wgpu:1"]),
        gen(&["--dtype", "f8"]),
        gen(&["--kernels", "gemv,fast"]),
        gen(&["--gemv", "4,1,9"]),
        gen(&["--rows", "x,y"]),
        // Sampling and lengths.
        gen(&["--temperature=-1"]),
        gen(&["--temperature", "nan"]),
        gen(&["--top-p", "2"]),
        gen(&["--top-p", "0"]),
        gen(&["--max-new-tokens", "0"]),
        gen(&["--max-new-tokens", "many"]),
        gen(&["--max-new-tokens", "-5"]),
        // Eviction settings.
        gen(&["--policy", "lru"]),
        gen(&["--policy", "roco", "--budget", "lots"]),
        gen(&["--policy", "roco", "--budget", "1.5"]),
        gen(&["--policy", "roco", "--budget=-0.5"]),
        gen(&["--policy", "roco", "--budget", "0"]),
        gen(&["--policy", "roco", "--budget", "-2MiB"]),
        gen(&["--policy", "roco", "--mode", "sideways"]),
        gen(&["--policy", "roco", "--stride", "0"]),
        gen(&["--policy", "roco", "--stride", "18446744073709551615"]),
        gen(&["--policy", "roco", "--stride", "99999999999999999999999"]),
        gen(&["--policy", "roco", "--recent-ratio", "1.5"]),
        gen(&["--policy", "roco", "--decode-stride", "0"]),
        gen(&["--policy", "roco", "--mode", "decoding", "--budget", "0.5"]),
        gen(&["--policy", "full", "--streaming"]),
        gen(&["--ranking", "bubble"]),
        gen(&["--unknown-flag"]),
        // Requests files.
        cmd(&["generate", "--requests-file", "/no/such/requests.jsonl"]),
        cmd(&["generate", "--requests-file", &p("requests-empty.jsonl")]),
        cmd(&["generate", "--requests-file", &p("requests-bad-json.jsonl")]),
        cmd(&["generate", "--requests-file", &p("requests-both.jsonl")]),
        cmd(&["generate", "--requests-file", &p("requests-neither.jsonl")]),
        cmd(&["generate", "--requests-file", &p("requests-unknown-field.jsonl")]),
        cmd(&["generate", "-q", "--requests-file", &p("requests-bad-budget.jsonl")]),
        cmd(&["generate", "-q", "--requests-file", &p("requests-bad-policy.jsonl")]),
        cmd(&[
            "generate",
            "-q",
            "--requests-file",
            &p("requests-bad-temperature.jsonl"),
        ]),
        cmd(&[
            "generate",
            "--requests-file",
            &p("requests-both.jsonl"),
            "--concurrency",
            "0",
        ]),
        cmd(&["generate", "--requests-file", &p("short.txt"), "--prompt", "hi"]),
        cmd(&[
            "generate",
            "--requests-file",
            &p("requests-one.jsonl"),
            "--kv-pool",
            "0.5",
        ]),
        cmd(&[
            "generate",
            "--requests-file",
            &p("requests-one.jsonl"),
            "--kv-pool",
            "0B",
        ]),
        cmd(&["generate", "--prompt", "hi", "--kv-pool", "1GiB"]),
        cmd(&["generate", "--prompt", "hi", "--prefill-passes", "mixed"]),
        cmd(&[
            "generate",
            "--requests-file",
            &p("requests-one.jsonl"),
            "--prefill-passes",
            "often",
        ]),
        // score
        cmd(&["score", "--text-file", "/no/such/text.txt"]),
        cmd(&["score", "--text-file", &p("empty.txt")]),
        cmd(&["score", "--text-file", &p("a-directory")]),
        cmd(&["score", "--text-file", &p("short.txt"), "--max-tokens", "1"]),
        cmd(&["score", "-q", "--text-file", &p("short.txt")]),
        cmd(&["score"]),
        // bench
        cmd(&["bench", "--new-tokens", "0"]),
        cmd(&["bench", "--prompt-tokens", "0"]),
        cmd(&["bench", "--requests", "0"]),
        cmd(&["bench", "--requests", "100000000"]),
        cmd(&["bench", "--requests", "4", "--kv-pool", "0.5"]),
        cmd(&["bench", "--requests", "4", "--kv-pool", "0B"]),
        cmd(&["bench", "--requests", "4", "--arrival-rate=-1"]),
        cmd(&["bench", "--requests", "4", "--warmup", "100000"]),
        cmd(&["bench", "--random-weights", "gpt-5"]),
        cmd(&["bench", "serve", "--clients", "0"]),
        cmd(&["bench", "serve", "--duration", "0"]),
        cmd(&["bench", "serve", "--duration", "inf"]),
        cmd(&["bench", "serve", "--url", "http://127.0.0.1:9", "--wait", "0"]),
        cmd(&["bench", "serve", "--prompt-words", "0"]),
        // serve
        cmd(&["serve", "--port", "70000"]),
        cmd(&["serve", "--host", "not-an-address"]),
        cmd(&["serve", "--max-concurrent", "0"]),
        cmd(&["serve", "--max-queue", "0"]),
        cmd(&["serve", "--api-key", ""]),
        cmd(&["serve", "--kv-pool", "0.5"]),
        cmd(&["serve", "--policy", "roco", "--budget", "7.5"]),
        cmd(&["serve", "--random-weights", "gpt-5"]),
        // eval
        cmd(&["eval", "speed", "--out", &p("eval")]),
        cmd(&["eval", "ppl", "--budgets", "half", "--out", &p("eval")]),
        cmd(&["eval", "ppl", "--budgets", "1.5", "--out", &p("eval")]),
        cmd(&["eval", "ppl", "--policies", "roco,lru", "--out", &p("eval")]),
        cmd(&["eval", "passkey", "--lengths", "0", "--out", &p("eval")]),
        cmd(&["eval", "passkey", "--depths", "2", "--out", &p("eval")]),
        cmd(&["eval", "ppl", "--ppl-tokens", "3", "--out", &p("eval")]),
        cmd(&["eval", "ppl", "--text-file", &p("empty.txt"), "--out", &p("eval")]),
        cmd(&["eval", "ppl", "--out", &p("a-file")]),
        cmd(&["eval", "ppl"]),
        cmd(&["eval", "passkey", "-q", "--lengths", "1000000000", "--out", &p("eval")]),
        // The rest of the command line.
        cmd(&["check-kernels"]),
        cmd(&["frobnicate"]),
        cmd(&[]),
    ];
    let full_disk: Vec<Vec<String>> = vec![
        gen(&["--max-new-tokens", "2", "--json"]),
        cmd(&["score", "-q", "--text-file", &p("long.txt"), "--max-tokens", "16"]),
        cmd(&[
            "score",
            "-q",
            "--text-file",
            &p("long.txt"),
            "--max-tokens",
            "16",
            "--json",
        ]),
    ];
    assert!(captured.len() + full_disk.len() >= 60);
    let mut lines = String::new();
    for (args, out) in captured
        .iter()
        .map(|a| (a, Out::Captured))
        .chain(full_disk.iter().map(|a| (a, Out::DevFull)))
    {
        let line = run(args, out, &f.dir);
        let shown = args.join(" ").replace(&f.dir.display().to_string(), "<dir>");
        let target = if out == Out::DevFull { " > /dev/full" } else { "" };
        lines.push_str(&format!("{shown}{target}\n  {line}\n"));
    }
    insta::assert_snapshot!(lines);
}

/// A reader that closes the pipe early (`| head`) ends the command quietly: exit 0, no panic.
#[test]
fn a_closed_pipe_ends_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_easykv"))
        .args([
            "generate",
            "-q",
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "64",
            "--json",
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end at once: every write fails with EPIPE.
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(o.status.code(), Some(0), "{err}");
}
