//! Held-out prompts answered by several model versions side by side, each
//! answer scored with the scripted labeler's rule (ends with EOS, stays
//! within its length limit, contains the reference answer). `troupe up`
//! ends with this comparison.
//!
//! Answers are sampled at temperature 1, [`SAMPLES_PER_PROMPT`] per prompt
//! with the same seeds for every model, because PPO improves the policy as
//! it samples; greedy decoding can hide what changed.

use std::path::Path;

use anyhow::{Context, Result};
use troupe_data::{read_demonstrations, Mode, Role};
use troupe_labeler::{score_response, Preference};
use troupe_model::{generate, Config, FinishReason, GenerateOptions, Model, SamplingParams, Tokenizer};
use troupe_store::{ModelRef, ModelRegistry};

/// Tokens each model may generate per held-out answer.
const MAX_NEW_TOKENS: usize = 32;
/// Sampled answers per prompt and model.
pub const SAMPLES_PER_PROMPT: usize = 4;
/// Sampling temperature of the comparison.
const TEMPERATURE: f64 = 1.0;
/// Prompts shown side by side in the printed summary.
const SHOWN_PROMPTS: usize = 5;

/// One greedy answer and its score under the labeler's rule.
pub struct Answer {
    pub text: String,
    pub ended_with_eos: bool,
    pub score: f64,
}

/// Answers of every compared model to every held-out prompt.
pub struct Comparison {
    pub models: Vec<ModelRef>,
    /// (prompt, reference answer) pairs.
    pub prompts: Vec<(String, String)>,
    /// `answers[model][prompt * SAMPLES_PER_PROMPT + sample]`.
    pub answers: Vec<Vec<Answer>>,
}

impl Comparison {
    /// Returns the mean labeler score of each model, in `models` order.
    pub fn mean_scores(&self) -> Vec<f64> {
        self.answers.iter().map(|answers| answers.iter().map(|a| a.score).sum::<f64>() / answers.len().max(1) as f64).collect()
    }

    /// Returns the share of answers that ended with EOS, per model.
    pub fn eos_rates(&self) -> Vec<f64> {
        self.answers
            .iter()
            .map(|answers| answers.iter().filter(|a| a.ended_with_eos).count() as f64 / answers.len().max(1) as f64)
            .collect()
    }

    pub fn print(&self) {
        println!(
            "\nheld-out prompts ({}), {SAMPLES_PER_PROMPT} answers each at temperature {TEMPERATURE}, scored by the labeler's rule:",
            self.prompts.len()
        );
        for ((model, score), eos) in self.models.iter().zip(self.mean_scores()).zip(self.eos_rates()) {
            println!("  {:<14} mean score {score:.3}   EOS rate {:.0}%", model.to_string(), eos * 100.0);
        }
        for (index, (prompt, reference)) in self.prompts.iter().take(SHOWN_PROMPTS).enumerate() {
            println!("\n  Q: {prompt}   (reference: {reference})");
            for (model, answers) in self.models.iter().zip(&self.answers) {
                let answer = &answers[index * SAMPLES_PER_PROMPT];
                let end = if answer.ended_with_eos { "" } else { " [no EOS]" };
                println!("    {:<14} {:?}{end}", model.to_string(), answer.text);
            }
        }
    }
}

/// Answers every prompt of `heldout` with each model, greedily.
pub async fn compare(registry: &ModelRegistry, heldout: &Path, models: &[&ModelRef]) -> Result<Comparison> {
    let loaded = read_demonstrations(heldout, Mode::Strict)?;
    let mut prompts = Vec::new();
    for record in loaded.records {
        let demonstration = record.value;
        let user = demonstration.prompt().iter().rev().find(|turn| turn.role == Role::User);
        if let Some(user) = user {
            prompts.push((user.content.clone(), demonstration.response().to_string()));
        }
    }

    let preference = Preference::default();
    let mut answers = Vec::new();
    for model_ref in models {
        let version = registry.load(model_ref).await.with_context(|| format!("cannot load {model_ref}"))?;
        let config = Config::from_json_str(std::str::from_utf8(version.config()).context("config.json is not UTF-8")?)?;
        let model = Model::from_safetensors_bytes(&config, version.weights(), &candle_core::Device::Cpu)?;
        let tokenizer = Tokenizer::from_bytes(version.tokenizer())?;

        let mut rendered = Vec::new();
        let mut params = Vec::new();
        let mut references = Vec::new();
        for (index, (prompt, reference)) in prompts.iter().enumerate() {
            let ids = tokenizer.render_prompt(prompt)?;
            for sample in 0..SAMPLES_PER_PROMPT {
                rendered.push(ids.clone());
                let seed = (index * SAMPLES_PER_PROMPT + sample) as u64;
                params.push(SamplingParams { temperature: TEMPERATURE, top_k: None, top_p: None, max_new_tokens: MAX_NEW_TOKENS, seed });
                references.push(reference);
            }
        }
        let outputs = generate(&model, &tokenizer, &rendered, &params, &GenerateOptions::default())?;
        let scored = outputs
            .into_iter()
            .zip(references)
            .map(|(output, reference)| {
                let ended_with_eos = output.finish_reason == FinishReason::Eos;
                let finish = if ended_with_eos { troupe_wire::FinishReason::Eos } else { troupe_wire::FinishReason::Length };
                let tokens = u32::try_from(output.tokens.len()).unwrap_or(u32::MAX);
                let score = score_response(&preference, &output.text, finish, tokens, Some(reference));
                Answer { text: output.text, ended_with_eos, score }
            })
            .collect();
        answers.push(scored);
    }
    Ok(Comparison { models: models.iter().map(|model| (*model).clone()).collect(), prompts, answers })
}
