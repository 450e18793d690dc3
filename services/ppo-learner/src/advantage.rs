//! Per-token rewards, generalized advantage estimation and masked whitening,
//! on plain vectors with one entry per response token.
//!
//! Each rollout is a vector over its own response tokens only, so prompt
//! tokens and padding have no entry and can receive no reward, value,
//! advantage or KL. The learner scatters these vectors into padded tensors
//! with zeros elsewhere.

/// Added to the variance before the square root in [`whiten`], so a batch
/// whose values are all equal gives zeros, not a division by zero.
pub const WHITEN_EPS: f64 = 1e-8;

/// Reward of each response token: `-coef * kl[k]` on every token, plus
/// `score` and, when the response ended without EOS, `missing_eos_penalty`
/// (a number <= 0) on the final token.
///
/// An empty response has no token to carry the score, so it gets no reward
/// and contributes nothing to the update.
pub fn token_rewards(kl: &[f32], coef: f64, score: f64, ended_with_eos: bool, missing_eos_penalty: f64) -> Vec<f32> {
    let mut rewards: Vec<f32> = kl.iter().map(|&k| (-coef * f64::from(k)) as f32).collect();
    if let Some(last) = rewards.last_mut() {
        let penalty = if ended_with_eos { 0.0 } else { missing_eos_penalty };
        *last += (score + penalty) as f32;
    }
    rewards
}

/// Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438)
/// over one response: returns `(advantages, returns)`.
///
/// `values[k]` is the value head's estimate before token `k` is emitted. The
/// state after the last token is terminal (value 0), also for a response
/// that hit the length limit without EOS: its episode is over, and the
/// missing-EOS penalty, not a bootstrapped value, says what that is worth.
///
/// ```text
/// delta_k = r_k + gamma * V_{k+1} - V_k        (V_L = 0)
/// A_k     = delta_k + gamma * lambda * A_{k+1} (A_L = 0)
/// R_k     = A_k + V_k
/// ```
pub fn gae(rewards: &[f32], values: &[f32], gamma: f64, lambda: f64) -> (Vec<f32>, Vec<f32>) {
    debug_assert_eq!(rewards.len(), values.len());
    let n = rewards.len().min(values.len());
    let mut advantages = vec![0.0f32; n];
    let mut next_advantage = 0.0f64;
    let mut next_value = 0.0f64;
    for k in (0..n).rev() {
        let value = f64::from(values[k]);
        let delta = f64::from(rewards[k]) + gamma * next_value - value;
        next_advantage = delta + gamma * lambda * next_advantage;
        advantages[k] = next_advantage as f32;
        next_value = value;
    }
    let returns = advantages.iter().zip(values).map(|(a, v)| a + v).collect();
    (advantages, returns)
}

/// Mean and population variance over every entry of every sequence, in f64;
/// `None` when there are no entries.
pub fn masked_moments(sequences: &[Vec<f32>]) -> Option<(f64, f64)> {
    let count: usize = sequences.iter().map(Vec::len).sum();
    if count == 0 {
        return None;
    }
    let mean = sequences.iter().flatten().map(|&x| f64::from(x)).sum::<f64>() / count as f64;
    let var = sequences.iter().flatten().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / count as f64;
    Some((mean, var))
}

/// Whitens in place over the response tokens of the whole batch:
/// `(x - mean) / sqrt(var + WHITEN_EPS)`, with the population variance.
///
/// One token, or tokens that are all equal, become 0. An empty batch is left
/// as it is.
pub fn whiten(sequences: &mut [Vec<f32>]) {
    let Some((mean, var)) = masked_moments(sequences) else { return };
    let scale = 1.0 / (var + WHITEN_EPS).sqrt();
    for x in sequences.iter_mut().flatten() {
        *x = ((f64::from(*x) - mean) * scale) as f32;
    }
}

/// `1 - Var(returns - values) / Var(returns)` over the response tokens: 1
/// when the value head predicts the returns exactly, 0 when it does no better
/// than their mean. `None` when there are no tokens or the returns do not vary.
pub fn explained_variance(values: &[Vec<f32>], returns: &[Vec<f32>]) -> Option<f64> {
    let residuals: Vec<Vec<f32>> =
        values.iter().zip(returns).map(|(v, r)| v.iter().zip(r).map(|(v, r)| r - v).collect()).collect();
    let (_, var_returns) = masked_moments(returns)?;
    let (_, var_residual) = masked_moments(&residuals)?;
    if var_returns <= 0.0 {
        return None;
    }
    Some(1.0 - var_residual / var_returns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_and_penalty_land_on_last_token() {
        let rewards = token_rewards(&[0.5, -0.25, 1.0], 0.1, 2.0, false, -1.0);
        assert_eq!(rewards.len(), 3);
        assert!((rewards[0] - -0.05).abs() < 1e-7);
        assert!((rewards[1] - 0.025).abs() < 1e-7);
        assert!((rewards[2] - (-0.1 + 2.0 - 1.0)).abs() < 1e-6);

        let with_eos = token_rewards(&[0.0, 0.0], 0.1, 2.0, true, -1.0);
        assert_eq!(with_eos, vec![0.0, 2.0]);
    }

    #[test]
    fn empty_response_gets_no_reward() {
        assert!(token_rewards(&[], 0.1, 5.0, false, -1.0).is_empty());
        let (advantages, returns) = gae(&[], &[], 1.0, 0.95);
        assert!(advantages.is_empty() && returns.is_empty());
    }

    #[test]
    fn gae_matches_hand_computation() {
        // gamma 0.9, lambda 0.5; V = [1, 2], r = [0, 3]
        // delta_1 = 3 + 0 - 2 = 1; A_1 = 1
        // delta_0 = 0 + 0.9*2 - 1 = 0.8; A_0 = 0.8 + 0.45 * 1 = 1.25
        let (advantages, returns) = gae(&[0.0, 3.0], &[1.0, 2.0], 0.9, 0.5);
        assert!((advantages[0] - 1.25).abs() < 1e-6);
        assert!((advantages[1] - 1.0).abs() < 1e-6);
        assert!((returns[0] - 2.25).abs() < 1e-6);
        assert!((returns[1] - 3.0).abs() < 1e-6);
    }

    #[test]
    fn gae_with_lambda_one_is_return_minus_value() {
        let rewards = [0.1, -0.2, 1.5];
        let values = [0.3, 0.7, -0.4];
        let (advantages, returns) = gae(&rewards, &values, 1.0, 1.0);
        let total: f32 = rewards.iter().sum();
        assert!((returns[0] - total).abs() < 1e-6);
        assert!((advantages[2] - (1.5 - -0.4)).abs() < 1e-6);
    }

    #[test]
    fn whitening_one_token_is_finite() {
        let mut batch = vec![vec![3.5f32]];
        whiten(&mut batch);
        assert_eq!(batch, vec![vec![0.0]]);
    }

    #[test]
    fn whitening_equal_values_is_finite() {
        let mut batch = vec![vec![2.0f32; 4], vec![], vec![2.0f32; 3]];
        whiten(&mut batch);
        assert!(batch.iter().flatten().all(|x| x.is_finite() && *x == 0.0), "{batch:?}");
        assert!(batch[1].is_empty());
    }

    #[test]
    fn whitening_gives_zero_mean_unit_variance() {
        let mut batch = vec![vec![1.0f32, 2.0, 3.0], vec![10.0]];
        whiten(&mut batch);
        let (mean, var) = masked_moments(&batch).unwrap();
        assert!(mean.abs() < 1e-6, "mean {mean}");
        assert!((var - 1.0).abs() < 1e-5, "var {var}");
        assert_eq!(batch[0].len(), 3);
    }

    #[test]
    fn whitening_empty_batch_is_a_no_op() {
        let mut batch: Vec<Vec<f32>> = vec![vec![], vec![]];
        whiten(&mut batch);
        assert!(batch.iter().all(Vec::is_empty));
    }

    #[test]
    fn explained_variance_bounds() {
        let returns = vec![vec![1.0f32, 2.0, 3.0]];
        assert!((explained_variance(&returns, &returns).unwrap() - 1.0).abs() < 1e-12);
        let mean = vec![vec![2.0f32, 2.0, 2.0]];
        assert!(explained_variance(&mean, &returns).unwrap().abs() < 1e-12);
        assert!(explained_variance(&mean, &mean).is_none());
    }
}
