//! Errors of the trainers.

/// What can go wrong while making data, training or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] ldm_models::Error),
    #[error(transparent)]
    Sampling(#[from] ldm_sampling::Error),
    #[error(transparent)]
    Pipeline(#[from] ldm_pipeline::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("safetensors: {0}")]
    SafeTensors(#[from] safetensors::SafeTensorError),
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;
