//! The pretraining loop and [`pretrain`], its entry point for the CLI and
//! the job service.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use tokio::sync::watch;
use troupe_bus::{BusHandle, Delivery};
use troupe_model::{clip_grad_norm, lm_loss, AdamW, AdamWConfig, Heads, Model, Tokenizer};
use troupe_store::{ModelKind, ModelRef, ModelRegistry, Store};
use troupe_train::checkpoint::check_tokenizer_matches;
use troupe_train::{
    announce, find_job_checkpoint, load_checkpoint, mean_loss, save_checkpoint, unigram_entropy,
    Checkpoint, DerivedSizes, GradAccumulator, LrSchedule, StepReporter, StepStats, TrainState,
};
use troupe_wire::{JobState, Stage};

use crate::data::{self, heldout_windows, WindowSampler};
use crate::{PretrainError, Settings};

/// Result of a finished pretraining call.
#[derive(Debug, Clone)]
pub struct PretrainOutcome {
    /// The final version (kind `base`).
    pub model: ModelRef,
    /// The first step this call ran; above 0 when it resumed.
    pub first_step: u64,
    /// Training loss of every step this call ran, from `first_step` on.
    pub step_losses: Vec<f64>,
    /// Held-out loss of the final model, in nats per token.
    pub heldout_loss: f64,
    /// Entropy of the training tokens' unigram distribution, in nats.
    pub unigram_entropy: f64,
    pub train_tokens: usize,
    pub validation_tokens: usize,
    /// The checkpoint this call resumed from.
    pub resumed_from: Option<ModelRef>,
}

/// Outside controls of a running job: the stop notice and the
/// delivery to keep alive on the work queue.
pub(crate) struct Control<'a> {
    pub stop: watch::Receiver<bool>,
    pub keepalive: Option<(&'a Delivery, Duration)>,
}

/// Runs one pretraining job to completion: resumes from the job's newest
/// checkpoint when there is one, publishes checkpoints and the final version,
/// and announces each on the bus. When `shutdown` resolves, the run saves a
/// checkpoint after the current step and returns [`PretrainError::Interrupted`].
pub async fn pretrain(
    settings: &Settings,
    bus: &BusHandle,
    store: &Store,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<PretrainOutcome, PretrainError> {
    let (stop_tx, stop) = watch::channel(false);
    let watcher = tokio::spawn(async move {
        shutdown.await;
        // The receiver is gone once the run ended, which is fine.
        stop_tx.send(true).ok();
    });
    let outcome = pretrain_with(
        settings,
        bus,
        store,
        Control {
            stop,
            keepalive: None,
        },
    )
    .await;
    watcher.abort();
    outcome
}

/// The model, tokenizer and position a run starts from.
struct Start {
    model: Model,
    tokenizer: Tokenizer,
    optimizer_state: Option<bytes::Bytes>,
    state: Option<TrainState>,
    resumed_from: Option<ModelRef>,
}

pub(crate) async fn pretrain_with(
    settings: &Settings,
    bus: &BusHandle,
    store: &Store,
    mut control: Control<'_>,
) -> Result<PretrainOutcome, PretrainError> {
    settings.validate().map_err(PretrainError::Settings)?;
    let device = Device::Cpu;
    let registry = ModelRegistry::new(store.clone());
    let settings_json = serde_json::to_value(settings).unwrap_or_default();

    let corpus = data::read_corpus(&settings.corpus, settings.validation_fraction)?;
    let corpus_sha = data::corpus_sha256(&corpus);
    tracing::info!(
        train_documents = corpus.train.len(),
        validation_documents = corpus.validation.len(),
        duplicates_removed = corpus.report.duplicates_removed(),
        corpus_sha256 = %&corpus_sha[..16],
        "corpus loaded"
    );

    let start = match find_job_checkpoint(&registry, &settings.output, &settings.job_id).await? {
        Some(manifest) => {
            let model_ref = manifest.model_ref();
            let resume_error = |reason: String| PretrainError::Resume {
                job_id: settings.job_id.clone(),
                model: model_ref.to_string(),
                reason,
            };
            if manifest.metadata.get("settings") != Some(&settings_json) {
                return Err(resume_error(
                    "the job was started with other settings; rerun with the same settings or a new --job-id".into(),
                ));
            }
            let restored = load_checkpoint(&registry, &model_ref, &device).await?;
            let state = restored
                .state
                .ok_or_else(|| resume_error("the version has no training state".into()))?;
            if state
                .data_position
                .get("corpus_sha256")
                .and_then(|v| v.as_str())
                != Some(corpus_sha.as_str())
            {
                return Err(resume_error(
                    "the corpus changed since the checkpoint; restore it or use a new --job-id"
                        .into(),
                ));
            }
            tracing::info!(job_id = %settings.job_id, model = %model_ref, step = state.step, "resuming from checkpoint");
            Start {
                model: restored.model,
                tokenizer: restored.tokenizer,
                optimizer_state: restored.optimizer_state,
                state: Some(state),
                resumed_from: Some(model_ref),
            }
        }
        None => fresh_start(settings, store, &corpus, &corpus_sha, &device).await?,
    };

    if let Some(state) = start.state.as_ref().filter(|state| state.finished) {
        tracing::info!(job_id = %settings.job_id, step = state.step, "job already finished; nothing to do");
        let streams = data::token_streams(store, &corpus, &start.tokenizer).await?;
        return Ok(PretrainOutcome {
            model: start
                .resumed_from
                .clone()
                .unwrap_or_else(|| ModelRef::new(settings.output.clone(), 0)),
            first_step: state.step,
            step_losses: Vec::new(),
            heldout_loss: state
                .metrics
                .get("heldout_loss")
                .copied()
                .unwrap_or(f64::NAN),
            unigram_entropy: unigram_entropy(&streams.train),
            train_tokens: streams.train.len(),
            validation_tokens: streams.validation.len(),
            resumed_from: start.resumed_from,
        });
    }

    let streams = data::token_streams(store, &corpus, &start.tokenizer).await?;
    for (side, tokens) in [
        ("training", &streams.train),
        ("validation", &streams.validation),
    ] {
        if tokens.len() < settings.seq_len {
            return Err(PretrainError::CorpusTooSmall {
                reason: format!(
                    "{} {side} tokens, fewer than --seq-len {}",
                    tokens.len(),
                    settings.seq_len
                ),
            });
        }
    }
    let entropy = unigram_entropy(&streams.train);
    tracing::info!(
        train_tokens = streams.train.len(),
        validation_tokens = streams.validation.len(),
        reused = streams.reused,
        shards = %streams.prefix,
        unigram_entropy = format!("{entropy:.4}"),
        "token shards ready"
    );

    run_loop(
        settings,
        bus,
        &registry,
        start,
        &streams,
        &corpus_sha,
        entropy,
        settings_json,
        &mut control,
        &device,
    )
    .await
}

/// Picks the tokenizer (given, stored or newly trained), checks it against
/// the model config and initializes the model. Nothing is written to the
/// store before every check has passed.
async fn fresh_start(
    settings: &Settings,
    store: &Store,
    corpus: &troupe_data::Corpus,
    corpus_sha: &str,
    device: &Device,
) -> Result<Start, PretrainError> {
    let preset = troupe_model::Config::preset(&settings.preset)?;
    let (tokenizer, trained) = match &settings.tokenizer {
        Some(path) => {
            let tokenizer = data::read_tokenizer(path)?;
            if let Some(vocab) = settings.vocab_size.filter(|&v| v != tokenizer.vocab_size()) {
                return Err(PretrainError::VocabMismatch(format!(
                    "--vocab-size is {vocab} but {} has {} tokens; drop --vocab-size or give a tokenizer of that size",
                    path.display(),
                    tokenizer.vocab_size()
                )));
            }
            (tokenizer, false)
        }
        None => {
            let vocab = settings.vocab_size.unwrap_or(preset.vocab_size);
            match data::stored_tokenizer(store, corpus_sha, vocab).await? {
                Some(tokenizer) => (tokenizer, false),
                None => {
                    let started = Instant::now();
                    let tokenizer = data::train_tokenizer(corpus, vocab)?;
                    tracing::info!(
                        vocab_size = tokenizer.vocab_size(),
                        seconds = started.elapsed().as_secs_f64(),
                        "tokenizer trained"
                    );
                    (tokenizer, true)
                }
            }
        }
    };

    let mut config = settings
        .model_config(settings.vocab_size.unwrap_or(tokenizer.vocab_size()))
        .map_err(|e| PretrainError::Settings(vec![e]))?;
    config.bos_token_id = tokenizer.bos_id();
    config.eos_token_id = tokenizer.eos_id().into_iter().collect();
    config.pad_token_id = tokenizer.pad_id();
    config.validate()?;
    check_tokenizer_matches(&tokenizer, &config)
        .map_err(|e| PretrainError::VocabMismatch(e.to_string()))?;

    if trained {
        data::save_tokenizer(store, corpus_sha, &tokenizer).await?;
    }
    let model = Model::new_random(&config, Heads::default(), settings.seed, DType::F32, device)?;
    Ok(Start {
        model,
        tokenizer,
        optimizer_state: None,
        state: None,
        resumed_from: None,
    })
}

/// Runs the training loop from the start's step to `settings.steps`.
#[allow(clippy::too_many_arguments)]
async fn run_loop(
    settings: &Settings,
    bus: &BusHandle,
    registry: &ModelRegistry,
    start: Start,
    streams: &data::TokenStreams,
    corpus_sha: &str,
    entropy: f64,
    settings_json: serde_json::Value,
    control: &mut Control<'_>,
    device: &Device,
) -> Result<PretrainOutcome, PretrainError> {
    let Start {
        model,
        tokenizer,
        optimizer_state,
        state,
        resumed_from,
    } = start;
    let vars = model.vars();
    let adamw = AdamWConfig {
        learning_rate: settings.learning_rate,
        weight_decay: settings.weight_decay,
        ..AdamWConfig::default()
    };
    let mut optimizer = AdamW::new(model.named_vars(), adamw)?;
    if let Some(bytes) = &optimizer_state {
        optimizer.load_safetensors(bytes)?;
    }
    let first_step = state.as_ref().map_or(0, |s| s.step);
    let sampler_seed = settings.seed.wrapping_add(1);
    let position = state
        .as_ref()
        .and_then(|s| s.data_position.get("windows_drawn"))
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let mut sampler = WindowSampler::new(sampler_seed, settings.seq_len, position);
    let schedule = LrSchedule {
        peak: settings.learning_rate,
        floor: settings.min_learning_rate,
        warmup_steps: settings.warmup_steps,
        total_steps: settings.steps,
    };
    let (heldout_ids, heldout_rows) = heldout_windows(
        &streams.validation,
        settings.seq_len,
        settings.eval_sequences,
    );
    let heldout = vec![(
        Tensor::from_vec(heldout_ids, (heldout_rows, settings.seq_len), device)?,
        None,
        None,
    )];

    let sizes = DerivedSizes {
        parameters: model.num_parameters(),
        micro_batch: settings.batch_size,
        grad_accum: settings.grad_accum,
        tokens_per_step: settings.batch_size * settings.grad_accum * settings.seq_len,
        total_steps: settings.steps,
    };
    sizes.log();
    let mut reporter = StepReporter::new(
        &settings.job_id,
        Stage::Pretrain,
        first_step,
        settings.steps,
        Some(bus.clone()),
    );
    let mut accumulator = GradAccumulator::new(vars.clone());
    let mut step_losses = Vec::new();
    let mut metrics = BTreeMap::new();
    let mut last_keepalive = Instant::now();
    let mut last_saved = first_step;

    let saver = Saver {
        settings,
        registry,
        bus,
        model: &model,
        tokenizer: &tokenizer,
        corpus_sha,
        sampler_seed,
        settings_json: &settings_json,
    };

    for step in first_step..settings.steps {
        // Stop when asked, after saving what the steps so far produced.
        if *control.stop.borrow() {
            if step > last_saved {
                saver
                    .save(step, false, &metrics, &optimizer, sampler.position())
                    .await?;
            }
            reporter
                .finish(
                    JobState::Failed,
                    step,
                    metrics.clone(),
                    Some("interrupted by shutdown".into()),
                )
                .await;
            return Err(PretrainError::Interrupted { step });
        }

        // Set the learning rate.
        let lr = schedule.lr_at(step);
        optimizer.set_learning_rate(lr);

        // Evaluate and checkpoint (never at the step the run started from).
        if step > first_step && settings.eval_every > 0 && step % settings.eval_every == 0 {
            let loss = mean_loss(&model, &heldout)?;
            metrics.insert("heldout_loss".into(), loss);
            tracing::info!(
                step,
                heldout_loss = format!("{loss:.4}"),
                "held-out evaluation"
            );
        }
        if step > first_step
            && settings.checkpoint_every > 0
            && step % settings.checkpoint_every == 0
        {
            saver
                .save(step, false, &metrics, &optimizer, sampler.position())
                .await?;
            last_saved = step;
        }

        // Forward and backward over the micro-batches.
        let mut step_loss = 0.0;
        for _ in 0..settings.grad_accum {
            let ids = sampler.next_batch(&streams.train, settings.batch_size);
            let ids = Tensor::from_vec(ids, (settings.batch_size, settings.seq_len), device)?;
            let logits = model.forward(&ids, None)?;
            let loss = lm_loss(&logits, &ids, None)?;
            step_loss += loss.to_scalar::<f32>()? as f64 / settings.grad_accum as f64;
            let scaled = (loss / settings.grad_accum as f64)?;
            accumulator.add(scaled.backward()?)?;
        }
        let Some(mut grads) = accumulator.take() else {
            continue;
        };

        // Clip the global gradient norm.
        let grad_norm = if settings.grad_clip > 0.0 {
            clip_grad_norm(&mut grads, &vars, settings.grad_clip)?
        } else {
            troupe_model::grad_norm(&grads, &vars)?
        };

        // Step.
        optimizer.step(&grads)?;

        // Log, publish progress and keep the job's delivery alive.
        step_losses.push(step_loss);
        metrics.insert("train_loss".into(), step_loss);
        let stats = StepStats {
            step,
            loss: step_loss,
            lr,
            grad_norm,
            tokens: sizes.tokens_per_step,
        };
        reporter.step(&stats, &metrics).await;
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
    }

    let heldout_loss = mean_loss(&model, &heldout)?;
    metrics.insert("heldout_loss".into(), heldout_loss);
    metrics.insert("unigram_entropy".into(), entropy);
    tracing::info!(
        heldout_loss = format!("{heldout_loss:.4}"),
        unigram_entropy = format!("{entropy:.4}"),
        "training finished"
    );
    let model_ref = saver
        .save(
            settings.steps,
            true,
            &metrics,
            &optimizer,
            sampler.position(),
        )
        .await?;
    reporter
        .finish(
            JobState::Succeeded,
            settings.steps,
            metrics.clone(),
            Some(format!("published {model_ref}")),
        )
        .await;

    Ok(PretrainOutcome {
        model: model_ref,
        first_step,
        step_losses,
        heldout_loss,
        unigram_entropy: entropy,
        train_tokens: streams.train.len(),
        validation_tokens: streams.validation.len(),
        resumed_from,
    })
}

/// Publishes checkpoints of one run.
struct Saver<'a> {
    settings: &'a Settings,
    registry: &'a ModelRegistry,
    bus: &'a BusHandle,
    model: &'a Model,
    tokenizer: &'a Tokenizer,
    corpus_sha: &'a str,
    sampler_seed: u64,
    settings_json: &'a serde_json::Value,
}

impl Saver<'_> {
    /// Publishes the state after `step` completed steps and announces it.
    async fn save(
        &self,
        step: u64,
        finished: bool,
        metrics: &BTreeMap<String, f64>,
        optimizer: &AdamW,
        windows_drawn: u64,
    ) -> Result<ModelRef, PretrainError> {
        let state = TrainState {
            job_id: self.settings.job_id.clone(),
            step,
            total_steps: self.settings.steps,
            data_position: serde_json::json!({ "windows_drawn": windows_drawn, "corpus_sha256": self.corpus_sha }),
            rng: serde_json::json!({ "sampler_seed": self.sampler_seed, "windows_drawn": windows_drawn }),
            finished,
            metrics: metrics.clone(),
        };
        let checkpoint = Checkpoint {
            name: &self.settings.output,
            kind: ModelKind::Base,
            parent: None,
            model: self.model,
            optimizer,
            tokenizer: self.tokenizer,
            state: &state,
            settings: self.settings_json.clone(),
        };
        let manifest = save_checkpoint(self.registry, checkpoint).await?;
        announce(self.bus, &manifest, metrics.clone()).await?;
        tracing::info!(model = %manifest.model_ref(), step, finished, "checkpoint published");
        Ok(manifest.model_ref())
    }
}
