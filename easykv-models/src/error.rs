//! The one error type of easykv-models.

use std::path::{Path, PathBuf};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("corrupt GGUF at byte {offset}: {message}")]
    Gguf { offset: u64, message: String },
    #[error("model file lacks metadata key '{0}'")]
    MissingMetadata(String),
    #[error("model file lacks tensor '{0}'")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A bounded queue is full; the same request may succeed later.
    #[error("busy: {0}")]
    Busy(String),
    #[error("model fetch failed: {0}")]
    Fetch(String),
    #[error("checksum mismatch for {path}: expected sha256 {expected}, got {found}")]
    Checksum {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error(transparent)]
    Cache(#[from] easykv_core::Error),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn gguf(offset: impl TryInto<u64>, message: impl Into<String>) -> Self {
        Error::Gguf {
            offset: offset.try_into().unwrap_or(u64::MAX),
            message: message.into(),
        }
    }
}
