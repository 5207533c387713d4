//! Shared by the CLI's integration tests: running the binary and finding `../shared`.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs the `easykv` binary with `args` (logs off whatever the environment says).
pub fn easykv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_easykv"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run easykv")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `../shared/<path>` beside the checkout.
pub fn shared(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(path)
}
