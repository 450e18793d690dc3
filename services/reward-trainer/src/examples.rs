//! Training examples: one prompt with every candidate response it has and
//! the preference pairs between them.
//!
//! All preferences about one prompt form one example, whichever record or
//! JSONL line they came from, so each candidate is scored once per example
//! and the loss averages over that prompt's pairs. Candidates are told apart
//! by text and by whether they ended with the end-of-sequence token.
//!
//! A pair never reaches the loss when its two sides are tied: the same
//! candidate id, the same candidate text, or (for ranking records) two ids
//! in the same group of the ranking's order. Such pairs are counted in
//! [`DroppedPairs`].

use std::collections::BTreeMap;

use troupe_data::{PreferencePair, Split, ValidationFraction};
use troupe_wire::FinishReason;

use crate::records::StoredRecord;

/// One candidate response of an example.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CandidateText {
    pub text: String,
    /// Whether the response ended with the end-of-sequence token; rendering
    /// appends that token only then.
    pub ends_with_eos: bool,
}

/// One prompt, its candidates and the preferences between them.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferenceExample {
    pub prompt: String,
    pub candidates: Vec<CandidateText>,
    /// `(chosen, rejected)` indices into `candidates`, never equal.
    pub pairs: Vec<(usize, usize)>,
    /// Where the preferences came from (ranking ids or file names), for messages.
    pub sources: Vec<String>,
}

impl PreferenceExample {
    /// Returns the side of the train/held-out split this example falls on,
    /// by a hash of its prompt (the rule of `troupe-data`'s split).
    pub fn split(&self, fraction: ValidationFraction) -> Split {
        Split::of_key(self.prompt.as_bytes(), fraction)
    }
}

/// Pairs left out of the examples, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DroppedPairs {
    /// Both sides in one group of the ranking order, or the same candidate.
    pub tied: u64,
    /// Two different candidates with the same text and ending.
    pub same_text: u64,
    /// A candidate id that the record does not list or rank.
    pub unknown_candidate: u64,
}

impl DroppedPairs {
    pub fn total(&self) -> u64 {
        self.tied + self.same_text + self.unknown_candidate
    }
}

/// Builds examples from preference sources, merging by prompt text.
#[derive(Default)]
pub struct ExampleBuilder {
    by_prompt: BTreeMap<String, usize>,
    examples: Vec<PreferenceExample>,
    pub dropped: DroppedPairs,
}

impl ExampleBuilder {
    pub fn new() -> ExampleBuilder {
        ExampleBuilder::default()
    }

    /// Adds the pairs of one ranking record.
    pub fn add_record(&mut self, record: &StoredRecord) {
        let group_of: BTreeMap<&str, usize> = record
            .order
            .iter()
            .enumerate()
            .flat_map(|(position, group)| group.iter().map(move |id| (id.as_str(), position)))
            .collect();
        let candidate = |id: &str| {
            record.candidates.iter().find(|candidate| candidate.candidate_id == id).map(|candidate| CandidateText {
                text: candidate.text.clone(),
                ends_with_eos: candidate.finish_reason == FinishReason::Eos,
            })
        };
        for pair in &record.pairs {
            let (Some(chosen), Some(rejected)) = (candidate(&pair.chosen), candidate(&pair.rejected)) else {
                self.dropped.unknown_candidate += 1;
                continue;
            };
            let (Some(&chosen_group), Some(&rejected_group)) =
                (group_of.get(pair.chosen.as_str()), group_of.get(pair.rejected.as_str()))
            else {
                self.dropped.unknown_candidate += 1;
                continue;
            };
            // The stored pairs follow the order; a pair the order does not
            // put strictly better-first is a tie or a contradiction, so it is left out.
            if pair.chosen == pair.rejected || chosen_group >= rejected_group {
                self.dropped.tied += 1;
                continue;
            }
            self.add_pair(&record.prompt, chosen, rejected, &record.ranking_id);
        }
    }

    /// Adds JSONL pairs; every response there is complete, so it is
    /// rendered with the end-of-sequence token.
    pub fn add_jsonl_pairs(&mut self, pairs: &[PreferencePair], source: &str) {
        for pair in pairs {
            let chosen = CandidateText { text: pair.chosen.clone(), ends_with_eos: true };
            let rejected = CandidateText { text: pair.rejected.clone(), ends_with_eos: true };
            self.add_pair(&pair.prompt, chosen, rejected, source);
        }
    }

    fn add_pair(&mut self, prompt: &str, chosen: CandidateText, rejected: CandidateText, source: &str) {
        if chosen == rejected {
            self.dropped.same_text += 1;
            return;
        }
        let index = *self.by_prompt.entry(prompt.to_string()).or_insert_with(|| {
            self.examples.push(PreferenceExample {
                prompt: prompt.to_string(),
                candidates: Vec::new(),
                pairs: Vec::new(),
                sources: Vec::new(),
            });
            self.examples.len() - 1
        });
        let example = &mut self.examples[index];
        let mut position = |candidate: CandidateText| match example.candidates.iter().position(|c| *c == candidate) {
            Some(position) => position,
            None => {
                example.candidates.push(candidate);
                example.candidates.len() - 1
            }
        };
        let chosen = position(chosen);
        let rejected = position(rejected);
        example.pairs.push((chosen, rejected));
        if !example.sources.iter().any(|known| known == source) {
            example.sources.push(source.to_string());
        }
    }

    /// Returns the examples in the order their prompts first appeared.
    pub fn finish(self) -> (Vec<PreferenceExample>, DroppedPairs) {
        (self.examples, self.dropped)
    }
}

/// Splits examples into (train, held-out) by prompt hash.
pub fn split_examples(
    examples: Vec<PreferenceExample>,
    fraction: ValidationFraction,
) -> (Vec<PreferenceExample>, Vec<PreferenceExample>) {
    examples.into_iter().partition(|example| example.split(fraction) == Split::Train)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{StoredCandidate, StoredPair};

    fn record(order: &[&[&str]], pairs: &[(&str, &str)], texts: &[(&str, &str)]) -> StoredRecord {
        StoredRecord {
            schema: 1,
            ranking_id: "r1".into(),
            prompt: "p".into(),
            candidates: texts
                .iter()
                .map(|(id, text)| StoredCandidate {
                    candidate_id: id.to_string(),
                    text: text.to_string(),
                    finish_reason: FinishReason::Eos,
                })
                .collect(),
            order: order.iter().map(|group| group.iter().map(|id| id.to_string()).collect()).collect(),
            pairs: pairs.iter().map(|(c, r)| StoredPair { chosen: c.to_string(), rejected: r.to_string() }).collect(),
        }
    }

    #[test]
    fn tied_pairs_never_kept() {
        // B and C are tied in the order; a pair between them is dropped even
        // if a writer stored one.
        let texts = [("A", "a"), ("B", "b"), ("C", "c")];
        let stored = record(&[&["A"], &["B", "C"]], &[("A", "B"), ("A", "C"), ("B", "C")], &texts);
        let mut builder = ExampleBuilder::new();
        builder.add_record(&stored);
        let (examples, dropped) = builder.finish();
        assert_eq!(examples.len(), 1);
        assert_eq!(examples[0].pairs, vec![(0, 1), (0, 2)]);
        assert_eq!(dropped.tied, 1);
    }

    #[test]
    fn same_text_pair_dropped() {
        let texts = [("A", "same"), ("B", "same"), ("C", "other")];
        let stored = record(&[&["A"], &["B"], &["C"]], &[("A", "B"), ("A", "C"), ("B", "C")], &texts);
        let mut builder = ExampleBuilder::new();
        builder.add_record(&stored);
        let (examples, dropped) = builder.finish();
        assert_eq!(dropped.same_text, 1);
        assert_eq!(examples[0].candidates.len(), 2, "equal texts are one candidate");
        assert_eq!(examples[0].pairs, vec![(0, 1), (0, 1)]);
    }

    #[test]
    fn unknown_candidate_dropped() {
        let stored = record(&[&["A"], &["B"]], &[("A", "B"), ("A", "Z")], &[("A", "a"), ("B", "b")]);
        let mut builder = ExampleBuilder::new();
        builder.add_record(&stored);
        let (examples, dropped) = builder.finish();
        assert_eq!(examples[0].pairs.len(), 1);
        assert_eq!(dropped.unknown_candidate, 1);
    }

    #[test]
    fn jsonl_lines_grouped_by_prompt() {
        let pair = |prompt: &str, chosen: &str, rejected: &str| PreferencePair {
            prompt: prompt.into(),
            chosen: chosen.into(),
            rejected: rejected.into(),
        };
        let pairs = [pair("p", "good", "bad"), pair("q", "x", "y"), pair("p", "good", "worse")];
        let mut builder = ExampleBuilder::new();
        builder.add_jsonl_pairs(&pairs, "file.jsonl");
        let (examples, _) = builder.finish();
        assert_eq!(examples.len(), 2);
        assert_eq!(examples[0].prompt, "p");
        assert_eq!(examples[0].candidates.len(), 3, "`good` is scored once for both of its pairs");
        assert_eq!(examples[0].pairs, vec![(0, 1), (0, 2)]);
    }
}
