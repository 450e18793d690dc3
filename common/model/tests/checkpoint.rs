//! Save/load round trips of weights, optimizer state and the Hugging Face
//! directory layout, and the errors a bad config or checkpoint produces.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{micro_config, micro_model, padded};
use troupe_model::{lm_loss, AdamW, AdamWConfig, Config, Error, Heads, Model, Tokenizer};

fn weights(model: &Model) -> Vec<(String, Vec<f32>)> {
    model
        .named_vars()
        .into_iter()
        .map(|(name, var)| {
            (
                name,
                var.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

fn batch() -> (Tensor, Tensor) {
    padded(
        &[vec![1, 5, 9, 13, 17, 21, 2], vec![1, 30, 31, 2]],
        0,
        false,
    )
}

fn logits(model: &Model) -> Vec<f32> {
    let (ids, mask) = batch();
    model
        .forward(&ids, Some(&mask))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn train_step(model: &Model, optimizer: &mut AdamW) {
    let (ids, mask) = batch();
    let logits = model.forward(&ids, Some(&mask)).unwrap();
    let loss = lm_loss(&logits, &ids, Some(&mask)).unwrap();
    let mut grads = loss.backward().unwrap();
    troupe_model::clip_grad_norm(&mut grads, &model.vars(), 1.0).unwrap();
    optimizer.step(&grads).unwrap();
}

#[test]
fn safetensors_round_trip_is_exact() {
    let model = micro_model(DType::F32, 21);
    let bytes = model.to_safetensors().unwrap();
    let loaded = Model::from_safetensors_bytes(model.config(), &bytes, &Device::Cpu).unwrap();
    assert_eq!(loaded.heads(), model.heads());
    assert_eq!(weights(&loaded), weights(&model));
    assert_eq!(logits(&loaded), logits(&model));
}

#[test]
fn training_resumes_exactly_from_saved_state() {
    let config = AdamWConfig {
        learning_rate: 1e-2,
        weight_decay: 0.1,
        ..Default::default()
    };
    let model = micro_model(DType::F32, 22);
    let mut optimizer = AdamW::new(model.named_vars(), config).unwrap();
    for _ in 0..3 {
        train_step(&model, &mut optimizer);
    }
    let model_bytes = model.to_safetensors().unwrap();
    let optimizer_bytes = optimizer.to_safetensors().unwrap();

    let resumed =
        Model::from_safetensors_bytes(model.config(), &model_bytes, &Device::Cpu).unwrap();
    let mut resumed_optimizer = AdamW::new(resumed.named_vars(), AdamWConfig::default()).unwrap();
    resumed_optimizer
        .load_safetensors(&optimizer_bytes)
        .unwrap();
    assert_eq!(resumed_optimizer.step_count(), 3);
    assert_eq!(resumed_optimizer.config(), optimizer.config());
    let saved: Vec<(String, Vec<f32>)> = optimizer
        .state_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    let restored: Vec<(String, Vec<f32>)> = resumed_optimizer
        .state_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    assert_eq!(saved, restored);

    for _ in 0..2 {
        train_step(&model, &mut optimizer);
        train_step(&resumed, &mut resumed_optimizer);
    }
    assert_eq!(
        weights(&resumed),
        weights(&model),
        "resumed training diverged"
    );
}

#[test]
fn optimizer_state_for_other_parameters_is_rejected() {
    let model = micro_model(DType::F32, 23);
    let optimizer = AdamW::new(model.named_vars(), AdamWConfig::default()).unwrap();
    let bytes = optimizer.to_safetensors().unwrap();
    let other = Model::new_random(
        &micro_config(true),
        Heads::default(),
        1,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut other_optimizer = AdamW::new(other.named_vars(), AdamWConfig::default()).unwrap();
    let err = other_optimizer
        .load_safetensors(&bytes)
        .unwrap_err()
        .to_string();
    assert!(err.contains("matches no parameter"), "{err}");
    assert!(other_optimizer
        .load_safetensors(b"not safetensors")
        .is_err());
}

#[test]
fn hf_dir_round_trip_keeps_logits_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = Tokenizer::train(["hello world", "hola mundo"].iter(), 300).unwrap();
    for tie in [true, false] {
        let cfg = micro_config(tie);
        let model =
            Model::new_random(&cfg, Heads::default(), 24, DType::F32, &Device::Cpu).unwrap();
        let path = dir.path().join(format!("tied-{tie}"));
        model.write_hf_dir(&path, Some(&tokenizer)).unwrap();

        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path.join("config.json")).unwrap()).unwrap();
        assert_eq!(written["model_type"], "llama");
        assert_eq!(written["architectures"][0], "LlamaForCausalLM");
        assert_eq!(written["tie_word_embeddings"], tie);
        let names = troupe_model::io::read_safetensors(
            &std::fs::read(path.join("model.safetensors")).unwrap(),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(names.contains_key("lm_head.weight"), !tie);
        assert!(names.contains_key("model.layers.1.self_attn.q_proj.weight"));
        assert!(names.contains_key("model.layers.0.mlp.gate_proj.weight"));
        assert!(names.contains_key("model.norm.weight"));

        let (loaded, loaded_tokenizer) = Model::load_hf_dir(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.config(), &cfg);
        assert_eq!(logits(&loaded), logits(&model));
        let loaded_tokenizer = loaded_tokenizer.expect("tokenizer.json was written");
        assert_eq!(
            loaded_tokenizer.encode("hello mundo").unwrap(),
            tokenizer.encode("hello mundo").unwrap()
        );
    }
}

#[test]
fn added_heads_survive_a_round_trip() {
    let mut model = Model::new_random(
        &micro_config(true),
        Heads::default(),
        25,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let before = logits(&model);
    model
        .add_heads(
            Heads {
                score: true,
                value: false,
            },
            3,
        )
        .unwrap();
    assert_eq!(
        logits(&model),
        before,
        "adding a head changed the language model"
    );
    let loaded = Model::from_safetensors_bytes(
        model.config(),
        &model.to_safetensors().unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        loaded.heads(),
        Heads {
            score: true,
            value: false
        }
    );
}

#[test]
fn bad_checkpoints_name_the_tensor() {
    let model = micro_model(DType::F32, 26);
    let tensors: Vec<(String, Tensor)> = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();

    let without: Vec<(String, Tensor)> = tensors
        .iter()
        .filter(|(n, _)| n != "model.norm.weight")
        .cloned()
        .collect();
    let bytes = troupe_model::io::write_safetensors(&without, None).unwrap();
    let err = Model::from_safetensors_bytes(model.config(), &bytes, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, Error::Tensor { name, .. } if name == "model.norm.weight"),
        "{err}"
    );

    let mut reshaped = tensors.clone();
    for (name, tensor) in reshaped.iter_mut() {
        if name == "model.layers.0.mlp.up_proj.weight" {
            *tensor = Tensor::zeros((3, 16), DType::F32, &Device::Cpu).unwrap();
        }
    }
    let bytes = troupe_model::io::write_safetensors(&reshaped, None).unwrap();
    let err = Model::from_safetensors_bytes(model.config(), &bytes, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.layers.0.mlp.up_proj.weight"), "{err}");
    assert!(err.contains("[3, 16]"), "{err}");

    let mut extra = tensors.clone();
    extra.push((
        "model.layers.0.self_attn.q_proj.bias".into(),
        Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap(),
    ));
    let bytes = troupe_model::io::write_safetensors(&extra, None).unwrap();
    let err = Model::from_safetensors_bytes(model.config(), &bytes, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("q_proj.bias"), "{err}");

    let err = Model::from_safetensors_bytes(model.config(), b"garbage", &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Safetensors(_)), "{err}");
}

#[test]
fn presets_match_reference_configs() {
    // The Hugging Face config.json files the reference PyTorch benchmark reads.
    let tiny = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":2048,"hidden_size":128,"intermediate_size":352,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":256,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":2}"#;
    let small = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":8192,"hidden_size":384,"intermediate_size":1024,"num_hidden_layers":6,"num_attention_heads":6,"num_key_value_heads":2,"max_position_embeddings":512,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":2}"#;
    assert_eq!(Config::from_json_str(tiny).unwrap(), Config::tiny());
    assert_eq!(Config::from_json_str(small).unwrap(), Config::small());
    assert_eq!(Config::preset("small").unwrap(), Config::small());
    assert!(Config::preset("huge").is_err());
    assert_eq!(Config::tiny().num_parameters(), 631_424);
    let model = Model::new_random(
        &Config::tiny(),
        Heads::default(),
        0,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(model.num_parameters(), Config::tiny().num_parameters());
    // Written and re-read, a config is unchanged.
    let text = Config::small().to_json_string();
    assert_eq!(Config::from_json_str(&text).unwrap(), Config::small());
    let via_serde: Config = serde_json::from_str(&text).unwrap();
    assert_eq!(via_serde, Config::small());
}

#[test]
fn bad_config_names_the_field() {
    let base = Config::tiny().to_json_value();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("hidden_size", serde_json::json!("wide"), "hidden_size"),
        (
            "num_key_value_heads",
            serde_json::json!(3),
            "num_key_value_heads",
        ),
        ("rms_norm_eps", serde_json::json!(-1.0), "rms_norm_eps"),
        ("eos_token_id", serde_json::json!(99999), "eos_token_id"),
        (
            "rope_scaling",
            serde_json::json!({"type": "linear", "factor": 2.0}),
            "rope_scaling",
        ),
        ("hidden_act", serde_json::json!("gelu"), "hidden_act"),
        (
            "tie_word_embeddings",
            serde_json::json!("yes"),
            "tie_word_embeddings",
        ),
    ];
    for (field, value, expected) in cases {
        let mut json = base.clone();
        json[field] = value;
        let err = Config::from_json_value(&json).unwrap_err().to_string();
        assert!(
            err.contains(expected),
            "setting {field}: error `{err}` should name `{expected}`"
        );
    }
    let mut json = base.clone();
    json.as_object_mut().unwrap().remove("vocab_size");
    let err = Config::from_json_value(&json).unwrap_err().to_string();
    assert!(err.contains("vocab_size"), "{err}");
    assert!(err.contains("missing"), "{err}");
    assert!(Config::from_json_str("{not json")
        .unwrap_err()
        .to_string()
        .contains("not valid JSON"));
}

#[test]
fn hf_dir_bad_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = micro_model(DType::F32, 27);
    model.write_hf_dir(dir.path(), None).unwrap();
    let config_path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace("\"intermediate_size\": 24", "\"intermediate_size\": \"24\"");
    std::fs::write(&config_path, text).unwrap();
    let err = Model::load_hf_dir(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    assert!(err.contains("intermediate_size"), "{err}");
    let err = Model::load_hf_dir(&dir.path().join("absent"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent"), "{err}");
}

#[test]
fn generate_reply_samples_from_hf_dir() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = Tokenizer::train(["the cat sat on the mat", "a dog ran"].iter(), 300).unwrap();
    let cfg = Config {
        vocab_size: tokenizer.vocab_size(),
        ..micro_config(true)
    };
    let model = Model::new_random(&cfg, Heads::default(), 28, DType::F32, &Device::Cpu).unwrap();
    model.write_hf_dir(dir.path(), Some(&tokenizer)).unwrap();

    let params = troupe_model::SamplingParams {
        temperature: 0.7,
        max_new_tokens: 5,
        seed: 4,
        ..Default::default()
    };
    let reply = troupe_model::generate_reply(dir.path(), "where is the cat?", &params).unwrap();
    assert!(!reply.tokens.is_empty());
    assert!(reply.tokens.len() <= 5);
    assert_eq!(reply.logprobs.len(), reply.tokens.len());
    assert_eq!(reply.text, tokenizer.decode(&reply.tokens, true).unwrap());
    let again = troupe_model::generate_reply(dir.path(), "where is the cat?", &params).unwrap();
    assert_eq!(again, reply);

    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = troupe_model::generate_reply(dir.path(), "hi", &params)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}
