//! The library's error type. Every variant that comes from user input names the file
//! (and where it applies the row and field) that failed, so a message can be acted on
//! without a debugger. The binary wraps these in `anyhow`; the library never panics on input.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but its contents are wrong (corrupt, truncated, inconsistent).
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    /// One row of a dataset file is wrong.
    #[error("{}:{line}: field `{field}`: {message}", path.display())]
    Row {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
    /// A value given on the command line or in a config is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A chat template failed to compile or raised while rendering.
    #[error("chat template: {0}")]
    Template(String),
    /// A tensor operation failed (shape or dtype mismatch inside the engine).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        Error::File {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    pub fn row(path: &Path, line: usize, field: &str, message: impl Into<String>) -> Self {
        Error::Row {
            path: path.to_path_buf(),
            line,
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }
}

/// Reads a whole file, naming it in the error.
pub fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Reads and parses a JSON file, naming it (and the parse position) in the error.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}
