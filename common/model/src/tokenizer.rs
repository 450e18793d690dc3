//! Byte-level BPE tokenizer (Hugging Face `tokenizers`) and the one chat
//! template that turns conversations into token ids everywhere in troupe.
//!
//! A trained tokenizer reserves these special tokens, in this id order:
//! `<|pad|>` 0, `<|bos|>` 1, `<|eos|>` 2, `<|system|>` 3, `<|user|>` 4,
//! `<|assistant|>` 5, `<|end|>` 6. The troupe chat layout is
//!
//! ```text
//! <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|eos|>
//! ```
//!
//! so an assistant turn ends with EOS and the model learns to stop. A loaded
//! `tokenizer.json` that has `<|im_start|>`/`<|im_end|>` instead (ChatML, as
//! SmolLM2 uses) is rendered as ChatML with `<|im_end|>` as the end of a
//! response. Text inside messages never produces special tokens: a literal
//! `<|eos|>` in a prompt is encoded as ordinary bytes.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder, TokenizerImpl};

pub const PAD: &str = "<|pad|>";
pub const BOS: &str = "<|bos|>";
pub const EOS: &str = "<|eos|>";
pub const SYSTEM: &str = "<|system|>";
pub const USER: &str = "<|user|>";
pub const ASSISTANT: &str = "<|assistant|>";
pub const END: &str = "<|end|>";

/// The special tokens of a trained tokenizer, in the order of their ids.
pub const SPECIAL_TOKENS: [&str; 7] = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END];

/// 256 byte symbols plus the special tokens: the smallest vocabulary a trained tokenizer can have.
pub const MIN_VOCAB_SIZE: usize = 256 + SPECIAL_TOKENS.len();

const CHATML_START: &str = "<|im_start|>";
const CHATML_END: &str = "<|im_end|>";
const CHATML_PADS: [&str; 2] = ["<|endoftext|>", "<|pad|>"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of a conversation, as in the `{"messages": [...]}` JSONL format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// A rendered conversation: token ids and, per token, 1 where the token is
/// part of an assistant response (its text and the EOS that ends it), else 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTokens {
    pub ids: Vec<u32>,
    pub response_mask: Vec<u8>,
}

impl ChatTokens {
    fn push(&mut self, ids: &[u32], response: bool) {
        self.ids.extend_from_slice(ids);
        self.response_mask
            .extend(std::iter::repeat_n(u8::from(response), ids.len()));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChatFormat {
    Troupe,
    ChatMl,
}

/// Special token ids the chat template needs.
#[derive(Debug, Clone)]
struct ChatSpec {
    format: ChatFormat,
    bos: Option<u32>,
    eos: u32,
    pad: u32,
    /// Troupe: `<|system|>`, `<|user|>`, `<|assistant|>`; ChatML: `<|im_start|>` three times.
    role_markers: [u32; 3],
    /// Troupe: `<|end|>`; ChatML: `<|im_end|>` (also `eos`).
    end: u32,
}

/// A tokenizer with troupe's special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat: Option<ChatSpec>,
}

fn tokenizer_error(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Trains a byte-level BPE with at most `vocab_size` tokens (special tokens
    /// included) on the texts of `corpus`. Every byte has a token, so no input
    /// is ever lost to an unknown token.
    pub fn train<I, S>(corpus: I, vocab_size: usize) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if vocab_size < MIN_VOCAB_SIZE {
            return Err(Error::Tokenizer(format!(
                "vocab_size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE}"
            )));
        }
        let specials: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        let mut trainer = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut inner: TokenizerImpl<
            BPE,
            NormalizerWrapper,
            ByteLevel,
            PostProcessorWrapper,
            ByteLevelDecoder,
        > = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(None)
            .with_decoder(Some(ByteLevelDecoder::default()))
            .build()
            .map_err(tokenizer_error)?;
        inner.train(&mut trainer, corpus).map_err(tokenizer_error)?;
        Self::from_inner(tokenizers::Tokenizer::from(inner))
    }

    /// Loads any `tokenizer.json`. Chat rendering works when it has troupe's
    /// or ChatML's special tokens; encoding and decoding always work.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_inner(tokenizers::Tokenizer::from_bytes(bytes).map_err(tokenizer_error)?)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::io::read_file(path)?;
        Self::from_bytes(&bytes).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    fn from_inner(mut inner: tokenizers::Tokenizer) -> Result<Self> {
        // Special-token strings inside user text are encoded as plain text.
        // This flag is not part of tokenizer.json, so exports are unaffected.
        inner.set_encode_special_tokens(true);
        let chat = detect_chat(&inner)?;
        Ok(Self { inner, chat })
    }

    /// Serializes the tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(tokenizer_error)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::write_file(path, self.to_json()?.as_bytes())
    }

    /// Number of tokens, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.chat.as_ref().and_then(|c| c.bos)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.chat.as_ref().map(|c| c.eos)
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.chat.as_ref().map(|c| c.pad)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of `text`, with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(tokenizer_error)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are dropped when `skip_special_tokens` is set.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(tokenizer_error)
    }

    /// Renders a conversation through the chat template. With
    /// `add_generation_prompt`, the ids end with the opening of an assistant
    /// turn, ready for sampling. Assistant turns are marked in the response mask.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<ChatTokens> {
        let chat = self.chat.as_ref().ok_or_else(|| {
            Error::Tokenizer("this tokenizer has neither troupe's nor ChatML's chat tokens, so it cannot render a chat".into())
        })?;
        if messages.is_empty() {
            return Err(Error::Request("a chat needs at least one message".into()));
        }
        let mut out = ChatTokens {
            ids: Vec::new(),
            response_mask: Vec::new(),
        };
        if let Some(bos) = chat.bos.filter(|_| chat.format == ChatFormat::Troupe) {
            out.push(&[bos], false);
        }
        for message in messages {
            let response = message.role == Role::Assistant;
            out.push(&self.turn_opening(chat, message.role)?, false);
            out.push(&self.encode(&message.content)?, response);
            match (chat.format, response) {
                (ChatFormat::Troupe, true) => out.push(&[chat.eos], true),
                (ChatFormat::Troupe, false) => out.push(&[chat.end], false),
                (ChatFormat::ChatMl, _) => {
                    out.push(&[chat.end], response);
                    out.push(&self.encode("\n")?, false);
                }
            }
        }
        if add_generation_prompt {
            out.push(&self.turn_opening(chat, Role::Assistant)?, false);
        }
        Ok(out)
    }

    /// Renders a single-turn example: `prompt` as the user turn, `response` as the
    /// assistant turn (the SFT and reward-model layout).
    pub fn render_prompt_response(&self, prompt: &str, response: &str) -> Result<ChatTokens> {
        self.render_chat(
            &[ChatMessage::user(prompt), ChatMessage::assistant(response)],
            false,
        )
    }

    /// Renders the ids of `prompt` as a user turn followed by the opening of the
    /// assistant turn; sampling continues from here.
    pub fn render_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        Ok(self.render_chat(&[ChatMessage::user(prompt)], true)?.ids)
    }

    fn turn_opening(&self, chat: &ChatSpec, role: Role) -> Result<Vec<u32>> {
        let marker = chat.role_markers[role as usize];
        Ok(match chat.format {
            ChatFormat::Troupe => vec![marker],
            ChatFormat::ChatMl => {
                let mut ids = vec![marker];
                ids.extend(self.encode(&format!("{}\n", role.as_str()))?);
                ids
            }
        })
    }
}

fn detect_chat(inner: &tokenizers::Tokenizer) -> Result<Option<ChatSpec>> {
    let id = |token: &str| inner.token_to_id(token);
    if let (Some(pad), Some(eos), Some(system), Some(user), Some(assistant), Some(end)) = (
        id(PAD),
        id(EOS),
        id(SYSTEM),
        id(USER),
        id(ASSISTANT),
        id(END),
    ) {
        return Ok(Some(ChatSpec {
            format: ChatFormat::Troupe,
            bos: id(BOS),
            eos,
            pad,
            role_markers: [system, user, assistant],
            end,
        }));
    }
    if let (Some(start), Some(end)) = (id(CHATML_START), id(CHATML_END)) {
        let pad = CHATML_PADS.iter().find_map(|p| id(p)).filter(|&p| p != end).ok_or_else(|| {
            Error::Tokenizer(format!("ChatML tokenizer has no padding token distinct from {CHATML_END} (looked for {CHATML_PADS:?})"))
        })?;
        return Ok(Some(ChatSpec {
            format: ChatFormat::ChatMl,
            bos: None,
            eos: end,
            pad,
            role_markers: [start; 3],
            end,
        }));
    }
    Ok(None)
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("chat_format", &self.chat.as_ref().map(|c| c.format))
            .finish()
    }
}
