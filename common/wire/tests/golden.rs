//! Golden bytes: the MessagePack encoding of one sample of every message type
//! is pinned in `tests/golden/<kind>.hex`. A change to any field name, order,
//! type or enum spelling changes the bytes and fails here; such a change also
//! needs a new `SCHEMA_VERSION`. After a deliberate change, rewrite the files
//! with `TROUPE_BLESS=1 cargo test -p troupe-wire --test golden` and review
//! the diff.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;

use troupe_wire::*;

const RUN: &str = "golden";
const TIME_MS: i64 = 1_780_000_000_000;

fn sampling() -> SamplingParams {
    SamplingParams { temperature: 0.7, top_k: 50, top_p: 0.95, max_new_tokens: 64, seed: 42 }
}

fn policy() -> ModelRef {
    ModelRef { name: "policy".into(), version: 3 }
}

fn rollout() -> Rollout {
    Rollout {
        rollout_id: "r-1".into(),
        batch_id: "b-1".into(),
        prompt_id: "p-1".into(),
        prompt: "What is the capital of France?".into(),
        prompt_tokens: vec![1, 17, 300, 70000],
        response: "Paris.".into(),
        response_tokens: vec![412, 13, 2],
        logprobs: vec![-0.25, -1.5, -0.125],
        finish_reason: FinishReason::Eos,
        policy: policy(),
        sampling: sampling(),
    }
}

/// Checks one message against its golden file and that JSON and MessagePack
/// decode to the same envelope.
fn check<T: Message + PartialEq + Debug>(payload: T) {
    let envelope = Envelope::with_id(RUN, format!("id-{}", T::KIND), TIME_MS, payload);
    let bytes = encode(&envelope, ContentType::MessagePack).unwrap();

    let json = encode(&envelope, ContentType::Json).unwrap();
    let from_json: Envelope<T> = decode(&json, ContentType::Json).unwrap();
    let from_msgpack: Envelope<T> = decode(&bytes, ContentType::MessagePack).unwrap();
    assert_eq!(from_json, envelope, "{}: JSON round trip changed the value", T::KIND);
    assert_eq!(from_msgpack, envelope, "{}: MessagePack round trip changed the value", T::KIND);

    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{}.hex", T::KIND));
    let actual = hex::encode(&bytes);
    if std::env::var("TROUPE_BLESS").is_ok_and(|value| value == "1") {
        std::fs::write(&path, format!("{actual}\n")).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("{}: {err}; create it with TROUPE_BLESS=1", path.display()));
    assert_eq!(
        actual,
        expected.trim(),
        "the MessagePack encoding of {} changed; bump SCHEMA_VERSION and rebless",
        T::KIND
    );
}

#[test]
fn prompt_batch_bytes() {
    check(PromptBatch {
        batch_id: "b-1".into(),
        mode: SampleMode::Candidates { k: 4 },
        policy: Some(policy()),
        sampling: sampling(),
        prompts: vec![Prompt { prompt_id: "p-1".into(), text: "Name a color.".into(), reference: Some("red".into()) }],
    });
}

#[test]
fn candidate_set_bytes() {
    check(CandidateSet {
        set_id: "s-1".into(),
        prompt_id: "p-1".into(),
        prompt: "Name a color.".into(),
        reference: None,
        policy: policy(),
        sampling: sampling(),
        candidates: vec![
            Candidate { candidate_id: "A".into(), text: "Red.".into(), finish_reason: FinishReason::Eos, token_count: 3 },
            Candidate { candidate_id: "B".into(), text: "Blu".into(), finish_reason: FinishReason::Length, token_count: 64 },
        ],
        expires_at_ms: Some(TIME_MS + 3_600_000),
    });
}

#[test]
fn ranking_bytes() {
    check(Ranking {
        ranking_id: "k-1".into(),
        set_id: "s-1".into(),
        labeler: "ada".into(),
        order: vec![vec!["D".into()], vec!["C".into(), "A".into()], vec!["B".into()]],
        note: None,
    });
}

#[test]
fn ranking_receipt_bytes() {
    check(RankingReceipt {
        ranking_id: "k-1".into(),
        set_id: "s-1".into(),
        accepted: false,
        reason: Some("unknown candidate id \"E\"".into()),
        pairs: 0,
        duplicate: false,
    });
}

#[test]
fn preference_update_bytes() {
    check(PreferenceUpdate {
        dataset: "preferences".into(),
        record_id: "k-1".into(),
        set_id: "s-1".into(),
        labeler: "ada".into(),
        pairs: 5,
        total_records: 10,
        total_pairs: 48,
    });
}

#[test]
fn rollout_bytes() {
    check(rollout());
}

#[test]
fn scored_rollout_bytes() {
    check(ScoredRollout {
        rollout: rollout(),
        raw_score: 1.25,
        score: 0.5,
        reward_model: ModelRef { name: "reward".into(), version: 1 },
    });
}

#[test]
fn model_announcement_bytes() {
    check(ModelAnnouncement {
        model: policy(),
        kind: ModelKind::Policy,
        parent: Some(ModelRef { name: "sft".into(), version: 1 }),
        manifest_key: "models/policy/00000003/manifest.json".into(),
        metrics: BTreeMap::from([("kl".to_string(), 0.03125)]),
    });
}

#[test]
fn job_request_bytes() {
    check(JobRequest {
        job_id: "j-1".into(),
        stage: Stage::Sft,
        base: Some(ModelRef { name: "base".into(), version: 2 }),
        output: "sft".into(),
        inputs: vec!["data/sft/capitals.train.jsonl".into()],
        settings: BTreeMap::from([("learning-rate".to_string(), "3e-4".to_string())]),
    });
}

#[test]
fn job_progress_bytes() {
    check(JobProgress {
        job_id: "j-1".into(),
        stage: Stage::Pretrain,
        state: JobState::Running,
        step: 10,
        total_steps: 100,
        metrics: BTreeMap::from([("loss".to_string(), 2.5)]),
        message: None,
    });
}

#[test]
fn dead_letter_bytes() {
    check(DeadLetter {
        subject: "troupe.golden.rankings".into(),
        message_id: Some("m-1".into()),
        consumer: "ranking-intake".into(),
        reason: "invalid MessagePack".into(),
        delivered: 1,
        content_type: Some("application/msgpack".into()),
        payload: vec![0xc1, 0x00, 0xff],
    });
}
