//! Hugging Face directory import: round trips through the registry give the
//! same logits, sharded and bf16 checkpoints load, and broken directories
//! fail with the file and tensor named.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use troupe_convert::{import_hf_dir, read_hf_dir, ConvertError};
use troupe_model::Model;
use troupe_store::{ModelKind, ModelRegistry, Store};

/// Writes `model` as a Hugging Face directory (single safetensors file).
fn write_dir(model: &Model, tokenizer: &troupe_model::Tokenizer, dir: &Path) {
    model.write_hf_dir(dir, Some(tokenizer)).unwrap();
}

fn tensors(model: &Model) -> HashMap<String, Tensor> {
    model
        .named_vars()
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect()
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_vec(&value).unwrap()).unwrap();
}

#[tokio::test]
async fn hf_round_trip_exact() {
    let tokenizer = common::tokenizer();
    for tied in [true, false] {
        let cfg = common::config(&tokenizer, tied);
        let source = common::model(&cfg, 7);
        let dir = tempfile::tempdir().unwrap();
        write_dir(&source, &tokenizer, dir.path());

        let registry = ModelRegistry::new(Store::memory());
        let manifest = import_hf_dir(dir.path(), &registry, "tiny-hf")
            .await
            .unwrap();
        assert_eq!(manifest.kind, ModelKind::Base);
        assert_eq!(manifest.version, 1);
        assert_eq!(manifest.metadata["source"]["format"], "hf");

        let loaded = registry.load(&manifest.model_ref()).await.unwrap();
        let stored_cfg =
            troupe_model::Config::from_json_str(std::str::from_utf8(loaded.config()).unwrap())
                .unwrap();
        assert_eq!(stored_cfg, cfg, "tied = {tied}");
        let imported =
            Model::from_safetensors_bytes(&stored_cfg, loaded.weights(), &Device::Cpu).unwrap();
        assert_eq!(
            common::logits(&imported),
            common::logits(&source),
            "tied = {tied}"
        );
        assert_eq!(
            loaded.tokenizer().as_ref(),
            std::fs::read(dir.path().join("tokenizer.json"))
                .unwrap()
                .as_slice()
        );
    }
}

#[test]
fn sharded_bf16_checkpoint_loads() {
    let tokenizer = common::tokenizer();
    let cfg = common::config(&tokenizer, false);
    let source = common::model(&cfg, 8);
    let dir = tempfile::tempdir().unwrap();
    write_dir(&source, &tokenizer, dir.path());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();

    // Two bf16 shards split by layer, plus an index, as transformers writes them.
    let all = tensors(&source);
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (name, tensor) in &all {
        let shard = usize::from(name.starts_with("model.layers.1") || name == "lm_head.weight");
        let file = format!("model-{:05}-of-00002.safetensors", shard + 1);
        shards[shard].insert(name.clone(), tensor.to_dtype(DType::BF16).unwrap());
        weight_map.insert(name.clone(), file.into());
    }
    for (index, shard) in shards.iter().enumerate() {
        let file = dir
            .path()
            .join(format!("model-{:05}-of-00002.safetensors", index + 1));
        candle_core::safetensors::save(shard, file).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let imported = read_hf_dir(dir.path()).unwrap();
    assert_eq!(imported.source["tensor_dtypes"]["bf16"], all.len());

    // The reference: the source weights rounded to bf16 and back.
    let rounded: HashMap<String, Tensor> = all
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            )
        })
        .collect();
    let reference = Model::from_tensors(&cfg, rounded, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(common::logits(&imported.model), common::logits(&reference));
    assert_ne!(
        common::logits(&imported.model),
        common::logits(&source),
        "bf16 rounding should change something"
    );
}

/// A valid directory, then `break_it` applied; returns the import error.
fn import_error(break_it: impl FnOnce(&Path)) -> ConvertError {
    let tokenizer = common::tokenizer();
    let cfg = common::config(&tokenizer, true);
    let dir = tempfile::tempdir().unwrap();
    write_dir(&common::model(&cfg, 9), &tokenizer, dir.path());
    break_it(dir.path());
    read_hf_dir(dir.path()).expect_err("the import should fail")
}

#[test]
fn other_architecture_rejected() {
    let error = import_error(|dir| {
        edit_config(dir, |c| {
            c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
            c["model_type"] = "mistral".into();
        })
    });
    assert!(matches!(error, ConvertError::Unsupported { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("config.json") && message.contains("MistralForCausalLM"),
        "{message}"
    );
}

#[test]
fn wrong_shape_names_file_and_tensor() {
    let error = import_error(|dir| edit_config(dir, |c| c["intermediate_size"] = 320.into()));
    let message = error.to_string();
    assert!(matches!(error, ConvertError::Tensor { .. }), "{message}");
    assert!(message.contains("model.safetensors"), "{message}");
    assert!(
        message.contains("mlp.down_proj.weight") || message.contains("mlp.gate_proj.weight"),
        "{message}"
    );
    assert!(
        message.contains("[128, 320]") || message.contains("[320, 128]"),
        "{message}"
    );
}

#[test]
fn missing_tensor_named() {
    let error = import_error(|dir| {
        let path = dir.join("model.safetensors");
        let mut all = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        all.remove("model.layers.1.self_attn.k_proj.weight");
        candle_core::safetensors::save(&all, &path).unwrap();
    });
    let message = error.to_string();
    assert!(
        message.contains("model.layers.1.self_attn.k_proj.weight") && message.contains("missing"),
        "{message}"
    );
}

#[test]
fn extra_layer_rejected() {
    let error = import_error(|dir| edit_config(dir, |c| c["num_hidden_layers"] = 1.into()));
    let message = error.to_string();
    assert!(message.contains("model.layers.1."), "{message}");
    assert!(message.contains("num_hidden_layers"), "{message}");
}

#[test]
fn missing_tokenizer_rejected() {
    let error = import_error(|dir| std::fs::remove_file(dir.join("tokenizer.json")).unwrap());
    assert!(
        matches!(&error, ConvertError::Io { path, .. } if path.ends_with("tokenizer.json")),
        "{error}"
    );
}

#[test]
fn missing_weights_rejected() {
    let error = import_error(|dir| {
        std::fs::rename(dir.join("model.safetensors"), dir.join("pytorch_model.bin")).unwrap()
    });
    let message = error.to_string();
    assert!(
        message.contains("model.safetensors.index.json") && message.contains("pickle"),
        "{message}"
    );
}

#[test]
fn index_with_missing_shard_rejected() {
    let error = import_error(|dir| {
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
        let index = serde_json::json!({"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    });
    assert!(
        matches!(&error, ConvertError::Io { path, .. } if path.ends_with("model-00001-of-00001.safetensors")),
        "{error}"
    );
}

#[test]
fn index_path_escape_rejected() {
    let error = import_error(|dir| {
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
        let index =
            serde_json::json!({"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    });
    assert!(error.to_string().contains("plain file name"), "{error}");
}

#[test]
fn integer_tensor_rejected() {
    let error = import_error(|dir| {
        let path = dir.join("model.safetensors");
        let mut all = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let norm = all["model.norm.weight"].to_dtype(DType::U32).unwrap();
        all.insert("model.norm.weight".into(), norm);
        candle_core::safetensors::save(&all, &path).unwrap();
    });
    let message = error.to_string();
    assert!(
        message.contains("model.norm.weight") && message.contains("U32"),
        "{message}"
    );
}
