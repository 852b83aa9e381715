//! Errors of `ldm-pipeline`.

/// What can go wrong loading components or generating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] ldm_models::Error),
    #[error(transparent)]
    Sampling(ldm_sampling::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{path}: {msg}")]
    Image {
        path: std::path::PathBuf,
        msg: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stopped by the step hook")]
    Cancelled,
}

impl From<ldm_sampling::Error> for Error {
    fn from(e: ldm_sampling::Error) -> Self {
        match e {
            ldm_sampling::Error::Stopped => Error::Cancelled,
            e => Error::Sampling(e),
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
