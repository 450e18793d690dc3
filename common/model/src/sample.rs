//! Batched sampling with temperature, top-k and top-p, a KV cache, and one
//! seeded random generator per request.
//!
//! Prompts of different lengths are padded on the left, so every row's next
//! token is read from the last column. Each request draws from its own
//! generator seeded with its `seed`, so its output depends only on its prompt,
//! its parameters and the model, not on the other requests in the batch. The
//! exception is float rounding, which the batch size may change in the matmuls.
//!
//! The log-prob recorded with a token is that of the full distribution
//! `softmax(logits / temperature)`, before top-k/top-p truncation, which is
//! what a teacher-forced pass at the same temperature recomputes
//! ([`crate::token_logprobs`]). Greedy decoding (temperature 0) records
//! log-probs at temperature 1.

use crate::{Error, Model, Result, Tokenizer};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Settings of one sampling request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens; `None` keeps all.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`, in (0, 1].
    pub top_p: Option<f64>,
    /// Upper bound on generated tokens, EOS included.
    pub max_new_tokens: usize,
    /// Seed of this request's random generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            max_new_tokens: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    fn validate(&self, index: usize) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::Request(format!(
                "sampling request {index}: {reason}"
            )))
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature must be 0 or positive, got {}",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return bad("top_k must be at least 1".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        Ok(())
    }
}

/// Engine settings shared by a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerateOptions {
    /// Reuse keys and values of earlier tokens (the normal mode); without it
    /// every step reruns the whole sequence, which benchmarks and tests use.
    pub use_kv_cache: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { use_kv_cache: true }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model produced EOS (included in `tokens`).
    Eos,
    /// `max_new_tokens` ran out first.
    Length,
}

/// One completed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids, the final EOS included when there is one.
    pub tokens: Vec<u32>,
    /// Decoded text of `tokens` without special tokens.
    pub text: String,
    /// Log-prob of each token in `tokens` at the request's temperature.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// Samples a completion for each prompt, stopping at the tokenizer's EOS.
/// `params[i]` applies to `prompts[i]`.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &[SamplingParams],
    options: &GenerateOptions,
) -> Result<Vec<Generation>> {
    let pad = tokenizer.pad_id().unwrap_or(0);
    let outputs = generate_tokens(model, prompts, params, tokenizer.eos_id(), pad, options)?;
    outputs
        .into_iter()
        .map(|out| {
            let text = tokenizer.decode(&out.tokens, true)?;
            Ok(Generation {
                tokens: out.tokens,
                text,
                logprobs: out.logprobs,
                finish_reason: out.finish_reason,
            })
        })
        .collect()
}

/// A completion as token ids only.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenGeneration {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

struct Row {
    rng: StdRng,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    finish_reason: Option<FinishReason>,
}

/// Samples completions without a tokenizer: stops at `eos` (if any) and pads
/// prompts on the left with `pad`.
pub fn generate_tokens(
    model: &Model,
    prompts: &[Vec<u32>],
    params: &[SamplingParams],
    eos: Option<u32>,
    pad: u32,
    options: &GenerateOptions,
) -> Result<Vec<TokenGeneration>> {
    validate_batch(model, prompts, params)?;
    let mut rows: Vec<Row> = params
        .iter()
        .map(|p| Row {
            rng: StdRng::seed_from_u64(p.seed),
            tokens: Vec::new(),
            logprobs: Vec::new(),
            finish_reason: None,
        })
        .collect();
    let steps = params.iter().map(|p| p.max_new_tokens).max().unwrap_or(0);
    let mut engine = Engine::new(model, prompts, pad, options.use_kv_cache);
    let mut logits = engine.prefill()?;
    for step in 0..steps {
        for (i, row) in rows.iter_mut().enumerate() {
            if row.finish_reason.is_some() {
                continue;
            }
            let (token, logprob) = pick_token(&logits[i], &params[i], &mut row.rng);
            row.tokens.push(token);
            row.logprobs.push(logprob);
            if Some(token) == eos {
                row.finish_reason = Some(FinishReason::Eos);
            } else if row.tokens.len() >= params[i].max_new_tokens {
                row.finish_reason = Some(FinishReason::Length);
            }
        }
        if step + 1 == steps || rows.iter().all(|r| r.finish_reason.is_some()) {
            break;
        }
        let next: Vec<Option<u32>> = rows
            .iter()
            .map(|r| {
                if r.finish_reason.is_none() {
                    r.tokens.last().copied()
                } else {
                    None
                }
            })
            .collect();
        logits = engine.step(&next)?;
    }
    Ok(rows
        .into_iter()
        .map(|r| TokenGeneration {
            tokens: r.tokens,
            logprobs: r.logprobs,
            finish_reason: r.finish_reason.unwrap_or(FinishReason::Length),
        })
        .collect())
}

fn validate_batch(model: &Model, prompts: &[Vec<u32>], params: &[SamplingParams]) -> Result<()> {
    if prompts.is_empty() {
        return Err(Error::Request("no prompts to sample".into()));
    }
    if prompts.len() != params.len() {
        return Err(Error::Request(format!(
            "{} prompts but {} sampling settings",
            prompts.len(),
            params.len()
        )));
    }
    let cfg = model.config();
    for (i, (prompt, p)) in prompts.iter().zip(params).enumerate() {
        p.validate(i)?;
        if prompt.is_empty() {
            return Err(Error::Request(format!(
                "sampling request {i}: the prompt is empty"
            )));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Error::Request(format!(
                "sampling request {i}: token {bad} is outside the model vocabulary of {}",
                cfg.vocab_size
            )));
        }
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let new_tokens = params.iter().map(|p| p.max_new_tokens).max().unwrap_or(0);
    if longest + new_tokens > cfg.max_position_embeddings {
        return Err(Error::Request(format!(
            "the maximum prompt length ({longest} tokens) plus max_new_tokens ({new_tokens}) exceeds max_position_embeddings = {}",
            cfg.max_position_embeddings
        )));
    }
    Ok(())
}

/// Produces next-token logits for the batch, with or without a KV cache.
struct Engine<'a> {
    model: &'a Model,
    pad: u32,
    /// Without a cache: every row's tokens so far (prompt and generated), unpadded.
    sequences: Vec<Vec<u32>>,
    cache: Option<crate::KvCache>,
}

impl<'a> Engine<'a> {
    fn new(model: &'a Model, prompts: &[Vec<u32>], pad: u32, use_kv_cache: bool) -> Self {
        let cache = use_kv_cache.then(|| model.new_cache(prompts.len()));
        Self {
            model,
            pad,
            sequences: prompts.to_vec(),
            cache,
        }
    }

    /// Logits of the next token after each prompt.
    fn prefill(&mut self) -> Result<Vec<Vec<f32>>> {
        let (ids, mask) = left_pad(&self.sequences, self.pad, self.model)?;
        self.last_logits(&ids, &mask)
    }

    /// Feeds one new token per row (`None` for rows already finished, which
    /// get a masked pad) and returns the logits that follow it.
    fn step(&mut self, next: &[Option<u32>]) -> Result<Vec<Vec<f32>>> {
        if self.cache.is_none() {
            for (seq, token) in self.sequences.iter_mut().zip(next) {
                seq.push(token.unwrap_or(self.pad));
            }
            return self.prefill();
        }
        let device = self.model.device();
        let ids: Vec<u32> = next.iter().map(|t| t.unwrap_or(self.pad)).collect();
        let mask: Vec<u8> = next.iter().map(|t| u8::from(t.is_some())).collect();
        let b = ids.len();
        let ids = Tensor::from_vec(ids, (b, 1), device)?;
        let mask = Tensor::from_vec(mask, (b, 1), device)?;
        self.last_logits(&ids, &mask)
    }

    fn last_logits(&mut self, ids: &Tensor, mask: &Tensor) -> Result<Vec<Vec<f32>>> {
        let hidden = match self.cache.as_mut() {
            Some(cache) => self.model.forward_cached(ids, Some(mask), cache)?,
            None => self.model.forward_hidden(ids, Some(mask))?,
        };
        let (_, t, _) = hidden.dims3()?;
        let logits = self
            .model
            .lm_logits(&hidden.narrow(1, t - 1, 1)?.contiguous()?)?;
        // logits: (b, 1, vocab)
        Ok(logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
}

/// Left-pads `sequences` with `pad`: ids `(b, t)` and a 0/1 mask `(b, t)`.
fn left_pad(sequences: &[Vec<u32>], pad: u32, model: &Model) -> Result<(Tensor, Tensor)> {
    let t = sequences.iter().map(Vec::len).max().unwrap_or(0);
    let b = sequences.len();
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    for seq in sequences {
        let padding = t - seq.len();
        ids.extend(std::iter::repeat_n(pad, padding).chain(seq.iter().copied()));
        mask.extend(std::iter::repeat_n(0u8, padding).chain(std::iter::repeat_n(1u8, seq.len())));
    }
    let device = model.device();
    Ok((
        Tensor::from_vec(ids, (b, t), device)?,
        Tensor::from_vec(mask, (b, t), device)?,
    ))
}

/// Chooses the next token from one row of logits; returns it with its
/// log-prob under the untruncated distribution (see the module doc).
pub fn pick_token(logits: &[f32], params: &SamplingParams, rng: &mut StdRng) -> (u32, f32) {
    if params.temperature == 0.0 {
        let token = argmax(logits);
        return (token as u32, log_softmax_at(logits, 1.0, token) as f32);
    }
    let inv_t = 1.0 / params.temperature;
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 * inv_t));
    let weights: Vec<f64> = logits
        .iter()
        .map(|&v| (v as f64 * inv_t - max).exp())
        .collect();
    let total: f64 = weights.iter().sum();

    let token = if params.top_k.is_none() && params.top_p.is_none() {
        draw(weights.iter().copied().enumerate(), total, rng)
    } else {
        // Candidates from most to least likely, ties broken by lower id.
        let mut order: Vec<usize> = (0..weights.len()).collect();
        order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
        if let Some(k) = params.top_k {
            order.truncate(k.max(1));
        }
        if let Some(p) = params.top_p {
            let kept_total: f64 = order.iter().map(|&j| weights[j]).sum();
            let mut cumulative = 0.0;
            let mut keep = order.len();
            for (n, &j) in order.iter().enumerate() {
                cumulative += weights[j];
                if cumulative >= p * kept_total {
                    keep = n + 1;
                    break;
                }
            }
            order.truncate(keep);
        }
        let kept_total: f64 = order.iter().map(|&j| weights[j]).sum();
        draw(order.iter().map(|&j| (j, weights[j])), kept_total, rng)
    };
    let logprob = (weights[token] / total).ln();
    (token as u32, logprob as f32)
}

/// Draws an index with probability proportional to its weight.
fn draw(candidates: impl Iterator<Item = (usize, f64)>, total: f64, rng: &mut StdRng) -> usize {
    let target = rng.random::<f64>() * total;
    let mut cumulative = 0.0;
    let mut last = 0;
    for (j, w) in candidates {
        if w <= 0.0 {
            continue;
        }
        cumulative += w;
        last = j;
        if cumulative > target {
            return j;
        }
    }
    // Rounding can leave `target` just above the final sum.
    last
}

/// Index of the largest logit, the lowest id on ties.
fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (j, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = j;
        }
    }
    best
}

fn log_softmax_at(logits: &[f32], temperature: f64, index: usize) -> f64 {
    let inv_t = 1.0 / temperature;
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 * inv_t));
    let sum: f64 = logits.iter().map(|&v| (v as f64 * inv_t - max).exp()).sum();
    logits[index] as f64 * inv_t - max - sum.ln()
}
