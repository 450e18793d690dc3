//! AdamW (Loshchilov and Hutter, "Decoupled Weight Decay Regularization",
//! arXiv:1711.05101) with its moments and step count exposed for checkpoints,
//! and global gradient-norm clipping.
//!
//! The update matches `torch.optim.AdamW`: decay `w -= lr * wd * w` first, then
//! the bias-corrected Adam step. Weight decay applies to matrices (rank 2 and
//! up) only, never to norm gains or biases. candle's own `AdamW` keeps its
//! moments private, which is why this one exists.
//!
//! Parameters must be f32; the moments are kept in f32 as PyTorch does.

use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Mutex;

/// Elements per parallel chunk of the update kernel.
const UPDATE_CHUNK: usize = 1 << 14;

/// AdamW hyperparameters; the defaults are those of `torch.optim.AdamW`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay per unit of learning rate, applied to matrices only.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

struct ParamState {
    name: String,
    var: Var,
    decay: bool,
    /// First moment (`exp_avg` in PyTorch).
    m: Vec<f32>,
    /// Second moment (`exp_avg_sq` in PyTorch).
    v: Vec<f32>,
}

/// AdamW over named parameters, with state that round-trips through safetensors.
pub struct AdamW {
    params: Vec<ParamState>,
    step: u64,
    config: AdamWConfig,
}

impl AdamW {
    /// Creates an optimizer over `params` (name, variable); names key the saved state.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, var)| {
                if var.dtype() != DType::F32 {
                    return Err(Error::Tensor {
                        name,
                        reason: format!("AdamW needs f32 parameters, got {:?}", var.dtype()),
                    });
                }
                let n = var.elem_count();
                let decay = var.rank() >= 2;
                Ok(ParamState {
                    name,
                    var,
                    decay,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            step: 0,
            config,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    pub fn learning_rate(&self) -> f64 {
        self.config.learning_rate
    }

    /// Sets the learning rate for the next steps (schedules call this every step).
    pub fn set_learning_rate(&mut self, learning_rate: f64) {
        self.config.learning_rate = learning_rate;
    }

    /// Number of steps taken so far; the bias correction uses it.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Applies one update from `grads`. A parameter without a gradient is left
    /// unchanged, as in PyTorch, but the step count still advances.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - c.beta1.powi(t);
        let bias_correction2 = 1.0 - c.beta2.powi(t);
        for p in &mut self.params {
            let grad = match grads.get(p.var.as_tensor()) {
                Some(grad) => grad.contiguous()?,
                None => continue,
            };
            let kernel = AdamWKernel {
                moments: Mutex::new((&mut p.m, &mut p.v)),
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                eps: c.eps as f32,
                decay_factor: if p.decay {
                    (1.0 - c.learning_rate * c.weight_decay) as f32
                } else {
                    1.0
                },
                step_size: (c.learning_rate / bias_correction1) as f32,
                inv_sqrt_bias_correction2: (1.0 / bias_correction2.sqrt()) as f32,
            };
            p.var
                .as_tensor()
                .inplace_op2(&grad, &kernel)
                .map_err(|e| Error::Tensor {
                    name: p.name.clone(),
                    reason: format!("AdamW update failed: {e}"),
                })?;
        }
        Ok(())
    }

    /// Copies the state out as named tensors: `{param}.exp_avg`, `{param}.exp_avg_sq`.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            let shape = p.var.shape();
            let device = p.var.device();
            out.push((
                format!("{}.exp_avg", p.name),
                Tensor::from_slice(&p.m, shape, device)?,
            ));
            out.push((
                format!("{}.exp_avg_sq", p.name),
                Tensor::from_slice(&p.v, shape, device)?,
            ));
        }
        Ok(out)
    }

    /// Serializes moments, step count and hyperparameters as safetensors.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let c = self.config;
        let metadata = HashMap::from([
            ("step".to_string(), self.step.to_string()),
            ("learning_rate".to_string(), c.learning_rate.to_string()),
            ("beta1".to_string(), c.beta1.to_string()),
            ("beta2".to_string(), c.beta2.to_string()),
            ("eps".to_string(), c.eps.to_string()),
            ("weight_decay".to_string(), c.weight_decay.to_string()),
        ]);
        crate::io::write_safetensors(&self.state_tensors()?, Some(metadata))
    }

    /// Restores what [`AdamW::to_safetensors`] wrote: moments, step count and
    /// hyperparameters. Every parameter of this optimizer must be present
    /// with its shape; extra entries are an error too.
    pub fn load_safetensors(&mut self, bytes: &[u8]) -> Result<()> {
        let metadata = crate::io::read_safetensors_metadata(bytes)?;
        let number = |key: &str| -> Result<f64> {
            let text = metadata.get(key).ok_or_else(|| {
                Error::Safetensors(format!("optimizer state has no `{key}` metadata"))
            })?;
            text.parse::<f64>().map_err(|_| {
                Error::Safetensors(format!(
                    "optimizer metadata `{key}` = `{text}` is not a number"
                ))
            })
        };
        let step_text = metadata
            .get("step")
            .ok_or_else(|| Error::Safetensors("optimizer state has no `step` metadata".into()))?;
        let step = step_text.parse::<u64>().map_err(|_| {
            Error::Safetensors(format!(
                "optimizer metadata `step` = `{step_text}` is not a step count"
            ))
        })?;
        let config = AdamWConfig {
            learning_rate: number("learning_rate")?,
            beta1: number("beta1")?,
            beta2: number("beta2")?,
            eps: number("eps")?,
            weight_decay: number("weight_decay")?,
        };

        let mut tensors = crate::io::read_safetensors(bytes, &candle_core::Device::Cpu)?;
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let mut take = |suffix: &str| -> Result<Vec<f32>> {
                let name = format!("{}.{suffix}", p.name);
                let tensor = tensors.remove(&name).ok_or_else(|| Error::Tensor {
                    name: name.clone(),
                    reason: "missing from the optimizer state".into(),
                })?;
                if tensor.dims() != p.var.dims() {
                    return Err(Error::Tensor {
                        name,
                        reason: format!(
                            "shape {:?} in the optimizer state, parameter is {:?}",
                            tensor.dims(),
                            p.var.dims()
                        ),
                    });
                }
                Ok(tensor
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?)
            };
            restored.push((take("exp_avg")?, take("exp_avg_sq")?));
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(Error::Tensor {
                name: extra.clone(),
                reason: "optimizer state entry matches no parameter".into(),
            });
        }
        for (p, (m, v)) in self.params.iter_mut().zip(restored) {
            p.m = m;
            p.v = v;
        }
        self.step = step;
        self.config = config;
        Ok(())
    }
}

/// One fused AdamW update of a parameter in place, reading its gradient.
struct AdamWKernel<'a> {
    moments: Mutex<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
    beta1: f32,
    beta2: f32,
    eps: f32,
    /// `1 - lr * weight_decay` for decayed parameters, 1 otherwise.
    decay_factor: f32,
    /// `lr / (1 - beta1^t)`.
    step_size: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    inv_sqrt_bias_correction2: f32,
}

impl AdamWKernel<'_> {
    fn update_chunk(&self, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        for i in 0..w.len() {
            let grad = g[i];
            m[i] = self.beta1 * m[i] + (1.0 - self.beta1) * grad;
            v[i] = self.beta2 * v[i] + (1.0 - self.beta2) * grad * grad;
            let denom = v[i].sqrt() * self.inv_sqrt_bias_correction2 + self.eps;
            w[i] = w[i] * self.decay_factor - self.step_size * m[i] / denom;
        }
    }
}

impl InplaceOp2 for AdamWKernel<'_> {
    fn name(&self) -> &'static str {
        "troupe-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(weights), CpuStorage::F32(grads)) = (s1, s2) else {
            bail!("adamw: parameter and gradient must both be f32");
        };
        let (Some((w0, w1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            bail!("adamw: parameter and gradient must be contiguous");
        };
        let (weights, grads) = (&mut weights[w0..w1], &grads[g0..g1]);
        let mut guard = self
            .moments
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (m, v) = &mut *guard;
        if weights.len() != grads.len() || m.len() != weights.len() {
            bail!("adamw: parameter, gradient and moments differ in length");
        }
        weights
            .par_chunks_mut(UPDATE_CHUNK)
            .zip(grads.par_chunks(UPDATE_CHUNK))
            .zip(m.par_chunks_mut(UPDATE_CHUNK))
            .zip(v.par_chunks_mut(UPDATE_CHUNK))
            .for_each(|(((w, g), m), v)| self.update_chunk(w, g, m, v));
        Ok(())
    }
}

/// Global L2 norm of the gradients of `vars` (vars without a gradient count as 0).
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut sum_sq = 0.0;
    for var in vars {
        if let Some(grad) = grads.get(var.as_tensor()) {
            sum_sq += grad
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sum_sq.sqrt())
}

/// Scales the gradients of `vars` so their global norm is at most `max_norm`
/// (as `torch.nn.utils.clip_grad_norm_` does) and returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, vars)?;
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for var in vars {
            if let Some(grad) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (grad * scale)?);
            }
        }
    }
    Ok(norm)
}
