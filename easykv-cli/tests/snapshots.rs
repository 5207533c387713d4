//! Text that is a contract, snapshotted (insta): every command's `--help` and the shape of
//! eval's tables for a small fixed run (the one-line errors of bad input: `bad_input.rs`). A change shows up as a
//! snapshot diff to review (`cargo insta review`, or `INSTA_UPDATE=always` and `git diff`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{easykv, shared};

#[test]
fn help_of_every_command() {
    for command in ["", "generate", "score", "bench", "eval", "check-kernels", "serve"] {
        let args: Vec<&str> = [command, "--help"].into_iter().filter(|a| !a.is_empty()).collect();
        let o = easykv(&args);
        assert!(o.status.success(), "{command}");
        let name = if command.is_empty() { "easykv" } else { command };
        insta::assert_snapshot!(format!("help_{name}"), String::from_utf8_lossy(&o.stdout));
    }
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
