//! The fine-tuning loop and [`fine_tune`], its entry point for the CLI and
//! the job service.

use std::collections::BTreeMap;
use std::future::Future;
use std::str::FromStr;
use std::time::{Duration, Instant};

use candle_core::Device;
use tokio::sync::watch;
use troupe_bus::{BusHandle, Delivery};
use troupe_model::{clip_grad_norm, lm_loss, AdamW, AdamWConfig, Model, Tokenizer};
use troupe_store::{ModelKind, ModelRef, ModelRegistry, Store};
use troupe_train::{
    announce, eos_rate, find_job_checkpoint, load_checkpoint, mean_loss, save_checkpoint,
    Checkpoint, DerivedSizes, GradAccumulator, LrSchedule, StepReporter, StepStats, TrainState,
};
use troupe_wire::{JobState, Stage};

use crate::data::{load_examples, make_batch, EpochOrder, Example};
use crate::{Settings, SftError};

/// Examples per batch in held-out loss and EOS-rate evaluation.
const EVAL_BATCH: usize = 32;

/// Result of a finished fine-tuning call.
#[derive(Debug, Clone)]
pub struct SftOutcome {
    /// The final version (kind `sft`).
    pub model: ModelRef,
    /// The base version it was fine-tuned from.
    pub base: ModelRef,
    pub first_step: u64,
    /// Training loss of every step this call ran.
    pub step_losses: Vec<f64>,
    /// Held-out loss on response tokens before training (absent on resume) and after.
    pub heldout_loss_before: Option<f64>,
    pub heldout_loss: f64,
    /// Share of held-out prompts whose greedy response ends with EOS within
    /// `--eval-max-new-tokens`, before training (absent on resume) and after.
    pub eos_rate_before: Option<f64>,
    pub eos_rate: f64,
    pub train_examples: usize,
    pub heldout_examples: usize,
}

pub(crate) struct Control<'a> {
    pub stop: watch::Receiver<bool>,
    pub keepalive: Option<(&'a Delivery, Duration)>,
}

/// Runs one fine-tuning job: loads the base version (or resumes from the
/// job's newest checkpoint), trains, and publishes and announces versions of
/// kind `sft` whose parent is the base.
pub async fn fine_tune(
    settings: &Settings,
    bus: &BusHandle,
    store: &Store,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<SftOutcome, SftError> {
    let (stop_tx, stop) = watch::channel(false);
    let watcher = tokio::spawn(async move {
        shutdown.await;
        stop_tx.send(true).ok();
    });
    let outcome = fine_tune_with(
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

/// Resolves `NAME@VERSION`, or `NAME` to its newest version.
async fn resolve_base(registry: &ModelRegistry, base: &str) -> Result<ModelRef, SftError> {
    let fail = |reason: String| SftError::Base {
        base: base.to_string(),
        reason,
    };
    if base.contains('@') {
        let model = ModelRef::from_str(base).map_err(|e| fail(e.to_string()))?;
        registry
            .manifest(&model)
            .await
            .map_err(|e| fail(e.to_string()))?;
        return Ok(model);
    }
    match registry
        .latest(base)
        .await
        .map_err(|e| fail(e.to_string()))?
    {
        Some(manifest) => Ok(manifest.model_ref()),
        None => Err(fail(
            "no version of this model is in the store; pretrain or import one first".into(),
        )),
    }
}

pub(crate) async fn fine_tune_with(
    settings: &Settings,
    bus: &BusHandle,
    store: &Store,
    mut control: Control<'_>,
) -> Result<SftOutcome, SftError> {
    settings.validate().map_err(SftError::Settings)?;
    let device = Device::Cpu;
    let registry = ModelRegistry::new(store.clone());
    let settings_json = serde_json::to_value(settings).unwrap_or_default();

    // The job's own checkpoint wins over the base, so a restart resumes.
    let checkpoint = find_job_checkpoint(&registry, &settings.output, &settings.job_id).await?;
    let (restored, base) = match checkpoint {
        Some(manifest) => {
            let model_ref = manifest.model_ref();
            let resume_error = |reason: &str| SftError::Resume {
                job_id: settings.job_id.clone(),
                model: model_ref.to_string(),
                reason: reason.into(),
            };
            if manifest.metadata.get("settings") != Some(&settings_json) {
                return Err(resume_error("the job was started with other settings; rerun with the same settings or a new --job-id"));
            }
            let base = manifest
                .parent
                .clone()
                .ok_or_else(|| resume_error("the checkpoint records no base version"))?;
            tracing::info!(job_id = %settings.job_id, model = %model_ref, "resuming from checkpoint");
            (load_checkpoint(&registry, &model_ref, &device).await?, base)
        }
        None => {
            let base = resolve_base(&registry, &settings.base).await?;
            let restored = load_checkpoint(&registry, &base, &device)
                .await
                .map_err(|e| SftError::Base {
                    base: base.to_string(),
                    reason: e.to_string(),
                })?;
            // The base's optimizer and training state belong to its own run.
            (
                troupe_train::Restored {
                    optimizer_state: None,
                    state: None,
                    ..restored
                },
                base,
            )
        }
    };
    let tokenizer = restored.tokenizer;
    let model = restored.model;
    if tokenizer.pad_id().is_none() || tokenizer.pad_id() == tokenizer.eos_id() {
        return Err(SftError::Base {
            base: base.to_string(),
            reason: "its tokenizer has no chat template with a pad token distinct from EOS".into(),
        });
    }
    let max_seq_len = settings
        .max_seq_len
        .min(model.config().max_position_embeddings);
    let examples = load_examples(
        &tokenizer,
        &settings.demonstrations,
        &settings.heldout,
        settings.validation_fraction,
        max_seq_len,
    )?;
    tracing::info!(
        base = %base,
        train_examples = examples.train.len(),
        heldout_examples = examples.heldout.len(),
        skipped_too_long = examples.skipped_too_long,
        "demonstrations loaded"
    );

    let state = restored.state;
    if let Some(state) = state.as_ref().filter(|s| s.finished) {
        tracing::info!(job_id = %settings.job_id, "job already finished; nothing to do");
        return Ok(SftOutcome {
            model: restored.manifest.model_ref(),
            base,
            first_step: state.step,
            step_losses: Vec::new(),
            heldout_loss_before: None,
            heldout_loss: state
                .metrics
                .get("heldout_loss")
                .copied()
                .unwrap_or(f64::NAN),
            eos_rate_before: None,
            eos_rate: state.metrics.get("eos_rate").copied().unwrap_or(f64::NAN),
            train_examples: examples.train.len(),
            heldout_examples: examples.heldout.len(),
        });
    }

    let run = Run {
        settings,
        bus,
        registry: &registry,
        model: &model,
        tokenizer: &tokenizer,
        base: &base,
        settings_json: &settings_json,
    };
    run.train(
        &examples.train,
        &examples.heldout,
        restored.optimizer_state,
        state,
        &mut control,
        &device,
    )
    .await
}

/// One run's fixed context.
struct Run<'a> {
    settings: &'a Settings,
    bus: &'a BusHandle,
    registry: &'a ModelRegistry,
    model: &'a Model,
    tokenizer: &'a Tokenizer,
    base: &'a ModelRef,
    settings_json: &'a serde_json::Value,
}

impl Run<'_> {
    fn heldout_loss(&self, heldout: &[Example], device: &Device) -> Result<f64, SftError> {
        let pad = self.tokenizer.pad_id().unwrap_or(0);
        let mut batches = Vec::new();
        for chunk in heldout.chunks(EVAL_BATCH) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let batch = make_batch(&refs, pad, device)?;
            batches.push((batch.ids, Some(batch.attention_mask), Some(batch.loss_mask)));
        }
        Ok(mean_loss(self.model, &batches)?)
    }

    fn eos_rate(&self, heldout: &[Example]) -> Result<f64, SftError> {
        let prompts: Vec<Vec<u32>> = heldout.iter().map(|e| e.prompt_ids.clone()).collect();
        Ok(eos_rate(
            self.model,
            self.tokenizer,
            &prompts,
            self.settings.eval_max_new_tokens,
            EVAL_BATCH,
        )?)
    }

    async fn save(&self, optimizer: &AdamW, state: &TrainState) -> Result<ModelRef, SftError> {
        let checkpoint = Checkpoint {
            name: &self.settings.output,
            kind: ModelKind::Sft,
            parent: Some(self.base.clone()),
            model: self.model,
            optimizer,
            tokenizer: self.tokenizer,
            state,
            settings: self.settings_json.clone(),
        };
        let manifest = save_checkpoint(self.registry, checkpoint).await?;
        announce(self.bus, &manifest, state.metrics.clone()).await?;
        tracing::info!(model = %manifest.model_ref(), step = state.step, finished = state.finished, "checkpoint published");
        Ok(manifest.model_ref())
    }

    fn state(
        &self,
        step: u64,
        order: &EpochOrder,
        finished: bool,
        metrics: &BTreeMap<String, f64>,
    ) -> TrainState {
        TrainState {
            job_id: self.settings.job_id.clone(),
            step,
            total_steps: self.settings.steps,
            data_position: serde_json::json!({ "epoch": order.epoch, "index": order.index }),
            rng: serde_json::json!({ "shuffle_seed": self.settings.seed, "epoch": order.epoch }),
            finished,
            metrics: metrics.clone(),
        }
    }

    async fn train(
        &self,
        train: &[Example],
        heldout: &[Example],
        optimizer_state: Option<bytes::Bytes>,
        state: Option<TrainState>,
        control: &mut Control<'_>,
        device: &Device,
    ) -> Result<SftOutcome, SftError> {
        let settings = self.settings;
        let vars = self.model.vars();
        let adamw = AdamWConfig {
            learning_rate: settings.learning_rate,
            weight_decay: settings.weight_decay,
            ..AdamWConfig::default()
        };
        let mut optimizer = AdamW::new(self.model.named_vars(), adamw)?;
        if let Some(bytes) = &optimizer_state {
            optimizer.load_safetensors(bytes)?;
        }
        let first_step = state.as_ref().map_or(0, |s| s.step);
        let position = |key: &str| {
            state
                .as_ref()
                .and_then(|s| s.data_position.get(key))
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        };
        let mut order = EpochOrder::new(
            settings.seed,
            train.len(),
            position("epoch"),
            position("index") as usize,
        );
        let schedule = LrSchedule {
            peak: settings.learning_rate,
            floor: settings.min_learning_rate,
            warmup_steps: settings.warmup_steps,
            total_steps: settings.steps,
        };
        let pad = self.tokenizer.pad_id().unwrap_or(0);
        let mut metrics = state
            .as_ref()
            .map(|s| s.metrics.clone())
            .unwrap_or_default();

        let (heldout_loss_before, eos_rate_before) = if first_step == 0 {
            let loss = self.heldout_loss(heldout, device)?;
            let rate = self.eos_rate(heldout)?;
            tracing::info!(
                heldout_loss = format!("{loss:.4}"),
                eos_rate = format!("{rate:.3}"),
                "base model evaluated"
            );
            metrics.insert("base_heldout_loss".into(), loss);
            metrics.insert("base_eos_rate".into(), rate);
            (Some(loss), Some(rate))
        } else {
            (None, None)
        };

        let mean_len = train.iter().map(|e| e.ids.len()).sum::<usize>() / train.len().max(1);
        let sizes = DerivedSizes {
            parameters: self.model.num_parameters(),
            micro_batch: settings.batch_size,
            grad_accum: settings.grad_accum,
            tokens_per_step: settings.batch_size * settings.grad_accum * mean_len,
            total_steps: settings.steps,
        };
        sizes.log();
        let mut reporter = StepReporter::new(
            &settings.job_id,
            Stage::Sft,
            first_step,
            settings.steps,
            Some(self.bus.clone()),
        );
        let mut accumulator = GradAccumulator::new(vars.clone());
        let mut step_losses = Vec::new();
        let mut last_keepalive = Instant::now();
        let mut last_saved = first_step;

        for step in first_step..settings.steps {
            // Stop when asked, after saving what the steps so far produced.
            if *control.stop.borrow() {
                if step > last_saved {
                    self.save(&optimizer, &self.state(step, &order, false, &metrics))
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
                return Err(SftError::Interrupted { step });
            }

            // Set the learning rate.
            let lr = schedule.lr_at(step);
            optimizer.set_learning_rate(lr);

            // Evaluate and checkpoint (never at the step the run started from).
            if step > first_step && settings.eval_every > 0 && step % settings.eval_every == 0 {
                let loss = self.heldout_loss(heldout, device)?;
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
                self.save(&optimizer, &self.state(step, &order, false, &metrics))
                    .await?;
                last_saved = step;
            }

            // Forward and backward over the micro-batches; the loss covers
            // response tokens and EOS only.
            let mut step_loss = 0.0;
            let mut step_tokens = 0;
            for _ in 0..settings.grad_accum {
                let indices = order.next_indices(settings.batch_size);
                let examples: Vec<&Example> = indices.iter().map(|&i| &train[i]).collect();
                let batch = make_batch(&examples, pad, device)?;
                let logits = self
                    .model
                    .forward(&batch.ids, Some(&batch.attention_mask))?;
                let loss = lm_loss(&logits, &batch.ids, Some(&batch.loss_mask))?;
                step_loss += loss.to_scalar::<f32>()? as f64 / settings.grad_accum as f64;
                step_tokens += batch.loss_tokens;
                accumulator.add((loss / settings.grad_accum as f64)?.backward()?)?;
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
            reporter
                .step(
                    &StepStats {
                        step,
                        loss: step_loss,
                        lr,
                        grad_norm,
                        tokens: step_tokens,
                    },
                    &metrics,
                )
                .await;
            if let Some((delivery, every)) = control.keepalive {
                if last_keepalive.elapsed() >= every {
                    if let Err(error) = delivery.progress().await {
                        tracing::warn!(job_id = %settings.job_id, %error, "failed to extend the job's acknowledgement deadline");
                    }
                    last_keepalive = Instant::now();
                }
            }
            tokio::task::yield_now().await;
        }

        let heldout_loss = self.heldout_loss(heldout, device)?;
        let eos_rate = self.eos_rate(heldout)?;
        metrics.insert("heldout_loss".into(), heldout_loss);
        metrics.insert("eos_rate".into(), eos_rate);
        tracing::info!(
            heldout_loss = format!("{heldout_loss:.4}"),
            eos_rate = format!("{eos_rate:.3}"),
            "fine-tuning finished"
        );
        let model = self
            .save(
                &optimizer,
                &self.state(settings.steps, &order, true, &metrics),
            )
            .await?;
        reporter
            .finish(
                JobState::Succeeded,
                settings.steps,
                metrics.clone(),
                Some(format!("published {model}")),
            )
            .await;

        Ok(SftOutcome {
            model,
            base: self.base.clone(),
            first_step,
            step_losses,
            heldout_loss_before,
            heldout_loss,
            eos_rate_before,
            eos_rate,
            train_examples: train.len(),
            heldout_examples: heldout.len(),
        })
    }
}
