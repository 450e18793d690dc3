//! Decoding checks that every consumer relies on.

use troupe_wire::*;

fn ranking(order: Vec<Vec<&str>>) -> Ranking {
    Ranking {
        ranking_id: "k-1".into(),
        set_id: "s-1".into(),
        labeler: "ada".into(),
        order: order.into_iter().map(|group| group.into_iter().map(String::from).collect()).collect(),
        note: None,
    }
}

#[test]
fn json_from_external_tool_decodes() {
    let json = br#"{"schema":1,"kind":"ranking","id":"m-7","run":"demo","time_ms":0,
        "payload":{"ranking_id":"k-7","set_id":"s-1","labeler":"tool","order":[["B"],["A","C"]]}}"#;
    let envelope: Envelope<Ranking> = decode(json, ContentType::Json).unwrap();
    assert_eq!(envelope.payload.order, vec![vec!["B".to_string()], vec!["A".to_string(), "C".to_string()]]);
    assert_eq!(envelope.payload.note, None);
}

#[test]
fn newer_schema_is_rejected() {
    let mut envelope = Envelope::new("demo", ranking(vec![vec!["A"], vec!["B"]]));
    envelope.schema = SCHEMA_VERSION + 1;
    let bytes = encode(&envelope, ContentType::MessagePack).unwrap();
    let err = decode::<Ranking>(&bytes, ContentType::MessagePack).unwrap_err();
    assert!(matches!(err, WireError::UnsupportedSchema { .. }), "{err}");
}

#[test]
fn wrong_kind_is_rejected() {
    let envelope = Envelope::new("demo", ranking(vec![vec!["A"], vec!["B"]]));
    let bytes = encode(&envelope, ContentType::MessagePack).unwrap();
    let err = decode::<CandidateSet>(&bytes, ContentType::MessagePack).unwrap_err();
    assert!(err.to_string().contains("\"ranking\""), "{err}");
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    for bytes in [&b""[..], &[0xc1], &[0x92, 0x01], b"{\"schema\":1}"] {
        assert!(decode::<Ranking>(bytes, ContentType::MessagePack).is_err());
        assert!(decode::<Ranking>(bytes, ContentType::Json).is_err());
    }
}

#[test]
fn ranking_with_repeated_id_is_invalid() {
    let envelope = Envelope::new("demo", ranking(vec![vec!["A"], vec!["B", "A"]]));
    let bytes = encode(&envelope, ContentType::Json).unwrap();
    let err = decode::<Ranking>(&bytes, ContentType::Json).unwrap_err();
    assert!(err.to_string().contains("\"A\" appears twice"), "{err}");
}

#[test]
fn ranking_needs_two_groups() {
    let envelope = Envelope::new("demo", ranking(vec![vec!["A", "B"]]));
    let bytes = encode(&envelope, ContentType::MessagePack).unwrap();
    assert!(decode::<Ranking>(&bytes, ContentType::MessagePack).is_err());
}

#[test]
fn rollout_logprob_count_must_match_tokens() {
    let rollout = Rollout {
        rollout_id: "r".into(),
        batch_id: "b".into(),
        prompt_id: "p".into(),
        prompt: "hi".into(),
        prompt_tokens: vec![1],
        response: "x".into(),
        response_tokens: vec![5, 2],
        logprobs: vec![-0.5],
        finish_reason: FinishReason::Eos,
        policy: ModelRef { name: "policy".into(), version: 1 },
        sampling: SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: 8, seed: 1 },
    };
    let bytes = encode(&Envelope::new("demo", rollout), ContentType::MessagePack).unwrap();
    let err = decode::<Rollout>(&bytes, ContentType::MessagePack).unwrap_err();
    assert!(err.to_string().contains("1 log-probs for 2 response tokens"), "{err}");
}

#[test]
fn content_type_header_parsing() {
    assert_eq!(ContentType::from_header(None).unwrap(), ContentType::MessagePack);
    assert_eq!(ContentType::from_header(Some("application/json; charset=utf-8")).unwrap(), ContentType::Json);
    assert_eq!(ContentType::from_header(Some("Application/MsgPack")).unwrap(), ContentType::MessagePack);
    assert!(ContentType::from_header(Some("text/plain")).is_err());
}
