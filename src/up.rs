//! `troupe up`: the whole three-stage pipeline in one process.
//!
//! Every stage runs as the same actor a deployment runs, talking over one
//! bus and one store: the in-process bus and a local folder by default, or
//! a real NATS server and S3 with `--nats` and `--store`.
//!
//! 1. Pretraining on the shipped corpus gives the base model.
//! 2. Supervised fine-tuning on the shipped demonstrations gives the SFT model.
//! 3. The sampler draws k candidates per prompt from the SFT model. The
//!    scripted labeler ranks them (or people do, with `--human`), and
//!    ranking intake turns the rankings into preference pairs. The reward
//!    model is trained on those pairs. Then the PPO learner improves the
//!    policy against it, while the sampler and the reward scorer serve its
//!    rollouts.
//!
//! At the end the held-out prompts are answered by the base, SFT and aligned
//! models, and each answer is scored with the labeler's own rule, which the
//! reward model only learned to imitate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use troupe_bus::{BusHandle, NatsArgs};
use troupe_store::{ModelRef, ModelRegistry, StoreArgs};
use troupe_wire::{Envelope, JobProgress, PromptBatch, SampleMode, SamplingParams};

use crate::open_store;

/// Flags of `troupe up`.
#[derive(Args, Debug)]
pub struct UpCommand {
    /// Model size preset for stage 1: tiny (0.6 million parameters, trains
    /// on a laptop CPU in minutes) or small (about 12 million parameters).
    #[arg(long, env = "TROUPE_UP_PRESET", default_value = "tiny")]
    pub preset: String,

    /// Pretraining steps.
    #[arg(long, env = "TROUPE_UP_PRETRAIN_STEPS", default_value_t = 300)]
    pub pretrain_steps: u64,

    /// Supervised fine-tuning steps. The default stops early on purpose: a
    /// tiny SFT model that always answers within the length limit leaves the
    /// labeler nothing to prefer and PPO nothing to improve.
    #[arg(long, env = "TROUPE_UP_SFT_STEPS", default_value_t = 60)]
    pub sft_steps: u64,

    /// Prompts whose candidates are ranked to train the reward model.
    #[arg(long, env = "TROUPE_UP_RANK_PROMPTS", default_value_t = 128)]
    pub rank_prompts: usize,

    /// Candidates sampled per ranked prompt (k).
    #[arg(long, env = "TROUPE_UP_CANDIDATES", default_value_t = 4)]
    pub candidates: u32,

    /// Reward-model training steps (it may stop earlier on held-out loss).
    #[arg(long, env = "TROUPE_UP_REWARD_STEPS", default_value_t = 200)]
    pub reward_steps: u64,

    /// PPO steps; each trains on one batch of scored rollouts.
    #[arg(long, env = "TROUPE_UP_PPO_STEPS", default_value_t = 30)]
    pub ppo_steps: u64,

    /// Wait for people to rank candidates on the web page instead of the
    /// scripted labeler; the page's address and token are printed.
    #[arg(long, env = "TROUPE_UP_HUMAN")]
    pub human: bool,

    /// Address of the ranking page. Defaults to 127.0.0.1:8090 with
    /// `--human` and to a free loopback port otherwise.
    #[arg(long, env = "TROUPE_UP_WEB_ADDR")]
    pub web_addr: Option<SocketAddr>,

    /// Demonstrations for stage 2 and prompts for stage 3 (JSONL). The
    /// default conversation pairs have answers of every length, so sampled
    /// candidates differ in whether they end within the length limit.
    #[arg(long, env = "TROUPE_UP_DEMONSTRATIONS", default_value = "data/sft/chatterbot_english.train.jsonl")]
    pub demonstrations: PathBuf,

    /// Held-out demonstrations: stage 2's evaluation and the final comparison.
    #[arg(long, env = "TROUPE_UP_HELDOUT", default_value = "data/sft/chatterbot_english.heldout.jsonl")]
    pub heldout: PathBuf,

    /// Seed of every random choice in the run.
    #[arg(long, env = "TROUPE_UP_SEED", default_value_t = 0)]
    pub seed: u64,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub store: StoreArgs,
}

/// Parses a stage's settings from flags, exactly as its own command line
/// would, so `troupe up` cannot drift from what the stage accepts.
fn stage_settings<T: Args>(program: &str, flags: &[String]) -> Result<T> {
    #[derive(Parser)]
    struct Wrapper<T: Args> {
        #[command(flatten)]
        inner: T,
    }
    let mut argv = vec![program.to_string()];
    argv.extend(flags.iter().cloned());
    let parsed = Wrapper::<T>::try_parse_from(&argv).with_context(|| format!("invalid {program} settings: {flags:?}"))?;
    Ok(parsed.inner)
}

fn flag(name: &str, value: impl ToString) -> String {
    format!("--{name}={}", value.to_string())
}

/// Stage 3's long-running actors, stopped together.
struct Actors {
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<Result<()>>)>,
}

impl Actors {
    fn new() -> Actors {
        Actors { stop: watch::channel(false).0, tasks: Vec::new() }
    }

    /// Returns a future that resolves when [`Actors::stop_all`] runs.
    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut receiver = self.stop.subscribe();
        async move {
            while !*receiver.borrow_and_update() {
                if receiver.changed().await.is_err() {
                    return;
                }
            }
        }
    }

    fn spawn(&mut self, name: &'static str, task: impl std::future::Future<Output = Result<()>> + Send + 'static) {
        let logged = async move {
            let result = task.await;
            if let Err(err) = &result {
                tracing::error!(actor = name, error = %err, "actor failed");
            }
            result
        };
        self.tasks.push((name, tokio::spawn(logged)));
    }

    /// Fails when an actor has stopped early with an error.
    fn check(&self) -> Result<()> {
        for (name, task) in &self.tasks {
            if task.is_finished() {
                bail!("the {name} stopped early; see the error logged above");
            }
        }
        Ok(())
    }

    /// Runs `work` while watching the actors, failing as soon as one of
    /// them stops early, so a broken actor cannot leave the run waiting.
    async fn watch<T>(&self, work: impl std::future::Future<Output = T>) -> Result<T> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                output = &mut work => return Ok(output),
                _ = tokio::time::sleep(Duration::from_secs(1)) => self.check()?,
            }
        }
    }

    async fn stop_all(self) {
        self.stop.send_replace(true);
        for (name, task) in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {} // logged by the task itself

                Err(err) => tracing::warn!(actor = name, error = %err, "actor panicked"),
            }
        }
    }
}

/// Runs the pipeline until it ends or the person presses Ctrl-C. An
/// interrupted run keeps every version published so far: each is complete
/// once its manifest exists, and a half-written one stays invisible.
pub async fn up(command: UpCommand) -> Result<()> {
    tokio::select! {
        result = run_pipeline(command) => result,
        interrupt = tokio::signal::ctrl_c() => {
            interrupt.context("cannot listen for Ctrl-C")?;
            bail!("interrupted; the model versions published so far stay in the store (`troupe status` lists them)")
        }
    }
}

async fn run_pipeline(command: UpCommand) -> Result<()> {
    let problems = command.nats.validate();
    if !problems.is_empty() {
        bail!("invalid settings:\n  {}", problems.join("\n  "));
    }
    if command.candidates < 2 {
        bail!("--candidates {} is too small; ranking needs at least 2 candidates per prompt", command.candidates);
    }
    check_before_training(&command)?;
    let web_addr = command
        .web_addr
        .unwrap_or_else(|| if command.human { SocketAddr::from(([127, 0, 0, 1], 8090)) } else { SocketAddr::from(([127, 0, 0, 1], 0)) });
    // Bind once now, so a taken port fails before any training is spent.
    std::net::TcpListener::bind(web_addr)
        .with_context(|| format!("cannot serve the ranking page on {web_addr}; choose another address with --web-addr"))?;
    let started = Instant::now();
    let store = open_store(&command.store)?;
    let bus = troupe_bus::connect(&command.nats).await?;
    let run = bus.subjects().run().to_string();
    // Job ids are new on every invocation, so a store that already contains an
    // earlier run's checkpoints starts this one from scratch.
    let unix_secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let jobs = format!("{run}-{unix_secs}");
    let registry = ModelRegistry::new(store.clone());
    let progress = collect_progress(&bus).await?;
    println!("troupe up: run {run}, store {}, bus {}", command.store.store, bus_name(&command.nats));

    // Stage 1: pretraining.
    println!("\n== stage 1: pretraining ({} steps, preset {})", command.pretrain_steps, command.preset);
    let pretrain: troupe_pretrainer::Settings = stage_settings(
        "pretrain",
        &[
            flag("job-id", format!("{jobs}-pretrain")),
            flag("preset", &command.preset),
            flag("steps", command.pretrain_steps),
            flag("seed", command.seed),
        ],
    )?;
    let base = troupe_pretrainer::pretrain(&pretrain, &bus, &store, std::future::pending()).await?;
    println!("base model {}: held-out loss {:.3} (unigram entropy {:.3})", base.model, base.heldout_loss, base.unigram_entropy);

    // Stage 2: supervised fine-tuning.
    println!("\n== stage 2: supervised fine-tuning ({} steps)", command.sft_steps);
    let sft_settings: troupe_sft_trainer::Settings = stage_settings(
        "sft",
        &[
            flag("job-id", format!("{jobs}-sft")),
            flag("base", &base.model),
            flag("steps", command.sft_steps),
            flag("demonstrations", command.demonstrations.display()),
            flag("heldout", command.heldout.display()),
            flag("seed", command.seed),
        ],
    )?;
    let sft = troupe_sft_trainer::fine_tune(&sft_settings, &bus, &store, std::future::pending()).await?;
    println!(
        "sft model {}: held-out response loss {:.3}, greedy answers ending with EOS {:.0}%",
        sft.model,
        sft.heldout_loss,
        sft.eos_rate * 100.0
    );

    // Stage 3a: candidates, rankings and the reward model.
    println!("\n== stage 3: RLHF");
    let mut actors = Actors::new();
    let sampler_settings = troupe_sampler::SamplerSettings::new("policy");
    let sampler = troupe_sampler::run(sampler_settings, bus.clone(), store.clone(), actors.stopped());
    actors.spawn("sampler", async move { sampler.await.map_err(anyhow::Error::from) });

    let mut intake_settings = troupe_ranking_intake::IntakeSettings { web_addr, ..Default::default() };
    // The page always gets a token, so it is never open without one; only
    // a person ranking needs to see it.
    let page_token = labeler_token(command.seed);
    intake_settings.tokens.insert("person", &page_token).map_err(anyhow::Error::msg)?;
    let token = command.human.then_some(page_token);
    let intake = troupe_ranking_intake::start(intake_settings, bus.clone(), store.clone(), actors.stopped()).await?;
    let intake_state = intake.intake.clone();
    let web_addr = intake.web_addr;
    actors.spawn("ranking intake", async move { intake.wait().await.map_err(anyhow::Error::from) });

    match &token {
        Some(token) => {
            println!("rank candidates at http://{web_addr}/label?token={token}");
            println!("(the run goes on once {} prompts are ranked)", command.rank_prompts);
        }
        None => {
            let labeler = troupe_labeler::LabelerSettings::new("scripted-labeler");
            let labeler = troupe_labeler::run(labeler, bus.clone(), actors.stopped());
            actors.spawn("labeler", async move { labeler.await.map(|_| ()).map_err(anyhow::Error::from) });
        }
    }

    let prompts = troupe_ppo_learner::prompts::PromptSet::load(std::slice::from_ref(&command.demonstrations), command.seed)?;
    let chosen = prompts.for_step(0, command.rank_prompts);
    let sft_ref = troupe_wire::ModelRef { name: sft.model.name.clone(), version: sft.model.version };
    for (index, chunk) in chosen.chunks(16).enumerate() {
        let batch = PromptBatch {
            batch_id: format!("{jobs}-candidates-{index}"),
            mode: SampleMode::Candidates { k: command.candidates },
            policy: Some(sft_ref.clone()),
            sampling: SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: 32, seed: command.seed + index as u64 },
            prompts: chunk.to_vec(),
        };
        bus.publish_durable(&bus.subjects().prompts(), &Envelope::new(&run, batch)).await?;
    }
    println!("sampling {} candidates for each of {} prompts from {}", command.candidates, chosen.len(), sft.model);
    if !command.human {
        println!("(the scripted labeler leaves sets whose candidates all score the same unranked; the run goes on {} s after the last ranking)", QUIET_PERIOD.as_secs());
    }
    let rankings = wait_for_rankings(&intake_state, &actors, chosen.len(), command.human).await?;
    println!("ranked {} candidate sets into {} preference pairs", rankings.records, rankings.pairs);
    if rankings.records < 8 {
        bail!(
            "only {} candidate sets were ranked; the reward model needs at least 8 to hold some out. Rank more, or raise --rank-prompts",
            rankings.records
        );
    }

    let reward_settings: troupe_reward_trainer::Settings = stage_settings(
        "reward",
        &[
            flag("job-id", format!("{jobs}-reward")),
            flag("base", &sft.model),
            flag("dataset", "preferences"),
            flag("heldout-fraction", 0.25),
            flag("steps", command.reward_steps),
            flag("seed", command.seed),
        ],
    )?;
    let reward = troupe_reward_trainer::train_reward_model(&reward_settings, &bus, &store, std::future::pending()).await?;
    println!(
        "reward model {}: held-out pairwise accuracy {:.2} over {} prompts",
        reward.model, reward.heldout.accuracy, reward.heldout_examples
    );

    // Stage 3b: PPO against the reward model.
    let scorer_settings: troupe_reward_scorer::Settings =
        stage_settings("scorer", &[flag("reward-model", &reward.model.name), flag("pin", &reward.model)])?;
    let scorer = troupe_reward_scorer::run(scorer_settings, bus.clone(), store.clone(), actors.stopped());
    actors.spawn("reward scorer", async move { scorer.await.map(|_| ()).map_err(anyhow::Error::from) });

    println!("PPO: {} steps from {}", command.ppo_steps, sft.model);
    let ppo_settings: troupe_ppo_learner::Settings = stage_settings(
        "ppo",
        &[
            flag("job-id", format!("{jobs}-ppo")),
            flag("reference", &sft.model),
            flag("prompts", command.demonstrations.display()),
            flag("steps", command.ppo_steps),
            flag("seed", command.seed),
        ],
    )?;
    let learner = troupe_ppo_learner::run(ppo_settings, bus.clone(), store.clone(), std::future::pending());
    let ppo = actors.watch(learner).await??;
    actors.stop_all().await;
    let Some(aligned) = ppo.final_version.clone().map(|model| ModelRef::new(model.name, model.version)) else {
        bail!("PPO published no policy version");
    };

    // The comparison on held-out prompts, scored by the labeler's own rule.
    let comparison = crate::compare::compare(&registry, &command.heldout, &[&base.model, &sft.model, &aligned]).await?;
    let progress = progress.finish().await;
    let progress_key = save_progress(&store, &run, &progress).await?;
    print_summary(&base, &sft, &reward, &ppo, &aligned, &progress, &comparison, started.elapsed());
    println!("\nprogress of every step: {progress_key} in the store");
    println!("plots: troupe report --run {run} --store {}", command.store.store);
    Ok(())
}

/// Writes every progress message of the run to `runs/<run>/progress.jsonl`,
/// one JSON object per line, for `troupe report`. A later run with the same
/// run id replaces it.
async fn save_progress(store: &troupe_store::Store, run: &str, progress: &[JobProgress]) -> Result<String> {
    let mut lines = String::new();
    for entry in progress {
        lines.push_str(&serde_json::to_string(entry)?);
        lines.push('\n');
    }
    let key = troupe_store::ObjectKey::new(format!("runs/{run}/progress.jsonl"))?;
    store.put(&key, lines.into_bytes()).await.with_context(|| format!("cannot store {key}"))?;
    Ok(key.to_string())
}

/// Checks what can fail late before stage 1 spends minutes training: the
/// stage settings as `troupe up` will pass them, and the data paths.
fn check_before_training(command: &UpCommand) -> Result<()> {
    let mut problems = Vec::new();
    if !std::path::Path::new("data/corpus").is_dir() {
        let here = std::env::current_dir().map(|dir| dir.display().to_string()).unwrap_or_default();
        problems.push(format!(
            "data/corpus not found in {here}; run troupe up from the root of the troupe repository, where the shipped data is"
        ));
    }
    for (flag_name, path) in [("--demonstrations", &command.demonstrations), ("--heldout", &command.heldout)] {
        if !path.is_file() {
            problems.push(format!("{flag_name} {}: no such file", path.display()));
        }
    }
    let pretrain: Result<troupe_pretrainer::Settings> =
        stage_settings("pretrain", &[flag("preset", &command.preset), flag("steps", command.pretrain_steps)]);
    match pretrain {
        Ok(settings) => problems.extend(settings.validate().err().unwrap_or_default()),
        Err(err) => problems.push(format!("{err:#}")),
    }
    if problems.is_empty() {
        return Ok(());
    }
    let noun = if problems.len() == 1 { "setting" } else { "settings" };
    bail!("{} invalid {noun}:\n  {}", problems.len(), problems.join("\n  "))
}

fn bus_name(nats: &NatsArgs) -> String {
    if nats.nats_url.trim().is_empty() {
        "in-process".to_string()
    } else {
        nats.nats_url.clone()
    }
}

/// Makes a token for the ranking page, different for every run of the same seed.
fn labeler_token(seed: u64) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:016x}", (nanos as u64) ^ seed.rotate_left(17) ^ u64::from(std::process::id()))
}

/// How long the scripted labeler may go without ranking another set before
/// the run continues with the rankings it has: some sets tie on every
/// candidate and are never ranked.
const QUIET_PERIOD: Duration = Duration::from_secs(10);

/// Waits until every candidate set is ranked, or (for the scripted labeler)
/// until rankings stop arriving for [`QUIET_PERIOD`].
async fn wait_for_rankings(
    intake: &troupe_ranking_intake::Intake,
    actors: &Actors,
    expected: usize,
    human: bool,
) -> Result<troupe_ranking_intake::Progress> {
    let mut last_change = Instant::now();
    let mut last_records = 0;
    loop {
        actors.check()?;
        let progress = intake.progress().await?;
        if progress.records != last_records {
            last_records = progress.records;
            last_change = Instant::now();
            tracing::info!(records = progress.records, pairs = progress.pairs, sets = progress.sets_total, "rankings stored");
        }
        if progress.records as usize >= expected {
            return Ok(progress);
        }
        let all_sets_arrived = progress.sets_total as usize >= expected;
        if !human && all_sets_arrived && last_change.elapsed() > QUIET_PERIOD {
            return Ok(progress);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Progress messages of every stage, collected while the run goes on.
struct ProgressLog {
    task: JoinHandle<Vec<JobProgress>>,
    stop: watch::Sender<bool>,
}

async fn collect_progress(bus: &BusHandle) -> Result<ProgressLog> {
    let mut subscription = bus.subscribe(&bus.subjects().progress()).await?;
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut log = Vec::new();
        loop {
            tokio::select! {
                _ = stopped.changed() => return log,
                message = subscription.next() => match message {
                    Some(message) => match message.decode::<JobProgress>() {
                        Ok(envelope) => log.push(envelope.payload),
                        Err(err) => tracing::warn!(error = %err, "undecodable progress message ignored"),
                    },
                    None => return log,
                },
            }
        }
    });
    Ok(ProgressLog { task, stop })
}

impl ProgressLog {
    async fn finish(self) -> Vec<JobProgress> {
        self.stop.send_replace(true);
        self.task.await.unwrap_or_default()
    }
}

/// First and last value of a metric over one job's progress messages.
fn metric_span(progress: &[JobProgress], job_id_suffix: &str, metric: &str) -> Option<(f64, f64)> {
    let values: Vec<f64> = progress
        .iter()
        .filter(|entry| entry.job_id.ends_with(job_id_suffix))
        .filter_map(|entry| entry.metrics.get(metric).copied())
        .collect();
    Some((*values.first()?, *values.last()?))
}

#[allow(clippy::too_many_arguments)]
fn print_summary(
    base: &troupe_pretrainer::PretrainOutcome,
    sft: &troupe_sft_trainer::SftOutcome,
    reward: &troupe_reward_trainer::RewardOutcome,
    ppo: &troupe_ppo_learner::PpoSummary,
    aligned: &ModelRef,
    progress: &[JobProgress],
    comparison: &crate::compare::Comparison,
    elapsed: Duration,
) {
    println!("\n== summary ({:.1} minutes)", elapsed.as_secs_f64() / 60.0);
    println!("stage 1  base {}   held-out loss {:.3} nats/token (unigram entropy {:.3})", base.model, base.heldout_loss, base.unigram_entropy);
    let before = sft.heldout_loss_before.map(|loss| format!("{loss:.3} -> ")).unwrap_or_default();
    println!(
        "stage 2  sft {}   held-out response loss {before}{:.3}, greedy answers ending with EOS {:.0}%",
        sft.model,
        sft.heldout_loss,
        sft.eos_rate * 100.0
    );
    println!(
        "stage 3  reward {}   held-out pairwise accuracy {:.2}, loss {:.3}",
        reward.model, reward.heldout.accuracy, reward.heldout.loss
    );
    println!("         policy {aligned}   {} PPO steps on {} rollouts ({} stale)", ppo.steps_run, ppo.trained, ppo.stale);
    let mut lines = BTreeMap::new();
    for metric in ["reward_raw", "reward", "kl", "kl_k3", "kl_coef", "eos_rate", "response_length"] {
        if let Some((first, last)) = metric_span(progress, "-ppo", metric) {
            lines.insert(metric, format!("{first:.3} -> {last:.3}"));
        }
    }
    for (metric, span) in &lines {
        println!("         {metric:<16} {span}");
    }
    comparison.print();
}
