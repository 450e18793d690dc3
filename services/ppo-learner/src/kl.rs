//! The per-token KL penalty to the frozen reference and the controller of
//! its coefficient.
//!
//! Two estimators of `KL(π || π_ref)` per sampled token `a`, with
//! `x = log π(a) - log π_ref(a)`:
//!
//! - `k1 = x`, the log-ratio. Unbiased, and the one Ziegler et al. (2019)
//!   put in the reward, but a single token's value can be negative.
//! - `k3 = (exp(-x) - 1) + x`, from J. Schulman's note "Approximating KL
//!   Divergence" (2020). Also unbiased for samples from `π`, with lower
//!   variance, and never negative because `e^y >= 1 + y`.
//!
//! # Adaptive coefficient
//!
//! After each PPO step with mean per-sequence KL `KL_t` over `n` rollouts,
//! the adaptive controller (Ziegler et al. 2019, "Fine-Tuning Language
//! Models from Human Preferences", arXiv:1909.08593, section 2.2) sets
//!
//! ```text
//! e_t       = clip(KL_t / target - 1, -clip, clip)
//! beta_t+1  = beta_t * (1 + e_t * n / horizon)
//! ```
//!
//! with `clip` 0.2 in the paper. The coefficient rises while the policy is
//! further from the reference than the target and falls while it is closer.

use serde::{Deserialize, Serialize};

/// Which estimator enters the reward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `log π - log π_ref`.
    K1,
    /// `(exp(log π_ref - log π) - 1) - (log π_ref - log π)`, never negative.
    K3,
}

/// `k1`: the log-ratio `log π - log π_ref`.
pub fn kl_k1(logprob: f32, ref_logprob: f32) -> f32 {
    logprob - ref_logprob
}

/// `k3 = (exp(r) - 1) - r` with `r = log π_ref - log π`, computed in f64 with
/// `exp_m1` so that rounding cannot make it negative.
pub fn kl_k3(logprob: f32, ref_logprob: f32) -> f32 {
    let r = f64::from(ref_logprob) - f64::from(logprob);
    // exp_m1(r) >= r holds exactly in IEEE arithmetic for all finite r, and
    // the max guards the last bit anyway.
    ((r.exp_m1() - r).max(0.0)) as f32
}

impl KlEstimator {
    /// The estimate for one token.
    pub fn estimate(self, logprob: f32, ref_logprob: f32) -> f32 {
        match self {
            KlEstimator::K1 => kl_k1(logprob, ref_logprob),
            KlEstimator::K3 => kl_k3(logprob, ref_logprob),
        }
    }
}

/// The KL coefficient and how it moves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KlController {
    /// A constant coefficient.
    Fixed { coef: f64 },
    /// The adaptive rule in the module documentation.
    Adaptive {
        coef: f64,
        /// Per-sequence KL in nats the controller steers towards.
        target: f64,
        /// Rollouts over which the coefficient may change by a factor of
        /// about `1 ± clip`.
        horizon: f64,
        /// Bound on the proportional error `KL / target - 1`.
        clip: f64,
    },
}

impl KlController {
    /// The coefficient for the next PPO step.
    pub fn coef(&self) -> f64 {
        match self {
            KlController::Fixed { coef } | KlController::Adaptive { coef, .. } => *coef,
        }
    }

    /// Moves the coefficient after a step whose mean per-sequence KL was
    /// `kl` over `rollouts` rollouts. A fixed controller does nothing, and a
    /// non-finite `kl` leaves the coefficient unchanged.
    pub fn update(&mut self, kl: f64, rollouts: usize) {
        if let KlController::Adaptive { coef, target, horizon, clip } = self {
            if !kl.is_finite() {
                return;
            }
            let error = (kl / *target - 1.0).clamp(-*clip, *clip);
            *coef *= 1.0 + error * rollouts as f64 / *horizon;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k3_is_never_negative() {
        let values = [-30.0f32, -5.0, -1.0, -1e-3, -1e-7, 0.0, 1e-7, 1e-3, 1.0, 5.0, 30.0];
        for &a in &values {
            for &b in &values {
                let k3 = kl_k3(a, b);
                assert!(k3 >= 0.0, "k3({a}, {b}) = {k3}");
                assert!(k3.is_finite() || (b - a) > 80.0, "k3({a}, {b}) = {k3}");
            }
        }
        assert_eq!(kl_k3(-2.0, -2.0), 0.0);
    }

    #[test]
    fn k1_is_the_log_ratio() {
        assert_eq!(kl_k1(-1.0, -3.0), 2.0);
        assert_eq!(KlEstimator::K1.estimate(-3.0, -1.0), -2.0);
    }

    #[test]
    fn adaptive_raises_above_target_and_lowers_below() {
        let start = KlController::Adaptive { coef: 0.1, target: 6.0, horizon: 100.0, clip: 0.2 };

        let mut above = start.clone();
        above.update(9.0, 10);
        // error 0.5 clipped to 0.2: 0.1 * (1 + 0.2 * 10 / 100)
        assert!((above.coef() - 0.1 * 1.02).abs() < 1e-12, "{}", above.coef());

        let mut slightly_above = start.clone();
        slightly_above.update(6.6, 10);
        assert!((slightly_above.coef() - 0.1 * (1.0 + 0.1 * 0.1)).abs() < 1e-12);

        let mut below = start.clone();
        below.update(0.0, 10);
        // error -1 clipped to -0.2
        assert!((below.coef() - 0.1 * 0.98).abs() < 1e-12, "{}", below.coef());

        let mut at_target = start.clone();
        at_target.update(6.0, 10);
        assert_eq!(at_target.coef(), 0.1);

        let mut not_finite = start.clone();
        not_finite.update(f64::NAN, 10);
        assert_eq!(not_finite.coef(), 0.1);
    }

    #[test]
    fn fixed_never_moves() {
        let mut fixed = KlController::Fixed { coef: 0.05 };
        fixed.update(100.0, 64);
        fixed.update(0.0, 64);
        assert_eq!(fixed.coef(), 0.05);
    }
}
