//! The learning-rate schedule every troupe trainer uses: linear warmup from 0
//! to the peak, then cosine decay from the peak down to a floor at the last
//! step (as in nanoGPT's `get_lr`).

/// Linear warmup then cosine decay. Steps count optimizer updates from 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Learning rate at the end of warmup.
    pub peak: f64,
    /// Learning rate at the last step and after it.
    pub floor: f64,
    /// Steps of linear warmup; 0 starts at the peak.
    pub warmup_steps: u64,
    /// Total optimizer steps of the run.
    pub total_steps: u64,
}

impl LrSchedule {
    /// Returns the learning rate for optimizer step `step` (0-based).
    ///
    /// During warmup it is `peak * (step + 1) / (warmup_steps + 1)`, so step 0
    /// already moves the weights. From the end of warmup to `total_steps - 1`
    /// it follows half a cosine from `peak` to `floor`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        let decay_steps = self
            .total_steps
            .saturating_sub(self.warmup_steps)
            .saturating_sub(1);
        if decay_steps == 0 {
            return self.peak;
        }
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.floor + (self.peak - self.floor) * cosine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEDULE: LrSchedule = LrSchedule {
        peak: 1e-3,
        floor: 1e-4,
        warmup_steps: 10,
        total_steps: 110,
    };

    #[test]
    fn warmup_rises_linearly() {
        assert!((SCHEDULE.lr_at(0) - 1e-3 / 11.0).abs() < 1e-12);
        assert!((SCHEDULE.lr_at(4) - 5e-3 / 11.0).abs() < 1e-12);
        assert!(SCHEDULE.lr_at(9) < SCHEDULE.lr_at(10));
    }

    #[test]
    fn decay_reaches_floor_at_last_step() {
        assert!((SCHEDULE.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((SCHEDULE.lr_at(109) - 1e-4).abs() < 1e-12);
        assert!((SCHEDULE.lr_at(500) - 1e-4).abs() < 1e-12);
        let midpoint = SCHEDULE.lr_at(10 + 99 / 2);
        assert!((midpoint - 5.5e-4).abs() < 1e-5, "midpoint {midpoint}");
    }

    #[test]
    fn decay_never_increases() {
        for step in 10..200 {
            assert!(
                SCHEDULE.lr_at(step + 1) <= SCHEDULE.lr_at(step) + 1e-15,
                "step {step}"
            );
        }
    }
}
