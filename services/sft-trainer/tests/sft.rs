//! Stage 2 acceptance: loss masks, learning to stop on the capitals quiz, and
//! bad demonstration files.

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use candle_core::{DType, Device};
use troupe_bus::memory::MemoryBus;
use troupe_bus::BusHandle;
use troupe_data::Demonstration;
use troupe_model::{lm_loss, token_logprobs, Config, Heads, Model, Tokenizer};
use troupe_sft_trainer::data::{make_batch, render};
use troupe_sft_trainer::{fine_tune, Settings, SftError};
use troupe_store::{ModelKind, ModelRef, ModelRegistry, NewVersion, Store};
use troupe_wire::RunId;

fn sft_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/sft")
        .join(name)
}

fn bus() -> BusHandle {
    BusHandle::new(MemoryBus::new(RunId::new("sft").unwrap()))
}

/// Trains a tokenizer on the capitals quiz and builds a random tiny model over it.
fn random_base() -> (Model, Tokenizer) {
    let demonstrations = troupe_data::read_demonstrations(
        sft_file("capitals.train.jsonl"),
        troupe_data::Mode::Strict,
    )
    .unwrap();
    let texts: Vec<String> = demonstrations
        .into_values()
        .iter()
        .map(|d| format!("{}\n{}", d.prompt()[0].content, d.response()))
        .collect();
    let tokenizer = Tokenizer::train(texts.iter(), 512).unwrap();
    let mut config = Config::tiny();
    config.vocab_size = tokenizer.vocab_size();
    config.pad_token_id = tokenizer.pad_id();
    let model = Model::new_random(&config, Heads::default(), 3, DType::F32, &Device::Cpu).unwrap();
    (model, tokenizer)
}

/// Publishes `model` as `base@1` in a fresh store.
async fn store_with_base(model: &Model, tokenizer: &Tokenizer, store: &Store) -> ModelRef {
    let version = NewVersion::new(
        "base",
        ModelKind::Base,
        Bytes::from(model.to_safetensors().unwrap()),
        Bytes::from(model.config().to_json_string()),
        Bytes::from(tokenizer.to_json().unwrap()),
    );
    ModelRegistry::new(store.clone())
        .publish(version)
        .await
        .unwrap()
        .model_ref()
}

#[test]
fn loss_mask_covers_response_and_eos_only() {
    let (model, tokenizer) = random_base();
    let demonstration =
        Demonstration::from_prompt_response("What is the capital of Peru?", "Lima").unwrap();
    let example = render(&tokenizer, &demonstration).unwrap();
    let eos = tokenizer.eos_id().unwrap();
    let response_len = tokenizer.encode("Lima").unwrap().len();

    // The mask is 1 on the response text and its EOS, 0 on everything before.
    assert_eq!(*example.ids.last().unwrap(), eos);
    assert_eq!(
        *example.response_mask.last().unwrap(),
        1,
        "EOS must carry loss"
    );
    let masked: usize = example.response_mask.iter().map(|&m| m as usize).sum();
    assert_eq!(masked, response_len + 1);
    let prompt_len = example.ids.len() - response_len - 1;
    assert!(
        example.response_mask[..prompt_len].iter().all(|&m| m == 0),
        "prompt tokens must carry no loss"
    );
    assert_eq!(example.prompt_ids, example.ids[..prompt_len]);

    // Padded next to a longer example, the padding carries neither attention nor loss.
    let longer = render(
        &tokenizer,
        &Demonstration::from_prompt_response("What is the capital of Burkina Faso?", "Ouagadougou")
            .unwrap(),
    )
    .unwrap();
    let pad = tokenizer.pad_id().unwrap();
    assert_ne!(pad, eos);
    let batch = make_batch(&[&example, &longer], pad, &Device::Cpu).unwrap();
    let loss_mask: Vec<Vec<u32>> = batch.loss_mask.to_vec2().unwrap();
    let attention: Vec<Vec<u32>> = batch.attention_mask.to_vec2().unwrap();
    let ids: Vec<Vec<u32>> = batch.ids.to_vec2().unwrap();
    for j in example.ids.len()..longer.ids.len() {
        assert_eq!(
            (ids[0][j], attention[0][j], loss_mask[0][j]),
            (pad, 0, 0),
            "column {j}"
        );
    }

    // The masked loss is the mean negative log-prob of exactly those tokens.
    let logits = model
        .forward(&batch.ids, Some(&batch.attention_mask))
        .unwrap();
    let loss = lm_loss(&logits, &batch.ids, Some(&batch.loss_mask))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let logprobs: Vec<Vec<f32>> = token_logprobs(&logits, &batch.ids, 1.0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let (mut sum, mut count) = (0.0f32, 0.0f32);
    for (row, mask) in loss_mask.iter().enumerate() {
        for (j, &m) in mask.iter().enumerate() {
            if m == 1 {
                sum -= logprobs[row][j];
                count += 1.0;
            }
        }
    }
    assert!(
        (loss - sum / count).abs() < 1e-4,
        "masked loss {loss} vs manual {}",
        sum / count
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fine_tuned_model_learns_to_stop() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let (model, tokenizer) = random_base();
    let store = Store::memory();
    let base = store_with_base(&model, &tokenizer, &store).await;

    let mut settings = Settings::from_args(&["sft".to_string()]).unwrap();
    settings.demonstrations = vec![sft_file("capitals.train.jsonl")];
    settings.heldout = vec![sft_file("capitals.heldout.jsonl")];
    settings.base = base.to_string();
    settings.eval_every = 0;
    let started = Instant::now();
    let outcome = fine_tune(&settings, &bus(), &store, std::future::pending())
        .await
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();

    let before = outcome.eos_rate_before.unwrap();
    println!(
        "capitals, {} steps of {} examples: held-out response loss {:.4} -> {:.4}, EOS rate {before:.3} -> {:.3} \
         ({} held-out prompts, {} new tokens max), {seconds:.1} s wall",
        settings.steps,
        settings.batch_size,
        outcome.heldout_loss_before.unwrap(),
        outcome.heldout_loss,
        outcome.eos_rate,
        outcome.heldout_examples,
        settings.eval_max_new_tokens,
    );
    assert!(
        before < 0.2,
        "the random base already ends {before} of responses with EOS"
    );
    assert!(
        outcome.eos_rate >= 0.95,
        "only {} of held-out responses end with EOS",
        outcome.eos_rate
    );
    assert!(outcome.heldout_loss < outcome.heldout_loss_before.unwrap());

    let registry = ModelRegistry::new(store);
    let lineage = registry.lineage(&outcome.model).await.unwrap();
    assert_eq!(lineage.len(), 2);
    assert_eq!(lineage[0].kind, ModelKind::Sft);
    assert_eq!(lineage[1].model_ref(), base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_demonstrations_fail_and_leave_store_unchanged() {
    let (model, tokenizer) = random_base();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::from_url(dir.path().join("store").to_str().unwrap()).unwrap();
    store_with_base(&model, &tokenizer, &store).await;
    let objects_before = store.list(None).await.unwrap().len();

    let missing_field = dir.path().join("missing.jsonl");
    std::fs::write(
        &missing_field,
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"no response\"}\n",
    )
    .unwrap();
    let nothing_valid = dir.path().join("blank.jsonl");
    std::fs::write(&nothing_valid, "\n\n").unwrap();
    let cases = [
        (missing_field, "missing.jsonl:2"),
        (nothing_valid, "no valid records"),
    ];

    for (file, expected) in cases {
        let mut settings = Settings::from_args(&["sft".to_string()]).unwrap();
        settings.demonstrations = vec![file];
        settings.heldout = vec![];
        let error = fine_tune(&settings, &bus(), &store, std::future::pending())
            .await
            .unwrap_err();
        assert!(matches!(error, SftError::Data(_)), "{error}");
        assert!(error.to_string().contains(expected), "{error}");
        assert_eq!(store.list(None).await.unwrap().len(), objects_before);
    }

    let mut settings = Settings::from_args(&["sft".to_string()]).unwrap();
    settings.base = "nothing-here".into();
    let error = fine_tune(&settings, &bus(), &store, std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(error, SftError::Base { .. }), "{error}");
    assert_eq!(store.list(None).await.unwrap().len(), objects_before);
}
