//! Export of stored versions in Hugging Face layout, and the `troupe import`
//! / `troupe export` entry points.

mod common;

use candle_core::Device;
use troupe_convert::{
    export_hf_dir, run_export, run_import, ConvertError, ExportArgs, Format, ImportArgs,
    GENERATION_CONFIG_FILE,
};
use troupe_model::Model;
use troupe_store::{ModelKind, ModelRef, ModelRegistry, NewVersion, Store, StoreError};

async fn publish_random(
    registry: &ModelRegistry,
    name: &str,
    seed: u64,
) -> (Model, troupe_model::Tokenizer, ModelRef) {
    let tokenizer = common::tokenizer();
    let cfg = common::config(&tokenizer, false);
    let model = common::model(&cfg, seed);
    let new = NewVersion::new(
        name,
        ModelKind::Sft,
        model.to_safetensors().unwrap(),
        cfg.to_json_string().into_bytes(),
        tokenizer.to_json().unwrap().into_bytes(),
    );
    let manifest = registry.publish(new).await.unwrap();
    (model, tokenizer, manifest.model_ref())
}

#[tokio::test]
async fn export_reloads_with_same_logits() {
    let registry = ModelRegistry::new(Store::memory());
    let (model, tokenizer, model_ref) = publish_random(&registry, "tiny-sft", 31).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");

    let manifest = export_hf_dir(&registry, &model_ref, &out).await.unwrap();
    assert_eq!(manifest.model_ref(), model_ref);

    let (reloaded, reloaded_tokenizer) = Model::load_hf_dir(&out, &Device::Cpu).unwrap();
    assert_eq!(common::logits(&reloaded), common::logits(&model));
    assert_eq!(
        reloaded_tokenizer.unwrap().to_json().unwrap(),
        tokenizer.to_json().unwrap()
    );

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["architectures"],
        serde_json::json!(["LlamaForCausalLM"])
    );
    assert_eq!(config["model_type"], "llama");
    let generation: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(GENERATION_CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(generation["eos_token_id"], tokenizer.eos_id().unwrap());
    assert_eq!(generation["pad_token_id"], tokenizer.pad_id().unwrap());
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn export_then_import_round_trip() {
    let registry = ModelRegistry::new(Store::memory());
    let (model, _, model_ref) = publish_random(&registry, "tiny-sft", 32).await;
    let dir = tempfile::tempdir().unwrap();
    export_hf_dir(&registry, &model_ref, dir.path())
        .await
        .unwrap();

    let manifest = troupe_convert::import_hf_dir(dir.path(), &registry, "tiny-again")
        .await
        .unwrap();
    let loaded = registry.load(&manifest.model_ref()).await.unwrap();
    let cfg =
        troupe_model::Config::from_json_str(std::str::from_utf8(loaded.config()).unwrap()).unwrap();
    let imported = Model::from_safetensors_bytes(&cfg, loaded.weights(), &Device::Cpu).unwrap();
    assert_eq!(common::logits(&imported), common::logits(&model));
}

#[tokio::test]
async fn export_missing_version_fails() {
    let registry = ModelRegistry::new(Store::memory());
    let dir = tempfile::tempdir().unwrap();
    let error = export_hf_dir(&registry, &ModelRef::new("absent", 4), dir.path())
        .await
        .unwrap_err();
    assert!(
        matches!(error, ConvertError::Store(StoreError::NotFound { .. })),
        "{error}"
    );
    assert!(error.to_string().contains("absent@4"), "{error}");
}

#[tokio::test]
async fn export_rejects_mismatched_files() {
    // A version whose config.json does not fit its weights is not exported.
    let registry = ModelRegistry::new(Store::memory());
    let tokenizer = common::tokenizer();
    let cfg = common::config(&tokenizer, true);
    let model = common::model(&cfg, 33);
    let mut wrong = cfg.clone();
    wrong.num_hidden_layers = 3;
    let new = NewVersion::new(
        "broken",
        ModelKind::Base,
        model.to_safetensors().unwrap(),
        wrong.to_json_string().into_bytes(),
        tokenizer.to_json().unwrap().into_bytes(),
    );
    let model_ref = registry.publish(new).await.unwrap().model_ref();
    let dir = tempfile::tempdir().unwrap();
    let error = export_hf_dir(&registry, &model_ref, dir.path())
        .await
        .unwrap_err();
    assert!(matches!(error, ConvertError::StoredModel { .. }), "{error}");
    assert!(
        error.to_string().contains("broken@1") && error.to_string().contains("model.layers.2"),
        "{error}"
    );
    assert!(!dir.path().join("model.safetensors").exists());
}

#[tokio::test]
async fn cli_import_then_export_latest() {
    let registry = ModelRegistry::new(Store::memory());
    let (model, tokenizer, model_ref) = publish_random(&registry, "tiny-sft", 34).await;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("My Model");
    export_hf_dir(&registry, &model_ref, &source).await.unwrap();
    drop(tokenizer);

    // `auto` picks hf for a directory; the name comes from the directory.
    let import = ImportArgs {
        source: source.clone(),
        name: None,
        format: Format::Auto,
    };
    let manifest = run_import(&import, &registry).await.unwrap();
    assert_eq!(manifest.model_ref(), ModelRef::new("My-Model", 1));
    let manifest = run_import(&import, &registry).await.unwrap();
    assert_eq!(manifest.version, 2);

    for spec in ["My-Model", "My-Model:2", "My-Model@1"] {
        let out = dir.path().join(spec.replace([':', '@'], "_"));
        let export = ExportArgs {
            model: spec.into(),
            out: out.clone(),
        };
        let manifest = run_export(&export, &registry).await.unwrap();
        let expected = if spec.ends_with('1') { 1 } else { 2 };
        assert_eq!(manifest.version, expected, "{spec}");
        let (reloaded, _) = Model::load_hf_dir(&out, &Device::Cpu).unwrap();
        assert_eq!(common::logits(&reloaded), common::logits(&model), "{spec}");
    }
}

#[tokio::test]
async fn cli_format_mismatch_reported() {
    let registry = ModelRegistry::new(Store::memory());
    let dir = tempfile::tempdir().unwrap();
    let import = ImportArgs {
        source: dir.path().to_path_buf(),
        name: Some("x".into()),
        format: Format::Gguf,
    };
    let error = run_import(&import, &registry).await.unwrap_err();
    assert!(
        matches!(&error, ConvertError::Settings(p) if p.len() == 1),
        "{error}"
    );
    assert!(error.to_string().contains("is a directory"), "{error}");

    let text = dir.path().join("model.bin");
    std::fs::write(&text, b"not a model").unwrap();
    let import = ImportArgs {
        source: text,
        name: Some("x".into()),
        format: Format::Auto,
    };
    let error = run_import(&import, &registry).await.unwrap_err();
    assert!(error.to_string().contains("--format"), "{error}");

    let export = ExportArgs {
        model: "nothing-here".into(),
        out: dir.path().join("out"),
    };
    let error = run_export(&export, &registry).await.unwrap_err();
    assert!(error.to_string().contains("nothing-here"), "{error}");
}
