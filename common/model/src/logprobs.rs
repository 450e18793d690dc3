//! Per-token log-probabilities, entropy and the masked language-model loss from
//! one full forward pass.
//!
//! All three return `(b, t)` tensors aligned with the tokens: entry `[i, j]`
//! describes token `j`, predicted by the logits at position `j - 1`. Column 0
//! has no prediction and is 0, so a response mask built over the same tokens
//! (such as [`crate::ChatTokens::response_mask`]) applies directly.

use crate::ops;
use crate::Result;
use candle_core::{DType, Tensor};

/// Next-token targets `(b*t,)`: `input_ids` shifted left by one, with a dummy
/// 0 in the last column (its result is dropped by [`align_to_tokens`]).
fn next_token_targets(input_ids: &Tensor) -> Result<Tensor> {
    let (b, t) = input_ids.dims2()?;
    let ids = input_ids.to_dtype(DType::U32)?;
    let filler = Tensor::zeros((b, 1), DType::U32, ids.device())?;
    let shifted = Tensor::cat(&[&ids.narrow(1, 1, t - 1)?, &filler], 1)?;
    Ok(shifted.flatten_all()?)
}

/// Turns per-position values `(b, t)` about the next token into per-token
/// values: drops the last column and puts a 0 in front.
fn align_to_tokens(per_position: &Tensor) -> Result<Tensor> {
    let (b, t) = per_position.dims2()?;
    let zeros = Tensor::zeros((b, 1), per_position.dtype(), per_position.device())?;
    Ok(Tensor::cat(
        &[&zeros, &per_position.narrow(1, 0, t - 1)?],
        1,
    )?)
}

fn check_shapes(logits: &Tensor, input_ids: &Tensor) -> Result<(usize, usize, usize)> {
    let (b, t, v) = logits.dims3()?;
    if input_ids.dims2()? != (b, t) {
        return Err(crate::Error::Request(format!(
            "logits {:?} and input ids {:?} disagree on (batch, time)",
            logits.dims(),
            input_ids.dims()
        )));
    }
    if t == 0 {
        return Err(crate::Error::Request(
            "sequences must have at least one token".into(),
        ));
    }
    Ok((b, t, v))
}

/// `log softmax(logits[:, j-1] / temperature)[input_ids[:, j]]` as a `(b, t)`
/// tensor with column 0 set to 0; differentiable in the logits.
pub fn token_logprobs(logits: &Tensor, input_ids: &Tensor, temperature: f64) -> Result<Tensor> {
    let (b, t, v) = check_shapes(logits, input_ids)?;
    if t == 1 {
        return Ok(Tensor::zeros((b, 1), logits.dtype(), logits.device())?);
    }
    let targets = next_token_targets(input_ids)?;
    let per_position = ops::target_log_probs(&logits.reshape((b * t, v))?, &targets, temperature)?
        .reshape((b, t))?;
    align_to_tokens(&per_position)
}

/// Entropy in nats of `softmax(logits[:, j-1] / temperature)`, the distribution
/// token `j` was drawn from, as `(b, t)` with column 0 set to 0.
pub fn token_entropy(logits: &Tensor, temperature: f64) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if t <= 1 {
        return Ok(Tensor::zeros((b, t), logits.dtype(), logits.device())?);
    }
    let per_position = ops::entropy(&logits.reshape((b * t, v))?, temperature)?.reshape((b, t))?;
    align_to_tokens(&per_position)
}

/// Mean negative log-likelihood (temperature 1) over the tokens where
/// `loss_mask` is 1, or over every predicted token (all but the first) when
/// `loss_mask` is `None`. The mask is `(b, t)` and aligned with the tokens, so
/// its column 0 is ignored. Returns a scalar tensor; an all-zero mask is an error.
pub fn lm_loss(logits: &Tensor, input_ids: &Tensor, loss_mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, t, _) = check_shapes(logits, input_ids)?;
    let logprobs = token_logprobs(logits, input_ids, 1.0)?;
    let dtype = logprobs.dtype();
    let mask = match loss_mask {
        Some(mask) => {
            if mask.dims2()? != (b, t) {
                return Err(crate::Error::Request(format!(
                    "loss mask {:?} does not match ({b}, {t})",
                    mask.dims()
                )));
            }
            mask.to_dtype(dtype)?
        }
        None => Tensor::ones((b, t), dtype, logits.device())?,
    };
    // Token 0 has no prediction, so its mask entry is dropped.
    let first = Tensor::zeros((b, 1), dtype, logits.device())?;
    let mask = Tensor::cat(&[&first, &mask.narrow(1, 1, t - 1)?], 1)?;
    let count = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if count == 0.0 {
        return Err(crate::Error::Request(
            "loss mask selects no predicted tokens".into(),
        ));
    }
    Ok((logprobs.mul(&mask)?.sum_all()?.neg()? / count)?)
}
