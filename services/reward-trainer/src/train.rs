//! The reward-model training loop and [`train_reward_model`], its entry
//! point for the CLI and the job service.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tokio::sync::watch;
use troupe_bus::{BusHandle, Delivery};
use troupe_data::{read_preference_pairs, Mode, ValidationFraction};
use troupe_model::{clip_grad_norm, AdamW, AdamWConfig, Heads, Model, Tokenizer};
use troupe_store::{ModelKind, ModelRef, ModelRegistry, Store};
use troupe_train::{
    announce, find_job_checkpoint, load_checkpoint, sha256_hex, DerivedSizes, LrSchedule, StepReporter, StepStats,
    TrainState,
};
use troupe_wire::{JobState, Stage};

use crate::examples::{split_examples, ExampleBuilder, PreferenceExample};
use crate::loss::{pair_metrics, PairLayout, PairMetrics};
use crate::records::{read_records, DatasetSnapshot};
use crate::reward_model::{
    announcement_metrics, publish_reward_version, render_candidate, score_rows, score_values, JsonlSnapshot,
    Normalization, PadSide, RewardInfo, RewardVersion,
};
use crate::settings::BaseModel;
use crate::{RewardError, Settings};

/// An `--eval-jsonl` file: its stem, its examples and their rendered candidates.
type EvalSet = (String, Vec<PreferenceExample>, Vec<Vec<Vec<u32>>>);

/// Rows scored per forward pass during evaluation.
const EVAL_CHUNK_ROWS: usize = 32;

/// What a finished run returns.
#[derive(Debug, Clone)]
pub struct RewardOutcome {
    /// The published reward version.
    pub model: ModelRef,
    /// The version training started from.
    pub base: ModelRef,
    /// Held-out numbers of the published weights.
    pub heldout: PairMetrics,
    /// Numbers on each `--eval-jsonl` file, by file stem.
    pub eval: BTreeMap<String, PairMetrics>,
    pub normalization: Normalization,
    /// Training loss of every step this call ran.
    pub step_losses: Vec<f64>,
    /// Held-out loss at each evaluation, as (step, loss).
    pub heldout_history: Vec<(u64, f64)>,
    pub best_step: u64,
    pub stopped_early: bool,
    pub train_examples: usize,
    pub heldout_examples: usize,
    pub resumed_from: Option<ModelRef>,
}

/// How a running job is steered from outside: the stop notice and the
/// delivery to keep alive on the work queue.
pub(crate) struct Control<'a> {
    pub stop: watch::Receiver<bool>,
    pub keepalive: Option<(&'a Delivery, Duration)>,
}

/// Trains one reward model to completion: resumes from the job's newest
/// checkpoint when there is one, publishes the final version with its
/// normalization and announces it on the bus. When `shutdown` resolves, the
/// run saves a checkpoint after the current step and returns
/// [`RewardError::Interrupted`].
pub async fn train_reward_model(
    settings: &Settings,
    bus: &BusHandle,
    store: &Store,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RewardOutcome, RewardError> {
    let (stop_tx, stop) = watch::channel(false);
    let watcher = tokio::spawn(async move {
        shutdown.await;
        // The receiver is gone once the run ended, which is fine.
        stop_tx.send(true).ok();
    });
    let outcome = train_with(settings, bus, store, Control { stop, keepalive: None }).await;
    watcher.abort();
    outcome
}

/// Returns the version a fresh run starts from.
pub async fn resolve_base(registry: &ModelRegistry, settings: &Settings) -> Result<ModelRef, RewardError> {
    let base = settings.base_ref().map_err(|problem| RewardError::Settings(vec![problem]))?;
    match base {
        Some(BaseModel::Version(model)) => {
            registry.manifest(&model).await.map_err(|error| RewardError::Base { reason: error.to_string() })?;
            Ok(model)
        }
        Some(BaseModel::Newest(name)) => match registry.latest(&name).await? {
            Some(manifest) => Ok(manifest.model_ref()),
            None => Err(RewardError::Base { reason: format!("model {name:?} has no published version") }),
        },
        None => {
            let mut newest: Option<troupe_store::Manifest> = None;
            for name in registry.list_models().await? {
                let Some(manifest) = registry.latest(&name).await? else { continue };
                if manifest.kind == ModelKind::Sft && newest.as_ref().is_none_or(|n| manifest.created_at > n.created_at) {
                    newest = Some(manifest);
                }
            }
            newest.map(|manifest| manifest.model_ref()).ok_or_else(|| RewardError::Base {
                reason: "no model of kind sft is stored; train one first or name a model with --base".into(),
            })
        }
    }
}

/// The preference data of a run.
struct Data {
    train: Vec<PreferenceExample>,
    heldout: Vec<PreferenceExample>,
    datasets: Vec<DatasetSnapshot>,
    jsonl: Vec<JsonlSnapshot>,
}

/// Reads every source, at most up to `limits` for datasets (a resumed run
/// reads exactly what the checkpoint read), and splits by prompt.
async fn read_data(settings: &Settings, store: &Store, limits: &[DatasetSnapshot]) -> Result<Data, RewardError> {
    let mut builder = ExampleBuilder::new();
    let mut datasets = Vec::new();
    for name in settings.datasets() {
        let limit = limits.iter().find(|snapshot| snapshot.dataset == name).map(|snapshot| snapshot.last_seq);
        let (records, snapshot) = read_records(store, &name, limit).await?;
        for record in &records {
            builder.add_record(record);
        }
        tracing::info!(dataset = %name, records = snapshot.records, last_seq = snapshot.last_seq, "preference dataset read");
        datasets.push(snapshot);
    }
    let mut jsonl = Vec::new();
    for path in &settings.pairs_jsonl {
        let (pairs, snapshot) = read_jsonl(path)?;
        builder.add_jsonl_pairs(&pairs, &path.display().to_string());
        jsonl.push(snapshot);
    }
    let (examples, dropped) = builder.finish();
    if dropped.total() > 0 {
        tracing::info!(
            tied = dropped.tied,
            same_text = dropped.same_text,
            unknown_candidate = dropped.unknown_candidate,
            "pairs left out of the loss"
        );
    }
    let fraction = ValidationFraction::new(settings.heldout_fraction)?;
    let (train, heldout) = split_examples(examples, fraction);
    let pairs = |examples: &[PreferenceExample]| examples.iter().map(|e| e.pairs.len()).sum::<usize>();
    tracing::info!(
        train_examples = train.len(),
        train_pairs = pairs(&train),
        heldout_examples = heldout.len(),
        heldout_pairs = pairs(&heldout),
        "examples grouped by prompt"
    );
    if train.is_empty() || heldout.is_empty() {
        return Err(RewardError::NoData {
            reason: format!(
                "{} training and {} held-out prompts with pairs; both sides need at least one \
                 (add preferences, or change --heldout-fraction {})",
                train.len(),
                heldout.len(),
                settings.heldout_fraction
            ),
        });
    }
    Ok(Data { train, heldout, datasets, jsonl })
}

fn read_jsonl(path: &Path) -> Result<(Vec<troupe_data::PreferencePair>, JsonlSnapshot), RewardError> {
    let bytes = std::fs::read(path).map_err(|source| {
        RewardError::Data(troupe_data::DataError::Io { path: path.to_path_buf(), source })
    })?;
    let pairs = read_preference_pairs(path, Mode::Strict)?.into_values();
    let snapshot = JsonlSnapshot { path: path.display().to_string(), sha256: sha256_hex(&bytes), lines: pairs.len() };
    Ok((pairs, snapshot))
}

/// Renders every candidate of every example.
fn render_examples(
    tokenizer: &Tokenizer,
    examples: &[PreferenceExample],
    max_tokens: usize,
) -> Result<Vec<Vec<Vec<u32>>>, RewardError> {
    examples
        .iter()
        .map(|example| {
            example
                .candidates
                .iter()
                .map(|candidate| render_candidate(tokenizer, &example.prompt, &candidate.text, candidate.ends_with_eos, max_tokens))
                .collect::<Result<Vec<_>, _>>()
                .map_err(RewardError::from)
        })
        .collect()
}

/// Scores every candidate of `examples` and returns the pair metrics and the
/// scores per example.
fn evaluate(
    model: &Model,
    pad_id: u32,
    examples: &[PreferenceExample],
    rows: &[Vec<Vec<u32>>],
) -> Result<(PairMetrics, Vec<Vec<f32>>), RewardError> {
    let flat: Vec<Vec<u32>> = rows.iter().flatten().cloned().collect();
    let values = score_values(model, &flat, pad_id, EVAL_CHUNK_ROWS)?;
    let mut per_example = Vec::with_capacity(rows.len());
    let mut offset = 0;
    for example_rows in rows {
        per_example.push(values[offset..offset + example_rows.len()].to_vec());
        offset += example_rows.len();
    }
    let refs: Vec<&PreferenceExample> = examples.iter().collect();
    Ok((pair_metrics(&refs, &per_example), per_example))
}

/// Deterministic example order: a fresh shuffle of all training examples
/// every epoch, seeded by the run seed and the epoch number, so the position
/// alone (examples drawn so far) restores it.
struct ExampleOrder {
    seed: u64,
    count: usize,
    drawn: u64,
    epoch: Option<(u64, Vec<usize>)>,
}

impl ExampleOrder {
    fn new(seed: u64, count: usize, drawn: u64) -> ExampleOrder {
        ExampleOrder { seed, count, drawn, epoch: None }
    }

    fn next_batch(&mut self, size: usize) -> Vec<usize> {
        let mut batch = Vec::with_capacity(size);
        for _ in 0..size {
            let epoch = self.drawn / self.count as u64;
            if self.epoch.as_ref().is_none_or(|(current, _)| *current != epoch) {
                let mut order: Vec<usize> = (0..self.count).collect();
                let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                order.shuffle(&mut rng);
                self.epoch = Some((epoch, order));
            }
            if let Some((_, order)) = &self.epoch {
                batch.push(order[(self.drawn % self.count as u64) as usize]);
            }
            self.drawn += 1;
        }
        batch
    }
}

/// The model, tokenizer and position a run starts from.
struct Start {
    model: Model,
    tokenizer: Tokenizer,
    base: ModelRef,
    optimizer_state: Option<bytes::Bytes>,
    state: Option<TrainState>,
    resumed_from: Option<ModelRef>,
    /// Dataset reads of the checkpoint, so a resumed run reads the same records.
    limits: Vec<DatasetSnapshot>,
}

pub(crate) async fn train_with(
    settings: &Settings,
    bus: &BusHandle,
    store: &Store,
    mut control: Control<'_>,
) -> Result<RewardOutcome, RewardError> {
    settings.validate().map_err(RewardError::Settings)?;
    let device = Device::Cpu;
    let registry = ModelRegistry::new(store.clone());
    let settings_json = serde_json::to_value(settings).unwrap_or_default();

    let start = match find_job_checkpoint(&registry, &settings.output, &settings.job_id).await? {
        Some(manifest) => resume(settings, &registry, manifest, &settings_json, &device).await?,
        None => {
            let base = resolve_base(&registry, settings).await?;
            let restored = load_checkpoint(&registry, &base, &device).await?;
            let mut model = restored.model;
            model.add_heads(Heads { score: true, value: false }, settings.seed)?;
            tracing::info!(base = %base, "starting from base model");
            Start {
                model,
                tokenizer: restored.tokenizer,
                base,
                optimizer_state: None,
                state: None,
                resumed_from: None,
                limits: Vec::new(),
            }
        }
    };
    if let (Some(state), Some(model)) = (start.state.as_ref().filter(|s| s.finished), start.resumed_from.as_ref()) {
        return finished_outcome(bus, &registry, model, &start.base, state).await;
    }
    let Some(pad_id) = start.tokenizer.pad_id() else {
        return Err(RewardError::Base {
            reason: format!("the tokenizer of {} has no padding token or chat template", start.base),
        });
    };
    let max_tokens = settings.max_tokens.min(start.model.config().max_position_embeddings);

    let data = read_data(settings, store, &start.limits).await?;
    let train_rows = render_examples(&start.tokenizer, &data.train, max_tokens)?;
    let heldout_rows = render_examples(&start.tokenizer, &data.heldout, max_tokens)?;
    let mut eval_sets = Vec::new();
    for path in &settings.eval_jsonl {
        let (pairs, _) = read_jsonl(path)?;
        let mut builder = ExampleBuilder::new();
        builder.add_jsonl_pairs(&pairs, &path.display().to_string());
        let (examples, _) = builder.finish();
        let rows = render_examples(&start.tokenizer, &examples, max_tokens)?;
        let stem = path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
        eval_sets.push((stem, examples, rows));
    }

    let run = Run { settings, bus, registry: &registry, pad_id, max_tokens, settings_json: &settings_json };
    run.train(start, &data, &train_rows, &heldout_rows, &eval_sets, &mut control).await
}

/// The outcome of a job whose final version is already published: announces
/// it again (the announcement id makes that a no-op when it was stored) and
/// returns its recorded numbers.
async fn finished_outcome(
    bus: &BusHandle,
    registry: &ModelRegistry,
    model: &ModelRef,
    base: &ModelRef,
    state: &TrainState,
) -> Result<RewardOutcome, RewardError> {
    tracing::info!(model = %model, step = state.step, "job already finished; nothing to train");
    let bytes = registry.load_file(model, crate::REWARD_FILE).await?;
    let info: RewardInfo = serde_json::from_slice(&bytes).map_err(|error| RewardError::NotAReward {
        model: model.to_string(),
        reason: format!("{} does not decode: {error}", crate::REWARD_FILE),
    })?;
    announce(bus, &registry.manifest(model).await?, announcement_metrics(&info)).await?;
    Ok(RewardOutcome {
        model: model.clone(),
        base: base.clone(),
        heldout: PairMetrics {
            loss: info.heldout_loss,
            accuracy: info.heldout_accuracy,
            pairs: info.heldout_pairs,
            examples: info.heldout_examples,
        },
        eval: BTreeMap::new(),
        normalization: info.normalization,
        step_losses: Vec::new(),
        heldout_history: Vec::new(),
        best_step: info.best_step,
        stopped_early: info.stopped_early,
        train_examples: info.train_examples,
        heldout_examples: info.heldout_examples,
        resumed_from: Some(model.clone()),
    })
}

async fn resume(
    settings: &Settings,
    registry: &ModelRegistry,
    manifest: troupe_store::Manifest,
    settings_json: &serde_json::Value,
    device: &Device,
) -> Result<Start, RewardError> {
    let model_ref = manifest.model_ref();
    let resume_error = |reason: String| RewardError::Resume {
        job_id: settings.job_id.clone(),
        model: model_ref.to_string(),
        reason,
    };
    if manifest.metadata.get("settings") != Some(settings_json) {
        return Err(resume_error(
            "the job was started with other settings; rerun with the same settings or a new --job-id".into(),
        ));
    }
    let base = manifest.parent.clone().ok_or_else(|| resume_error("the checkpoint records no base model".into()))?;
    let restored = load_checkpoint(registry, &model_ref, device).await?;
    let state = restored.state.ok_or_else(|| resume_error("the version has no training state".into()))?;
    let limits: Vec<DatasetSnapshot> = state
        .data_position
        .get("datasets")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|error| resume_error(format!("its data position does not decode: {error}")))?
        .unwrap_or_default();
    tracing::info!(job_id = %settings.job_id, model = %model_ref, step = state.step, finished = state.finished, "resuming from checkpoint");
    Ok(Start {
        model: restored.model,
        tokenizer: restored.tokenizer,
        base,
        optimizer_state: restored.optimizer_state,
        state: Some(state),
        resumed_from: Some(model_ref),
        limits,
    })
}

/// Everything fixed for the duration of one run.
struct Run<'a> {
    settings: &'a Settings,
    bus: &'a BusHandle,
    registry: &'a ModelRegistry,
    pad_id: u32,
    max_tokens: usize,
    settings_json: &'a serde_json::Value,
}

/// The lowest held-out loss so far and the weights that reached it.
struct Best {
    loss: f64,
    step: u64,
    weights: Option<Vec<Tensor>>,
    evals_since: u32,
}

impl Run<'_> {
    #[allow(clippy::too_many_arguments)]
    async fn train(
        &self,
        start: Start,
        data: &Data,
        train_rows: &[Vec<Vec<u32>>],
        heldout_rows: &[Vec<Vec<u32>>],
        eval_sets: &[EvalSet],
        control: &mut Control<'_>,
    ) -> Result<RewardOutcome, RewardError> {
        let settings = self.settings;
        let Start { model, tokenizer, base, optimizer_state, state, resumed_from, .. } = start;
        let vars = model.vars();
        let adamw = AdamWConfig { learning_rate: settings.learning_rate, weight_decay: settings.weight_decay, ..AdamWConfig::default() };
        let mut optimizer = AdamW::new(model.named_vars(), adamw)?;
        if let Some(bytes) = &optimizer_state {
            optimizer.load_safetensors(bytes)?;
        }
        let first_step = state.as_ref().map_or(0, |s| s.step);
        let drawn = state.as_ref().and_then(|s| s.data_position.get("examples_drawn")).and_then(|v| v.as_u64()).unwrap_or(0);
        let mut order = ExampleOrder::new(settings.seed, data.train.len(), drawn);
        let schedule = LrSchedule {
            peak: settings.learning_rate,
            floor: settings.min_learning_rate,
            warmup_steps: settings.warmup_steps,
            total_steps: settings.steps,
        };
        // NOTE: the best weights live in memory only, so a resumed run
        // restarts early stopping from its checkpoint's weights.
        let mut best = Best { loss: f64::INFINITY, step: first_step, weights: None, evals_since: 0 };

        let candidates: usize = data.train.iter().map(|e| e.candidates.len()).sum();
        let train_tokens: usize = train_rows.iter().flatten().map(Vec::len).sum();
        let sizes = DerivedSizes {
            parameters: model.num_parameters(),
            micro_batch: settings.batch_size,
            grad_accum: 1,
            tokens_per_step: train_tokens * settings.batch_size / data.train.len().max(1),
            total_steps: settings.steps,
        };
        tracing::info!(
            candidates_per_example = format!("{:.2}", candidates as f64 / data.train.len() as f64),
            max_tokens = self.max_tokens,
            "examples are prompts; tokens per step is an average over the training examples"
        );
        sizes.log();

        let mut reporter = StepReporter::new(&settings.job_id, Stage::RewardModel, first_step, settings.steps, Some(self.bus.clone()));
        let mut metrics = BTreeMap::new();
        let mut step_losses = Vec::new();
        let mut history = Vec::new();
        let mut last_keepalive = Instant::now();
        let mut last_saved = first_step;
        let mut stopped_early = false;
        let mut step = first_step;

        while step < settings.steps {
            // Stop when asked, after saving what the steps so far produced.
            if *control.stop.borrow() {
                if step > last_saved {
                    self.save(&base, &model, &optimizer, &tokenizer, step, &order, &metrics, data, None).await?;
                }
                reporter.finish(JobState::Failed, step, metrics.clone(), Some("interrupted by shutdown".into())).await;
                return Err(RewardError::Interrupted { step });
            }

            // Set the learning rate.
            let lr = schedule.lr_at(step);
            optimizer.set_learning_rate(lr);

            // Evaluate, stop early, checkpoint.
            if step > first_step && settings.eval_every > 0 && step % settings.eval_every == 0 {
                let (heldout, _) = evaluate(&model, self.pad_id, &data.heldout, heldout_rows)?;
                record_eval(&mut metrics, &mut history, step, &heldout);
                if self.improved(&mut best, &heldout, step, &vars)? {
                    tracing::info!(step, "held-out loss improved");
                } else if settings.patience > 0 && best.evals_since >= settings.patience {
                    tracing::info!(step, best_step = best.step, best_loss = format!("{:.4}", best.loss), "early stop: held-out loss stopped improving");
                    stopped_early = true;
                    break;
                }
            }
            if step > first_step && settings.checkpoint_every > 0 && step % settings.checkpoint_every == 0 {
                self.save(&base, &model, &optimizer, &tokenizer, step, &order, &metrics, data, None).await?;
                last_saved = step;
            }

            // Forward: every candidate of the batch's examples in one pass, then the pair losses.
            let indices = order.next_batch(settings.batch_size);
            let batch: Vec<&PreferenceExample> = indices.iter().map(|&i| &data.train[i]).collect();
            let rows: Vec<Vec<u32>> = indices.iter().flat_map(|&i| train_rows[i].iter().cloned()).collect();
            let tokens: usize = rows.iter().map(Vec::len).sum();
            let layout = PairLayout::new(&batch);
            let scores = score_rows(&model, &rows, self.pad_id, PadSide::Right)?;
            let loss = layout.loss(&scores)?;
            let loss_value = f64::from(loss.to_scalar::<f32>()?);

            // Backward and clip the global gradient norm.
            let mut grads = loss.backward()?;
            let grad_norm = if settings.grad_clip > 0.0 {
                clip_grad_norm(&mut grads, &vars, settings.grad_clip)?
            } else {
                troupe_model::grad_norm(&grads, &vars)?
            };

            // Step.
            optimizer.step(&grads)?;

            // Log, publish progress and keep the job's delivery alive.
            step_losses.push(loss_value);
            metrics.insert("train_loss".into(), loss_value);
            reporter.step(&StepStats { step, loss: loss_value, lr, grad_norm, tokens }, &metrics).await;
            if let Some((delivery, every)) = control.keepalive {
                if last_keepalive.elapsed() >= every {
                    if let Err(error) = delivery.progress().await {
                        tracing::warn!(job_id = %settings.job_id, %error, "failed to extend the job's acknowledgement deadline");
                    }
                    last_keepalive = Instant::now();
                }
            }
            // Training is CPU-bound; yielding lets shutdown and task cancellation in.
            tokio::task::yield_now().await;
            step += 1;
        }

        // Final evaluation, then the best weights back in place.
        if !stopped_early {
            let (heldout, _) = evaluate(&model, self.pad_id, &data.heldout, heldout_rows)?;
            record_eval(&mut metrics, &mut history, step, &heldout);
            self.improved(&mut best, &heldout, step, &vars)?;
        }
        if let Some(weights) = &best.weights {
            for (var, weights) in vars.iter().zip(weights) {
                var.set(weights)?;
            }
        }
        let (heldout, heldout_scores) = evaluate(&model, self.pad_id, &data.heldout, heldout_rows)?;
        let flat_scores: Vec<f32> = heldout_scores.into_iter().flatten().collect();
        let normalization = Normalization::measure(&flat_scores, "held-out candidates");
        metrics.insert("heldout_loss".into(), heldout.loss);
        metrics.insert("heldout_accuracy".into(), heldout.accuracy);
        let mut eval = BTreeMap::new();
        for (stem, examples, rows) in eval_sets {
            let (numbers, _) = evaluate(&model, self.pad_id, examples, rows)?;
            tracing::info!(file = %stem, accuracy = format!("{:.4}", numbers.accuracy), loss = format!("{:.4}", numbers.loss), pairs = numbers.pairs, "evaluation set");
            metrics.insert(format!("eval/{stem}/accuracy"), numbers.accuracy);
            metrics.insert(format!("eval/{stem}/loss"), numbers.loss);
            eval.insert(stem.clone(), numbers);
        }
        tracing::info!(
            heldout_accuracy = format!("{:.4}", heldout.accuracy),
            heldout_loss = format!("{:.4}", heldout.loss),
            best_step = best.step,
            stopped_early,
            score_mean = format!("{:.4}", normalization.mean),
            score_std = format!("{:.4}", normalization.std),
            "training finished"
        );

        let info = RewardInfo {
            normalization: normalization.clone(),
            datasets: data.datasets.clone(),
            jsonl: data.jsonl.clone(),
            train_examples: data.train.len(),
            heldout_examples: data.heldout.len(),
            heldout_pairs: heldout.pairs,
            heldout_accuracy: heldout.accuracy,
            heldout_loss: heldout.loss,
            best_step: best.step,
            stopped_early,
            max_tokens: self.max_tokens,
        };
        let model_ref = self.save(&base, &model, &optimizer, &tokenizer, step, &order, &metrics, data, Some(&info)).await?;
        reporter.finish(JobState::Succeeded, step, metrics.clone(), Some(format!("published {model_ref}"))).await;

        Ok(RewardOutcome {
            model: model_ref,
            base,
            heldout,
            eval,
            normalization,
            step_losses,
            heldout_history: history,
            best_step: best.step,
            stopped_early,
            train_examples: data.train.len(),
            heldout_examples: data.heldout.len(),
            resumed_from,
        })
    }

    /// Updates `best` with an evaluation; returns whether it improved.
    fn improved(&self, best: &mut Best, heldout: &PairMetrics, step: u64, vars: &[candle_core::Var]) -> Result<bool, RewardError> {
        if heldout.loss < best.loss - self.settings.min_delta {
            best.loss = heldout.loss;
            best.step = step;
            best.weights = Some(vars.iter().map(|var| var.as_tensor().copy()).collect::<Result<_, _>>()?);
            best.evals_since = 0;
            Ok(true)
        } else {
            best.evals_since += 1;
            Ok(false)
        }
    }

    /// Publishes a version after `step` steps. With `info` it is the final,
    /// announced version; without, a checkpoint that only a resumed run reads.
    #[allow(clippy::too_many_arguments)]
    async fn save(
        &self,
        base: &ModelRef,
        model: &Model,
        optimizer: &AdamW,
        tokenizer: &Tokenizer,
        step: u64,
        order: &ExampleOrder,
        metrics: &BTreeMap<String, f64>,
        data: &Data,
        info: Option<&RewardInfo>,
    ) -> Result<ModelRef, RewardError> {
        let finished = info.is_some();
        let state = TrainState {
            job_id: self.settings.job_id.clone(),
            step,
            total_steps: self.settings.steps,
            data_position: serde_json::json!({ "examples_drawn": order.drawn, "datasets": data.datasets, "jsonl": data.jsonl }),
            rng: serde_json::json!({ "order_seed": self.settings.seed, "examples_drawn": order.drawn }),
            finished,
            metrics: metrics.clone(),
        };
        let placeholder;
        let info = match info {
            Some(info) => info,
            None => {
                placeholder = RewardInfo {
                    normalization: Normalization {
                        reference: "not measured: intermediate checkpoint".into(),
                        ..Normalization::identity()
                    },
                    datasets: data.datasets.clone(),
                    jsonl: data.jsonl.clone(),
                    train_examples: data.train.len(),
                    heldout_examples: data.heldout.len(),
                    heldout_pairs: 0,
                    heldout_accuracy: metrics.get("heldout_accuracy").copied().unwrap_or(f64::NAN),
                    heldout_loss: metrics.get("heldout_loss").copied().unwrap_or(f64::NAN),
                    best_step: step,
                    stopped_early: false,
                    max_tokens: self.max_tokens,
                };
                &placeholder
            }
        };
        let version = RewardVersion {
            name: &self.settings.output,
            parent: Some(base.clone()),
            model,
            optimizer,
            tokenizer,
            state: &state,
            settings: self.settings_json.clone(),
            info,
        };
        let manifest = publish_reward_version(self.registry, version).await?;
        if finished {
            announce(self.bus, &manifest, announcement_metrics(info)).await?;
        }
        tracing::info!(model = %manifest.model_ref(), step, finished, "reward version published");
        Ok(manifest.model_ref())
    }
}

fn record_eval(metrics: &mut BTreeMap<String, f64>, history: &mut Vec<(u64, f64)>, step: u64, heldout: &PairMetrics) {
    metrics.insert("heldout_loss".into(), heldout.loss);
    metrics.insert("heldout_accuracy".into(), heldout.accuracy);
    history.push((step, heldout.loss));
    tracing::info!(
        step,
        heldout_loss = format!("{:.4}", heldout.loss),
        heldout_accuracy = format!("{:.4}", heldout.accuracy),
        pairs = heldout.pairs,
        "held-out evaluation"
    );
}
