//! One PPO step on a batch of scored rollouts, with no bus and no store:
//! the numbers only. The service feeds it batches and publishes what it
//! produces.
//!
//! A step runs these phases:
//!
//! 1. Score pass, without gradients: the policy's log-probs and values and
//!    the reference's log-probs for every response token, each at the
//!    temperature its rollout was sampled with.
//! 2. Targets: the per-token KL estimate, rewards (KL penalty on every
//!    token, the clipped score and the missing-EOS penalty on the last), GAE
//!    advantages and returns, and advantages whitened over the batch.
//! 3. Updates: `epochs` passes over shuffled minibatches of rollouts, each
//!    minibatch one AdamW step on the clipped surrogate plus the clipped
//!    value loss, with the global gradient norm clipped.
//! 4. The KL controller moves the coefficient for the next step.
//!
//! The ratio `π_new / π_old` uses the log-probs the sampler recorded as
//! `π_old`, the policy that actually produced the tokens. For a rollout of
//! the learner's current version these equal the recomputed log-probs (the
//! report's `first_ratio_max_error` measures the gap on the first minibatch),
//! and for an older version clipping bounds the update as PPO intends.
//!
//! Tensors are `(b, t)` over right-padded rows; a row is a rollout's prompt
//! followed by its response. Response token `k` of row `i` sits at column
//! `prompt_len_i + k`; every other cell of the target tensors is 0 and the
//! response mask is 0 there.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use troupe_model::{clip_grad_norm, token_entropy, token_logprobs, AdamW, AdamWConfig, Model};

use crate::advantage::{explained_variance, gae, masked_moments, token_rewards, whiten};
use crate::kl::{kl_k1, kl_k3, KlController, KlEstimator};
use crate::PpoError;

/// Hyperparameters of the PPO update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PpoConfig {
    /// AdamW learning rate, constant over the run.
    pub learning_rate: f64,
    /// Global gradient-norm bound per optimizer step.
    pub max_grad_norm: f64,
    /// Passes over each PPO batch.
    pub epochs: usize,
    /// Rollouts per optimizer step.
    pub minibatch_size: usize,
    /// Policy ratio clip `epsilon`: the ratio counts within `[1 - eps, 1 + eps]`.
    pub clip_range: f64,
    /// Value clip: a new value counts at most this far from the old one.
    pub value_clip_range: f64,
    /// Weight of the value loss next to the policy loss.
    pub value_coef: f64,
    /// Discount per token.
    pub gamma: f64,
    /// GAE `lambda`.
    pub lambda: f64,
    /// The estimator whose value is penalized in the reward.
    pub kl_estimator: KlEstimator,
    /// The normalized score is clipped to `[-score_clip, score_clip]`.
    pub score_clip: f64,
    /// Added (a number <= 0) to the final reward of a response without EOS.
    pub missing_eos_penalty: f64,
    /// Seed of the minibatch shuffle; step `s` shuffles with `seed + s`.
    pub seed: u64,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            learning_rate: 1e-5,
            max_grad_norm: 1.0,
            epochs: 4,
            minibatch_size: 8,
            clip_range: 0.2,
            value_clip_range: 0.2,
            value_coef: 0.1,
            gamma: 1.0,
            lambda: 0.95,
            kl_estimator: KlEstimator::K1,
            score_clip: 5.0,
            missing_eos_penalty: -1.0,
            seed: 0,
        }
    }
}

/// One rollout as the learner needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub prompt_tokens: Vec<u32>,
    pub response_tokens: Vec<u32>,
    /// Log-prob of each response token under the sampling policy.
    pub sampler_logprobs: Vec<f32>,
    /// Temperature the sampler used; 0 (greedy) is recorded at temperature 1.
    pub temperature: f32,
    pub ended_with_eos: bool,
    /// The reward model's normalized score.
    pub score: f32,
    /// The reward model's score before normalization, for logging.
    pub raw_score: f32,
    /// Learner versions between the sampling policy and the current one.
    pub lag: u64,
}

impl Sample {
    /// The temperature log-probs are computed at: the sampler's, or 1 for greedy.
    pub fn effective_temperature(&self) -> f32 {
        if self.temperature > 0.0 {
            self.temperature
        } else {
            1.0
        }
    }
}

/// Per-token targets of a batch, as `(b, t)` tensors that are 0 outside the
/// response tokens, and the same numbers per rollout.
#[derive(Debug)]
pub struct Targets {
    /// 1 on response tokens, 0 on prompt tokens and padding.
    pub mask: Tensor,
    pub advantages: Tensor,
    pub returns: Tensor,
    /// Value-head outputs before the update.
    pub old_values: Tensor,
    /// Sampler log-probs: `π_old` of the ratio.
    pub old_logprobs: Tensor,
    /// The penalized KL estimate per token.
    pub kl: Tensor,
    /// Per rollout, per response token: the penalized KL estimate.
    pub kl_per_token: Vec<Vec<f32>>,
    pub k1_per_token: Vec<Vec<f32>>,
    pub k3_per_token: Vec<Vec<f32>>,
    pub rewards: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
    pub returns_per_token: Vec<Vec<f32>>,
    /// Whitened advantages per rollout.
    pub advantages_per_token: Vec<Vec<f32>>,
    /// Recomputed policy log-probs before the update.
    pub policy_logprobs: Vec<Vec<f32>>,
}

/// What one step measured. Means over rollouts unless the name says tokens.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub rollouts: usize,
    pub response_tokens: usize,
    pub reward_raw: f64,
    /// Normalized score after clipping, as it enters the reward.
    pub reward: f64,
    /// Sum of per-token rewards (score, penalties and KL penalty) per rollout.
    pub total_reward: f64,
    /// Per-sequence KL of the penalized estimator: the one in the reward.
    pub kl: f64,
    pub kl_k1: f64,
    pub kl_k3: f64,
    /// The coefficient this step penalized with.
    pub kl_coef: f64,
    /// The coefficient after the controller's update.
    pub next_kl_coef: f64,
    /// Share of response tokens whose ratio was clipped, over all updates.
    pub clip_fraction: f64,
    /// Mean `(r - 1) - log r` between the policy before and during updates.
    pub approx_kl: f64,
    /// Policy entropy in nats per response token, before the update.
    pub entropy: f64,
    pub policy_loss: f64,
    pub value_loss: f64,
    pub explained_variance: f64,
    pub response_length: f64,
    pub eos_rate: f64,
    /// Mean and max versions between a rollout's policy and the learner's.
    pub policy_lag: f64,
    pub policy_lag_max: u64,
    /// Largest `|π_new / π_old - 1|` on tokens of current-version rollouts
    /// in the first minibatch of the first epoch; 0 when there were none.
    pub first_ratio_max_error: f64,
    /// Mean global gradient norm before clipping.
    pub grad_norm: f64,
    pub optimizer_steps: usize,
}

impl StepReport {
    /// The report as a name-to-number map for `JobProgress`.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let value = serde_json::to_value(self).unwrap_or_default();
        let mut out = BTreeMap::new();
        if let serde_json::Value::Object(map) = value {
            for (name, number) in map {
                if let Some(number) = number.as_f64() {
                    out.insert(name, number);
                }
            }
        }
        out
    }
}

/// The policy (with its value head), the frozen reference, the optimizer and
/// the KL controller.
pub struct Learner {
    policy: Model,
    reference: Model,
    optimizer: AdamW,
    kl: KlController,
    config: PpoConfig,
    pad_id: u32,
    /// PPO steps completed.
    step: u64,
}

impl Learner {
    /// Builds a learner. `policy` must have a value head; `reference` is
    /// never updated. `pad_id` fills the right padding.
    pub fn new(policy: Model, reference: Model, kl: KlController, config: PpoConfig, pad_id: u32) -> Result<Self, PpoError> {
        if !policy.heads().value {
            return Err(PpoError::Invalid("the policy needs a value head; add one with Model::add_heads".into()));
        }
        if policy.config().vocab_size != reference.config().vocab_size {
            return Err(PpoError::Invalid(format!(
                "policy vocab_size {} differs from the reference's {}; PPO needs the same tokenizer for both",
                policy.config().vocab_size,
                reference.config().vocab_size
            )));
        }
        let adamw = AdamWConfig { learning_rate: config.learning_rate, weight_decay: 0.0, ..AdamWConfig::default() };
        let optimizer = AdamW::new(policy.named_vars(), adamw)?;
        Ok(Learner { policy, reference, optimizer, kl, config, pad_id, step: 0 })
    }

    /// Restores the optimizer moments and the step count of a checkpoint.
    pub fn restore(&mut self, optimizer_state: &[u8], step: u64) -> Result<(), PpoError> {
        self.optimizer.load_safetensors(optimizer_state)?;
        self.optimizer.set_learning_rate(self.config.learning_rate);
        self.step = step;
        Ok(())
    }

    pub fn policy(&self) -> &Model {
        &self.policy
    }

    pub fn reference(&self) -> &Model {
        &self.reference
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    pub fn kl_controller(&self) -> &KlController {
        &self.kl
    }

    pub fn config(&self) -> &PpoConfig {
        &self.config
    }

    /// PPO steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Checks that a sample fits the models; the reason is for the dead-letter record.
    pub fn check_sample(&self, sample: &Sample) -> Result<(), String> {
        let cfg = self.policy.config();
        let total = sample.prompt_tokens.len() + sample.response_tokens.len();
        if sample.prompt_tokens.is_empty() {
            return Err("the rollout has no prompt tokens".into());
        }
        if total > cfg.max_position_embeddings {
            return Err(format!(
                "prompt and response have {total} tokens, over the policy's max_position_embeddings of {}",
                cfg.max_position_embeddings
            ));
        }
        if let Some(bad) = sample.prompt_tokens.iter().chain(&sample.response_tokens).find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(format!("token id {bad} is outside the policy's vocabulary of {}; was it sampled with another tokenizer?", cfg.vocab_size));
        }
        if sample.sampler_logprobs.len() != sample.response_tokens.len() {
            return Err("one log-prob per response token is required".into());
        }
        if !sample.temperature.is_finite() || sample.temperature < 0.0 {
            return Err(format!("sampling temperature {} is not a number >= 0", sample.temperature));
        }
        Ok(())
    }

    /// Runs the score pass and computes every per-token target of `samples`.
    pub fn compute_targets(&self, samples: &[Sample]) -> Result<Targets, PpoError> {
        let rows: Vec<&Sample> = samples.iter().collect();
        let chunk = self.config.minibatch_size.max(1);
        let mut policy_logprobs = Vec::with_capacity(samples.len());
        let mut values = Vec::with_capacity(samples.len());
        let mut ref_logprobs = Vec::with_capacity(samples.len());
        for part in rows.chunks(chunk) {
            let layout = Layout::new(part, self.pad_id, self.policy.device())?;
            let pass = forward(&self.policy, &layout, true)?;
            policy_logprobs.extend(layout.gather(&pass.logprobs.detach())?);
            if let Some(v) = pass.values {
                values.extend(layout.gather(&v.detach())?);
            }
            let reference = forward(&self.reference, &layout, false)?;
            ref_logprobs.extend(layout.gather(&reference.logprobs.detach())?);
        }

        let coef = self.kl.coef();
        let mut kl_per_token = Vec::with_capacity(samples.len());
        let mut k1_per_token = Vec::with_capacity(samples.len());
        let mut k3_per_token = Vec::with_capacity(samples.len());
        let mut rewards = Vec::with_capacity(samples.len());
        let mut advantages = Vec::with_capacity(samples.len());
        let mut returns = Vec::with_capacity(samples.len());
        for (i, sample) in samples.iter().enumerate() {
            let pairs = policy_logprobs[i].iter().zip(&ref_logprobs[i]);
            let k1: Vec<f32> = pairs.clone().map(|(&p, &r)| kl_k1(p, r)).collect();
            let k3: Vec<f32> = pairs.clone().map(|(&p, &r)| kl_k3(p, r)).collect();
            let penalized: Vec<f32> = pairs.map(|(&p, &r)| self.config.kl_estimator.estimate(p, r)).collect();
            let score = f64::from(sample.score).clamp(-self.config.score_clip, self.config.score_clip);
            let reward = token_rewards(&penalized, coef, score, sample.ended_with_eos, self.config.missing_eos_penalty);
            let (advantage, ret) = gae(&reward, &values[i], self.config.gamma, self.config.lambda);
            kl_per_token.push(penalized);
            k1_per_token.push(k1);
            k3_per_token.push(k3);
            rewards.push(reward);
            advantages.push(advantage);
            returns.push(ret);
        }
        whiten(&mut advantages);

        let layout = Layout::new(&rows, self.pad_id, self.policy.device())?;
        let old: Vec<Vec<f32>> = samples.iter().map(|s| s.sampler_logprobs.clone()).collect();
        Ok(Targets {
            mask: layout.mask_f32()?,
            advantages: layout.scatter(&advantages)?,
            returns: layout.scatter(&returns)?,
            old_values: layout.scatter(&values)?,
            old_logprobs: layout.scatter(&old)?,
            kl: layout.scatter(&kl_per_token)?,
            kl_per_token,
            k1_per_token,
            k3_per_token,
            rewards,
            values,
            returns_per_token: returns,
            advantages_per_token: advantages,
            policy_logprobs,
        })
    }

    /// Runs one PPO step on `samples` and returns what it measured.
    pub fn train_step(&mut self, samples: &[Sample]) -> Result<StepReport, PpoError> {
        if samples.is_empty() {
            return Err(PpoError::Invalid("a PPO step needs at least one rollout".into()));
        }
        for (i, sample) in samples.iter().enumerate() {
            self.check_sample(sample).map_err(|reason| PpoError::Invalid(format!("rollout {i}: {reason}")))?;
        }

        // Score pass and targets.
        let targets = self.compute_targets(samples)?;
        let mut report = self.describe_batch(samples, &targets)?;

        // Updates: epochs over shuffled minibatches.
        let mut rng = StdRng::seed_from_u64(self.config.seed.wrapping_add(self.step));
        let mut order: Vec<usize> = (0..samples.len()).collect();
        let mut totals = UpdateTotals::default();
        for epoch in 0..self.config.epochs {
            order.shuffle(&mut rng);
            for (index, chunk) in order.chunks(self.config.minibatch_size.max(1)).enumerate() {
                let first = epoch == 0 && index == 0;
                self.update_minibatch(samples, &targets, chunk, first, &mut totals)?;
            }
        }
        totals.write_into(&mut report);

        // KL controller.
        self.kl.update(report.kl, samples.len());
        report.next_kl_coef = self.kl.coef();
        self.step += 1;
        Ok(report)
    }

    fn describe_batch(&self, samples: &[Sample], targets: &Targets) -> Result<StepReport, PpoError> {
        let n = samples.len() as f64;
        let sum_seq = |per_token: &[Vec<f32>]| per_token.iter().map(|seq| seq.iter().map(|&x| f64::from(x)).sum::<f64>()).sum::<f64>() / n;
        let response_tokens: usize = samples.iter().map(|s| s.response_tokens.len()).sum();
        let entropy = self.mean_entropy(samples)?;
        Ok(StepReport {
            rollouts: samples.len(),
            response_tokens,
            reward_raw: samples.iter().map(|s| f64::from(s.raw_score)).sum::<f64>() / n,
            reward: samples.iter().map(|s| f64::from(s.score).clamp(-self.config.score_clip, self.config.score_clip)).sum::<f64>() / n,
            total_reward: sum_seq(&targets.rewards),
            kl: sum_seq(&targets.kl_per_token),
            kl_k1: sum_seq(&targets.k1_per_token),
            kl_k3: sum_seq(&targets.k3_per_token),
            kl_coef: self.kl.coef(),
            next_kl_coef: self.kl.coef(),
            entropy,
            explained_variance: explained_variance(&targets.values, &targets.returns_per_token).unwrap_or(0.0),
            response_length: response_tokens as f64 / n,
            eos_rate: samples.iter().filter(|s| s.ended_with_eos).count() as f64 / n,
            policy_lag: samples.iter().map(|s| s.lag as f64).sum::<f64>() / n,
            policy_lag_max: samples.iter().map(|s| s.lag).max().unwrap_or(0),
            ..StepReport::default()
        })
    }

    /// Mean entropy per response token of the policy at each rollout's temperature.
    fn mean_entropy(&self, samples: &[Sample]) -> Result<f64, PpoError> {
        let rows: Vec<&Sample> = samples.iter().collect();
        let mut per_token = Vec::new();
        for part in rows.chunks(self.config.minibatch_size.max(1)) {
            let layout = Layout::new(part, self.pad_id, self.policy.device())?;
            let logits = scaled_logits(&self.policy, &layout)?;
            per_token.extend(layout.gather(&token_entropy(&logits, 1.0)?.detach())?);
        }
        Ok(masked_moments(&per_token).map_or(0.0, |(mean, _)| mean))
    }

    fn update_minibatch(
        &mut self,
        samples: &[Sample],
        targets: &Targets,
        chunk: &[usize],
        first: bool,
        totals: &mut UpdateTotals,
    ) -> Result<(), PpoError> {
        let rows: Vec<&Sample> = chunk.iter().map(|&i| &samples[i]).collect();
        let layout = Layout::new(&rows, self.pad_id, self.policy.device())?;
        let t = layout.width;
        let pick = |all: &Tensor| -> Result<Tensor, PpoError> {
            let index = Tensor::from_vec(chunk.iter().map(|&i| i as u32).collect::<Vec<_>>(), chunk.len(), all.device())?;
            Ok(all.index_select(&index, 0)?.narrow(1, 0, t)?.contiguous()?)
        };
        let mask = pick(&targets.mask)?;
        let tokens = mask.sum_all()?.to_scalar::<f32>()? as f64;
        if tokens == 0.0 {
            // Only empty responses: nothing to learn from.
            return Ok(());
        }
        let advantages = pick(&targets.advantages)?;
        let returns = pick(&targets.returns)?;
        let old_values = pick(&targets.old_values)?;
        let old_logprobs = pick(&targets.old_logprobs)?;

        // Forward and backward.
        let pass = forward(&self.policy, &layout, true)?;
        let values = pass.values.ok_or_else(|| PpoError::Invalid("the policy lost its value head".into()))?;
        let log_ratio = ((&pass.logprobs - &old_logprobs)? * &mask)?;
        let ratio = log_ratio.exp()?;
        let eps = self.config.clip_range as f32;
        let unclipped = (advantages.neg()? * &ratio)?;
        let clipped = (advantages.neg()? * ratio.clamp(1.0 - eps, 1.0 + eps)?)?;
        let policy_loss = (unclipped.maximum(&clipped)? * &mask)?.sum_all()?.affine(1.0 / tokens, 0.0)?;

        let c = self.config.value_clip_range as f32;
        let values_clipped = (&old_values + (&values - &old_values)?.clamp(-c, c)?)?;
        let value_error = (&values - &returns)?.sqr()?;
        let value_error_clipped = (&values_clipped - &returns)?.sqr()?;
        let value_loss = (value_error.maximum(&value_error_clipped)? * &mask)?.sum_all()?.affine(0.5 / tokens, 0.0)?;

        let loss = (&policy_loss + value_loss.affine(self.config.value_coef, 0.0)?)?;
        let mut grads = loss.backward()?;

        // Clip and step.
        let vars = self.policy.vars();
        let grad_norm = clip_grad_norm(&mut grads, &vars, self.config.max_grad_norm)?;
        self.optimizer.step(&grads)?;

        // Statistics.
        let ratio_host = ratio.detach().to_vec2::<f32>()?;
        let log_ratio_host = log_ratio.detach().to_vec2::<f32>()?;
        let mask_host = mask.to_vec2::<f32>()?;
        for (row, sample) in rows.iter().enumerate() {
            for col in 0..t {
                if mask_host[row][col] == 0.0 {
                    continue;
                }
                let r = f64::from(ratio_host[row][col]);
                totals.tokens += 1;
                if (r - 1.0).abs() > self.config.clip_range {
                    totals.clipped += 1;
                }
                totals.approx_kl += (r - 1.0) - f64::from(log_ratio_host[row][col]);
                if first && sample.lag == 0 {
                    totals.first_ratio_max_error = totals.first_ratio_max_error.max((r - 1.0).abs());
                }
            }
        }
        totals.policy_loss += f64::from(policy_loss.to_scalar::<f32>()?);
        totals.value_loss += f64::from(value_loss.to_scalar::<f32>()?);
        totals.grad_norm += grad_norm;
        totals.steps += 1;
        Ok(())
    }
}

#[derive(Default)]
struct UpdateTotals {
    tokens: usize,
    clipped: usize,
    approx_kl: f64,
    policy_loss: f64,
    value_loss: f64,
    grad_norm: f64,
    first_ratio_max_error: f64,
    steps: usize,
}

impl UpdateTotals {
    fn write_into(&self, report: &mut StepReport) {
        let steps = self.steps.max(1) as f64;
        let tokens = self.tokens.max(1) as f64;
        report.clip_fraction = self.clipped as f64 / tokens;
        report.approx_kl = self.approx_kl / tokens;
        report.policy_loss = self.policy_loss / steps;
        report.value_loss = self.value_loss / steps;
        report.grad_norm = self.grad_norm / steps;
        report.first_ratio_max_error = self.first_ratio_max_error;
        report.optimizer_steps = self.steps;
    }
}

/// Right-padded rows of prompt plus response, and where each response sits.
struct Layout {
    ids: Tensor,
    attention: Tensor,
    /// `(b, 1, 1)`: `1 / temperature` per row.
    inverse_temperature: Tensor,
    starts: Vec<usize>,
    lengths: Vec<usize>,
    width: usize,
    device: Device,
}

impl Layout {
    fn new(rows: &[&Sample], pad: u32, device: &Device) -> Result<Layout, PpoError> {
        let width = rows.iter().map(|s| s.prompt_tokens.len() + s.response_tokens.len()).max().unwrap_or(0).max(1);
        let b = rows.len();
        let mut ids = Vec::with_capacity(b * width);
        let mut attention = Vec::with_capacity(b * width);
        for sample in rows {
            let real = sample.prompt_tokens.len() + sample.response_tokens.len();
            ids.extend(sample.prompt_tokens.iter().chain(&sample.response_tokens).copied());
            ids.extend(std::iter::repeat_n(pad, width - real));
            attention.extend(std::iter::repeat_n(1u8, real).chain(std::iter::repeat_n(0u8, width - real)));
        }
        let inverse: Vec<f32> = rows.iter().map(|s| 1.0 / s.effective_temperature()).collect();
        Ok(Layout {
            ids: Tensor::from_vec(ids, (b, width), device)?,
            attention: Tensor::from_vec(attention, (b, width), device)?,
            inverse_temperature: Tensor::from_vec(inverse, (b, 1, 1), device)?,
            starts: rows.iter().map(|s| s.prompt_tokens.len()).collect(),
            lengths: rows.iter().map(|s| s.response_tokens.len()).collect(),
            width,
            device: device.clone(),
        })
    }

    /// The response-token entries of each row of a `(b, t)` tensor.
    fn gather(&self, per_token: &Tensor) -> Result<Vec<Vec<f32>>, PpoError> {
        let host = per_token.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(host
            .into_iter()
            .enumerate()
            .map(|(row, values)| values[self.starts[row]..self.starts[row] + self.lengths[row]].to_vec())
            .collect())
    }

    /// A `(b, t)` tensor with `per_row[i][k]` at row `i`, column `start_i + k`, and 0 elsewhere.
    fn scatter(&self, per_row: &[Vec<f32>]) -> Result<Tensor, PpoError> {
        let b = self.starts.len();
        let mut out = vec![0.0f32; b * self.width];
        for (row, values) in per_row.iter().enumerate() {
            let start = row * self.width + self.starts[row];
            out[start..start + values.len()].copy_from_slice(values);
        }
        Ok(Tensor::from_vec(out, (b, self.width), &self.device)?)
    }

    fn mask_f32(&self) -> Result<Tensor, PpoError> {
        let ones: Vec<Vec<f32>> = self.lengths.iter().map(|&n| vec![1.0; n]).collect();
        self.scatter(&ones)
    }
}

struct Pass {
    /// `(b, t)` log-prob of each token given the tokens before it.
    logprobs: Tensor,
    /// `(b, t)` value before each token was emitted; `None` without a value head.
    values: Option<Tensor>,
}

/// Logits divided by each row's temperature.
fn scaled_logits(model: &Model, layout: &Layout) -> Result<Tensor, PpoError> {
    let logits = model.forward(&layout.ids, Some(&layout.attention))?;
    Ok(logits.broadcast_mul(&layout.inverse_temperature)?)
}

fn forward(model: &Model, layout: &Layout, with_values: bool) -> Result<Pass, PpoError> {
    let hidden = model.forward_hidden(&layout.ids, Some(&layout.attention))?;
    let logits = model.lm_logits(&hidden)?.broadcast_mul(&layout.inverse_temperature)?;
    let logprobs = token_logprobs(&logits, &layout.ids, 1.0)?;
    let values = if with_values && model.heads().value {
        // values: (b, t), value of the state after token j; the action at
        // column j was chosen in the state after token j - 1.
        let per_state = model.values(&hidden)?;
        let (b, t) = per_state.dims2()?;
        let zeros = Tensor::zeros((b, 1), per_state.dtype(), per_state.device())?;
        Some(if t > 1 { Tensor::cat(&[&zeros, &per_state.narrow(1, 0, t - 1)?], D::Minus1)? } else { zeros })
    } else {
        None
    };
    Ok(Pass { logprobs, values })
}
