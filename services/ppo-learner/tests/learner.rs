//! The PPO step's invariants on a tiny random model: the first ratio is 1,
//! the penalized KL is the logged KL, padding gets nothing, and odd batches
//! stay finite.

mod common;

use candle_core::Tensor;
use troupe_model::{generate, FinishReason, GenerateOptions, SamplingParams};
use troupe_ppo_learner::{KlController, KlEstimator, Learner, PpoConfig, Sample};

const PROMPTS: [&str; 4] = ["What is the capital of Chad?", "What is the capital of Peru?", "Capital of Laos?", "Hello"];

/// Samples `n` rollouts per prompt from `model` at `temperature`.
fn sample(model: &troupe_model::Model, tokenizer: &troupe_model::Tokenizer, temperature: f64, max_new_tokens: usize) -> Vec<Sample> {
    let mut prompts = Vec::new();
    let mut params = Vec::new();
    for (i, text) in PROMPTS.iter().enumerate() {
        for j in 0..2 {
            prompts.push(tokenizer.render_prompt(text).unwrap());
            params.push(SamplingParams { temperature, max_new_tokens, seed: (i * 10 + j) as u64, ..SamplingParams::default() });
        }
    }
    let outputs = generate(model, tokenizer, &prompts, &params, &GenerateOptions::default()).unwrap();
    prompts
        .into_iter()
        .zip(outputs)
        .enumerate()
        .map(|(i, (prompt_tokens, out))| Sample {
            prompt_tokens,
            response_tokens: out.tokens,
            sampler_logprobs: out.logprobs,
            temperature: temperature as f32,
            ended_with_eos: out.finish_reason == FinishReason::Eos,
            score: (i % 3) as f32 - 1.0,
            raw_score: (i % 3) as f32,
            lag: 0,
        })
        .collect()
}

fn setup(reference_seed: u64) -> (Learner, troupe_model::Tokenizer) {
    let tokenizer = common::capitals_tokenizer(320);
    let cfg = common::micro_config(tokenizer.vocab_size());
    let policy = common::random_model(&cfg, true, 1);
    let reference = common::random_model(&cfg, false, reference_seed);
    let config = PpoConfig { learning_rate: 1e-3, minibatch_size: 4, epochs: 2, ..PpoConfig::default() };
    let learner = Learner::new(policy, reference, KlController::Fixed { coef: 0.1 }, config, 0).unwrap();
    (learner, tokenizer)
}

/// Sum of `|x|` over the cells where `mask` is 0.
fn outside_mask(x: &Tensor, mask: &Tensor) -> f32 {
    let outside = mask.affine(-1.0, 1.0).unwrap();
    (x * outside).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn first_ratio_is_one() {
    let (mut learner, tokenizer) = setup(1);
    let samples = sample(learner.policy(), &tokenizer, 0.7, 12);
    let report = learner.train_step(&samples).unwrap();
    // Tolerance 1e-4: the sampler decodes with a KV cache and left padding,
    // while the learner runs one right-padded forward pass, so f32 rounding differs.
    assert!(report.first_ratio_max_error < 1e-4, "first ratio off by {}", report.first_ratio_max_error);
    assert!(report.optimizer_steps == 4, "{} optimizer steps", report.optimizer_steps);
}

#[test]
fn first_ratio_detects_wrong_temperature() {
    let (mut learner, tokenizer) = setup(1);
    let mut samples = sample(learner.policy(), &tokenizer, 0.7, 12);
    for s in &mut samples {
        s.temperature = 1.0;
    }
    let report = learner.train_step(&samples).unwrap();
    assert!(report.first_ratio_max_error > 1e-2, "a temperature mismatch went unnoticed: {}", report.first_ratio_max_error);
}

#[test]
fn logged_kl_is_penalized_kl() {
    for estimator in [KlEstimator::K1, KlEstimator::K3] {
        let tokenizer = common::capitals_tokenizer(320);
        let cfg = common::micro_config(tokenizer.vocab_size());
        let config = PpoConfig { kl_estimator: estimator, minibatch_size: 4, epochs: 1, ..PpoConfig::default() };
        let policy = common::random_model(&cfg, true, 1);
        let reference = common::random_model(&cfg, false, 2);
        let mut learner = Learner::new(policy, reference, KlController::Fixed { coef: 0.1 }, config, 0).unwrap();
        let samples = sample(learner.policy(), &tokenizer, 1.0, 10);

        let targets = learner.compute_targets(&samples).unwrap();
        for seq in &targets.k3_per_token {
            assert!(seq.iter().all(|&k| k >= 0.0), "negative k3 in {seq:?}");
        }
        for (i, seq) in targets.kl_per_token.iter().enumerate() {
            let expected = match estimator {
                KlEstimator::K1 => &targets.k1_per_token[i],
                KlEstimator::K3 => &targets.k3_per_token[i],
            };
            assert_eq!(seq, expected);
            // Every token but the last carries exactly the KL penalty.
            for (reward, kl) in targets.rewards[i].iter().zip(seq).take(seq.len().saturating_sub(1)) {
                assert!((reward + 0.1 * kl).abs() < 1e-6);
            }
        }
        let per_sequence: f64 = targets.kl_per_token.iter().map(|s| s.iter().map(|&x| f64::from(x)).sum::<f64>()).sum::<f64>()
            / samples.len() as f64;
        let report = learner.train_step(&samples).unwrap();
        assert!((report.kl - per_sequence).abs() < 1e-4, "{estimator:?}: logged {} vs penalized {per_sequence}", report.kl);
        assert!(report.kl_k3 >= 0.0);
        assert!(report.kl_k1.abs() > 1e-3, "the reference should differ from the policy");
    }
}

#[test]
fn padding_gets_no_targets() {
    let (learner, tokenizer) = setup(2);
    let mut samples = sample(learner.policy(), &tokenizer, 1.0, 8);
    // An empty response and a response cut without EOS.
    samples[0].response_tokens.clear();
    samples[0].sampler_logprobs.clear();
    samples[1].ended_with_eos = false;
    samples[1].score = 1.0;

    let targets = learner.compute_targets(&samples).unwrap();
    let response_tokens: usize = samples.iter().map(|s| s.response_tokens.len()).sum();
    let mask_sum = targets.mask.sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(mask_sum as usize, response_tokens);
    let nonzero_advantages =
        targets.advantages.ne(0f32).unwrap().to_dtype(candle_core::DType::F32).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(nonzero_advantages as usize, response_tokens);
    for (name, tensor) in [("advantages", &targets.advantages), ("returns", &targets.returns), ("values", &targets.old_values), ("kl", &targets.kl)] {
        assert_eq!(outside_mask(tensor, &targets.mask), 0.0, "{name} is nonzero outside the response");
    }
    assert!(targets.rewards[0].is_empty());
    assert!(targets.advantages_per_token[0].is_empty());

    // The truncated response's last reward has the score and the penalty.
    let last = samples[1].response_tokens.len() - 1;
    let expected = -0.1 * targets.kl_per_token[1][last] + 1.0 - 1.0;
    assert!((targets.rewards[1][last] - expected).abs() < 1e-5, "{} vs {expected}", targets.rewards[1][last]);
}

#[test]
fn odd_batches_stay_finite() {
    let (mut learner, tokenizer) = setup(2);
    let samples = sample(learner.policy(), &tokenizer, 1.0, 6);

    let one = vec![Sample { response_tokens: samples[0].response_tokens[..1].to_vec(), sampler_logprobs: samples[0].sampler_logprobs[..1].to_vec(), ..samples[0].clone() }];
    let report = learner.train_step(&one).unwrap();
    assert!(report.policy_loss.is_finite(), "{report:?}");
    assert!(report.value_loss.is_finite(), "{report:?}");
    assert!(report.grad_norm.is_finite(), "{report:?}");

    let equal: Vec<Sample> = samples.iter().map(|s| Sample { score: 0.5, ..s.clone() }).collect();
    let report = learner.train_step(&equal).unwrap();
    assert!(report.policy_loss.is_finite(), "{report:?}");
    assert!(report.approx_kl.is_finite(), "{report:?}");

    let empty: Vec<Sample> = samples.iter().map(|s| Sample { response_tokens: vec![], sampler_logprobs: vec![], ..s.clone() }).collect();
    let report = learner.train_step(&empty).unwrap();
    assert_eq!(report.optimizer_steps, 0);
    assert_eq!(report.response_tokens, 0);
}

#[test]
fn oversized_sample_is_refused() {
    let (learner, _) = setup(2);
    let long = Sample {
        prompt_tokens: vec![5; 120],
        response_tokens: vec![6; 20],
        sampler_logprobs: vec![-1.0; 20],
        temperature: 1.0,
        ended_with_eos: false,
        score: 0.0,
        raw_score: 0.0,
        lag: 0,
    };
    assert!(learner.check_sample(&long).unwrap_err().contains("max_position_embeddings"));
    let unknown = Sample { prompt_tokens: vec![100_000], response_tokens: vec![], sampler_logprobs: vec![], ..long };
    assert!(learner.check_sample(&unknown).unwrap_err().contains("vocabulary"));
}
