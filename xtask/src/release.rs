//! `cargo xtask release [--features cpu,cuda,wgpu] [--dry-run]`: one archive per feature set.
//!
//! Each archive, `dist/easykv-<version>-<target>-<features>.tar.gz`, holds the `easykv` binary
//! built with those features, README.md, LICENSE and docs/; `dist/SHA256SUMS` lists them. A
//! release is refused from a tree with uncommitted changes or for a version already tagged
//! (`v<version>`), and `--dry-run` checks exactly that and prints the plan without building.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use easykv_models::atomic::{write_atomic, write_with};
use easykv_models::fetch::sha256_file;
use flate2::write::GzEncoder;
use flate2::Compression;

const FEATURE_SETS: &[&str] = &["cpu", "cuda", "wgpu"];
/// What every archive carries besides the binary.
const PAYLOAD: &[&str] = &["README.md", "LICENSE", "docs"];

pub fn release(args: &[&str], usage: &str) -> Result<(), String> {
    let mut features = vec!["cpu".to_string()];
    let mut dry_run = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match *arg {
            "--dry-run" => dry_run = true,
            "--features" => {
                let list = it.next().ok_or_else(|| format!("--features needs a value\n{usage}"))?;
                features = list.split(',').map(|f| f.trim().to_string()).collect();
            }
            other => return Err(format!("unknown flag {other}\n{usage}")),
        }
    }
    if let Some(bad) = features.iter().find(|f| !FEATURE_SETS.contains(&f.as_str())) {
        return Err(format!(
            "unknown feature set '{bad}' (valid: {})",
            FEATURE_SETS.join(", ")
        ));
    }
    let root = workspace_root()?;
    let version = env!("CARGO_PKG_VERSION");
    let target = host_target()?;
    check_releasable(&root, version)?;
    let dist = root.join("dist");
    let plan: Vec<(String, PathBuf)> = features
        .iter()
        .map(|f| (f.clone(), dist.join(format!("easykv-{version}-{target}-{f}.tar.gz"))))
        .collect();
    for (f, archive) in &plan {
        println!(
            "{} {} ← cargo build --release -p easykv-cli{}",
            if dry_run { "would write" } else { "writing" },
            archive.display(),
            cargo_features(f)
        );
    }
    if dry_run {
        println!("dry run: tree clean, v{version} not tagged; nothing built");
        return Ok(());
    }
    std::fs::create_dir_all(&dist).map_err(|e| format!("{}: {e}", dist.display()))?;
    let mut sums = String::new();
    for (f, archive) in &plan {
        let binary = build(&root, f)?;
        let dir_name = archive
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".tar.gz"))
            .unwrap_or("easykv")
            .to_string();
        pack(&root, &binary, archive, &dir_name)?;
        let digest = sha256_file(archive).map_err(|e| e.to_string())?;
        sums.push_str(&format!(
            "{digest}  {}\n",
            archive.file_name().and_then(|n| n.to_str()).unwrap_or_default()
        ));
        println!("wrote {}", archive.display());
    }
    write_atomic(&dist.join("SHA256SUMS"), &sums).map_err(|e| e.to_string())?;
    println!("wrote {}", dist.join("SHA256SUMS").display());
    Ok(())
}

fn cargo_features(set: &str) -> String {
    match set {
        "cpu" => String::new(),
        other => format!(" --features {other}"),
    }
}

fn workspace_root() -> Result<PathBuf, String> {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "cannot locate the workspace root".into())
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn host_target() -> Result<String, String> {
    run(Command::new("rustc").arg("-vV"))?
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .ok_or_else(|| "rustc -vV names no host target".into())
}

/// Refuses a tree with uncommitted changes and a version whose tag exists.
fn check_releasable(root: &Path, version: &str) -> Result<(), String> {
    let status = run(Command::new("git").arg("-C").arg(root).args(["status", "--porcelain"]))?;
    if !status.trim().is_empty() {
        let first = status.lines().next().unwrap_or_default();
        return Err(format!(
            "the working tree has uncommitted changes ({first} …): commit or stash them first"
        ));
    }
    let tag = format!("v{version}");
    let tags = run(Command::new("git").arg("-C").arg(root).args(["tag", "--list", &tag]))?;
    if !tags.trim().is_empty() {
        return Err(format!("{tag} is already tagged: bump the workspace version first"));
    }
    Ok(())
}

/// Builds the binary with `set`'s features into its own target folder; returns its path.
fn build(root: &Path, set: &str) -> Result<PathBuf, String> {
    let target_dir = root.join("target").join(format!("release-{set}"));
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root)
        .args(["build", "--release", "-p", "easykv-cli"])
        .env("CARGO_TARGET_DIR", &target_dir);
    if set != "cpu" {
        cmd.args(["--features", set]);
    }
    let status = cmd.status().map_err(|e| format!("cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build for feature set '{set}' failed"));
    }
    Ok(target_dir.join("release").join("easykv"))
}

/// Writes `archive` atomically: `dir_name/` with the binary and the payload.
fn pack(root: &Path, binary: &Path, archive: &Path, dir_name: &str) -> Result<(), String> {
    let tar_to = |tmp: &Path| -> std::io::Result<()> {
        let mut tar = tar::Builder::new(GzEncoder::new(File::create(tmp)?, Compression::default()));
        tar.append_path_with_name(binary, format!("{dir_name}/easykv"))?;
        for item in PAYLOAD {
            let path = root.join(item);
            let name = format!("{dir_name}/{item}");
            if path.is_dir() {
                tar.append_dir_all(&name, &path)?;
            } else {
                tar.append_path_with_name(&path, &name)?;
            }
        }
        let mut gz = tar.into_inner()?;
        gz.flush()?;
        gz.finish().map(drop)
    };
    write_with(archive, |tmp| {
        tar_to(tmp).map_err(|e| easykv_models::Error::InvalidInput(format!("{}: {e}", tmp.display())))
    })
    .map_err(|e| e.to_string())
}
