//! PPO at tiny scale on the in-process bus with the real sampler: a short
//! SFT run gives the reference, a scorer task scores rollouts with the
//! scripted labeler's rule (standing in for a trained reward model), and the
//! learner is killed mid-run and restarted before it finishes.
//!
//! Run with `--nocapture` to see the numbers recorded in docs/benchmarks.md.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::{Device, Tensor};
use troupe_bus::memory::MemoryBus;
use troupe_bus::{BusHandle, QueueConfig};
use troupe_labeler::{score_response, Preference};
use troupe_model::{generate, lm_loss, AdamW, AdamWConfig, GenerateOptions, Model, SamplingParams, Tokenizer};
use troupe_ppo_learner::Settings;
use troupe_sampler::{SamplerSettings, StatusHandle};
use troupe_store::{ModelKind, ModelRegistry, NewVersion, Store};
use troupe_wire::{Envelope, FinishReason, JobProgress, Rollout, RunId, ScoredRollout};

const SFT_STEPS: usize = 40;
const PPO_STEPS: u64 = 30;
const KILL_AFTER_STEP: u64 = 10;
const MAX_NEW_TOKENS: u32 = 16;
/// Bound on the final per-sequence KL to the reference, in nats.
const KL_BOUND: f64 = 10.0;

fn preference() -> Preference {
    Preference { max_tokens: 4, ..Preference::default() }
}

fn prompt_pairs(file: &str) -> Vec<(String, String)> {
    let loaded = troupe_data::read_demonstrations(common::data_path(file), troupe_data::Mode::Strict).unwrap();
    loaded.into_values().into_iter().map(|d| (d.prompt()[0].content.clone(), d.response().to_string())).collect()
}

/// Trains the reference with a few SFT steps on the capitals demonstrations.
/// The result ends with EOS but is not yet brief.
fn sft(tokenizer: &Tokenizer) -> Model {
    let cfg = common::micro_config(tokenizer.vocab_size());
    let model = common::random_model(&cfg, false, 11);
    let mut optimizer = AdamW::new(model.named_vars(), AdamWConfig { learning_rate: 3e-3, ..AdamWConfig::default() }).unwrap();
    let examples: Vec<_> = prompt_pairs("sft/capitals.train.jsonl")
        .into_iter()
        .map(|(p, r)| tokenizer.render_prompt_response(&p, &r).unwrap())
        .collect();
    for step in 0..SFT_STEPS {
        let batch: Vec<_> = (0..16).map(|i| &examples[(step * 16 + i) % examples.len()]).collect();
        let t = batch.iter().map(|e| e.ids.len()).max().unwrap();
        let mut ids = Vec::new();
        let mut attention = Vec::new();
        let mut loss_mask = Vec::new();
        for e in &batch {
            let pad = t - e.ids.len();
            ids.extend(e.ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
            attention.extend(std::iter::repeat_n(1u8, e.ids.len()).chain(std::iter::repeat_n(0, pad)));
            loss_mask.extend(e.response_mask.iter().map(|&m| f32::from(m)).chain(std::iter::repeat_n(0.0, pad)));
        }
        let ids = Tensor::from_vec(ids, (batch.len(), t), &Device::Cpu).unwrap();
        let attention = Tensor::from_vec(attention, (batch.len(), t), &Device::Cpu).unwrap();
        let loss_mask = Tensor::from_vec(loss_mask, (batch.len(), t), &Device::Cpu).unwrap();
        let logits = model.forward(&ids, Some(&attention)).unwrap();
        let loss = lm_loss(&logits, &ids, Some(&loss_mask)).unwrap();
        optimizer.step(&loss.backward().unwrap()).unwrap();
    }
    model
}

/// Mean labeler score of `model` on the held-out prompts, 4 samples each at temperature 1.
fn evaluate(model: &Model, tokenizer: &Tokenizer) -> (f64, f64) {
    let pairs = prompt_pairs("sft/capitals.heldout.jsonl");
    let mut prompts = Vec::new();
    let mut params = Vec::new();
    let mut references = Vec::new();
    for (i, (prompt, reference)) in pairs.iter().enumerate() {
        for j in 0..4 {
            prompts.push(tokenizer.render_prompt(prompt).unwrap());
            params.push(SamplingParams { temperature: 1.0, max_new_tokens: MAX_NEW_TOKENS as usize, seed: 1000 + (i * 4 + j) as u64, ..SamplingParams::default() });
            references.push(reference.clone());
        }
    }
    let outputs = generate(model, tokenizer, &prompts, &params, &GenerateOptions::default()).unwrap();
    let mut total = 0.0;
    let mut eos = 0;
    for (out, reference) in outputs.iter().zip(&references) {
        let finish = if out.finish_reason == troupe_model::FinishReason::Eos { FinishReason::Eos } else { FinishReason::Length };
        eos += usize::from(finish == FinishReason::Eos);
        total += score_response(&preference(), &out.text, finish, out.tokens.len() as u32, Some(reference));
    }
    (total / outputs.len() as f64, eos as f64 / outputs.len() as f64)
}

/// Scores every rollout with the labeler's rule, centered on 1.75, and
/// publishes it on `scored`; counts what it published.
async fn scorer(bus: BusHandle, published: Arc<AtomicU64>) {
    let mut queue = bus.queue(QueueConfig::new("test-scorer", &bus.subjects().rollouts())).await.unwrap();
    loop {
        let (envelope, delivery) = match queue.next_message::<Rollout>().await {
            Ok(next) => next,
            Err(error) => panic!("scorer queue failed: {error}"),
        };
        let rollout = envelope.payload;
        let raw = score_response(&preference(), &rollout.response, rollout.finish_reason, rollout.response_tokens.len() as u32, None);
        // The rollout's own id is taken on the bus, so the scored message gets another.
        let id = format!("scored-{}", rollout.rollout_id);
        let scored = ScoredRollout {
            rollout,
            raw_score: raw as f32,
            score: (raw - 1.0) as f32,
            reward_model: troupe_wire::ModelRef { name: "labeler-rule".into(), version: 1 },
        };
        let envelope = Envelope::with_id(bus.subjects().run().as_str(), id, troupe_wire::codec::now_ms(), scored);
        if bus.publish_durable(&bus.subjects().scored(), &envelope).await.unwrap().duplicate {
            delivery.ack().await.unwrap();
            continue;
        }
        published.fetch_add(1, Ordering::SeqCst);
        delivery.ack().await.unwrap();
    }
}

async fn load_version(registry: &ModelRegistry, name: &str, version: u64) -> (Model, serde_json::Value) {
    let model = troupe_store::ModelRef::new(name, version);
    let restored = troupe_train::load_checkpoint(registry, &model, &Device::Cpu).await.unwrap();
    let state = registry.load_file(&model, "ppo_state.json").await.unwrap();
    (restored.model, serde_json::from_slice(&state).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ppo_raises_labeler_score_and_survives_a_restart() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let started = Instant::now();
    let tokenizer = common::capitals_tokenizer(320);
    let sft_model = sft(&tokenizer);
    let (sft_score, sft_eos) = evaluate(&sft_model, &tokenizer);
    eprintln!("sft: mean labeler score {sft_score:.3}, eos rate {sft_eos:.2} ({:.1}s)", started.elapsed().as_secs_f64());

    let store = Store::memory();
    let registry = ModelRegistry::new(store.clone());
    registry
        .publish(NewVersion::new(
            "sft",
            ModelKind::Sft,
            Bytes::from(sft_model.to_safetensors().unwrap()),
            Bytes::from(sft_model.config().to_json_string()),
            Bytes::from(tokenizer.to_json().unwrap()),
        ))
        .await
        .unwrap();

    let bus = BusHandle::new(MemoryBus::new(RunId::new("ppo-e2e").unwrap()));
    let status = StatusHandle::new();
    let sampler = tokio::spawn(troupe_sampler::run_with_status(SamplerSettings::new("policy"), bus.clone(), store.clone(), status.clone(), std::future::pending()));
    let published = Arc::new(AtomicU64::new(0));
    let scorer_task = tokio::spawn(scorer(bus.clone(), published.clone()));

    let prompts = vec![common::data_path("sft/capitals.train.jsonl")];
    let mut settings = Settings::new("sft", prompts);
    settings.steps = PPO_STEPS;
    settings.batch_size = 16;
    settings.rollouts_per_prompt = 4;
    settings.minibatch_size = 8;
    settings.epochs = 2;
    settings.learning_rate = 3e-4;
    settings.kl_coef = 0.02;
    settings.kl_target = Some(4.0);
    settings.kl_horizon = 1000.0;
    settings.max_new_tokens = MAX_NEW_TOKENS;
    settings.ack_wait_secs = 2.0;

    // First run, killed while it waits for rollouts after KILL_AFTER_STEP.
    let mut progress = bus.subscribe(&bus.subjects().progress()).await.unwrap();
    let first = tokio::spawn(troupe_ppo_learner::run(settings.clone(), bus.clone(), store.clone(), std::future::pending()));
    loop {
        let message = tokio::time::timeout(Duration::from_secs(300), progress.next()).await.expect("progress within 5 minutes").unwrap();
        let update: Envelope<JobProgress> = message.decode().unwrap();
        if update.payload.step >= KILL_AFTER_STEP {
            break;
        }
    }
    first.abort();
    let _ = first.await;
    let killed_at = registry.latest("policy").await.unwrap().unwrap().model_ref();
    let (_, killed_state) = load_version(&registry, "policy", killed_at.version).await;
    let steps_before_kill = killed_state["step"].as_u64().unwrap();
    eprintln!("killed after step {steps_before_kill}, newest version {killed_at}");

    // While the learner is down the sampler keeps the last announced version.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let serving = status.serving().expect("the sampler serves a version");
    assert_eq!((serving.name.as_str(), serving.version), ("policy", killed_at.version));

    // Restart: it resumes from the checkpoint and finishes the job.
    let summary = tokio::time::timeout(Duration::from_secs(600), troupe_ppo_learner::run(settings.clone(), bus.clone(), store.clone(), std::future::pending()))
        .await
        .expect("the resumed run finishes")
        .unwrap();
    assert!(summary.finished);
    assert_eq!(summary.job_steps, PPO_STEPS);
    assert_eq!(summary.steps_run, PPO_STEPS - steps_before_kill);
    let accounted = steps_before_kill * settings.batch_size as u64 + summary.trained + summary.stale + summary.duplicates;
    let total_published = published.load(Ordering::SeqCst);
    eprintln!("scored published {total_published}, accounted {accounted}: {summary:?}");
    assert_eq!(summary.rejected, 0);
    assert_eq!(accounted, total_published, "every scored rollout is trained on, stale or a duplicate");

    // Lineage: each version's parent is the previous one, back to the SFT model.
    let final_ref = summary.final_version.clone().unwrap();
    let lineage = registry.lineage(&final_ref).await.unwrap();
    assert_eq!(lineage.len() as u64, PPO_STEPS + 2, "policy versions 1..=steps+1 and sft@1");

    let (policy, final_state) = load_version(&registry, &final_ref.name, final_ref.version).await;
    let (ppo_score, ppo_eos) = evaluate(&policy, &tokenizer);
    let final_metrics: BTreeMap<String, f64> = serde_json::from_value(
        registry.manifest(&final_ref).await.unwrap().metadata["metrics"].clone(),
    )
    .unwrap();
    let final_kl = final_metrics["kl"];
    eprintln!(
        "ppo: mean labeler score {ppo_score:.3} (sft {sft_score:.3}), eos rate {ppo_eos:.2} (sft {sft_eos:.2}), final kl {final_kl:.3}, kl coef {:.4}, total {:.1}s",
        final_state["kl_controller"]["coef"].as_f64().unwrap(),
        started.elapsed().as_secs_f64()
    );
    assert!(ppo_score > sft_score + 0.25, "PPO did not raise the score: {sft_score:.3} -> {ppo_score:.3}");
    assert!(final_kl < KL_BOUND, "final KL {final_kl} over {KL_BOUND}");

    sampler.abort();
    scorer_task.abort();
}
