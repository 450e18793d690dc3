//! `troupe generate`: loads a stored model version, checks it against its
//! manifest, and samples completions of a prompt for a person to read.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use troupe_model::{generate, Config, GenerateOptions, Model, SamplingParams, Tokenizer};
use troupe_store::{ModelRef, ModelRegistry, StoreArgs};

/// Flags of `troupe generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The model version to sample from: NAME@VERSION, or NAME for its newest version.
    #[arg(value_name = "MODEL")]
    pub model: String,

    /// The prompt. It is sent as a user turn of the chat template unless --raw is set.
    #[arg(value_name = "PROMPT")]
    pub prompt: String,

    /// Continue the prompt as plain text, without the chat template (for base models).
    #[arg(long, env = "TROUPE_GENERATE_RAW")]
    pub raw: bool,

    /// Completions to sample, each with its own seed (seed, seed + 1, ...).
    #[arg(long, env = "TROUPE_GENERATE_SAMPLES", default_value_t = 1)]
    pub samples: usize,

    /// Softmax temperature; 0 picks the most likely token at each step.
    #[arg(long, env = "TROUPE_GENERATE_TEMPERATURE", default_value_t = 0.8)]
    pub temperature: f64,

    /// Keep only the K most likely tokens at each step; 0 keeps all.
    #[arg(long, env = "TROUPE_GENERATE_TOP_K", default_value_t = 0)]
    pub top_k: usize,

    /// Keep the smallest set of likely tokens whose probability reaches P, in (0, 1].
    #[arg(long, env = "TROUPE_GENERATE_TOP_P", default_value_t = 1.0)]
    pub top_p: f64,

    /// Maximum number of tokens generated per completion.
    #[arg(long, env = "TROUPE_GENERATE_MAX_NEW_TOKENS", default_value_t = 128)]
    pub max_new_tokens: usize,

    /// Seed of the first completion's random generator.
    #[arg(long, env = "TROUPE_GENERATE_SEED", default_value_t = 0)]
    pub seed: u64,

    #[command(flatten)]
    pub store: StoreArgs,
}

/// Maximum completions one call samples, so a typo cannot start hours of work.
const MAX_SAMPLES: usize = 64;

pub async fn run(args: GenerateArgs) -> Result<()> {
    if args.samples == 0 || args.samples > MAX_SAMPLES {
        bail!("--samples {} is out of range; use 1 to {MAX_SAMPLES}", args.samples);
    }
    let registry = crate::open_registry(&args.store)?;

    let model_ref = resolve_model(&registry, &args.model).await?;
    let loaded = registry.load(&model_ref).await.with_context(|| format!("cannot load {model_ref}"))?;
    let config_text = std::str::from_utf8(loaded.config()).context("config.json is not UTF-8")?;
    let model_config = Config::from_json_str(config_text).with_context(|| format!("invalid config.json of {model_ref}"))?;
    let device = candle_core::Device::Cpu;
    let model = Model::from_safetensors_bytes(&model_config, loaded.weights(), &device)
        .with_context(|| format!("invalid weights of {model_ref}"))?;
    let tokenizer = Tokenizer::from_bytes(loaded.tokenizer()).with_context(|| format!("invalid tokenizer of {model_ref}"))?;

    let prompt_ids = if args.raw {
        let mut ids: Vec<u32> = tokenizer.bos_id().into_iter().collect();
        ids.extend(tokenizer.encode(&args.prompt)?);
        ids
    } else {
        tokenizer.render_prompt(&args.prompt)?
    };
    let params: Vec<SamplingParams> = (0..args.samples)
        .map(|index| SamplingParams {
            temperature: args.temperature,
            top_k: (args.top_k > 0).then_some(args.top_k),
            top_p: (args.top_p < 1.0).then_some(args.top_p),
            max_new_tokens: args.max_new_tokens,
            seed: args.seed.wrapping_add(index as u64),
        })
        .collect();
    let prompts = vec![prompt_ids; args.samples];

    let started = Instant::now();
    let outputs = generate(&model, &tokenizer, &prompts, &params, &GenerateOptions::default())
        .with_context(|| format!("sampling from {model_ref} failed"))?;
    let elapsed = started.elapsed().as_secs_f64();

    let tokens: usize = outputs.iter().map(|output| output.tokens.len()).sum();
    eprintln!("model {model_ref}: {} parameters, {tokens} tokens in {elapsed:.2} s", model.num_parameters());
    for (index, output) in outputs.iter().enumerate() {
        if args.samples > 1 {
            println!("--- sample {} (seed {}, {:?}) ---", index + 1, params[index].seed, output.finish_reason);
        }
        println!("{}", output.text);
    }
    Ok(())
}

/// Reads `NAME@VERSION`, or `NAME` for the newest stored version.
async fn resolve_model(registry: &ModelRegistry, text: &str) -> Result<ModelRef> {
    if text.contains('@') {
        return Ok(text.parse()?);
    }
    let latest = registry.latest(text).await.with_context(|| format!("cannot list the versions of {text}"))?;
    match latest {
        Some(manifest) => Ok(manifest.model_ref()),
        None => bail!("no stored version of model {text:?}; list models with `troupe status` or import one with `troupe import`"),
    }
}
