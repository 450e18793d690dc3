//! The scripted labeler: its scoring rule, the rankings it implies, its
//! settings, and a run against the ranking intake on the in-process bus.

use std::collections::HashMap;
use std::time::Duration;

use troupe_bus::memory::MemoryBus;
use troupe_bus::BusHandle;
use troupe_labeler::{rank, ranking_for, score_response, Cli, LabelerSettings, Preference};
use troupe_ranking_intake::{read_preference_records, IntakeSettings};
use troupe_service::settings::{parse_args_with_env, SettingsErrors};
use troupe_store::Store;
use troupe_wire::{Candidate, CandidateSet, Envelope, FinishReason, ModelRef, RunId, SamplingParams};

fn candidate(id: &str, text: &str, finish_reason: FinishReason, token_count: u32) -> Candidate {
    Candidate { candidate_id: id.to_string(), text: text.to_string(), finish_reason, token_count }
}

fn set(set_id: &str, reference: Option<&str>, candidates: Vec<Candidate>) -> CandidateSet {
    CandidateSet {
        set_id: set_id.to_string(),
        prompt_id: format!("prompt-{set_id}"),
        prompt: "What is 6 times 7?".to_string(),
        reference: reference.map(str::to_string),
        policy: ModelRef { name: "policy".to_string(), version: 1 },
        sampling: SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: 64, seed: 1 },
        candidates,
        expires_at_ms: None,
    }
}

fn groups(order: &[Vec<String>]) -> Vec<Vec<&str>> {
    order.iter().map(|group| group.iter().map(String::as_str).collect()).collect()
}

#[test]
fn score_adds_rule_weights() {
    let preference = Preference { eos_weight: 1.0, length_weight: 0.5, max_tokens: 10, reference_weight: 2.0 };
    let score = |text, finish, tokens, reference| score_response(&preference, text, finish, tokens, reference);
    assert_eq!(score("It is 42.", FinishReason::Eos, 4, Some("42")), 3.5);
    assert_eq!(score("It is 42.", FinishReason::Length, 4, Some("42")), 2.5);
    assert_eq!(score("It is 42.", FinishReason::Eos, 11, Some("42")), 3.0);
    assert_eq!(score("It is 41.", FinishReason::Eos, 4, Some("42")), 1.5);
    assert_eq!(score("PARIS it is", FinishReason::Eos, 10, Some("Paris")), 3.5, "reference match ignores case");
    assert_eq!(score("anything", FinishReason::Eos, 4, Some("  ")), 1.5, "a blank reference never matches");
    assert_eq!(score("anything", FinishReason::Eos, 4, None), 1.5);
}

#[test]
fn rank_groups_equal_scores() {
    let candidates = vec![
        candidate("A", "I think 41", FinishReason::Eos, 5),
        candidate("B", "42", FinishReason::Length, 64),
        candidate("C", "The answer is 42", FinishReason::Eos, 6),
        candidate("D", "maybe 40", FinishReason::Eos, 5),
    ];
    let order = rank(&Preference::default(), &set("s1", Some("42"), candidates)).unwrap();
    // C: 2 + 1 + 0.5; B: 2 + 0.5; A and D: 1 + 0.5 each, tied in set order.
    assert_eq!(groups(&order), vec![vec!["C"], vec!["B"], vec!["A", "D"]]);
}

#[test]
fn rank_all_tied_is_none() {
    let candidates = vec![candidate("A", "x", FinishReason::Eos, 3), candidate("B", "y", FinishReason::Eos, 3)];
    assert!(rank(&Preference::default(), &set("s1", None, candidates)).is_none());
}

#[test]
fn ranking_id_is_stable() {
    let settings = LabelerSettings::new("bot");
    let candidates = vec![candidate("A", "42", FinishReason::Eos, 3), candidate("B", "no", FinishReason::Length, 99)];
    let the_set = set("s9", Some("42"), candidates);
    let first = ranking_for(&settings, &the_set).unwrap();
    let second = ranking_for(&settings, &the_set).unwrap();
    assert_eq!(first.ranking_id, "bot-s9");
    assert_eq!(first, second);
    assert_eq!(first.labeler, "bot");
}

#[test]
fn settings_report_every_error() {
    let env = HashMap::from([("TROUPE_LABELER_LENGTH_WEIGHT".to_string(), "-1".to_string())]);
    let cli: Cli = parse_args_with_env(
        ["troupe-labeler", "--eos-weight", "heavy", "--max-tokens=-5", "--queue", "a.b", "--labeler-id", " "],
        &env,
    )
    .unwrap();
    let mut errors = SettingsErrors::new();
    assert!(cli.labeler.validate(&mut errors).is_none());
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    for flag in ["--eos-weight", "--length-weight", "--max-tokens", "--queue", "--labeler-id"] {
        assert!(text.iter().any(|line| line.contains(flag)), "no error for {flag}: {text:#?}");
    }
}

#[test]
fn settings_defaults_match_preference() {
    let cli: Cli = parse_args_with_env(["troupe-labeler"], &HashMap::new()).unwrap();
    let mut errors = SettingsErrors::new();
    let settings = cli.labeler.validate(&mut errors).unwrap();
    assert!(errors.is_empty());
    assert_eq!(settings.preference, Preference::default());
    assert_eq!(settings.labeler_id, "scripted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labeler_feeds_intake() {
    let run = RunId::new(&format!("t{}", uuid::Uuid::new_v4().simple())).unwrap();
    let bus = BusHandle::new(MemoryBus::new(run));
    let store = Store::memory();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let intake = troupe_ranking_intake::start(IntakeSettings::default(), bus.clone(), store.clone(), async move {
        stopped.await.ok();
    })
    .await
    .unwrap();

    let candidates = bus.subjects().candidates();
    let sets = [
        set("s1", Some("42"), vec![
            candidate("A", "It is 41", FinishReason::Eos, 4),
            candidate("B", "It is 42", FinishReason::Eos, 4),
            candidate("C", "42 42 42 42", FinishReason::Length, 64),
        ]),
        set("s2", None, vec![candidate("A", "x", FinishReason::Eos, 2), candidate("B", "y", FinishReason::Eos, 2)]),
        set("s3", Some("blue"), vec![
            candidate("A", "Blue.", FinishReason::Eos, 2),
            candidate("B", "Green.", FinishReason::Eos, 2),
        ]),
    ];
    for the_set in sets {
        bus.publish_durable(&candidates, &Envelope::new(bus.subjects().run().as_str(), the_set)).await.unwrap();
    }

    let settings = LabelerSettings { max_sets: 3, ..LabelerSettings::new("scripted") };
    let summary = tokio::time::timeout(Duration::from_secs(20), troupe_labeler::run(settings, bus.clone(), std::future::pending()))
        .await
        .expect("the labeler did not handle three sets")
        .unwrap();
    assert_eq!(summary.ranked, 2);
    assert_eq!(summary.all_tied, 1);

    let mut records = Vec::new();
    for _ in 0..100 {
        records = read_preference_records(&store, "preferences").await.unwrap();
        if records.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(records.len(), 2, "the intake did not store both rankings");
    let s1 = records.iter().find(|record| record.set_id == "s1").unwrap();
    assert_eq!(groups(&s1.order), vec![vec!["B"], vec!["C"], vec!["A"]]);
    assert_eq!(s1.labeler, "scripted");
    assert_eq!(s1.ranking_id, "scripted-s1");
    assert_eq!(s1.pairs.len(), 3);

    stop.send(()).unwrap();
    intake.wait().await.unwrap();
}
