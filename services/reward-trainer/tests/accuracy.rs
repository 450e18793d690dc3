//! Trains a reward model on preferences that the scripted labeler gave to
//! candidate sets built from the shipped SFT demonstrations, and checks the
//! held-out pairwise accuracy, the stored version and its announcement.
//!
//! Each prompt gets four candidates, as a sampler with a token limit would
//! produce them. They are its reference answer ending with EOS, that answer
//! cut off at the limit (no EOS), another prompt's answer ending with EOS,
//! and another prompt's answer cut off. The labeler's default rule (reference
//! answer 2, EOS 1, at most 64 tokens 0.5) orders them; the two cut-off
//! answers tie, so that pair never reaches the loss.

mod common;

use std::collections::BTreeMap;

use troupe_bus::memory::MemoryBus;
use troupe_bus::BusHandle;
use troupe_labeler::{rank, Preference};
use troupe_ranking_intake::record::segment_id;
use troupe_ranking_intake::{pairs_from_order, PreferenceRecord, Source};
use troupe_reward_trainer::{train_reward_model, RewardModel, Settings};
use troupe_store::{Datasets, ModelKind, ModelRegistry, Store};
use troupe_wire::{Candidate, CandidateSet, FinishReason, ModelAnnouncement, ModelRef, Ranking, RunId, SamplingParams};

/// Token limit of the simulated sampler.
const MAX_NEW_TOKENS: usize = 6;

fn sampling() -> SamplingParams {
    SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: MAX_NEW_TOKENS as u32, seed: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labeler_preferences_learned() {
    let tokenizer = common::tokenizer(&["data/sft/capitals.train.jsonl", "data/sft/chatterbot_english.train.jsonl"], 512);
    let store = Store::memory();
    let registry = ModelRegistry::new(store.clone());
    let base_model = common::tiny_model(&tokenizer, Default::default(), 1);
    let base = common::store_model(&registry, "sft", ModelKind::Sft, &base_model, &tokenizer).await;

    // Candidate sets ranked by the labeler, stored as the intake stores them.
    let mut demos = common::demonstrations("data/sft/capitals.train.jsonl");
    demos.extend(common::demonstrations("data/sft/chatterbot_english.train.jsonl").into_iter().take(400));
    let datasets = Datasets::new(store.clone());
    let preference = Preference::default();
    let mut stored = 0;
    for (index, (prompt, response)) in demos.iter().enumerate() {
        let (_, other) = &demos[(index * 7 + 3) % demos.len()];
        if other == response {
            continue;
        }
        let candidate = |id: &str, text: &str, cut: bool| {
            let ids = tokenizer.encode(text).unwrap();
            if cut && ids.len() > MAX_NEW_TOKENS {
                let text = tokenizer.decode(&ids[..MAX_NEW_TOKENS], true).unwrap();
                Candidate { candidate_id: id.into(), text, finish_reason: FinishReason::Length, token_count: MAX_NEW_TOKENS as u32 }
            } else {
                Candidate { candidate_id: id.into(), text: text.into(), finish_reason: FinishReason::Eos, token_count: ids.len() as u32 + 1 }
            }
        };
        let set = CandidateSet {
            set_id: format!("set-{index}"),
            prompt_id: format!("prompt-{index}"),
            prompt: prompt.clone(),
            reference: Some(response.clone()),
            policy: ModelRef { name: "sft".into(), version: 1 },
            sampling: sampling(),
            candidates: vec![
                candidate("A", response, false),
                candidate("B", response, true),
                candidate("C", other, false),
                candidate("D", other, true),
            ],
            expires_at_ms: None,
        };
        let Some(order) = rank(&preference, &set) else { continue };
        let ranking = Ranking { ranking_id: format!("labeler-{index}"), set_id: set.set_id.clone(), labeler: "labeler".into(), order, note: None };
        let record = PreferenceRecord::new(&set, &ranking, pairs_from_order(&ranking.order), Source::Bus, 0, 0);
        datasets.append("preferences", &segment_id(&ranking.ranking_id), serde_json::to_vec(&record).unwrap()).await.unwrap();
        stored += 1;
    }
    assert!(stored > 500, "only {stored} records");

    let bus = BusHandle::new(MemoryBus::new(RunId::new("reward-accuracy").unwrap()));
    let mut args: Vec<String> = [
        "x", "--steps=160", "--batch-size=8", "--learning-rate=2e-3", "--min-learning-rate=2e-4", "--warmup-steps=5",
        "--eval-every=20", "--patience=3", "--max-tokens=48", "--heldout-fraction=0.15",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--eval-jsonl={}", common::data_path("data/preference/bigbench_hhh_alignment.jsonl").display()));
    let settings = Settings::from_args(&args).unwrap();
    let started = std::time::Instant::now();
    let outcome = train_reward_model(&settings, &bus, &store, std::future::pending()).await.unwrap();
    let hhh = &outcome.eval["bigbench_hhh_alignment"];
    eprintln!(
        "held-out accuracy {:.4} loss {:.4} on {} pairs / {} prompts; trained {} prompts; best step {} (early stop {}); \
         HHH accuracy {:.4} on {} pairs; {} steps in {:.1}s",
        outcome.heldout.accuracy,
        outcome.heldout.loss,
        outcome.heldout.pairs,
        outcome.heldout_examples,
        outcome.train_examples,
        outcome.best_step,
        outcome.stopped_early,
        hhh.accuracy,
        hhh.pairs,
        outcome.step_losses.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(outcome.heldout.accuracy >= 0.8, "held-out pairwise accuracy {:.4} is below 0.8", outcome.heldout.accuracy);
    assert!(hhh.pairs > 200, "the HHH file was not evaluated");
    assert_eq!(outcome.base, base);

    // The published version: kind reward, lineage to the base, data snapshot.
    let manifest = registry.manifest(&outcome.model).await.unwrap();
    assert_eq!(manifest.kind, ModelKind::Reward);
    assert_eq!(manifest.parent.as_ref(), Some(&base));
    let snapshot = &manifest.metadata["reward"]["datasets"][0];
    assert_eq!(snapshot["dataset"], "preferences");
    assert_eq!(snapshot["records"], stored);
    assert_eq!(snapshot["last_seq"].as_u64(), Some(datasets.list("preferences").await.unwrap().last().unwrap().seq));

    // Normalization: held-out candidates score with mean 0 and std 1 after it.
    let reward = RewardModel::load(&registry, &outcome.model).await.unwrap();
    assert!(reward.normalization.std > 0.0);
    assert_eq!(reward.normalization.reference, "held-out candidates");

    // The announcement.
    let last = bus.last(&bus.subjects().models()).await.unwrap().expect("an announcement");
    let announcement = last.decode::<ModelAnnouncement>().unwrap().payload;
    assert_eq!(announcement.model.version, outcome.model.version);
    assert_eq!(announcement.kind, troupe_wire::ModelKind::Reward);
    let _: BTreeMap<String, f64> = announcement.metrics;
}
