//! Finite-difference check of every backward pass the model uses, in f64.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{micro_config, micro_model_with, padded};
use troupe_model::{lm_loss, token_entropy, token_logprobs, Model};

/// A scalar that touches every head and helper: LM loss, log-probs at a
/// temperature, entropy, reward scores and values, on a right-padded batch.
fn combined_loss(model: &Model, ids: &Tensor, mask: &Tensor) -> Tensor {
    let hidden = model.forward_hidden(ids, Some(mask)).unwrap();
    let logits = model.lm_logits(&hidden).unwrap();
    let maskf = mask.to_dtype(DType::F64).unwrap();
    let lm = lm_loss(&logits, ids, Some(mask)).unwrap();
    let tempered = (token_logprobs(&logits, ids, 0.7).unwrap() * &maskf)
        .unwrap()
        .sum_all()
        .unwrap();
    let entropy = (token_entropy(&logits, 1.3).unwrap() * &maskf)
        .unwrap()
        .sum_all()
        .unwrap();
    let scores = model
        .scores(&hidden, Some(mask))
        .unwrap()
        .sum_all()
        .unwrap();
    let values = (model.values(&hidden).unwrap().sqr().unwrap() * &maskf)
        .unwrap()
        .sum_all()
        .unwrap();
    let total = (lm + (tempered * 0.1).unwrap()).unwrap();
    let total = (total + (entropy * 0.05).unwrap()).unwrap();
    let total = (total + (scores * 0.3).unwrap()).unwrap();
    (total + (values * 0.2).unwrap()).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

fn check_gradients(tie_word_embeddings: bool) {
    let model = micro_model_with(micro_config(tie_word_embeddings), DType::F64, 11);
    let rows = vec![vec![5, 9, 17, 3, 30, 41], vec![7, 22, 8, 19]];
    let (ids, mask) = padded(&rows, 0, false);

    let loss = combined_loss(&model, &ids, &mask);
    let grads = loss.backward().unwrap();

    // Central differences with h = 1e-5 in f64: truncation error ~h^2 and
    // rounding ~1e-16/h, both far below the tolerance.
    let h = 1e-5;
    let mut checked = 0;
    for (name, var) in model.named_vars() {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let analytic: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
        let largest = analytic.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        assert!(largest > 0.0, "{name} has an all-zero gradient");

        let original: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        // Three elements per tensor, spread over it; for the embedding, the
        // row of a token in the batch.
        let n = original.len();
        let width = var.dims().last().copied().unwrap();
        let picks: Vec<usize> = if name.contains("embed_tokens") {
            vec![5 * width, 17 * width + 2, 22 * width + width - 1]
        } else {
            vec![0, n / 2, n - 1]
        };
        for &i in &picks {
            let eval = |delta: f64| {
                let mut values = original.clone();
                values[i] += delta;
                var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                scalar(&combined_loss(&model, &ids, &mask))
            };
            let numeric = (eval(h) - eval(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let diff = (numeric - analytic[i]).abs();
            assert!(
                diff <= 1e-7 + 1e-5 * analytic[i].abs(),
                "{name}[{i}]: analytic {} vs numeric {numeric} (diff {diff:e})",
                analytic[i]
            );
            checked += 1;
        }
    }
    assert!(checked >= 3 * 20, "only {checked} elements checked");
}

#[test]
fn gradients_match_finite_differences_untied() {
    check_gradients(false);
}

#[test]
fn gradients_match_finite_differences_tied() {
    check_gradients(true);
}
