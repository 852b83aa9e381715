//! Errors of `ldm-sampling`.

/// What can go wrong choosing or running a sampler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid scheduler config: {0}")]
    Config(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A step hook asked the run to stop (a cancelled or interrupted request).
    #[error("stopped by the step hook")]
    Stopped,
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
