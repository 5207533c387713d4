//! Text that is a contract, snapshotted (insta): every command's `--help`, the one-line errors
//! of bad input, and the shape of eval's tables for a small fixed run. A change shows up as a
//! snapshot diff to review (`cargo insta review`, or `INSTA_UPDATE=always` and `git diff`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{easykv, shared};

#[test]
fn help_of_every_command() {
    for command in ["", "generate", "score", "bench", "eval", "check-kernels"] {
        let args: Vec<&str> = [command, "--help"].into_iter().filter(|a| !a.is_empty()).collect();
        let o = easykv(&args);
        assert!(o.status.success(), "{command}");
        let name = if command.is_empty() { "easykv" } else { command };
        insta::assert_snapshot!(format!("help_{name}"), String::from_utf8_lossy(&o.stdout));
    }
}

/// Bad input, each checked before a model is loaded: the exit code and the one line on stderr.
#[test]
fn bad_input_error_lines() {
    let cases: &[&[&str]] = &[
        &["generate", "--prompt", "hi", "--policy", "lru"],
        &["generate", "--prompt", "hi", "--policy", "roco", "--budget", "lots"],
        &["generate", "--prompt", "hi", "--policy", "roco", "--budget", "1.5"],
        &["generate", "--prompt", "hi", "--policy", "roco", "--budget=-0.5"],
        &["generate", "--prompt", "hi", "--policy", "roco", "--mode", "sideways"],
        &["generate", "--prompt", "hi", "--policy", "roco", "--stride", "0"],
        &[
            "generate",
            "--prompt",
            "hi",
            "--policy",
            "roco",
            "--stride",
            "18446744073709551615",
        ],
        &[
            "generate",
            "--prompt",
            "hi",
            "--policy",
            "roco",
            "--recent-ratio",
            "1.5",
        ],
        &[
            "generate", "--prompt", "hi", "--policy", "roco", "--mode", "decoding", "--budget", "0.5",
        ],
        &["generate", "--prompt", "hi", "--policy", "full", "--streaming"],
        &["generate", "--prompt", "hi", "--ranking", "bubble"],
        &["generate", "--prompt", "hi", "--kernels", "gemv,fast"],
        &["generate", "--prompt", "hi", "--gemv", "4,1,9"],
        &["generate", "--prompt", "hi", "--dtype", "f8"],
        &["generate", "--prompt", "hi", "--device", "tpu"],
        &["generate", "--prompt", "hi", "--unknown-flag"],
        &["bench", "--new-tokens", "0"],
        &["bench", "--requests", "4", "--kv-pool", "0.5"],
        &["bench", "--requests", "0"],
        &["eval", "speed", "--out", "/tmp/easykv-snap-eval"],
        &["eval", "ppl", "--budgets", "half", "--out", "/tmp/easykv-snap-eval"],
        &[
            "eval",
            "ppl",
            "--policies",
            "roco,lru",
            "--out",
            "/tmp/easykv-snap-eval",
        ],
        &["check-kernels"],
    ];
    let mut lines = String::new();
    for args in cases {
        let o = easykv(args);
        let err = String::from_utf8_lossy(&o.stderr);
        let error_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(error_lines.len(), 1, "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}");
        lines.push_str(&format!("{}\n  {}\n", args.join(" "), error_lines[0]));
    }
    let _ = std::fs::remove_dir_all("/tmp/easykv-snap-eval");
    insta::assert_snapshot!(lines);
}

/// A small eval (SmolLM2, perplexity of 160 tokens, two policies, two budgets): the tables'
/// rows, columns and headings, values masked (they are the model's, covered by the reference
/// tests; their last digits may differ between CPUs).
#[test]
fn eval_tables_have_their_shape() {
    let out = std::env::temp_dir().join(format!("easykv-snap-eval-{}", std::process::id()));
    let text = shared("data/last_of_the_mohicans.txt");
    let (text, dir) = (text.display().to_string(), out.display().to_string());
    let o = easykv(&[
        "eval",
        "ppl",
        "-q",
        "--policies",
        "roco,recency",
        "--budgets",
        "0.25,0.5",
        "--ppl-tokens",
        "160",
        "--text-file",
        &text,
        "--out",
        &dir,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    insta::with_settings!({filters => vec![
        (r"easykv \d+\.\d+\.\d+", "easykv [version]"),
        (r"-?\d+\.\d{3,}(e-?\d+)?", "[x]"),
        (r"/[^ ,\x22]*last_of_the_mohicans.txt", "[text]"),
    ]}, {
        insta::assert_snapshot!("eval_results_md", md);
        insta::assert_snapshot!("eval_results_csv", csv);
    });
}
