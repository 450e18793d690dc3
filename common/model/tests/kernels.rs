//! The fused kernels against plain candle ops and the standard library.

use candle_core::{DType, Device, Tensor, D};
use troupe_model::ops;

#[test]
fn fast_exp_matches_std() {
    let mut worst = 0.0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let expected = (x as f64).exp();
        let relative = ((ops::fast_exp(x) as f64) - expected).abs() / expected;
        worst = worst.max(relative);
        x += 0.0137;
    }
    assert!(worst < 1e-6, "max relative error {worst:e}");
    assert_eq!(ops::fast_exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(ops::fast_exp(-200.0), 0.0);
    assert_eq!(ops::fast_exp(0.0), 1.0);
    assert_eq!(ops::fast_exp(100.0), f32::INFINITY);
    assert!(ops::fast_exp(88.5).is_finite());
    assert!(ops::fast_exp(f32::NAN).is_nan());
}

#[test]
fn rms_norm_matches_reference() {
    let device = Device::Cpu;
    let x = Tensor::randn(0f32, 2.0, (3, 5, 16), &device).unwrap();
    let w = Tensor::randn(1f32, 0.3, 16, &device).unwrap();
    let fused = ops::rms_norm(&x, &w, 1e-5).unwrap();
    let mean_sq = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let reference = x
        .broadcast_div(&(mean_sq + 1e-5).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&w)
        .unwrap();
    let diff = (fused - reference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "max difference {diff}");
}

#[test]
fn masked_softmax_matches_reference() {
    let device = Device::Cpu;
    let scores = Tensor::randn(0f32, 3.0, (2, 3, 4, 6), &device).unwrap();
    // Causal bias for 4 queries over 6 keys (2 cached), second row's first key is padding.
    let mut bias = vec![f32::NEG_INFINITY; 2 * 4 * 6];
    for b in 0..2 {
        for i in 0..4 {
            for j in 0..=(2 + i) {
                if !(b == 1 && j == 0) {
                    bias[(b * 4 + i) * 6 + j] = 0.0;
                }
            }
        }
    }
    let bias = Tensor::from_vec(bias, (2, 4, 6), &device).unwrap();
    let fused = ops::masked_softmax(&scores, &bias, 0.5).unwrap();
    let shifted = (scores * 0.5)
        .unwrap()
        .broadcast_add(&bias.unsqueeze(1).unwrap())
        .unwrap();
    let reference = candle_nn::ops::softmax(&shifted, D::Minus1).unwrap();
    let diff = (fused - reference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-6, "max difference {diff}");
}

#[test]
fn fully_masked_row_gives_zeros() {
    let device = Device::Cpu;
    let scores = Tensor::ones((1, 1, 1, 3), DType::F32, &device).unwrap();
    let bias = Tensor::full(f32::NEG_INFINITY, (1, 1, 3), &device).unwrap();
    let out: Vec<f32> = ops::masked_softmax(&scores, &bias, 1.0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(out, vec![0.0, 0.0, 0.0]);
}

#[test]
fn target_log_probs_match_log_softmax() {
    let device = Device::Cpu;
    let logits = Tensor::randn(0f32, 4.0, (5, 37), &device).unwrap();
    let targets = Tensor::new(&[0u32, 36, 7, 7, 20], &device).unwrap();
    let fused: Vec<f32> = ops::target_log_probs(&logits, &targets, 0.6)
        .unwrap()
        .to_vec1()
        .unwrap();
    let log_softmax: Vec<Vec<f32>> =
        candle_nn::ops::log_softmax(&(&logits / 0.6).unwrap(), D::Minus1)
            .unwrap()
            .to_vec2()
            .unwrap();
    for (row, &t) in [0usize, 36, 7, 7, 20].iter().enumerate() {
        assert!(
            (fused[row] - log_softmax[row][t]).abs() < 1e-5,
            "row {row}: {} vs {}",
            fused[row],
            log_softmax[row][t]
        );
    }
    let out_of_range = Tensor::new(&[0u32, 1, 2, 3, 37], &device).unwrap();
    let err = ops::target_log_probs(&logits, &out_of_range, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    assert!(ops::target_log_probs(&logits, &targets, 0.0).is_err());
}
