//! The text conditioner: CLIP's BPE tokenizer and text transformer.

pub mod config;
pub mod text_model;
pub mod textual_inversion;
pub mod tokenizer;

pub use config::ClipTextConfig;
pub use text_model::{ClipTextModel, ClipTextOutput};
pub use tokenizer::ClipTokenizer;
