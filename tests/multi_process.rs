//! The whole pipeline with every service in its own process, as a
//! deployment runs it: the real service binaries over a real nats-server
//! and a real S3 API (SeaweedFS). The test is the driver. It publishes the
//! stage 1 and 2 jobs, the candidate prompts and the reward-model job,
//! starts the PPO learner, and in the middle of PPO kills one sampler and
//! the learner with SIGKILL. It then checks that the restarted learner
//! finishes with exactly one policy version per step and that no ranking or
//! rollout was lost or used twice.
//!
//! The service binaries come from `cargo build --workspace` (or
//! `cargo test --workspace`), which puts them next to `troupe`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use troupe_bus::nats::NatsBus;
use troupe_bus::{BusHandle, QueueConfig};
use troupe_ppo_learner::prompts::{batch_id, PromptSet};
use troupe_ranking_intake::Progress;
use troupe_sampler::batch::{candidate_set_id, rollout_id};
use troupe_store::{Manifest, ModelKind, ModelRef, ModelRegistry, Secret, Store, StoreArgs};
use troupe_wire::{
    DeadLetter, Envelope, JobRequest, Prompt, PromptBatch, RunId, SampleMode, SamplingParams, ScoredRollout, Stage,
};

const DEMONSTRATIONS: &str = "data/sft/chatterbot_english.train.jsonl";
const HELDOUT: &str = "data/sft/chatterbot_english.heldout.jsonl";

/// Prompts whose candidates the scripted labeler ranks for the reward model.
const RANK_PROMPTS: usize = 64;
/// Candidate prompts per published batch.
const RANK_BATCH: usize = 16;
const CANDIDATES_PER_PROMPT: u32 = 4;

const PPO_STEPS: u64 = 6;
/// The learner's `--batch-size` (scored rollouts per step) and `--rollouts-per-prompt`.
const PPO_BATCH_SIZE: usize = 16;
const PPO_ROLLOUTS_PER_PROMPT: usize = 4;
/// PPO steps published before the test looks for a sampler and a learner to kill mid-work.
const KILL_AFTER_STEPS: u64 = 2;
const PPO_SEED: u64 = 0;

/// Seconds before an unacknowledged delivery of a killed sampler or learner
/// is delivered again. The defaults (60 s) would make the test wait a minute.
const ACK_WAIT_SECS: &str = "10";

const TRAINER_TIMEOUT: Duration = Duration::from_secs(240);
const RANKING_TIMEOUT: Duration = Duration::from_secs(180);
const PPO_TIMEOUT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(500);
const LOG_TAIL_LINES: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_survive_kills_and_finish_every_stage() {
    let (Some(nats), Some(s3)) = (troupe_testkit::nats_url(), troupe_testkit::s3()) else { return };
    let started = Instant::now();
    let unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let run = format!("multi-process-{}-{unix_ms}", std::process::id());
    let store_url = format!("s3://{}/{run}", s3.bucket);

    let store = open_store(&store_url, &s3.endpoint);
    let registry = ModelRegistry::new(store.clone());
    let bus = BusHandle::new(
        NatsBus::connect(&nats, RunId::new(&run).unwrap()).await.expect("connect the driver to nats-server"),
    );
    let subjects = bus.subjects().clone();
    let mut services = Services::new(ServiceFlags {
        nats: nats.clone(),
        run: run.clone(),
        store: store_url.clone(),
        s3_endpoint: s3.endpoint.clone(),
    });
    println!("run {run}: nats {nats}, store {store_url}, logs in {}", services.log_dir.path().display());

    services.spawn("pretrainer", "troupe-pretrainer", &[]);
    services.spawn("sft-trainer", "troupe-sft-trainer", &[]);
    let sampler_a = services.spawn("sampler-a", "troupe-sampler", &["--ack-wait", ACK_WAIT_SECS]);
    let sampler_b = services.spawn("sampler-b", "troupe-sampler", &["--ack-wait", ACK_WAIT_SECS]);
    let intake = services.spawn("ranking-intake", "troupe-ranking-intake", &["--web-addr", "127.0.0.1:0"]);
    let labeler = services.spawn("labeler", "troupe-labeler", &[]);
    services.spawn("reward-trainer", "troupe-reward-trainer", &[]);

    // Stage 1 and stage 2.
    let pretrain_job = JobRequest {
        job_id: format!("{run}-pretrain"),
        stage: Stage::Pretrain,
        base: None,
        output: "base".into(),
        inputs: Vec::new(),
        settings: settings(&[("steps", "20"), ("seed", "0")]),
    };
    publish_job(&bus, pretrain_job).await;
    let base =
        wait_for_finished_version(&mut services, &registry, "base", ModelKind::Base, "the pretraining job").await;
    println!("[{:>5.1}s] base model {}", started.elapsed().as_secs_f64(), base.model_ref());

    let sft_job = JobRequest {
        job_id: format!("{run}-sft"),
        stage: Stage::Sft,
        base: Some(wire_ref(&base.model_ref())),
        output: "sft".into(),
        inputs: vec![DEMONSTRATIONS.into()],
        settings: settings(&[("steps", "60"), ("heldout", HELDOUT), ("seed", "0")]),
    };
    publish_job(&bus, sft_job).await;
    let sft = wait_for_finished_version(&mut services, &registry, "sft", ModelKind::Sft, "the SFT job").await;
    let sft_ref = sft.model_ref();
    assert_eq!(sft.parent.as_ref(), Some(&base.model_ref()), "the SFT model names the wrong parent");
    println!("[{:>5.1}s] SFT model {sft_ref}", started.elapsed().as_secs_f64());

    // Stage 3: candidates, rankings and the reward model.
    let intake_addr = services.wait_for_address(intake, "serving the labeling page and /progress").await;
    let labeler_addr = services.wait_for_address(labeler, "serving health and metrics").await;
    let sampler_a_addr = services.wait_for_address(sampler_a, "serving health, metrics and /status").await;
    let sampler_b_addr = services.wait_for_address(sampler_b, "serving health, metrics and /status").await;
    let prompt_set = PromptSet::load(&[repo_path(DEMONSTRATIONS)], 0).expect("load the demonstration prompts");
    let mut expected_sets = BTreeSet::new();
    for (index, chunk) in prompt_set.for_step(0, RANK_PROMPTS).chunks(RANK_BATCH).enumerate() {
        let batch = candidate_batch(&format!("{run}-candidates-{index}"), &sft_ref, index as u64, chunk);
        expected_sets.extend(batch.prompts.iter().map(|prompt| candidate_set_id(&batch.batch_id, &prompt.prompt_id)));
        bus.publish_durable(&subjects.prompts(), &Envelope::new(run.as_str(), batch))
            .await
            .expect("publish a candidate prompt batch");
    }
    assert_eq!(expected_sets.len(), RANK_PROMPTS, "the candidate prompts are not distinct");

    let rankings = wait_for_rankings(&mut services, intake_addr, labeler_addr).await;
    println!(
        "[{:>5.1}s] {} of {RANK_PROMPTS} candidate sets ranked into {} pairs",
        started.elapsed().as_secs_f64(),
        rankings.records,
        rankings.pairs
    );
    check_preference_dataset(&store, &rankings, &expected_sets, &sft_ref).await;

    let reward_job = JobRequest {
        job_id: format!("{run}-reward"),
        stage: Stage::RewardModel,
        base: Some(wire_ref(&sft_ref)),
        output: "reward".into(),
        inputs: vec!["preferences".into()],
        settings: settings(&[("heldout-fraction", "0.25"), ("steps", "30"), ("seed", "0")]),
    };
    publish_job(&bus, reward_job).await;
    let reward =
        wait_for_finished_version(&mut services, &registry, "reward", ModelKind::Reward, "the reward-model job").await;
    println!("[{:>5.1}s] reward model {}", started.elapsed().as_secs_f64(), reward.model_ref());

    // Stage 3: PPO, with one sampler and the learner killed midway.
    let pin = reward.model_ref().to_string();
    services.spawn("reward-scorer-a", "troupe-reward-scorer", &["--reward-model", "reward", "--pin", &pin]);
    services.spawn("reward-scorer-b", "troupe-reward-scorer", &["--reward-model", "reward", "--pin", &pin]);
    let ppo_job_id = format!("{run}-ppo");
    let reference = sft_ref.to_string();
    let steps = PPO_STEPS.to_string();
    let seed = PPO_SEED.to_string();
    let batch_size = PPO_BATCH_SIZE.to_string();
    let rollouts_per_prompt = PPO_ROLLOUTS_PER_PROMPT.to_string();
    let learner_flags = [
        ("--reference", reference.as_str()),
        ("--prompts", DEMONSTRATIONS),
        ("--steps", &steps),
        ("--job-id", &ppo_job_id),
        ("--seed", &seed),
        ("--batch-size", &batch_size),
        ("--rollouts-per-prompt", &rollouts_per_prompt),
        ("--ack-wait", ACK_WAIT_SECS),
    ];
    let learner_args: Vec<&str> = learner_flags.iter().flat_map(|(flag, value)| [*flag, *value]).collect();
    let scored = observe_scored_rollouts(&bus).await;
    let learner = services.spawn("ppo-learner", "troupe-ppo-learner", &learner_args);
    services.may_exit(learner);

    // Version 1 is the starting policy (step 0), so step N is version N + 1.
    // One sampler is killed while it samples a PPO batch. The learner is
    // killed once scored rollouts of that batch reach it, before it can
    // acknowledge them.
    wait_for_policy_version(&mut services, &registry, KILL_AFTER_STEPS + 1, learner).await;
    let samplers = [(sampler_a, sampler_a_addr), (sampler_b, sampler_b_addr)];
    let (killed_sampler, interrupted_batch) =
        kill_busy_sampler(&mut services, &samplers, &format!("{ppo_job_id}-step-"), learner).await;
    println!("[{:>5.1}s] killed a sampler while it sampled {interrupted_batch}", started.elapsed().as_secs_f64());
    wait_for_scored_rollouts(&mut services, &scored, &interrupted_batch, PPO_BATCH_SIZE / 2, learner).await;
    if let Some(status) = services.exit_status(learner) {
        panic!("the PPO learner exited with {status} before it could be killed; raise PPO_STEPS");
    }
    services.kill(learner);
    let killed_at = registry.list_versions("policy").await.unwrap().last().copied().unwrap_or(0);
    println!("[{:>5.1}s] killed the learner at policy version {killed_at}", started.elapsed().as_secs_f64());

    let restarted = services.spawn("ppo-learner-restarted", "troupe-ppo-learner", &learner_args);
    services.may_exit(restarted);
    let status = services.wait_for_exit(restarted, PPO_TIMEOUT, "the restarted PPO learner to finish").await;
    if !status.success() {
        panic!("the restarted PPO learner exited with {status}");
    }
    println!("[{:>5.1}s] PPO finished", started.elapsed().as_secs_f64());
    let surviving_sampler = samplers.iter().find(|(index, _)| *index != killed_sampler).map(|(_, addr)| *addr).unwrap();
    let survivor_status = http_get(surviving_sampler, "/status").await.unwrap_or_default();
    let redelivered = serde_json::from_str::<serde_json::Value>(&survivor_status).ok().and_then(|status| {
        status["recent"].as_array()?.iter().find(|batch| batch["batch_id"] == interrupted_batch.as_str())?["delivered"]
            .as_u64()
    });
    println!("the other sampler sampled {interrupted_batch} on delivery {redelivered:?}");
    if !services.log_text(restarted).contains("resuming from checkpoint") {
        panic!("the restarted PPO learner did not resume from its newest policy version");
    }

    check_policy_versions(&registry, &ppo_job_id, &sft_ref).await;
    check_trained_rollouts(&registry, &prompt_set, &ppo_job_id).await;
    check_no_dead_letters(&bus).await;
    println!("[{:>5.1}s] all checks passed", started.elapsed().as_secs_f64());
}

/// Opens the test's view of the store the services share.
fn open_store(url: &str, endpoint: &str) -> Store {
    let mut args = StoreArgs::for_url(url);
    args.s3_endpoint = Some(endpoint.to_string());
    args.s3_access_key_id = Some(Secret::new("test"));
    args.s3_secret_access_key = Some(Secret::new("test"));
    let config = args.validate().unwrap_or_else(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        panic!("invalid store settings for {url}: {}", lines.join("; "))
    });
    Store::open(&config).unwrap_or_else(|err| panic!("cannot open the store {url}: {err}"))
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect()
}

fn wire_ref(model: &ModelRef) -> troupe_wire::ModelRef {
    troupe_wire::ModelRef { name: model.name.clone(), version: model.version }
}

async fn publish_job(bus: &BusHandle, job: JobRequest) {
    let subject = bus.subjects().jobs_for(job.stage);
    let envelope = Envelope::new(bus.subjects().run().as_str(), job);
    bus.publish_durable(&subject, &envelope).await.unwrap_or_else(|err| panic!("publish a job on {subject}: {err}"));
}

fn candidate_batch(batch_id: &str, policy: &ModelRef, seed: u64, prompts: &[Prompt]) -> PromptBatch {
    PromptBatch {
        batch_id: batch_id.to_string(),
        mode: SampleMode::Candidates { k: CANDIDATES_PER_PROMPT },
        policy: Some(wire_ref(policy)),
        sampling: SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: 32, seed },
        prompts: prompts.to_vec(),
    }
}

/// Waits until the registry has a version of `name` whose training finished.
async fn wait_for_finished_version(
    services: &mut Services,
    registry: &ModelRegistry,
    name: &str,
    kind: ModelKind,
    job: &str,
) -> Manifest {
    let deadline = Instant::now() + TRAINER_TIMEOUT;
    loop {
        services.check_running();
        if let Ok(Some(manifest)) = registry.latest(name).await {
            let finished = manifest.metadata.get("finished").and_then(|value| value.as_bool()).unwrap_or(false);
            if finished {
                assert_eq!(manifest.kind, kind, "{} has the wrong kind", manifest.model_ref());
                return manifest;
            }
        }
        if Instant::now() > deadline {
            panic!("timed out after {TRAINER_TIMEOUT:?} waiting for {job} to publish a finished {name} version");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the labeler has handled every candidate set and the intake
/// has stored a record for each ranking the labeler published, then returns
/// the intake's progress once the record count has held still for a while.
async fn wait_for_rankings(services: &mut Services, intake: SocketAddr, labeler: SocketAddr) -> Progress {
    const QUIET: Duration = Duration::from_secs(3);
    let deadline = Instant::now() + RANKING_TIMEOUT;
    let mut last_records = None;
    let mut last_change = Instant::now();
    loop {
        services.check_running();
        let progress = http_get(intake, "/progress").await.and_then(|body| {
            serde_json::from_str::<Progress>(&body).map_err(|err| format!("invalid /progress body {body:?}: {err}"))
        });
        let labeled = http_get(labeler, "/metrics").await.map(|body| labeler_counts(&body));
        let last_seen;
        match (progress, labeled) {
            (Ok(progress), Ok(labeled)) => {
                if last_records != Some(progress.records) {
                    last_records = Some(progress.records);
                    last_change = Instant::now();
                }
                let ranked = labeled.get("ranked").copied().unwrap_or(0);
                let handled: u64 = labeled.values().sum();
                last_seen = format!("intake {progress:?}, labeler {labeled:?}");
                let done = progress.sets_total == RANK_PROMPTS as u64
                    && handled == RANK_PROMPTS as u64
                    && progress.records == ranked
                    && last_change.elapsed() > QUIET;
                if done {
                    return progress;
                }
            }
            (progress, labeled) => {
                last_seen = format!("intake {progress:?}, labeler {labeled:?}");
            }
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {RANKING_TIMEOUT:?} waiting for all {RANK_PROMPTS} candidate sets to be labeled and stored; last seen: {last_seen}"
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Reads the labeler's `troupe_labeler_sets_total` counters by outcome.
fn labeler_counts(metrics: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in metrics.lines().filter(|line| line.starts_with("troupe_labeler_sets_total{")) {
        let Some((labels, value)) = line.rsplit_once(' ') else { continue };
        let Some(outcome) = labels.split("outcome=\"").nth(1).and_then(|rest| rest.split('"').next()) else { continue };
        if let Ok(value) = value.trim().parse::<f64>() {
            counts.insert(outcome.to_string(), value as u64);
        }
    }
    counts
}

/// Checks that the preference dataset has one record per stored ranking,
/// each for a distinct candidate set that the driver asked for.
async fn check_preference_dataset(
    store: &Store,
    progress: &Progress,
    expected_sets: &BTreeSet<String>,
    sft: &ModelRef,
) {
    let records = troupe_ranking_intake::read_preference_records(store, "preferences")
        .await
        .unwrap_or_else(|err| panic!("cannot read the preference dataset: {err}"));
    assert_eq!(records.len() as u64, progress.records, "records in the dataset differ from the intake's count");
    assert!(records.len() >= 2, "only {} candidate sets were ranked; the reward model needs at least 2", records.len());

    let ranking_ids: BTreeSet<&str> = records.iter().map(|record| record.ranking_id.as_str()).collect();
    assert_eq!(ranking_ids.len(), records.len(), "a ranking was stored twice");
    let set_ids: BTreeSet<String> = records.iter().map(|record| record.set_id.clone()).collect();
    assert_eq!(set_ids.len(), records.len(), "a candidate set was ranked twice");
    let unexpected: Vec<&String> = set_ids.difference(expected_sets).collect();
    assert!(unexpected.is_empty(), "records for candidate sets the driver never asked for: {unexpected:?}");

    let pairs: usize = records.iter().map(|record| record.pairs.len()).sum();
    assert_eq!(pairs as u64, progress.pairs, "pairs in the dataset differ from the intake's count");
    for record in &records {
        assert_eq!(record.policy, wire_ref(sft), "record {} was sampled from the wrong policy", record.ranking_id);
    }
}

/// Waits until the policy has at least `version`, failing if the learner
/// exits first.
async fn wait_for_policy_version(services: &mut Services, registry: &ModelRegistry, version: u64, learner: usize) {
    let deadline = Instant::now() + PPO_TIMEOUT;
    loop {
        services.check_running();
        if let Some(status) = services.exit_status(learner) {
            panic!("the PPO learner exited with {status} before publishing policy version {version}");
        }
        let newest = registry.list_versions("policy").await.ok().and_then(|versions| versions.last().copied());
        if newest.is_some_and(|newest| newest >= version) {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {PPO_TIMEOUT:?} waiting for policy version {version}; newest is {newest:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls the samplers' `/status` and kills (SIGKILL) the first one seen
/// sampling a batch whose id starts with `batch_prefix`. Returns the killed
/// sampler's index and the batch id.
async fn kill_busy_sampler(
    services: &mut Services,
    samplers: &[(usize, SocketAddr)],
    batch_prefix: &str,
    learner: usize,
) -> (usize, String) {
    let deadline = Instant::now() + PPO_TIMEOUT;
    loop {
        services.check_running();
        for &(index, addr) in samplers {
            let Ok(body) = http_get(addr, "/status").await else { continue };
            let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if let Some(batch) = status["in_progress"].as_str().filter(|batch| batch.starts_with(batch_prefix)) {
                let batch = batch.to_string();
                services.kill(index);
                return (index, batch);
            }
        }
        if let Some(status) = services.exit_status(learner) {
            panic!("the PPO learner exited with {status} before a sampler was seen sampling one of its batches");
        }
        if Instant::now() > deadline {
            panic!("timed out after {PPO_TIMEOUT:?} waiting for a sampler to sample a PPO batch");
        }
        // A tiny model samples a batch in a fraction of a second, so poll often.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Distinct scored rollout ids seen on the `scored` subject, by prompt batch id.
type ScoredByBatch = Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>;

/// Reads every scored rollout on a queue of the test's own, beside the
/// learner's, in a task that runs until the test ends.
async fn observe_scored_rollouts(bus: &BusHandle) -> ScoredByBatch {
    let mut config = QueueConfig::new("multi-process-test-scored", &bus.subjects().scored());
    config.max_in_flight = 256;
    let mut queue = bus.queue(config).await.expect("open a queue on the scored subject");
    let seen = ScoredByBatch::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((envelope, delivery)) = queue.next_message::<ScoredRollout>().await {
            let rollout = envelope.payload.rollout;
            record.lock().unwrap().entry(rollout.batch_id).or_default().insert(rollout.rollout_id);
            let _ = delivery.ack().await;
        }
    });
    seen
}

/// Waits until `count` distinct scored rollouts of `batch` have been seen.
async fn wait_for_scored_rollouts(
    services: &mut Services,
    scored: &ScoredByBatch,
    batch: &str,
    count: usize,
    learner: usize,
) {
    let deadline = Instant::now() + PPO_TIMEOUT;
    loop {
        services.check_running();
        let seen = scored.lock().unwrap().get(batch).map_or(0, BTreeSet::len);
        if seen >= count {
            return;
        }
        if let Some(status) = services.exit_status(learner) {
            panic!("the PPO learner exited with {status} while the test waited for rollouts of {batch}");
        }
        if Instant::now() > deadline {
            panic!("timed out after {PPO_TIMEOUT:?} waiting for {count} scored rollouts of {batch}; saw {seen}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks that steps 0 (the starting policy) to `PPO_STEPS` each have
/// exactly one policy version, in order, and the last one is finished.
async fn check_policy_versions(registry: &ModelRegistry, job_id: &str, sft: &ModelRef) {
    let versions = registry.list_versions("policy").await.expect("list the policy versions");
    let expected: Vec<u64> = (1..=PPO_STEPS + 1).collect();
    if versions != expected {
        panic!("policy versions {versions:?}; expected one per step: {expected:?}");
    }
    for version in versions {
        let manifest = registry.manifest(&ModelRef::new("policy", version)).await.expect("read a policy manifest");
        let metadata = &manifest.metadata;
        assert_eq!(manifest.kind, ModelKind::Policy, "policy@{version} has the wrong kind");
        assert_eq!(metadata["job_id"].as_str(), Some(job_id), "policy@{version} belongs to another job");
        assert_eq!(metadata["step"].as_u64(), Some(version - 1), "policy@{version} has the wrong step");
        assert_eq!(
            metadata["reference"].as_str(),
            Some(sft.to_string().as_str()),
            "policy@{version} has the wrong reference"
        );
        let expected_parent = if version == 1 { sft.clone() } else { ModelRef::new("policy", version - 1) };
        assert_eq!(manifest.parent.as_ref(), Some(&expected_parent), "policy@{version} has the wrong parent");
        let finished = metadata["finished"].as_bool();
        assert_eq!(finished, Some(version == PPO_STEPS + 1), "policy@{version} has the wrong `finished` flag");
    }
}

/// Checks that each PPO step trained on exactly the rollouts of its own
/// prompt batch: none lost to the kills, none trained twice.
async fn check_trained_rollouts(registry: &ModelRegistry, prompts: &PromptSet, job_id: &str) {
    let prompts_per_batch = PPO_BATCH_SIZE / PPO_ROLLOUTS_PER_PROMPT;
    let mut all_trained = BTreeSet::new();
    for step in 0..PPO_STEPS {
        let version = ModelRef::new("policy", step + 2);
        let state = registry.load_file(&version, "ppo_state.json").await.expect("read ppo_state.json");
        let state: serde_json::Value = serde_json::from_slice(&state).expect("ppo_state.json is JSON");
        let trained: Vec<String> =
            serde_json::from_value(state["trained_rollouts"].clone()).expect("ppo_state.json lists trained_rollouts");

        let batch = batch_id(job_id, step);
        let expected: BTreeSet<String> = prompts
            .for_step(step, prompts_per_batch)
            .iter()
            .flat_map(|prompt| (0..PPO_ROLLOUTS_PER_PROMPT).map(|index| rollout_id(&batch, &prompt.prompt_id, index)))
            .collect();
        let trained_set: BTreeSet<String> = trained.iter().cloned().collect();
        assert_eq!(trained.len(), PPO_BATCH_SIZE, "{version} trained on {} rollouts", trained.len());
        assert_eq!(trained_set.len(), trained.len(), "{version} trained on one rollout twice");
        if trained_set != expected {
            panic!(
                "{version} (step {}) trained on other rollouts than its batch {batch}: missing {:?}, extra {:?}",
                step + 1,
                expected.difference(&trained_set).collect::<Vec<_>>(),
                trained_set.difference(&expected).collect::<Vec<_>>()
            );
        }
        all_trained.extend(trained_set);
    }
    assert_eq!(all_trained.len(), PPO_STEPS as usize * PPO_BATCH_SIZE, "a rollout was trained on in two steps");
}

/// Reads the whole dead-letter subject and fails if it has any letter.
async fn check_no_dead_letters(bus: &BusHandle) {
    let mut config = QueueConfig::new("multi-process-test-dead-letters", &bus.subjects().dead());
    config.ack_wait = Duration::from_secs(30);
    let mut queue = bus.queue(config).await.expect("open a queue on the dead-letter subject");
    let mut letters = Vec::new();
    while let Ok(next) = tokio::time::timeout(Duration::from_secs(3), queue.next_message::<DeadLetter>()).await {
        let (envelope, delivery) = next.expect("read the dead-letter subject");
        let letter = envelope.payload;
        letters.push(format!(
            "{} on {} by {}: {}",
            letter.message_id.unwrap_or_default(),
            letter.subject,
            letter.consumer,
            letter.reason
        ));
        delivery.ack().await.expect("acknowledge a dead letter");
    }
    if !letters.is_empty() {
        panic!("{} dead letters:\n  {}", letters.len(), letters.join("\n  "));
    }
}

/// Sends `GET path` to a service and returns the body of a 200 response.
async fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|err| err.to_string())?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(|err| err.to_string())?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.map_err(|err| err.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("GET http://{addr}{path} timed out"))??;
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| format!("malformed response {response:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET http://{addr}{path}: {}", head.lines().next().unwrap_or(head)));
    }
    Ok(body.to_string())
}

/// Flags every service shares.
struct ServiceFlags {
    nats: String,
    run: String,
    store: String,
    s3_endpoint: String,
}

/// One spawned service process and its log file.
struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    /// Set when the test killed it on purpose.
    killed: bool,
    /// Set for processes that exit by themselves when their work is done.
    may_exit: bool,
}

/// The service processes of the test. Dropping it kills every process that
/// is still running and, when the test panics, prints the end of each log.
struct Services {
    flags: ServiceFlags,
    log_dir: tempfile::TempDir,
    processes: Vec<Process>,
}

impl Services {
    fn new(flags: ServiceFlags) -> Services {
        let log_dir =
            tempfile::Builder::new().prefix("troupe-multi-process-").tempdir().expect("create the log folder");
        Services { flags, log_dir, processes: Vec::new() }
    }

    /// Starts `binary` with the shared flags plus `extra`, logging to
    /// `<name>.log`, and returns its index.
    fn spawn(&mut self, name: &str, binary: &str, extra: &[&str]) -> usize {
        let path = Path::new(env!("CARGO_BIN_EXE_troupe")).with_file_name(binary);
        assert!(
            path.is_file(),
            "service binary {} is missing; build every binary with `cargo build --workspace` first",
            path.display()
        );
        let log = self.log_dir.path().join(format!("{name}.log"));
        let log_file = File::create(&log).expect("create a service log file");
        let mut command = Command::new(&path);
        command
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["--nats", &self.flags.nats, "--run", &self.flags.run])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("share the log file"))
            .stderr(log_file);
        // The labeler needs no store.
        if binary != "troupe-labeler" {
            command.args(["--store", &self.flags.store, "--s3-endpoint", &self.flags.s3_endpoint]);
            command.args(["--s3-access-key-id", "test", "--s3-secret-access-key", "test"]);
        }
        command.args(["--http-addr", "127.0.0.1:0"]);
        command.args(extra);
        let child = command.spawn().unwrap_or_else(|err| panic!("failed to start {}: {err}", path.display()));
        self.processes.push(Process { name: name.to_string(), child, log, killed: false, may_exit: false });
        self.processes.len() - 1
    }

    fn may_exit(&mut self, index: usize) {
        self.processes[index].may_exit = true;
    }

    /// Kills a process with SIGKILL, as a crash would, and reaps it.
    fn kill(&mut self, index: usize) {
        let process = &mut self.processes[index];
        process.killed = true;
        let _ = process.child.kill();
        let _ = process.child.wait();
    }

    fn exit_status(&mut self, index: usize) -> Option<ExitStatus> {
        self.processes[index].child.try_wait().ok().flatten()
    }

    /// Fails when a service that should still run has exited.
    fn check_running(&mut self) {
        let mut exited = Vec::new();
        for process in &mut self.processes {
            if process.killed || process.may_exit {
                continue;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                exited.push(format!("{} exited with {status}", process.name));
            }
        }
        if !exited.is_empty() {
            panic!("{}", exited.join("; "));
        }
    }

    async fn wait_for_exit(&mut self, index: usize, timeout: Duration, description: &str) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running();
            if let Some(status) = self.exit_status(index) {
                return status;
            }
            if Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {description}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Reads the address that a service logged in its line containing
    /// `message` (`addr=IP:PORT`), waiting until the line appears.
    async fn wait_for_address(&mut self, index: usize, message: &str) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.check_running();
            let text = self.log_text(index);
            let addr = text
                .lines()
                .filter(|line| line.contains(message))
                .find_map(|line| line.split("addr=").nth(1)?.split_whitespace().next()?.parse().ok());
            if let Some(addr) = addr {
                return addr;
            }
            if Instant::now() > deadline {
                let name = &self.processes[index].name;
                panic!("timed out waiting for {name} to log {message:?} with its address");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_text(&self, index: usize) -> String {
        std::fs::read_to_string(&self.processes[index].log).unwrap_or_default()
    }

    /// Returns the last lines of every service log.
    fn log_tails(&self) -> String {
        let mut report = String::new();
        for (index, process) in self.processes.iter().enumerate() {
            let text = self.log_text(index);
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            report.push_str(&format!("\n--- last {} lines of {} ---\n", tail.len(), process.log.display()));
            for line in tail {
                report.push_str(line);
                report.push('\n');
            }
        }
        report
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for process in &mut self.processes {
            if let Ok(None) = process.child.try_wait() {
                let _ = process.child.kill();
                let _ = process.child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
            // Keep the full logs for inspection after the failure.
            let placeholder = tempfile::tempdir().expect("create a temporary folder");
            let logs = std::mem::replace(&mut self.log_dir, placeholder).keep();
            eprintln!("service logs kept in {}", logs.display());
        }
    }
}
