//! Evaluation helpers: held-out loss, the unigram entropy that a language
//! model must beat to have learned anything beyond token frequencies, and the
//! share of sampled responses that end with EOS.

use candle_core::Tensor;
use troupe_model::{
    generate, lm_loss, FinishReason, GenerateOptions, Model, SamplingParams, Tokenizer,
};

use crate::{Result, TrainError};

/// Entropy in nats of the unigram distribution of `tokens`: the loss of a
/// model that predicts every token from corpus frequencies alone.
pub fn unigram_entropy(tokens: &[u32]) -> f64 {
    let mut counts = std::collections::HashMap::<u32, u64>::new();
    for &token in tokens {
        *counts.entry(token).or_default() += 1;
    }
    let total = tokens.len() as f64;
    counts
        .values()
        .map(|&c| c as f64 / total)
        .map(|p| -p * p.ln())
        .sum()
}

/// Mean language-model loss over `batches`, weighting each batch by the tokens
/// that carry loss. Each batch is `(input_ids, attention_mask, loss_mask)`;
/// `None` masks mean every token counts.
pub fn mean_loss(
    model: &Model,
    batches: &[(Tensor, Option<Tensor>, Option<Tensor>)],
) -> Result<f64> {
    let mut weighted = 0.0;
    let mut tokens = 0.0;
    for (ids, attention_mask, loss_mask) in batches {
        let logits = model.forward(ids, attention_mask.as_ref())?;
        let loss = lm_loss(&logits, ids, loss_mask.as_ref())?.to_scalar::<f32>()? as f64;
        let (b, t) = ids.dims2()?;
        let count = match loss_mask {
            // Column 0 has no prediction, as in `lm_loss`.
            Some(mask) => mask
                .narrow(1, 1, t - 1)?
                .to_dtype(candle_core::DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?,
            None => (b * (t - 1)) as f64,
        };
        weighted += loss * count;
        tokens += count;
    }
    if tokens == 0.0 {
        return Err(TrainError::Invalid {
            what: "evaluation set",
            reason: "no tokens to evaluate".into(),
        });
    }
    Ok(weighted / tokens)
}

/// Share of `prompts` (already rendered token ids) whose greedy completion
/// ends with EOS within `max_new_tokens`, sampled in batches of `batch_size`.
pub fn eos_rate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    batch_size: usize,
) -> Result<f64> {
    if prompts.is_empty() {
        return Err(TrainError::Invalid {
            what: "evaluation prompts",
            reason: "no prompts given".into(),
        });
    }
    let params = SamplingParams {
        temperature: 0.0,
        max_new_tokens,
        ..SamplingParams::default()
    };
    let mut ended = 0;
    for chunk in prompts.chunks(batch_size.max(1)) {
        let chunk_params = vec![params.clone(); chunk.len()];
        let outputs = generate(
            model,
            tokenizer,
            chunk,
            &chunk_params,
            &GenerateOptions::default(),
        )?;
        ended += outputs
            .iter()
            .filter(|out| out.finish_reason == FinishReason::Eos)
            .count();
    }
    Ok(ended as f64 / prompts.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unigram_entropy_of_uniform_tokens() {
        let tokens: Vec<u32> = (0..4).cycle().take(400).collect();
        assert!((unigram_entropy(&tokens) - 4f64.ln()).abs() < 1e-12);
        assert_eq!(unigram_entropy(&[7, 7, 7]), 0.0);
    }
}
