//! CLIP: the text conditioner (BPE tokenizer and text transformer) and the image encoder
//! IP-Adapter conditions on.

pub mod config;
pub mod text_model;
pub mod textual_inversion;
pub mod tokenizer;
pub mod vision_model;

pub use config::ClipTextConfig;
pub use text_model::{ClipTextModel, ClipTextOutput};
pub use tokenizer::ClipTokenizer;
pub use vision_model::{ClipVisionConfig, ClipVisionModel};
