//! The Bradley-Terry pairwise loss and the held-out numbers derived from it.
//!
//! Under the Bradley-Terry model the probability that a labeler prefers
//! response `c` over `r` is `sigmoid(s_c - s_r)`, where `s` are the reward
//! model's scores. The loss of one pair is the negative log-likelihood
//! `-log sigmoid(s_c - s_r)`, computed as `softplus(-m)` with the margin
//! `m = s_c - s_r`. An example's loss is the mean over its pairs, and a
//! batch's loss the mean over its examples.

use candle_core::{Result, Tensor};

use crate::examples::PreferenceExample;

/// Per-pair losses `-log sigmoid(margin)` for a tensor of margins, in the
/// overflow-free form `relu(-m) + ln(1 + exp(-|m|))`, built from ops that
/// have a backward pass.
pub fn pair_losses(margins: &Tensor) -> Result<Tensor> {
    let negative_part = margins.neg()?.relu()?;
    let soft_part = (margins.abs()?.neg()?.exp()? + 1.0)?.log()?;
    negative_part + soft_part
}

/// The same loss for one margin, in f64, for evaluation.
pub fn pair_loss_value(margin: f64) -> f64 {
    (-margin).max(0.0) + (-margin.abs()).exp().ln_1p()
}

/// Flat pair indices and weights for one batch of examples whose
/// candidates were scored together, in example order.
#[derive(Clone, Debug, PartialEq)]
pub struct PairLayout {
    /// Row of each pair's chosen candidate in the batch's score vector.
    pub chosen: Vec<u32>,
    /// Row of each pair's rejected candidate.
    pub rejected: Vec<u32>,
    /// `1 / (pairs of its example * examples in the batch)`, so the
    /// weighted sum is the mean over examples of each example's mean pair loss.
    pub weights: Vec<f32>,
    /// Candidates in the batch: the length of the score vector.
    pub rows: usize,
}

impl PairLayout {
    /// Lays out `examples`, whose candidates occupy consecutive rows.
    /// Examples without pairs take no rows and no weight.
    pub fn new(examples: &[&PreferenceExample]) -> PairLayout {
        let with_pairs = examples.iter().filter(|example| !example.pairs.is_empty()).count().max(1);
        let mut layout = PairLayout { chosen: Vec::new(), rejected: Vec::new(), weights: Vec::new(), rows: 0 };
        for example in examples.iter().filter(|example| !example.pairs.is_empty()) {
            let weight = 1.0 / (example.pairs.len() * with_pairs) as f32;
            for &(chosen, rejected) in &example.pairs {
                layout.chosen.push((layout.rows + chosen) as u32);
                layout.rejected.push((layout.rows + rejected) as u32);
                layout.weights.push(weight);
            }
            layout.rows += example.candidates.len();
        }
        layout
    }

    pub fn pairs(&self) -> usize {
        self.chosen.len()
    }

    /// The margins `s_chosen - s_rejected` of every pair, from scores `(rows,)`.
    pub fn margins(&self, scores: &Tensor) -> Result<Tensor> {
        let device = scores.device();
        let chosen = Tensor::from_slice(&self.chosen, self.chosen.len(), device)?;
        let rejected = Tensor::from_slice(&self.rejected, self.rejected.len(), device)?;
        scores.index_select(&chosen, 0)? - scores.index_select(&rejected, 0)?
    }

    /// The batch loss, a scalar: weighted sum of the per-pair losses.
    pub fn loss(&self, scores: &Tensor) -> Result<Tensor> {
        let losses = pair_losses(&self.margins(scores)?)?;
        let weights = Tensor::from_slice(&self.weights, self.weights.len(), scores.device())?.to_dtype(losses.dtype())?;
        (losses * weights)?.sum_all()
    }
}

/// Held-out numbers over a set of examples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairMetrics {
    /// Mean over examples of the mean pair loss, in nats (the training objective).
    pub loss: f64,
    /// Share of pairs whose chosen side scored higher; an exact tie counts one half.
    pub accuracy: f64,
    pub pairs: usize,
    pub examples: usize,
}

/// Computes [`PairMetrics`] from per-example candidate scores.
pub fn pair_metrics(examples: &[&PreferenceExample], scores: &[Vec<f32>]) -> PairMetrics {
    let mut loss_sum = 0.0;
    let mut correct = 0.0;
    let mut pairs = 0;
    let mut counted_examples = 0;
    for (example, scores) in examples.iter().zip(scores) {
        if example.pairs.is_empty() {
            continue;
        }
        let mut example_loss = 0.0;
        for &(chosen, rejected) in &example.pairs {
            let margin = f64::from(scores[chosen]) - f64::from(scores[rejected]);
            example_loss += pair_loss_value(margin);
            correct += match margin.partial_cmp(&0.0) {
                Some(std::cmp::Ordering::Greater) => 1.0,
                Some(std::cmp::Ordering::Equal) => 0.5,
                _ => 0.0,
            };
        }
        loss_sum += example_loss / example.pairs.len() as f64;
        pairs += example.pairs.len();
        counted_examples += 1;
    }
    PairMetrics {
        loss: loss_sum / counted_examples.max(1) as f64,
        accuracy: correct / pairs.max(1) as f64,
        pairs,
        examples: counted_examples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::examples::CandidateText;
    use candle_core::Device;

    #[test]
    fn swapped_pairs_mirror_the_loss() {
        let margins = [-30.0f32, -2.5, -0.1, 0.0, 0.3, 4.0, 30.0];
        let device = Device::Cpu;
        let forward = pair_losses(&Tensor::new(&margins[..], &device).unwrap()).unwrap().to_vec1::<f32>().unwrap();
        let negated: Vec<f32> = margins.iter().map(|m| -m).collect();
        let swapped = pair_losses(&Tensor::new(&negated[..], &device).unwrap()).unwrap().to_vec1::<f32>().unwrap();
        for ((m, l), l_swapped) in margins.iter().zip(&forward).zip(&swapped) {
            // softplus(-m) - softplus(m) = -m
            assert!((l - l_swapped + m).abs() < 1e-5, "m={m}: {l} - {l_swapped} != {}", -m);
            // sigmoid(m) + sigmoid(-m) = 1
            let probability_sum = (-l).exp() + (-l_swapped).exp();
            assert!((probability_sum - 1.0).abs() < 1e-5, "m={m}: probabilities sum to {probability_sum}");
            assert!(l.is_finite() && *l >= 0.0);
        }
        assert!((forward[3] - std::f32::consts::LN_2).abs() < 1e-6, "a zero margin costs ln 2");
    }

    #[test]
    fn tensor_and_scalar_losses_agree() {
        let margins = [-3.0f32, 0.5, 12.0];
        let values = pair_losses(&Tensor::new(&margins[..], &Device::Cpu).unwrap()).unwrap().to_vec1::<f32>().unwrap();
        for (m, value) in margins.iter().zip(values) {
            assert!((pair_loss_value(f64::from(*m)) - f64::from(value)).abs() < 1e-5);
        }
    }

    #[test]
    fn layout_averages_per_example() {
        let candidate = |text: &str| CandidateText { text: text.into(), ends_with_eos: true };
        let one = PreferenceExample {
            prompt: "a".into(),
            candidates: vec![candidate("x"), candidate("y"), candidate("z")],
            pairs: vec![(0, 1), (0, 2), (1, 2)],
            sources: vec![],
        };
        let two = PreferenceExample {
            prompt: "b".into(),
            candidates: vec![candidate("x"), candidate("y")],
            pairs: vec![(1, 0)],
            sources: vec![],
        };
        let layout = PairLayout::new(&[&one, &two]);
        assert_eq!(layout.rows, 5);
        assert_eq!(layout.chosen, vec![0, 0, 1, 4]);
        assert_eq!(layout.rejected, vec![1, 2, 2, 3]);
        let total: f32 = layout.weights.iter().sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((layout.weights[3] - 0.5).abs() < 1e-6, "the single pair of an example weighs half the batch");

        let scores = Tensor::new(&[1.0f32, 0.0, -1.0, 0.0, 2.0], &Device::Cpu).unwrap();
        let loss = layout.loss(&scores).unwrap().to_scalar::<f32>().unwrap() as f64;
        let metrics = pair_metrics(&[&one, &two], &[vec![1.0, 0.0, -1.0], vec![0.0, 2.0]]);
        assert!((loss - metrics.loss).abs() < 1e-5, "{loss} vs {}", metrics.loss);
        assert_eq!(metrics.accuracy, 1.0);
        assert_eq!(metrics.pairs, 4);
    }
}
