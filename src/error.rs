//! The crate's error type. Every message names the file (where there is one) and the problem,
//! because these strings reach radiologists through the C ABI and the Slicer module.
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A file was read but its content is not acceptable (corrupt, unsupported, lying header...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// An argument is not acceptable (shape mismatch, bad config value...).
    #[error("{0}")]
    Invalid(String),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The job was cancelled by its caller.
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// `return Err(Error::invalid(format!(...)))` in one line.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::Invalid(format!($($arg)*))) };
}
