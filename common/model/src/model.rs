//! [`Model`]: a [`Llama`] whose parameters live in a candle `VarMap`, so every
//! one of them is trainable, plus construction, safetensors import/export and
//! the Hugging Face directory layout (`config.json`, `model.safetensors`,
//! `tokenizer.json`).

use crate::llama::{Heads, KvCache, Llama};
use crate::tokenizer::Tokenizer;
use crate::{Config, Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Standard deviation of the normal initialization of embeddings and projections
/// (the value GPT-2 and Hugging Face Llama use).
pub const INIT_STD: f64 = 0.02;

/// Tensors some checkpoints carry that hold no parameters (precomputed rotary
/// frequencies); they are skipped on load.
const IGNORED_TENSOR_SUFFIXES: [&str; 1] = ["rotary_emb.inv_freq"];

/// A trainable Llama-family model and its parameters.
///
/// Constructing one calls [`crate::tune_cpu_runtime`], which changes glibc
/// malloc thresholds and candle's thread count for the whole process.
pub struct Model {
    llama: Llama,
    varmap: VarMap,
    dtype: DType,
    device: Device,
}

impl Model {
    /// Creates a freshly initialized model: norms at 1, value-head bias at 0, every
    /// other tensor drawn from N(0, [`INIT_STD`]) by a generator seeded with
    /// `seed`, in sorted tensor-name order, so equal seeds give equal weights.
    pub fn new_random(
        cfg: &Config,
        heads: Heads,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        crate::tune_cpu_runtime();
        cfg.validate()?;
        let varmap = VarMap::new();
        let llama = Llama::load(VarBuilder::from_varmap(&varmap, dtype, device), cfg, heads)?;
        let model = Self {
            llama,
            varmap,
            dtype,
            device: device.clone(),
        };
        let mut rng = StdRng::seed_from_u64(seed);
        for (name, var) in model.named_vars() {
            if is_random_init(&name) {
                fill_normal(&var, &mut rng, INIT_STD)?;
            }
        }
        Ok(model)
    }

    /// Adds the heads in `heads` that the model lacks, each initialized from
    /// N(0, [`INIT_STD`]) with `seed`; existing parameters are kept.
    pub fn add_heads(&mut self, heads: Heads, seed: u64) -> Result<()> {
        let current = self.llama.heads();
        let requested = Heads {
            score: current.score || heads.score,
            value: current.value || heads.value,
        };
        let before: Vec<String> = self
            .named_vars()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        let vb = VarBuilder::from_varmap(&self.varmap, self.dtype, &self.device);
        self.llama = Llama::load(vb, self.llama.config(), requested)?;
        let mut rng = StdRng::seed_from_u64(seed);
        for (name, var) in self.named_vars() {
            if !before.contains(&name) && is_random_init(&name) {
                fill_normal(&var, &mut rng, INIT_STD)?;
            }
        }
        Ok(())
    }

    /// Loads weights from safetensors bytes with Hugging Face tensor names.
    /// The `score` and `value_head` heads are loaded when the file has them.
    /// A missing tensor, a wrong shape, or a tensor the model has no place
    /// for is an error naming the tensor.
    pub fn from_safetensors_bytes(cfg: &Config, bytes: &[u8], device: &Device) -> Result<Self> {
        let tensors = crate::io::read_safetensors(bytes, device)?;
        Self::from_tensors(cfg, tensors, DType::F32, device)
    }

    /// Loads weights from named tensors (converted to `dtype`); see [`Model::from_safetensors_bytes`].
    pub fn from_tensors(
        cfg: &Config,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        crate::tune_cpu_runtime();
        cfg.validate()?;
        let heads = Heads {
            score: tensors.contains_key("score.weight"),
            value: tensors.contains_key("value_head.weight"),
        };
        let varmap = VarMap::new();
        let llama = Llama::load(VarBuilder::from_varmap(&varmap, dtype, device), cfg, heads)?;
        let model = Self {
            llama,
            varmap,
            dtype,
            device: device.clone(),
        };

        let vars = model.named_vars();
        for (name, var) in &vars {
            let tensor = tensors.get(name).ok_or_else(|| Error::Tensor {
                name: name.clone(),
                reason: "missing from the checkpoint".into(),
            })?;
            if tensor.dims() != var.dims() {
                return Err(Error::Tensor {
                    name: name.clone(),
                    reason: format!(
                        "shape {:?} in the checkpoint, {:?} expected from the config",
                        tensor.dims(),
                        var.dims()
                    ),
                });
            }
            var.set(&tensor.to_dtype(dtype)?.to_device(device)?)?;
        }
        let known: Vec<&String> = vars.iter().map(|(name, _)| name).collect();
        for name in tensors.keys() {
            let ignorable = IGNORED_TENSOR_SUFFIXES
                .iter()
                .any(|suffix| name.ends_with(suffix))
                || (cfg.tie_word_embeddings && name == "lm_head.weight");
            if !ignorable && !known.contains(&name) {
                return Err(Error::Tensor {
                    name: name.clone(),
                    reason: "the checkpoint has this tensor but the model has no such parameter"
                        .into(),
                });
            }
        }
        Ok(model)
    }

    /// Serializes the parameters as safetensors with Hugging Face names. A tied
    /// `lm_head.weight` is left out, as transformers does.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let tensors: Vec<(String, Tensor)> = self
            .named_vars()
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect();
        crate::io::write_safetensors(&tensors, None)
    }

    /// Writes `config.json`, `model.safetensors` and, when given, `tokenizer.json`
    /// into `dir` (created if needed), the layout transformers loads.
    pub fn write_hf_dir(&self, dir: &Path, tokenizer: Option<&Tokenizer>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::io::write_file(
            &dir.join("config.json"),
            self.config().to_json_string().as_bytes(),
        )?;
        crate::io::write_file(&dir.join("model.safetensors"), &self.to_safetensors()?)?;
        if let Some(tokenizer) = tokenizer {
            crate::io::write_file(&dir.join("tokenizer.json"), tokenizer.to_json()?.as_bytes())?;
        }
        Ok(())
    }

    /// Loads a Hugging Face directory: `config.json` and `model.safetensors`
    /// are required, `tokenizer.json` is loaded when present.
    pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<(Self, Option<Tokenizer>)> {
        let config_path = dir.join("config.json");
        let config_text = crate::io::read_file(&config_path)?;
        let cfg =
            Config::from_json_str(&String::from_utf8_lossy(&config_text)).map_err(|e| match e {
                Error::Config { field, reason } => Error::Config {
                    field: format!("{}: {field}", config_path.display()),
                    reason,
                },
                other => other,
            })?;
        let weights = crate::io::read_file(&dir.join("model.safetensors"))?;
        let model = Self::from_safetensors_bytes(&cfg, &weights, device)?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = if tokenizer_path.exists() {
            Some(Tokenizer::from_file(&tokenizer_path)?)
        } else {
            None
        };
        Ok((model, tokenizer))
    }

    /// Returns every parameter with its Hugging Face name, sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self
            .varmap
            .data()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let sorted: BTreeMap<String, Var> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        sorted.into_iter().collect()
    }

    /// Returns every parameter, in the order of [`Model::named_vars`].
    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, var)| var).collect()
    }

    pub fn num_parameters(&self) -> usize {
        self.named_vars()
            .iter()
            .map(|(_, var)| var.elem_count())
            .sum()
    }

    pub fn llama(&self) -> &Llama {
        &self.llama
    }

    pub fn config(&self) -> &Config {
        self.llama.config()
    }

    pub fn heads(&self) -> Heads {
        self.llama.heads()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits `(b, t, vocab)` at every position; see [`Llama::forward_hidden`] for the mask.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.llama.forward(input_ids, attention_mask)?)
    }

    /// Final hidden states `(b, t, hidden)`, to feed several heads from one pass.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        Ok(self.llama.forward_hidden(input_ids, attention_mask, None)?)
    }

    /// Incremental decoding: runs the new tokens against `cache` and appends them.
    /// Returns hidden states `(b, t, hidden)` of the new tokens only.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        Ok(self
            .llama
            .forward_hidden(input_ids, attention_mask, Some(cache))?)
    }

    /// Creates an empty cache for a batch of `batch_size` rows.
    pub fn new_cache(&self, batch_size: usize) -> KvCache {
        KvCache::new(self.config(), batch_size)
    }

    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.llama.lm_logits(hidden)?)
    }

    /// Reward-model scores `(b,)`, read at the last real token of each row.
    pub fn scores(&self, hidden: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.llama.scores(hidden, attention_mask)?)
    }

    /// Per-token values `(b, t)` for PPO.
    pub fn values(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.llama.values(hidden)?)
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", self.config())
            .field("heads", &self.heads())
            .field("dtype", &self.dtype)
            .field("parameters", &self.num_parameters())
            .finish()
    }
}

fn is_random_init(name: &str) -> bool {
    !(name.ends_with("norm.weight") || name.ends_with(".bias"))
}

/// Fills `var` with N(0, std) samples from `rng` (Box-Muller transform).
fn fill_normal(var: &Var, rng: &mut StdRng, std: f64) -> Result<()> {
    let n = var.elem_count();
    let mut values = Vec::with_capacity(n + 1);
    while values.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let radius = (-2.0 * u1.ln()).sqrt() * std;
        let angle = 2.0 * std::f64::consts::PI * u2;
        values.push(radius * angle.cos());
        values.push(radius * angle.sin());
    }
    values.truncate(n);
    let tensor = Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?;
    var.set(&tensor)?;
    Ok(())
}
