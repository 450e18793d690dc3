//! Incremental decoding, padding invariance and the sampler, each checked
//! against a full teacher-forced forward pass.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, micro_model, padded};
use troupe_model::sample::{generate_tokens, pick_token};
use troupe_model::{token_logprobs, GenerateOptions, Model, SamplingParams};

/// f32 logits of the full and cached paths agree to this (max abs difference).
const LOGIT_TOLERANCE: f32 = 1e-4;

fn row_logits(logits: &Tensor, row: usize, position: usize) -> Vec<f32> {
    logits
        .get(row)
        .unwrap()
        .get(position)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn kv_cache_matches_full_forward_each_step() {
    let model = micro_model(DType::F32, 3);
    // Two rows of different lengths, left-padded for the prompt part.
    let rows = vec![
        vec![4u32, 9, 13, 21, 7, 30, 11, 2, 45, 6],
        vec![8u32, 16, 3, 40, 33, 12, 5],
    ];
    let (ids, mask) = padded(&rows, 0, true);
    let full = model.forward(&ids, Some(&mask)).unwrap();
    let (b, t) = ids.dims2().unwrap();

    let prefill = 4;
    let mut cache = model.new_cache(b);
    let hidden = model
        .forward_cached(
            &ids.narrow(1, 0, prefill).unwrap(),
            Some(&mask.narrow(1, 0, prefill).unwrap()),
            &mut cache,
        )
        .unwrap();
    let logits = model.lm_logits(&hidden).unwrap();
    for position in 0..prefill {
        for row in 0..b {
            if mask
                .get(row)
                .unwrap()
                .get(position)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap()
                == 0
            {
                continue;
            }
            let diff = max_abs_diff(
                &row_logits(&logits, row, position),
                &row_logits(&full, row, position),
            );
            assert!(
                diff < LOGIT_TOLERANCE,
                "prefill row {row} position {position}: diff {diff}"
            );
        }
    }
    for position in prefill..t {
        let step_ids = ids.narrow(1, position, 1).unwrap();
        let step_mask = mask.narrow(1, position, 1).unwrap();
        let hidden = model
            .forward_cached(&step_ids, Some(&step_mask), &mut cache)
            .unwrap();
        let logits = model.lm_logits(&hidden).unwrap();
        for row in 0..b {
            let diff = max_abs_diff(
                &row_logits(&logits, row, 0),
                &row_logits(&full, row, position),
            );
            assert!(
                diff < LOGIT_TOLERANCE,
                "step row {row} position {position}: diff {diff}"
            );
        }
    }
    assert_eq!(cache.len(), t);
}

#[test]
fn position_ids_skip_padding() {
    use troupe_model::llama::position_ids;
    assert_eq!(
        position_ids(&[false, false, true, true, true], 0),
        vec![0, 0, 0, 1, 2]
    );
    assert_eq!(
        position_ids(&[true, true, true, false, false], 0),
        vec![0, 1, 2, 2, 2]
    );
    assert_eq!(position_ids(&[true], 3), vec![3]);
    assert_eq!(position_ids(&[false], 3), vec![2]);
}

#[test]
fn left_and_right_padding_agree() {
    let model = micro_model(DType::F32, 5);
    let rows = vec![
        vec![3u32, 17, 29, 4, 11, 38, 20],
        vec![9u32, 2, 44, 15],
        vec![31u32, 7],
    ];
    let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
    let t = *lengths.iter().max().unwrap();

    let run = |left: bool| {
        let (ids, mask) = padded(&rows, 0, left);
        let hidden = model.forward_hidden(&ids, Some(&mask)).unwrap();
        let logits = model.lm_logits(&hidden).unwrap();
        let logprobs: Vec<Vec<f32>> = token_logprobs(&logits, &ids, 0.9)
            .unwrap()
            .to_vec2()
            .unwrap();
        let values: Vec<Vec<f32>> = model.values(&hidden).unwrap().to_vec2().unwrap();
        let scores: Vec<f32> = model
            .scores(&hidden, Some(&mask))
            .unwrap()
            .to_vec1()
            .unwrap();
        (logprobs, values, scores)
    };
    let (left_lp, left_values, left_scores) = run(true);
    let (right_lp, right_values, right_scores) = run(false);

    for (row, &n) in lengths.iter().enumerate() {
        let offset = t - n;
        // Token 0 of a sequence has no prediction of its own; compare from token 1.
        let left: Vec<f32> = left_lp[row][offset + 1..].to_vec();
        let right: Vec<f32> = right_lp[row][1..n].to_vec();
        assert!(
            max_abs_diff(&left, &right) < 1e-5,
            "row {row} log-probs: {left:?} vs {right:?}"
        );
        let left: Vec<f32> = left_values[row][offset..].to_vec();
        let right: Vec<f32> = right_values[row][..n].to_vec();
        assert!(
            max_abs_diff(&left, &right) < 1e-5,
            "row {row} values: {left:?} vs {right:?}"
        );
    }
    assert!(
        max_abs_diff(&left_scores, &right_scores) < 1e-5,
        "scores {left_scores:?} vs {right_scores:?}"
    );
}

#[test]
fn padding_matches_unpadded_sequence() {
    let model = micro_model(DType::F32, 5);
    let rows = vec![vec![3u32, 17, 29, 4, 11, 38, 20], vec![9u32, 2, 44, 15]];
    let (ids, mask) = padded(&rows, 0, true);
    let batched: Vec<f32> = model
        .scores(
            &model.forward_hidden(&ids, Some(&mask)).unwrap(),
            Some(&mask),
        )
        .unwrap()
        .to_vec1()
        .unwrap();
    let alone = Tensor::new(&[[9u32, 2, 44, 15]], &Device::Cpu).unwrap();
    let single: Vec<f32> = model
        .scores(&model.forward_hidden(&alone, None).unwrap(), None)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(
        (batched[1] - single[0]).abs() < 1e-5,
        "padded {} vs alone {}",
        batched[1],
        single[0]
    );
}

#[test]
fn score_ignores_pad_token_id() {
    let model = micro_model(DType::F32, 6);
    let rows = vec![vec![3u32, 17, 29, 4], vec![9u32, 2]];
    let score_with_pad = |pad: u32| -> Vec<f32> {
        let (ids, mask) = padded(&rows, pad, false);
        model
            .scores(
                &model.forward_hidden(&ids, Some(&mask)).unwrap(),
                Some(&mask),
            )
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    // The pad id equals a real token here, which would fool a reader that searched for it.
    assert!(max_abs_diff(&score_with_pad(0), &score_with_pad(2)) < 1e-6);
}

fn teacher_forced(model: &Model, prompt: &[u32], tokens: &[u32], temperature: f64) -> Vec<f32> {
    let mut all = prompt.to_vec();
    all.extend_from_slice(tokens);
    let ids = Tensor::from_vec(all.clone(), (1, all.len()), &Device::Cpu).unwrap();
    let logits = model.forward(&ids, None).unwrap();
    let lp: Vec<Vec<f32>> = token_logprobs(&logits, &ids, temperature)
        .unwrap()
        .to_vec2()
        .unwrap();
    lp[0][prompt.len()..].to_vec()
}

#[test]
fn sampler_logprobs_match_teacher_forcing() {
    let model = micro_model(DType::F32, 8);
    let prompts = vec![vec![1u32, 14, 27, 9, 33], vec![1u32, 6]];
    let params = vec![
        SamplingParams {
            temperature: 0.8,
            top_k: Some(20),
            top_p: Some(0.95),
            max_new_tokens: 12,
            seed: 1,
        },
        SamplingParams {
            temperature: 1.3,
            top_k: None,
            top_p: None,
            max_new_tokens: 9,
            seed: 2,
        },
    ];
    for use_kv_cache in [true, false] {
        let out = generate_tokens(
            &model,
            &prompts,
            &params,
            Some(2),
            0,
            &GenerateOptions { use_kv_cache },
        )
        .unwrap();
        for (i, gen) in out.iter().enumerate() {
            assert_eq!(gen.tokens.len(), gen.logprobs.len());
            assert!(!gen.tokens.is_empty());
            let expected = teacher_forced(&model, &prompts[i], &gen.tokens, params[i].temperature);
            let diff = max_abs_diff(&gen.logprobs, &expected);
            assert!(
                diff < 1e-4,
                "cache {use_kv_cache} row {i}: {:?} vs {expected:?}",
                gen.logprobs
            );
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let model = micro_model(DType::F32, 9);
    let prompts = vec![vec![1u32, 5, 8], vec![1u32, 40, 41, 42]];
    let params = |seed: u64| {
        vec![
            SamplingParams {
                temperature: 1.5,
                top_k: None,
                top_p: Some(0.99),
                max_new_tokens: 16,
                seed
            };
            2
        ]
    };
    let options = GenerateOptions::default();

    let first = generate_tokens(&model, &prompts, &params(7), None, 0, &options).unwrap();
    let again = generate_tokens(&model, &prompts, &params(7), None, 0, &options).unwrap();
    let other = generate_tokens(&model, &prompts, &params(8), None, 0, &options).unwrap();

    assert_eq!(first, again);
    assert_ne!(first[0].tokens, other[0].tokens);

    // The uncached path draws the same tokens from the same seeds.
    let uncached = generate_tokens(
        &model,
        &prompts,
        &params(7),
        None,
        0,
        &GenerateOptions {
            use_kv_cache: false,
        },
    )
    .unwrap();
    for (a, b) in first.iter().zip(&uncached) {
        assert_eq!(a.tokens, b.tokens);
    }
}

#[test]
fn top_k_one_equals_greedy() {
    let model = micro_model(DType::F32, 10);
    let prompts = vec![vec![1u32, 12, 19, 3]];
    let greedy = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 20,
        ..Default::default()
    };
    let top1 = SamplingParams {
        temperature: 1.0,
        top_k: Some(1),
        max_new_tokens: 20,
        seed: 99,
        ..Default::default()
    };
    let options = GenerateOptions::default();
    let a = generate_tokens(&model, &prompts, &[greedy], None, 0, &options).unwrap();
    let b = generate_tokens(&model, &prompts, &[top1], None, 0, &options).unwrap();
    assert_eq!(a[0].tokens, b[0].tokens);
    // Greedy and top-1 at temperature 1 both record temperature-1 log-probs.
    assert!(max_abs_diff(&a[0].logprobs, &b[0].logprobs) < 1e-6);
}

#[test]
fn generation_stops_at_eos_or_length() {
    let model = micro_model(DType::F32, 12);
    let prompt = vec![vec![1u32, 7, 7]];
    let greedy = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 6,
        ..Default::default()
    };
    let options = GenerateOptions::default();
    let free = generate_tokens(
        &model,
        &prompt,
        std::slice::from_ref(&greedy),
        None,
        0,
        &options,
    )
    .unwrap();
    assert_eq!(free[0].tokens.len(), 6);
    assert_eq!(free[0].finish_reason, troupe_model::FinishReason::Length);
    // Declaring the third greedy token to be EOS must stop right there.
    let eos = free[0].tokens[2];
    let stopped = generate_tokens(&model, &prompt, &[greedy], Some(eos), 0, &options).unwrap();
    let first_eos = free[0].tokens.iter().position(|&t| t == eos).unwrap();
    assert_eq!(stopped[0].tokens, free[0].tokens[..=first_eos].to_vec());
    assert_eq!(stopped[0].finish_reason, troupe_model::FinishReason::Eos);
}

#[test]
fn pick_token_respects_top_k_and_top_p() {
    use rand::SeedableRng;
    let logits = [2.0f32, 1.0, 0.5, 3.0, -1.0];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for _ in 0..200 {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: Some(2),
            ..Default::default()
        };
        let (token, _) = pick_token(&logits, &params, &mut rng);
        assert!(token == 3 || token == 0, "top-2 drew {token}");
        // p(3) = 0.61 < 0.65, so top-p 0.65 keeps tokens 3 and 0.
        let params = SamplingParams {
            temperature: 1.0,
            top_p: Some(0.65),
            ..Default::default()
        };
        let (token, _) = pick_token(&logits, &params, &mut rng);
        assert!(token == 3 || token == 0, "top-p drew {token}");
    }
}

#[test]
fn invalid_requests_are_rejected() {
    let model = micro_model(DType::F32, 1);
    let options = GenerateOptions::default();
    let ok = SamplingParams {
        max_new_tokens: 4,
        ..Default::default()
    };
    let cases = [
        (
            vec![vec![1u32]],
            SamplingParams {
                temperature: -1.0,
                ..ok.clone()
            },
            "temperature",
        ),
        (
            vec![vec![1u32]],
            SamplingParams {
                top_p: Some(1.5),
                ..ok.clone()
            },
            "top_p",
        ),
        (
            vec![vec![1u32]],
            SamplingParams {
                top_k: Some(0),
                ..ok.clone()
            },
            "top_k",
        ),
        (vec![vec![]], ok.clone(), "empty"),
        (
            vec![vec![480u32]],
            ok.clone(),
            "outside the model vocabulary",
        ),
        (vec![vec![1u32; 62]], ok.clone(), "max_position_embeddings"),
    ];
    for (prompts, params, expected) in cases {
        let err = generate_tokens(&model, &prompts, &[params], None, 0, &options)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(expected),
            "error `{err}` should mention `{expected}`"
        );
    }
}
