//! Errors of the offline tools. Each names the file and the problem.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not found")]
    NotFound { path: PathBuf },
    #[error("{path}: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Output { path: PathBuf, message: String },
    #[error("{message}")]
    Invalid { message: String },
    #[error(transparent)]
    Engine(#[from] lmq_turbomind::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { path }
        } else {
            Error::Io { path, source }
        }
    }
}
