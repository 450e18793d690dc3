//! GGUF import: a tiny random Llama written the way llama.cpp's converter
//! writes it (GGUF names, rotary row order, quantized 2-D tensors, f32
//! norms, GPT-2 tokenizer metadata) comes back with the source's logits.
//!
//! Each type is checked twice. First, the imported logits must equal
//! exactly those of a reference whose weights went through the same
//! quantize/dequantize in Hugging Face layout, so a wrong tensor name or row
//! order fails whatever the tolerance. Second, against the unquantized
//! source, with |Δ logit| relative to the RMS of the source logits (about
//! 2.6) on a tiny random model (measured max / mean, then the bound tested):
//!
//! | type | max | mean | bound (max / mean) |
//! |---|---|---|---|
//! | F32 | 0 | 0 | exact |
//! | F16 | 0.001 | 0.0002 | 0.005 / 0.001 |
//! | Q8_0 | 0.032 | 0.0055 | 0.1 / 0.02 |
//! | Q4_0 | 0.45 | 0.086 | 1.0 / 0.2 |
//! | Q4_1 | 0.39 | 0.078 | 1.0 / 0.2 |

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use troupe_convert::layout::to_gguf_rotary_rows;
use troupe_convert::{import_gguf, read_gguf, ConvertError};
use troupe_model::{Config, Model, Tokenizer};
use troupe_store::{ModelRegistry, Store};

/// How the test writer stores the 2-D weights of the model.
#[derive(Clone, Copy)]
struct Layout {
    /// Type of every 2-D weight except the token embeddings.
    weights: GgmlDType,
    /// Type of `token_embd.weight` (and `output.weight`).
    embeddings: GgmlDType,
    /// Apply llama.cpp's rotary row order to `attn_q`/`attn_k`; off only to
    /// show that the importer's inverse matters.
    permute: bool,
    /// GGUF version written in the header.
    version: u32,
}

impl Layout {
    fn uniform(dtype: GgmlDType) -> Self {
        Layout {
            weights: dtype,
            embeddings: dtype,
            permute: true,
            version: 3,
        }
    }
}

/// GGUF name of a Hugging Face tensor name, spelled out independently of the importer's table.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, suffix) = rest.split_once('.').unwrap();
    let short = match suffix {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        other => panic!("unexpected tensor {other}"),
    };
    format!("blk.{layer}.{short}.weight")
}

fn dtype_for(hf: &str, tensor: &Tensor, layout: Layout) -> GgmlDType {
    if tensor.rank() == 1 {
        GgmlDType::F32
    } else if hf == "model.embed_tokens.weight" || hf == "lm_head.weight" {
        layout.embeddings
    } else {
        layout.weights
    }
}

/// Vocabulary, merges and token types of `tokenizer`, as llama.cpp stores them.
fn tokenizer_metadata(tokenizer: &Tokenizer) -> Vec<(String, Value)> {
    let json: serde_json::Value = serde_json::from_str(&tokenizer.to_json().unwrap()).unwrap();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (token, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = token.clone();
    }
    let merges: Vec<Value> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Value::String(s.clone()),
            pair => Value::String(format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            )),
        })
        .collect();
    let specials: Vec<u64> = json["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    let types: Vec<Value> = (0..tokens.len() as u64)
        .map(|id| Value::I32(if specials.contains(&id) { 3 } else { 1 }))
        .collect();
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(tokenizer.bos_id().unwrap()),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(tokenizer.eos_id().unwrap()),
        ),
        (
            "tokenizer.ggml.padding_token_id".into(),
            Value::U32(tokenizer.pad_id().unwrap()),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ]
}

fn model_metadata(cfg: &Config) -> Vec<(String, Value)> {
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String("tiny test model".into()),
        ),
        ("llama.vocab_size".into(), Value::U32(cfg.vocab_size as u32)),
        (
            "llama.context_length".into(),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        (
            "llama.embedding_length".into(),
            Value::U32(cfg.hidden_size as u32),
        ),
        (
            "llama.block_count".into(),
            Value::U32(cfg.num_hidden_layers as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count".into(),
            Value::U32(cfg.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(cfg.num_key_value_heads as u32),
        ),
        (
            "llama.rope.dimension_count".into(),
            Value::U32(cfg.head_dim as u32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
    ]
}

/// Converts the source model's tensors to GGUF names, row order and types.
fn gguf_tensors(model: &Model, layout: Layout) -> Vec<(String, QTensor)> {
    let cfg = model.config();
    model
        .named_vars()
        .into_iter()
        .map(|(hf, var)| {
            let mut tensor = var.as_tensor().clone();
            if layout.permute && hf.ends_with("q_proj.weight") {
                tensor = to_gguf_rotary_rows(&tensor, cfg.num_attention_heads).unwrap();
            } else if layout.permute && hf.ends_with("k_proj.weight") {
                tensor = to_gguf_rotary_rows(&tensor, cfg.num_key_value_heads).unwrap();
            }
            let q = QTensor::quantize(&tensor, dtype_for(&hf, &tensor, layout)).unwrap();
            (gguf_name(&hf), q)
        })
        .collect()
}

/// Writes a GGUF file with candle's writer, which emits version 2, then
/// rewrites the version field. Versions 2 and 3 share one layout on
/// little-endian machines.
fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, QTensor)],
    version: u32,
) {
    let mut file = std::fs::File::create(path).unwrap();
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
    drop(file);
    let mut bytes = std::fs::read(path).unwrap();
    bytes[4..8].copy_from_slice(&version.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

struct Fixture {
    tokenizer: Tokenizer,
    cfg: Config,
    model: Model,
}

fn fixture(tied: bool) -> Fixture {
    let tokenizer = common::tokenizer();
    let cfg = common::config(&tokenizer, tied);
    let model = common::model(&cfg, 21);
    Fixture {
        tokenizer,
        cfg,
        model,
    }
}

fn metadata(f: &Fixture) -> Vec<(String, Value)> {
    let mut all = model_metadata(&f.cfg);
    all.extend(tokenizer_metadata(&f.tokenizer));
    all
}

fn write_fixture(f: &Fixture, layout: Layout, dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tiny.gguf");
    write_gguf(
        &path,
        &metadata(f),
        &gguf_tensors(&f.model, layout),
        layout.version,
    );
    path
}

/// Builds the source model with every tensor passed through the
/// quantization the writer used, in Hugging Face layout.
fn quantized_reference(f: &Fixture, layout: Layout) -> Model {
    let tensors: HashMap<String, Tensor> = f
        .model
        .named_vars()
        .into_iter()
        .map(|(hf, var)| {
            let tensor = var.as_tensor();
            let q = QTensor::quantize(tensor, dtype_for(&hf, tensor, layout)).unwrap();
            (hf, q.dequantize(&Device::Cpu).unwrap())
        })
        .collect();
    Model::from_tensors(&f.cfg, tensors, DType::F32, &Device::Cpu).unwrap()
}

/// Imports a file of `layout` written from the sharp fixture model and
/// checks that its logits equal those of the quantized reference exactly.
fn check_exact(layout: Layout, tied: bool) {
    let f = fixture(tied);
    let dir = tempfile::tempdir().unwrap();
    let imported = read_gguf(&write_fixture(&f, layout, dir.path())).unwrap();
    let got = common::logits(&imported.model);
    assert_eq!(
        got,
        common::logits(&quantized_reference(&f, layout)),
        "imported weights differ from the quantized source"
    );
}

/// Imports a file of `layout` written from a model with default-width
/// attention and returns (max, mean) |Δ logit| / RMS against the source.
///
/// The sharp fixture model amplifies any weight change (a Q8_0 file moves
/// its logits by up to a third of their RMS), so tolerances are measured
/// on this calmer one, closer to a trained model.
fn quantization_error(layout: Layout) -> (f32, f32) {
    let tokenizer = common::tokenizer();
    let cfg = common::config(&tokenizer, true);
    let f = Fixture {
        model: common::model_scaled(&cfg, 22, 4.0, 1.0),
        tokenizer,
        cfg,
    };
    let dir = tempfile::tempdir().unwrap();
    let imported = read_gguf(&write_fixture(&f, layout, dir.path())).unwrap();
    let got = common::logits(&imported.model);
    let want = common::logits(&f.model);
    let mean = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / got.len() as f32;
    let rms = common::rms(&want);
    (common::max_abs_diff(&got, &want) / rms, mean / rms)
}

#[test]
fn f32_gguf_exact() {
    for tied in [true, false] {
        check_exact(Layout::uniform(GgmlDType::F32), tied);
        let f = fixture(tied);
        let dir = tempfile::tempdir().unwrap();
        let imported = read_gguf(&write_fixture(
            &f,
            Layout::uniform(GgmlDType::F32),
            dir.path(),
        ))
        .unwrap();
        assert_eq!(
            common::logits(&imported.model),
            common::logits(&f.model),
            "tied = {tied}"
        );
    }
}

/// Checks (max, mean) relative errors against their bounds; a zero max
/// error would mean the file was not quantized at all.
fn assert_within(label: &str, (max, mean): (f32, f32), max_bound: f32, mean_bound: f32) {
    assert!(max > 0.0, "{label}: no quantization error at all");
    assert!(
        max < max_bound,
        "{label}: max relative error {max}, bound {max_bound}"
    );
    assert!(
        mean < mean_bound,
        "{label}: mean relative error {mean}, bound {mean_bound}"
    );
}

#[test]
fn f16_gguf_close() {
    check_exact(Layout::uniform(GgmlDType::F16), true);
    assert_within(
        "F16",
        quantization_error(Layout::uniform(GgmlDType::F16)),
        5e-3,
        1e-3,
    );
}

#[test]
fn q8_0_gguf_close() {
    check_exact(Layout::uniform(GgmlDType::Q8_0), false);
    assert_within(
        "Q8_0",
        quantization_error(Layout::uniform(GgmlDType::Q8_0)),
        0.1,
        2e-2,
    );
}

#[test]
fn q4_gguf_close() {
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1] {
        check_exact(Layout::uniform(dtype), false);
        assert_within(
            &format!("{dtype:?}"),
            quantization_error(Layout::uniform(dtype)),
            1.0,
            0.2,
        );
    }
}

#[test]
fn mixed_types_v2_file() {
    // The SmolLM2 file's mix: Q8_0 embeddings, Q4_1 blocks, f32 norms.
    let layout = Layout {
        weights: GgmlDType::Q4_1,
        embeddings: GgmlDType::Q8_0,
        permute: true,
        version: 2,
    };
    check_exact(layout, true);
    assert_within("Q4_1 + Q8_0", quantization_error(layout), 0.5, 0.1);
}

#[test]
fn rotary_order_matters() {
    // A file without llama.cpp's row order must not import as the source:
    // this shows the exact-logits checks above can fail.
    let f = fixture(true);
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout {
        permute: false,
        ..Layout::uniform(GgmlDType::F32)
    };
    let imported = read_gguf(&write_fixture(&f, layout, dir.path())).unwrap();
    let error = common::max_abs_diff(&common::logits(&imported.model), &common::logits(&f.model));
    assert!(error > 0.1, "max |Δ logit| only {error}");
}

#[test]
fn config_from_metadata() {
    let f = fixture(true);
    let dir = tempfile::tempdir().unwrap();
    let imported = read_gguf(&write_fixture(
        &f,
        Layout::uniform(GgmlDType::F32),
        dir.path(),
    ))
    .unwrap();
    let cfg = imported.config();
    assert_eq!(cfg, &f.cfg);
    assert_eq!(imported.source["gguf_version"], 3);
    assert_eq!(
        imported.source["tensor_types"]["f32"],
        f.model.named_vars().len()
    );
    assert_eq!(imported.source["name"], "tiny test model");
}

#[test]
fn tokenizer_encodes_like_source() {
    let f = fixture(true);
    let dir = tempfile::tempdir().unwrap();
    let imported = read_gguf(&write_fixture(
        &f,
        Layout::uniform(GgmlDType::F32),
        dir.path(),
    ))
    .unwrap();
    let tokenizer = &imported.tokenizer;
    assert_eq!(tokenizer.vocab_size(), f.tokenizer.vocab_size());
    for text in common::CORPUS.iter().chain(common::PROBES.iter()) {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids, f.tokenizer.encode(text).unwrap(), "{text:?}");
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), *text);
    }
    assert_eq!(
        tokenizer.render_prompt_response("hi", "hello").unwrap(),
        f.tokenizer.render_prompt_response("hi", "hello").unwrap()
    );
    assert_eq!(
        (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()),
        (
            f.tokenizer.bos_id(),
            f.tokenizer.eos_id(),
            f.tokenizer.pad_id()
        )
    );
}

#[tokio::test]
async fn gguf_import_publishes_version() {
    let f = fixture(true);
    let dir = tempfile::tempdir().unwrap();
    let path = write_fixture(&f, Layout::uniform(GgmlDType::Q8_0), dir.path());
    let registry = ModelRegistry::new(Store::memory());
    let first = import_gguf(&path, &registry, "tiny-gguf").await.unwrap();
    let second = import_gguf(&path, &registry, "tiny-gguf").await.unwrap();
    assert_eq!((first.version, second.version), (1, 2));
    assert_eq!(first.metadata["source"]["format"], "gguf");
    assert_eq!(
        first.metadata["source"]["sha256"].as_str().map(str::len),
        Some(64)
    );

    let loaded = registry.load(&second.model_ref()).await.unwrap();
    let cfg = Config::from_json_str(std::str::from_utf8(loaded.config()).unwrap()).unwrap();
    let model = Model::from_safetensors_bytes(&cfg, loaded.weights(), &Device::Cpu).unwrap();
    let layout = Layout::uniform(GgmlDType::Q8_0);
    assert_eq!(
        common::logits(&model),
        common::logits(&quantized_reference(&f, layout))
    );
}

/// Writes a valid F32 file with `edit` applied to its metadata and tensor
/// list, and returns the import error.
fn gguf_error(
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>),
) -> ConvertError {
    let f = fixture(true);
    let mut meta = metadata(&f);
    let mut tensors = gguf_tensors(&f.model, Layout::uniform(GgmlDType::F32));
    edit(&mut meta, &mut tensors);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    write_gguf(&path, &meta, &tensors, 3);
    read_gguf(&path).expect_err("the import should fail")
}

fn set(meta: &mut [(String, Value)], key: &str, value: Value) {
    meta.iter_mut().find(|(k, _)| k == key).unwrap().1 = value;
}

#[test]
fn other_architecture_rejected() {
    let error =
        gguf_error(|meta, _| set(meta, "general.architecture", Value::String("qwen2".into())));
    assert!(matches!(error, ConvertError::Unsupported { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("general.architecture is `qwen2`"),
        "{error}"
    );
}

#[test]
fn sentencepiece_tokenizer_rejected() {
    let error =
        gguf_error(|meta, _| set(meta, "tokenizer.ggml.model", Value::String("llama".into())));
    assert!(
        error
            .to_string()
            .contains("tokenizer.ggml.model is `llama`"),
        "{error}"
    );
}

#[test]
fn unknown_pre_tokenizer_rejected() {
    let error = gguf_error(|meta, _| {
        set(
            meta,
            "tokenizer.ggml.pre",
            Value::String("llama-bpe".into()),
        )
    });
    assert!(error.to_string().contains("llama-bpe"), "{error}");
}

#[test]
fn missing_metadata_key_named() {
    let error = gguf_error(|meta, _| meta.retain(|(k, _)| k != "llama.feed_forward_length"));
    assert!(
        error
            .to_string()
            .contains("`llama.feed_forward_length` is missing"),
        "{error}"
    );
}

#[test]
fn missing_tensor_named() {
    let error = gguf_error(|_, tensors| tensors.retain(|(name, _)| name != "blk.1.ffn_up.weight"));
    let message = error.to_string();
    assert!(
        message.contains("blk.1.ffn_up.weight")
            && message.contains("model.layers.1.mlp.up_proj.weight"),
        "{message}"
    );
}

#[test]
fn wrong_shape_named() {
    let error = gguf_error(|meta, _| set(meta, "llama.feed_forward_length", Value::U32(320)));
    let message = error.to_string();
    assert!(matches!(error, ConvertError::Tensor { .. }), "{message}");
    assert!(
        message.contains("ffn_") && message.contains("320"),
        "{message}"
    );
}

#[test]
fn unknown_tensor_named() {
    let error = gguf_error(|_, tensors| {
        let extra = QTensor::quantize(
            &Tensor::zeros(32, DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        tensors.push(("blk.0.attn_q.bias".into(), extra));
    });
    assert!(error.to_string().contains("blk.0.attn_q.bias"), "{error}");
}

#[test]
fn truncated_file_rejected() {
    let f = fixture(true);
    let dir = tempfile::tempdir().unwrap();
    let path = write_fixture(&f, Layout::uniform(GgmlDType::F32), dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let error = read_gguf(&path).expect_err("a truncated file should fail");
    assert!(error.to_string().contains("tiny.gguf"), "{error}");
}

#[test]
fn not_gguf_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.gguf");
    std::fs::write(&path, b"this is not a model file at all, just some text").unwrap();
    let error = read_gguf(&path).expect_err("text should fail");
    assert!(
        matches!(error, ConvertError::InvalidSource { .. }),
        "{error}"
    );
}
