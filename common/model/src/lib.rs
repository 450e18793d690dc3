//! troupe's model core: the Llama-family decoder every stage trains or samples,
//! written with candle for the CPU in f32 (f64 works too, for gradient checks).
//!
//! - [`config`]: [`Config`], a Hugging Face `LlamaConfig` `config.json`, and the `tiny`/`small` presets.
//! - [`ops`]: fused CPU kernels with backward passes (RMSNorm, masked softmax, rotary, SwiGLU, log-probs).
//! - [`llama`]: the transformer blocks, attention masks for either padding side, the KV cache and heads.
//! - [`model`]: [`Model`], parameters in a `VarMap`, safetensors and Hugging Face directory I/O.
//! - [`logprobs`]: per-token log-probs, entropy and the masked language-model loss.
//! - [`optim`]: [`AdamW`] with saveable moments, and global gradient-norm clipping.
//! - [`tokenizer`]: byte-level BPE training and loading, and the one chat template.
//! - [`sample`]: batched, seeded sampling with a KV cache (temperature, top-k, top-p).
//! - [`io`]: safetensors encoding helpers.
//!
//! Not here: training loops, schedules, data loading, or anything that talks to
//! the bus or the object store; those live in the service crates.

pub mod config;
pub mod io;
pub mod llama;
pub mod logprobs;
pub mod model;
pub mod ops;
pub mod optim;
pub mod sample;
pub mod tokenizer;

pub use config::Config;
pub use llama::{Heads, KvCache};
pub use logprobs::{lm_loss, token_entropy, token_logprobs};
pub use model::Model;
pub use optim::{clip_grad_norm, grad_norm, AdamW, AdamWConfig};
pub use sample::{generate, FinishReason, GenerateOptions, Generation, SamplingParams};
pub use tokenizer::{ChatMessage, ChatTokens, Role, Tokenizer};

use std::path::{Path, PathBuf};

/// Errors of the model core. Tensor-math failures keep candle's message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("invalid config field `{field}`: {reason}")]
    Config { field: String, reason: String },
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
    #[error("invalid safetensors data: {0}")]
    Safetensors(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid request: {0}")]
    Request(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Tunes process-wide settings that decide CPU training speed with candle.
///
/// - glibc malloc: candle allocates a fresh buffer for every op result and
///   gradient. With glibc's defaults, blocks of a few MiB are `mmap`ed and
///   unmapped on every allocation, so each training step page-faults through
///   all of its activations again. On a 2-core AMD EPYC that cost about a third
///   of the CPU time of a `tiny` training step (measured with `perf`). Raising
///   the mmap and trim thresholds to 1 GiB lets freed blocks be reused from the
///   heap, at the cost of the process keeping its peak heap size.
/// - `CANDLE_NUM_THREADS=1`: candle 0.11 runs elementwise ops on its own
///   spinning thread pool next to rayon's, which gemm and this crate's kernels
///   use. On 2 cores the two pools spin against each other; `tiny` training
///   ran 1.1 to 3 times faster with candle's pool disabled.
///
/// Runs once per process, and model constructors call it. Each setting is
/// left alone when its environment variable (`MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TRIM_THRESHOLD_`, `CANDLE_NUM_THREADS`) is already set. The malloc
/// part applies to Linux with glibc only.
/// NOTE: the thread setting only takes effect if no candle elementwise op has
/// run yet in this process, because candle sizes its pool on first use.
pub fn tune_cpu_runtime() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
                || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some()
            {
                return;
            }
            extern "C" {
                fn mallopt(
                    param: std::os::raw::c_int,
                    value: std::os::raw::c_int,
                ) -> std::os::raw::c_int;
            }
            // Parameter numbers from glibc's <malloc.h>.
            const M_TRIM_THRESHOLD: std::os::raw::c_int = -1;
            const M_MMAP_THRESHOLD: std::os::raw::c_int = -3;
            const ONE_GIB: std::os::raw::c_int = 1 << 30;
            // SAFETY: mallopt only changes allocator parameters; it is
            // thread-safe in glibc and takes no pointers.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, ONE_GIB);
                mallopt(M_TRIM_THRESHOLD, ONE_GIB);
            }
        }
    });
}

/// Loads a model directory and samples one completion of `prompt` (rendered
/// through the chat template as a user turn) for a person to read.
///
/// `dir` is a Hugging Face layout with `config.json`, `model.safetensors` and
/// `tokenizer.json`.
pub fn generate_reply(dir: &Path, prompt: &str, params: &SamplingParams) -> Result<Generation> {
    let device = candle_core::Device::Cpu;
    let (model, tokenizer) = Model::load_hf_dir(dir, &device)?;
    let tokenizer = tokenizer
        .ok_or_else(|| Error::Tokenizer(format!("{} has no tokenizer.json", dir.display())))?;
    let rendered = tokenizer.render_chat(&[ChatMessage::user(prompt)], true)?;
    let mut out = generate(
        &model,
        &tokenizer,
        &[rendered.ids],
        std::slice::from_ref(params),
        &GenerateOptions::default(),
    )?;
    out.pop()
        .ok_or_else(|| Error::Request("no generation returned".into()))
}
