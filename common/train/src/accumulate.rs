//! Gradient accumulation: the gradients of several micro-batches summed into
//! one store before a single optimizer step.
//!
//! Each micro-batch's loss should be divided by the number of micro-batches
//! before `backward`, so the sum equals the gradient of the mean loss over the
//! whole step. candle's `GradStore` cannot be built empty, so the first
//! micro-batch's store becomes the accumulator.

use candle_core::backprop::GradStore;
use candle_core::Var;

use crate::Result;

/// Sums the gradients of `vars` over micro-batches.
pub struct GradAccumulator {
    vars: Vec<Var>,
    sum: Option<GradStore>,
    micro_batches: usize,
}

impl GradAccumulator {
    /// Creates an empty accumulator over the trainable `vars`.
    pub fn new(vars: Vec<Var>) -> Self {
        Self {
            vars,
            sum: None,
            micro_batches: 0,
        }
    }

    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, grads: GradStore) -> Result<()> {
        self.micro_batches += 1;
        let Some(sum) = self.sum.as_mut() else {
            self.sum = Some(grads);
            return Ok(());
        };
        for var in &self.vars {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let total = match sum.remove(var.as_tensor()) {
                Some(previous) => (previous + grad)?,
                None => grad.clone(),
            };
            sum.insert(var.as_tensor(), total);
        }
        Ok(())
    }

    /// Micro-batches added so far.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// Takes the summed gradients, or `None` when nothing was added. The
    /// accumulator is empty again afterwards.
    pub fn take(&mut self) -> Option<GradStore> {
        self.micro_batches = 0;
        self.sum.take()
    }
}
