//! Stage 2 data: demonstrations rendered through the model crate's one chat
//! template, padded batches with their masks, and the seeded, resumable
//! order in which examples are visited.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use troupe_data::{read_demonstrations, Demonstration, Mode, Role, Split, ValidationFraction};
use troupe_model::{ChatMessage, Tokenizer};

use crate::SftError;

/// One rendered demonstration: token ids and, per token, 1 where it is part
/// of an assistant response (its text and the EOS that ends it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub response_mask: Vec<u8>,
    /// The prompt turns rendered with the opening of the assistant turn, for sampling.
    pub prompt_ids: Vec<u32>,
}

/// Renders `demonstration` through the chat template.
pub fn render(tokenizer: &Tokenizer, demonstration: &Demonstration) -> Result<Example, SftError> {
    let to_chat = |turns: &[troupe_data::Turn]| -> Vec<ChatMessage> {
        turns
            .iter()
            .map(|turn| match turn.role {
                Role::System => ChatMessage::system(turn.content.clone()),
                Role::User => ChatMessage::user(turn.content.clone()),
                Role::Assistant => ChatMessage::assistant(turn.content.clone()),
            })
            .collect()
    };
    let full = tokenizer.render_chat(&to_chat(demonstration.turns()), false)?;
    let prompt = tokenizer.render_chat(&to_chat(demonstration.prompt()), true)?;
    Ok(Example {
        ids: full.ids,
        response_mask: full.response_mask,
        prompt_ids: prompt.ids,
    })
}

/// Training and held-out examples, and how many were too long to use.
#[derive(Debug, Clone)]
pub struct Examples {
    pub train: Vec<Example>,
    pub heldout: Vec<Example>,
    pub skipped_too_long: usize,
}

/// Reads demonstrations in strict mode (the first malformed line fails the
/// load with its file and line), renders them, and drops examples longer
/// than `max_seq_len` tokens. Held-out examples come from `heldout` files, or
/// by prompt hash from the training files when none are given.
pub fn load_examples(
    tokenizer: &Tokenizer,
    train_files: &[PathBuf],
    heldout_files: &[PathBuf],
    validation_fraction: f64,
    max_seq_len: usize,
) -> Result<Examples, SftError> {
    let read = |files: &[PathBuf]| -> Result<Vec<Demonstration>, SftError> {
        let mut all = Vec::new();
        for file in files {
            all.extend(read_demonstrations(file, Mode::Strict)?.into_values());
        }
        Ok(all)
    };
    let mut train = read(train_files)?;
    let heldout = if heldout_files.is_empty() {
        let fraction = ValidationFraction::new(validation_fraction)?;
        let (kept, held): (Vec<_>, Vec<_>) = train
            .into_iter()
            .partition(|d| d.split(fraction) == Split::Train);
        train = kept;
        held
    } else {
        read(heldout_files)?
    };

    let mut skipped_too_long = 0;
    let mut render_all = |demonstrations: &[Demonstration]| -> Result<Vec<Example>, SftError> {
        let mut out = Vec::with_capacity(demonstrations.len());
        for demonstration in demonstrations {
            let example = render(tokenizer, demonstration)?;
            if example.ids.len() > max_seq_len {
                skipped_too_long += 1;
            } else {
                out.push(example);
            }
        }
        Ok(out)
    };
    let train = render_all(&train)?;
    let heldout = render_all(&heldout)?;
    if train.is_empty() || heldout.is_empty() {
        return Err(SftError::NoExamples(format!(
            "{} training and {} held-out examples fit in --max-seq-len {max_seq_len} ({skipped_too_long} too long); \
             raise --max-seq-len or add demonstrations",
            train.len(),
            heldout.len()
        )));
    }
    Ok(Examples {
        train,
        heldout,
        skipped_too_long,
    })
}

/// A padded batch: ids `(b, t)` with `pad` on the right, the attention mask
/// (1 for real tokens) and the loss mask (1 for response tokens and EOS).
pub struct Batch {
    pub ids: Tensor,
    pub attention_mask: Tensor,
    pub loss_mask: Tensor,
    /// Tokens that carry loss.
    pub loss_tokens: usize,
}

/// Pads `examples` on the right to the longest one.
pub fn make_batch(examples: &[&Example], pad: u32, device: &Device) -> Result<Batch, SftError> {
    let b = examples.len();
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut ids = vec![pad; b * t];
    let mut attention = vec![0u32; b * t];
    let mut loss = vec![0u32; b * t];
    for (row, example) in examples.iter().enumerate() {
        for (j, (&id, &response)) in example.ids.iter().zip(&example.response_mask).enumerate() {
            ids[row * t + j] = id;
            attention[row * t + j] = 1;
            loss[row * t + j] = u32::from(response);
        }
    }
    let loss_tokens = loss.iter().filter(|&&m| m == 1).count();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        attention_mask: Tensor::from_vec(attention, (b, t), device)?,
        loss_mask: Tensor::from_vec(loss, (b, t), device)?,
        loss_tokens,
    })
}

/// Visits examples epoch by epoch, each epoch in a permutation drawn from
/// the seed and the epoch number, so `(epoch, index)` is the whole state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochOrder {
    seed: u64,
    len: usize,
    pub epoch: u64,
    pub index: usize,
    permutation: Vec<usize>,
}

impl EpochOrder {
    pub fn new(seed: u64, len: usize, epoch: u64, index: usize) -> Self {
        let mut order = Self {
            seed,
            len,
            epoch,
            index,
            permutation: Vec::new(),
        };
        order.shuffle();
        order
    }

    fn shuffle(&mut self) {
        self.permutation = (0..self.len).collect();
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.permutation.shuffle(&mut rng);
    }

    /// Returns the next `count` example indices, moving into the next epoch as needed.
    pub fn next_indices(&mut self, count: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            if self.index >= self.len {
                self.epoch += 1;
                self.index = 0;
                self.shuffle();
            }
            out.push(self.permutation[self.index]);
            self.index += 1;
        }
        out
    }
}
