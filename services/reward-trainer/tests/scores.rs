//! Score invariants: padding side, batch size and batch composition do not
//! change a row's score, nor does the pad id.

mod common;

use troupe_model::Heads;
use troupe_reward_trainer::reward_model::{render_candidate, score_rows, PadSide};

/// Largest absolute score difference accepted between two batchings (f32).
const TOLERANCE: f32 = 1e-4;

fn scores(model: &troupe_model::Model, rows: &[Vec<u32>], pad: u32, side: PadSide) -> Vec<f32> {
    score_rows(model, rows, pad, side).unwrap().to_vec1::<f32>().unwrap()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= TOLERANCE, "{what}: {x} vs {y}");
    }
}

#[test]
fn scores_ignore_padding_and_batching() {
    let tokenizer = common::tokenizer(&["data/sft/capitals.train.jsonl"], 400);
    let model = common::tiny_model(&tokenizer, Heads { score: true, value: false }, 7);
    let pad = tokenizer.pad_id().unwrap();
    let texts = [("What is the capital of Chad?", "N'Djamena", true), ("Hi", "", false), ("A longer question, with more words in it?", "An answer that goes on for a while", true)];
    let rows: Vec<Vec<u32>> = texts.iter().map(|(p, r, eos)| render_candidate(&tokenizer, p, r, *eos, 256).unwrap()).collect();
    assert!(rows.iter().map(Vec::len).collect::<std::collections::BTreeSet<_>>().len() == 3, "rows need different lengths");

    let right = scores(&model, &rows, pad, PadSide::Right);
    let left = scores(&model, &rows, pad, PadSide::Left);
    assert_close(&right, &left, "left vs right padding");

    let alone: Vec<f32> = rows.iter().map(|row| scores(&model, std::slice::from_ref(row), pad, PadSide::Right)[0]).collect();
    assert_close(&right, &alone, "batch of 3 vs batch of 1");

    let other = render_candidate(&tokenizer, "Something else entirely", "with its own reply", true, 256).unwrap();
    let mixed = scores(&model, &[other.clone(), rows[1].clone(), other], pad, PadSide::Left);
    assert_close(&[mixed[1]], &[right[1]], "other rows in the batch");

    let eos = tokenizer.eos_id().unwrap();
    let other_pad = scores(&model, &rows, eos, PadSide::Right);
    assert_close(&right, &other_pad, "pad id");
    assert!(right.iter().any(|s| (s - right[0]).abs() > 1e-6), "distinct rows should score differently");
}
