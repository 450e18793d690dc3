//! AdamW against a scalar re-implementation of the `torch.optim.AdamW` update,
//! and gradient-norm clipping.

use candle_core::{DType, Device, Tensor, Var};
use troupe_model::{clip_grad_norm, grad_norm, AdamW, AdamWConfig};

/// Applies one `torch.optim.AdamW` step to plain numbers.
fn reference_step(
    w: &mut [f64],
    m: &mut [f64],
    v: &mut [f64],
    g: &[f64],
    step: i32,
    c: &AdamWConfig,
    decay: bool,
) {
    for i in 0..w.len() {
        if decay {
            w[i] *= 1.0 - c.learning_rate * c.weight_decay;
        }
        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
        v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
        let m_hat = m[i] / (1.0 - c.beta1.powi(step));
        let v_hat = v[i] / (1.0 - c.beta2.powi(step));
        w[i] -= c.learning_rate * m_hat / (v_hat.sqrt() + c.eps);
    }
}

#[test]
fn adamw_matches_reference_and_skips_decay_on_vectors() {
    let device = Device::Cpu;
    let matrix =
        Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &device).unwrap()).unwrap();
    let vector = Var::from_tensor(&Tensor::new(&[1.5f32, -0.5], &device).unwrap()).unwrap();
    let config = AdamWConfig {
        learning_rate: 0.1,
        beta1: 0.8,
        beta2: 0.9,
        eps: 1e-6,
        weight_decay: 0.5,
    };
    let mut optimizer = AdamW::new(
        vec![
            ("matrix".into(), matrix.clone()),
            ("norm".into(), vector.clone()),
        ],
        config,
    )
    .unwrap();

    let mut w_matrix = vec![0.5, -1.0, 2.0, 0.25];
    let mut w_vector = vec![1.5, -0.5];
    let (mut m1, mut v1, mut m2, mut v2) = (vec![0.0; 4], vec![0.0; 4], vec![0.0; 2], vec![0.0; 2]);
    for step in 1..=4 {
        // loss = sum(w^3) / 3 + sum(u^2), so gradients are w^2 and 2u.
        let loss = (matrix.as_tensor().powf(3.0).unwrap().sum_all().unwrap() / 3.0).unwrap();
        let loss = (loss + vector.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        optimizer.step(&grads).unwrap();

        let g_matrix: Vec<f64> = w_matrix.iter().map(|w| w * w).collect();
        let g_vector: Vec<f64> = w_vector.iter().map(|u| 2.0 * u).collect();
        reference_step(
            &mut w_matrix,
            &mut m1,
            &mut v1,
            &g_matrix,
            step,
            &config,
            true,
        );
        reference_step(
            &mut w_vector,
            &mut m2,
            &mut v2,
            &g_vector,
            step,
            &config,
            false,
        );

        let got: Vec<f32> = matrix.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in got.iter().zip(&w_matrix) {
            assert!(
                (*a as f64 - b).abs() < 1e-5,
                "step {step} matrix: {got:?} vs {w_matrix:?}"
            );
        }
        let got: Vec<f32> = vector.as_tensor().to_vec1().unwrap();
        for (a, b) in got.iter().zip(&w_vector) {
            assert!(
                (*a as f64 - b).abs() < 1e-5,
                "step {step} vector: {got:?} vs {w_vector:?}"
            );
        }
    }
    assert_eq!(optimizer.step_count(), 4);
}

#[test]
fn clipping_scales_to_max_norm_and_returns_original() {
    let device = Device::Cpu;
    let a = Var::from_tensor(&Tensor::new(&[3.0f32, 0.0], &device).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[[0.0f32, 4.0]], &device).unwrap()).unwrap();
    // Gradients of sum(a * c) are c: norm sqrt(9 + 16) = 5 with these constants.
    let loss = (a.as_tensor() * Tensor::new(&[3.0f32, 0.0], &device).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let loss = (loss
        + (b.as_tensor() * Tensor::new(&[[0.0f32, 4.0]], &device).unwrap())
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let mut grads = loss.backward().unwrap();
    let vars = vec![a.clone(), b.clone()];
    let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6, "norm {norm}");
    let clipped = grad_norm(&grads, &vars).unwrap();
    assert!((clipped - 1.0).abs() < 1e-5, "clipped norm {clipped}");
    // Below the limit nothing changes.
    let again = clip_grad_norm(&mut grads, &vars, 10.0).unwrap();
    assert!((again - clipped).abs() < 1e-9);
}

#[test]
fn adamw_rejects_non_f32_parameters() {
    let var = Var::zeros(3, DType::F64, &Device::Cpu).unwrap();
    let err = AdamW::new(vec![("w".into(), var)], AdamWConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("f32"), "{err}");
}
