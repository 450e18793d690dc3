//! Moves models between troupe's model registry and the formats other tools
//! use: Hugging Face Llama directories and GGUF files come in as base-model
//! versions, and any stored version goes out as a Hugging Face directory.
//!
//! - [`layout`]: the tensor names and shapes a Llama [`Config`] implies, and
//!   llama.cpp's rotary row order for `q_proj`/`k_proj`.
//! - [`hf`]: reads a Hugging Face directory (single or sharded safetensors,
//!   f32/f16/bf16) into an [`ImportedModel`].
//! - [`gguf`]: reads a GGUF v2/v3 Llama file, dequantizing its tensors and
//!   renaming them to Hugging Face names.
//! - [`gguf_tokenizer`]: builds a `tokenizer.json` from GGUF tokenizer metadata.
//! - [`import`]: publishes an [`ImportedModel`] to a [`ModelRegistry`].
//! - [`export`]: writes a stored version as a Hugging Face directory.
//! - [`args`]: the `troupe import` and `troupe export` flags and their entry points.
//! - [`error`]: the error type, [`ConvertError`].
//!
//! Not here: training, sampling, or anything on the bus. Everything is
//! converted to f32 on the CPU, the one precision troupe's model code runs.
//!
//! [`Config`]: troupe_model::Config
//! [`ModelRegistry`]: troupe_store::ModelRegistry

pub mod args;
pub mod error;
pub mod export;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod hf;
pub mod import;
pub mod layout;

pub use args::{run_export, run_import, ExportArgs, Format, ImportArgs};
pub use error::{ConvertError, Result};
pub use export::{export_hf_dir, GENERATION_CONFIG_FILE};
pub use gguf::read_gguf;
pub use hf::read_hf_dir;
pub use import::{import_gguf, import_hf_dir, publish_imported, ImportedModel};
