//! Byte-level BPE round trips and the chat template's response mask.

use troupe_model::tokenizer::{ASSISTANT, BOS, EOS, PAD, USER};
use troupe_model::{ChatMessage, Tokenizer};

const CORPUS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog.",
    "fn main() {\n    println!(\"hello\");\n}\n",
    "東京は日本の首都です。",
    "Ünïcödé façade, naïve café.",
    "def add(a, b):\n\treturn a + b\n",
    "emoji 🎉🚀 and more 👩‍👩‍👧",
];

fn trained() -> Tokenizer {
    let corpus: Vec<String> = CORPUS
        .iter()
        .cycle()
        .take(60)
        .map(|s| s.to_string())
        .collect();
    Tokenizer::train(corpus.into_iter(), 400).unwrap()
}

#[test]
fn round_trip_is_lossless() {
    let tokenizer = trained();
    let samples = [
        "東京は日本の首都です。中文测试，한국어 텍스트",
        "emoji 🎉🚀👩‍👩‍👧 flags 🇯🇵",
        "    indented\n\n\n\ttabs\t\t and   runs of   spaces   \r\n",
        "fn main() {\n    let x = vec![1, 2, 3];\n}\n",
        "مرحبا بالعالم — Привет, мир",
        "",
        " leading and trailing ",
        "literal <|eos|> and <|user|> markers in text",
    ];
    for text in samples {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text, "ids {ids:?}");
    }
}

#[test]
fn special_tokens_are_distinct_and_fixed() {
    let tokenizer = trained();
    assert_eq!(tokenizer.pad_id(), Some(0));
    assert_eq!(tokenizer.bos_id(), Some(1));
    assert_eq!(tokenizer.eos_id(), Some(2));
    assert_ne!(tokenizer.eos_id(), tokenizer.pad_id());
    assert_eq!(tokenizer.token_to_id(PAD), Some(0));
    assert_eq!(tokenizer.token_to_id(BOS), Some(1));
    assert_eq!(tokenizer.token_to_id(EOS), Some(2));
    assert!(tokenizer.vocab_size() <= 400);
}

#[test]
fn text_never_produces_special_tokens() {
    let tokenizer = trained();
    let ids = tokenizer.encode("say <|eos|> then <|user|>").unwrap();
    assert!(!ids.contains(&2), "{ids:?}");
    assert!(!ids.contains(&tokenizer.token_to_id(USER).unwrap()));
}

#[test]
fn chat_template_marks_response_and_eos() {
    let tokenizer = trained();
    let rendered = tokenizer
        .render_prompt_response("What is 2+2?", "It is 4.")
        .unwrap();
    assert_eq!(rendered.ids.len(), rendered.response_mask.len());
    assert_eq!(rendered.ids[0], tokenizer.bos_id().unwrap());
    assert_eq!(*rendered.ids.last().unwrap(), tokenizer.eos_id().unwrap());
    assert_eq!(
        *rendered.response_mask.last().unwrap(),
        1,
        "EOS counts as response"
    );

    let response: Vec<u32> = rendered
        .ids
        .iter()
        .zip(&rendered.response_mask)
        .filter(|(_, &m)| m == 1)
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(tokenizer.decode(&response, true).unwrap(), "It is 4.");
    assert_eq!(
        response.len(),
        tokenizer.encode("It is 4.").unwrap().len() + 1
    );

    // The generation prompt is exactly the rendered example up to the response.
    let prompt = tokenizer.render_prompt("What is 2+2?").unwrap();
    let first_response = rendered.response_mask.iter().position(|&m| m == 1).unwrap();
    assert_eq!(prompt, rendered.ids[..first_response].to_vec());
    assert_eq!(
        *prompt.last().unwrap(),
        tokenizer.token_to_id(ASSISTANT).unwrap()
    );
}

#[test]
fn multi_turn_chat_masks_every_assistant_turn() {
    let tokenizer = trained();
    let messages = [
        ChatMessage::system("Be brief."),
        ChatMessage::user("Hi"),
        ChatMessage::assistant("Hello!"),
        ChatMessage::user("Bye"),
        ChatMessage::assistant("Goodbye."),
    ];
    let rendered = tokenizer.render_chat(&messages, false).unwrap();
    let eos = tokenizer.eos_id().unwrap();
    let eos_positions: Vec<usize> = rendered
        .ids
        .iter()
        .enumerate()
        .filter(|(_, &id)| id == eos)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(eos_positions.len(), 2);
    for i in eos_positions {
        assert_eq!(rendered.response_mask[i], 1);
    }
    let response: Vec<u32> = rendered
        .ids
        .iter()
        .zip(&rendered.response_mask)
        .filter(|(_, &m)| m == 1)
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(tokenizer.decode(&response, true).unwrap(), "Hello!Goodbye.");
    assert!(tokenizer.render_chat(&[], true).is_err());
}

#[test]
fn saved_tokenizer_reloads_identically() {
    let tokenizer = trained();
    let json = tokenizer.to_json().unwrap();
    let loaded = Tokenizer::from_bytes(json.as_bytes()).unwrap();
    let text = "fn main() { 東京 🎉 }";
    assert_eq!(
        loaded.encode(text).unwrap(),
        tokenizer.encode(text).unwrap()
    );
    assert_eq!(
        loaded.render_prompt("hi").unwrap(),
        tokenizer.render_prompt("hi").unwrap()
    );
    assert!(Tokenizer::from_bytes(b"{\"not\": \"a tokenizer\"}").is_err());
    assert!(Tokenizer::train(CORPUS.iter(), 100)
        .unwrap_err()
        .to_string()
        .contains("too small"));
}

#[test]
fn chatml_tokenizer_uses_chatml_layout() {
    // A tokenizer.json whose special tokens are ChatML's, as SmolLM2 ships.
    let json = trained()
        .to_json()
        .unwrap()
        .replace("<|bos|>", "<|im_start|>")
        .replace("<|eos|>", "<|im_end|>")
        .replace("<|pad|>", "<|endoftext|>")
        .replace("<|user|>", "<|unused_user|>");
    let tokenizer = Tokenizer::from_bytes(json.as_bytes()).unwrap();
    let start = tokenizer.token_to_id("<|im_start|>").unwrap();
    let end = tokenizer.token_to_id("<|im_end|>").unwrap();
    assert_eq!(tokenizer.eos_id(), Some(end));
    assert_eq!(tokenizer.pad_id(), tokenizer.token_to_id("<|endoftext|>"));

    let rendered = tokenizer.render_prompt_response("Hi", "Hello").unwrap();
    let text = tokenizer.decode(&rendered.ids, false).unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    );
    assert_eq!(rendered.ids[0], start);
    let response: Vec<u32> = rendered
        .ids
        .iter()
        .zip(&rendered.response_mask)
        .filter(|(_, &m)| m == 1)
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(
        *response.last().unwrap(),
        end,
        "the closing <|im_end|> counts as response"
    );
    assert_eq!(tokenizer.decode(&response, true).unwrap(), "Hello");
    // The newline after <|im_end|> is not generated, so it is not response.
    assert_eq!(*rendered.response_mask.last().unwrap(), 0);
}

#[test]
fn tokenizer_without_chat_tokens_still_encodes() {
    let json = trained()
        .to_json()
        .unwrap()
        .replace("<|user|>", "<|unused_user|>");
    let tokenizer = Tokenizer::from_bytes(json.as_bytes()).unwrap();
    assert_eq!(
        tokenizer
            .decode(&tokenizer.encode("plain text").unwrap(), false)
            .unwrap(),
        "plain text"
    );
    let err = tokenizer.render_prompt("hi").unwrap_err().to_string();
    assert!(err.contains("cannot render a chat"), "{err}");
}
