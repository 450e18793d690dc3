//! Llama-family decoder-only transformer.
//!
//! - Touvron et al., "LLaMA: Open and Efficient Foundation Language Models",
//!   arXiv:2302.13971: pre-normalization with RMSNorm, SwiGLU MLP, rotary
//!   position embeddings.
//! - Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models
//!   from Multi-Head Checkpoints", arXiv:2305.13245: grouped-query attention.
//! - Reference implementation: `transformers/models/llama/modeling_llama.py`;
//!   tensor names and the rotary layout (rotate-half) follow it, so checkpoints
//!   move both ways without renaming.
//!
//! Unlike candle-transformers' Llama, [`Llama::forward_hidden`] returns every
//! position (training needs them all), takes an attention mask with left or
//! right padding and derives position ids from it, and the same code path
//! serves incremental decoding with a [`KvCache`].
//!
//! The Q/K/V and gate/up weights are stored separately under their Hugging Face
//! names and concatenated at each forward pass, so each group runs as one
//! matmul while checkpoints and optimizer state keep the standard names.

use crate::ops;
use crate::Config;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// Optional heads a model carries besides the language-model head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Heads {
    /// `score.weight` `(1, hidden)`: one scalar per sequence, for reward models.
    pub score: bool,
    /// `value_head.weight` `(1, hidden)` and `value_head.bias` `(1,)`: one value per token, for PPO.
    pub value: bool,
}

/// Root-mean-square layer norm with a learned gain and no bias.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        Ok(Self { weight, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps)
    }
}

fn linear_weight(vb: &VarBuilder, out_dim: usize, in_dim: usize, name: &str) -> Result<Tensor> {
    // Zeros here; `Model::new_random` draws the values from its own seeded generator.
    vb.pp(name)
        .get_with_hints((out_dim, in_dim), "weight", Init::Const(0.0))
}

/// `x @ w.T` for `x` of shape `(n, in)` and a weight of shape `(out, in)`.
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)
}

/// Rotary tables and the additive attention bias shared by every layer of one forward call.
pub struct AttentionInputs {
    /// `(b, t, head_dim / 2)` cosines of each token's position times each frequency.
    pub cos: Tensor,
    /// `(b, t, head_dim / 2)` sines, same layout.
    pub sin: Tensor,
    /// `(b, t, s)`: 0 where query `i` may attend to key `j`, -inf elsewhere;
    /// `s` counts cached keys plus the `t` new ones.
    pub bias: Tensor,
}

/// Grouped-query self-attention with rotary embeddings and no biases.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let q = cfg.num_attention_heads * hd;
        let kv = cfg.num_key_value_heads * hd;
        Ok(Self {
            q_proj: linear_weight(&vb, q, d, "q_proj")?,
            k_proj: linear_weight(&vb, kv, d, "k_proj")?,
            v_proj: linear_weight(&vb, kv, d, "v_proj")?,
            o_proj: linear_weight(&vb, d, q, "o_proj")?,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    /// Attends from the `t` new tokens in `x` to the cached keys plus the new
    /// ones, appending the new keys and values to `cache` when one is given.
    pub fn forward(
        &self,
        x: &Tensor,
        inputs: &AttentionInputs,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (h, kvh, hd) = (
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        );
        let groups = h / kvh;

        let qkv_weight = Tensor::cat(&[&self.q_proj, &self.k_proj, &self.v_proj], 0)?;
        let qkv = matmul_t(&x.reshape((b * t, d))?, &qkv_weight)?;
        let qkv = qkv.reshape((b, t, (h + 2 * kvh) * hd))?;
        let q = ops::rope_heads(&qkv.narrow(2, 0, h * hd)?, &inputs.cos, &inputs.sin, hd)?;
        // q: (b, h, t, hd)
        let k = ops::rope_heads(
            &qkv.narrow(2, h * hd, kvh * hd)?,
            &inputs.cos,
            &inputs.sin,
            hd,
        )?;
        // k: (b, kvh, t, hd)
        let v = ops::split_heads(
            &qkv.narrow(2, (h + kvh) * hd, kvh * hd)?,
            &inputs.cos,
            &inputs.sin,
            hd,
        )?;
        // v: (b, kvh, t, hd)

        let (k, v) = match cache {
            Some(cache) => cache.append(k, v)?,
            None => (k, v),
        };

        // Query heads g*j .. g*j+g-1 share key/value head j, so grouping the
        // query heads is a free reshape instead of repeating keys and values.
        let q = q.reshape((b, kvh, groups * t, hd))?;
        let scores = q.matmul(&k.t()?)?;
        // scores: (b, kvh, groups*t, s), s = cached plus new keys
        let probs = ops::masked_softmax(&scores, &inputs.bias, 1.0 / (hd as f64).sqrt())?;
        let context = probs.matmul(&v)?;
        // context: (b, kvh, groups*t, hd), which is (b, h, t, hd)
        let context = context
            .reshape((b, h, t, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let context = context.reshape((b * t, h * hd))?;
        matmul_t(&context, &self.o_proj)?.reshape((b, t, d))
    }
}

/// SwiGLU feed-forward block: `down_proj(silu(gate_proj(x)) * up_proj(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

impl Mlp {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear_weight(&vb, i, d, "gate_proj")?,
            up_proj: linear_weight(&vb, i, d, "up_proj")?,
            down_proj: linear_weight(&vb, d, i, "down_proj")?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let gate_up = Tensor::cat(&[&self.gate_proj, &self.up_proj], 0)?;
        let hidden = matmul_t(&x.reshape((b * t, d))?, &gate_up)?;
        // hidden: (b*t, 2 * intermediate), rows laid out as [gate | up]
        let hidden = ops::silu_mul(&hidden)?;
        matmul_t(&hidden, &self.down_proj)?.reshape((b, t, d))
    }
}

/// One pre-norm transformer block.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
        })
    }

    pub fn forward(
        &self,
        residual: &Tensor,
        inputs: &AttentionInputs,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let attn =
            self.self_attn
                .forward(&self.input_layernorm.forward(residual)?, inputs, cache)?;
        let residual = (residual + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&residual)?)?;
        residual + mlp
    }
}

/// Keys and values of one layer for the tokens seen so far.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    keys_values: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.keys_values.take() {
            None => (k, v),
            Some((past_k, past_v)) => (
                Tensor::cat(&[&past_k, &k], 2)?,
                Tensor::cat(&[&past_v, &v], 2)?,
            ),
        };
        // k, v: (b, kvh, s, hd)
        self.keys_values = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// State of incremental decoding for a batch: per-layer keys and values, plus
/// which cached slots hold real tokens (so padding stays invisible) and how
/// many real tokens each row has seen (its next position id).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    key_mask: Vec<Vec<bool>>,
    real_tokens: Vec<u32>,
}

impl KvCache {
    pub fn new(cfg: &Config, batch_size: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); cfg.num_hidden_layers],
            key_mask: vec![Vec::new(); batch_size],
            real_tokens: vec![0; batch_size],
        }
    }

    pub fn batch_size(&self) -> usize {
        self.key_mask.len()
    }

    /// Number of cached slots per row, padding included.
    pub fn len(&self) -> usize {
        self.key_mask.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads a `(b, t)` attention mask of 0/1 values in any numeric dtype.
pub fn mask_rows(mask: &Tensor) -> Result<Vec<Vec<bool>>> {
    let rows = mask.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    rows.into_iter()
        .map(|row| {
            row.into_iter()
                .map(|v| match v {
                    0.0 => Ok(false),
                    1.0 => Ok(true),
                    other => {
                        candle_core::bail!("attention mask entries must be 0 or 1, got {other}")
                    }
                })
                .collect()
        })
        .collect()
}

/// Position id of each slot of one row: the number of real tokens before it,
/// counting `seen_before` tokens already in the cache. A padding slot reuses
/// the position of the last real token (0 before any); its output is unused.
pub fn position_ids(mask: &[bool], seen_before: u32) -> Vec<u32> {
    let mut seen = seen_before;
    mask.iter()
        .map(|&real| {
            if real {
                seen += 1;
            }
            seen.saturating_sub(1)
        })
        .collect()
}

/// The decoder stack with its language-model head and optional scalar heads.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `(vocab, hidden)`; the embedding matrix itself when embeddings are tied.
    lm_head: Tensor,
    score: Option<Tensor>,
    value_head: Option<(Tensor, Tensor)>,
    inv_freq: Vec<f64>,
    cfg: Config,
}

impl Llama {
    /// Builds the model from `vb`, whose paths are the Hugging Face tensor names.
    pub fn load(vb: VarBuilder, cfg: &Config, heads: Heads) -> Result<Self> {
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let model = vb.pp("model");
        let embed_tokens =
            model
                .pp("embed_tokens")
                .get_with_hints((v, d), "weight", Init::Const(0.0))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(model.pp(format!("layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(model.pp("norm"), d, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            linear_weight(&vb, v, d, "lm_head")?
        };
        let score = if heads.score {
            Some(linear_weight(&vb, 1, d, "score")?)
        } else {
            None
        };
        let value_head = if heads.value {
            let weight = linear_weight(&vb, 1, d, "value_head")?;
            let bias = vb
                .pp("value_head")
                .get_with_hints(1, "bias", Init::Const(0.0))?;
            Some((weight, bias))
        } else {
            None
        };
        let half = cfg.head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64))
            .collect();
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            score,
            value_head,
            inv_freq,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn heads(&self) -> Heads {
        Heads {
            score: self.score.is_some(),
            value: self.value_head.is_some(),
        }
    }

    /// Final-norm hidden states `(b, t, hidden)` for every position.
    ///
    /// `attention_mask` is `(b, t)` with 1 for real tokens and 0 for padding on
    /// either side; `None` means no padding. Position ids count real tokens
    /// only, so a sequence gets the same positions whichever side it is padded.
    /// With a `cache`, the new tokens attend to the cached ones and are appended.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let mask = match attention_mask {
            Some(mask) => {
                if mask.dims2()? != (b, t) {
                    candle_core::bail!(
                        "attention mask {:?} does not match input ids ({b}, {t})",
                        mask.dims()
                    );
                }
                mask_rows(mask)?
            }
            None => vec![vec![true; t]; b],
        };
        let mut cache = cache;
        if let Some(cache) = cache.as_deref() {
            if cache.batch_size() != b {
                candle_core::bail!(
                    "invalid input: the kv cache has {} rows but the input has {b}",
                    cache.batch_size()
                );
            }
        }
        let past = cache.as_deref().map_or(0, KvCache::len);
        if past + t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {} tokens exceeds max_position_embeddings = {}",
                past + t,
                self.cfg.max_position_embeddings
            );
        }
        let inputs = self.attention_inputs(&mask, cache.as_deref(), input_ids.device())?;
        if let Some(cache) = cache.as_deref_mut() {
            for (row, new) in cache.key_mask.iter_mut().zip(&mask) {
                row.extend_from_slice(new);
            }
            for (count, new) in cache.real_tokens.iter_mut().zip(&mask) {
                *count += new.iter().filter(|&&m| m).count() as u32;
            }
        }

        let d = self.cfg.hidden_size;
        let ids = input_ids.flatten_all()?.to_dtype(DType::U32)?;
        let mut residual = self
            .embed_tokens
            .index_select(&ids, 0)?
            .reshape((b, t, d))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            residual = layer.forward(&residual, &inputs, layer_cache)?;
        }
        self.norm.forward(&residual)
    }

    /// Rotary tables from mask-derived positions and the causal-and-padding bias.
    fn attention_inputs(
        &self,
        mask: &[Vec<bool>],
        cache: Option<&KvCache>,
        device: &Device,
    ) -> Result<AttentionInputs> {
        let (b, t) = (mask.len(), mask.first().map_or(0, Vec::len));
        let past = cache.map_or(0, KvCache::len);
        let s = past + t;
        let half = self.inv_freq.len();
        let dtype = self.embed_tokens.dtype();

        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        let mut bias = vec![f64::NEG_INFINITY; b * t * s];
        for (row, row_mask) in mask.iter().enumerate() {
            let positions = position_ids(row_mask, cache.map_or(0, |c| c.real_tokens[row]));
            let past_mask = cache.map_or(&[][..], |c| &c.key_mask[row][..]);
            for i in 0..t {
                for &f in &self.inv_freq {
                    let angle = positions[i] as f64 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
                // bias: (b, t, s); query i sits at slot past + i.
                let bias_row = &mut bias[(row * t + i) * s..][..s];
                for (j, cell) in bias_row.iter_mut().enumerate().take(past + i + 1) {
                    let visible = if j < past {
                        past_mask[j]
                    } else {
                        row_mask[j - past]
                    };
                    if visible {
                        *cell = 0.0;
                    }
                }
            }
        }
        Ok(AttentionInputs {
            cos: Tensor::from_vec(cos, (b, t, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (b, t, half), device)?.to_dtype(dtype)?,
            bias: Tensor::from_vec(bias, (b, t, s), device)?.to_dtype(dtype)?,
        })
    }

    /// Language-model logits `(b, t, vocab)` for hidden states `(b, t, hidden)`.
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        matmul_t(&hidden.reshape((b * t, d))?, &self.lm_head)?.reshape((b, t, self.cfg.vocab_size))
    }

    /// Computes one scalar per sequence `(b,)`, read at the last position whose mask is 1,
    /// so it does not depend on which side the batch is padded or on the pad id.
    pub fn scores(&self, hidden: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let score = match &self.score {
            Some(score) => score,
            None => {
                candle_core::bail!("this model has no score head; add one with Model::add_heads")
            }
        };
        let (b, t, d) = hidden.dims3()?;
        // Flat index of each row's last real token in the (b*t, hidden) view.
        let last: Vec<u32> = match attention_mask {
            None => (0..b).map(|row| (row * t + t - 1) as u32).collect(),
            Some(mask) => mask_rows(mask)?
                .iter()
                .enumerate()
                .map(|(row, m)| match m.iter().rposition(|&real| real) {
                    Some(j) => Ok((row * t + j) as u32),
                    None => {
                        candle_core::bail!("row {row} of the attention mask has no real tokens")
                    }
                })
                .collect::<Result<_>>()?,
        };
        let index = Tensor::from_vec(last, b, hidden.device())?;
        let picked = hidden.reshape((b * t, d))?.index_select(&index, 0)?;
        // picked: (b, hidden)
        matmul_t(&picked, score)?.squeeze(1)
    }

    /// Computes one value per position `(b, t)` with the value head.
    pub fn values(&self, hidden: &Tensor) -> Result<Tensor> {
        let (weight, bias) = match &self.value_head {
            Some(head) => head,
            None => {
                candle_core::bail!("this model has no value head; add one with Model::add_heads")
            }
        };
        let (b, t, d) = hidden.dims3()?;
        let values = matmul_t(&hidden.reshape((b * t, d))?, weight)?.broadcast_add(bias)?;
        values.reshape((b, t))
    }

    /// Logits `(b, t, vocab)` at every position.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.lm_logits(&self.forward_hidden(input_ids, attention_mask, None)?)
    }
}
