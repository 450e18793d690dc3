//! Reports rendered from synthetic progress logs shaped like the trainers'
//! messages: evaluation results repeated at every later step, a final
//! message that repeats the last step, and PPO's final message carrying only
//! `stale_total`.

use std::collections::BTreeMap;

use clap::Parser;
use troupe_report::{
    parse_progress_log, progress_log_key, render_from_progress, render_report,
    render_report_from_file, ReportArgs, ReportError, REPORT_HTML,
};
use troupe_store::{ObjectKey, Store};
use troupe_wire::{JobProgress, JobState, Stage};

const PRETRAIN_STEPS: u64 = 20;
const SFT_STEPS: u64 = 15;
const REWARD_STEPS: u64 = 16;
const PPO_STEPS: u64 = 12;

fn message(
    job_id: &str,
    stage: Stage,
    state: JobState,
    step: u64,
    total: u64,
    metrics: &[(&str, f64)],
) -> JobProgress {
    JobProgress {
        job_id: job_id.to_string(),
        stage,
        state,
        step,
        total_steps: total,
        metrics: metrics
            .iter()
            .map(|(name, value)| (name.to_string(), *value))
            .collect(),
        message: None,
    }
}

/// Builds the messages of a pretraining or SFT job: step metrics every step, a held-out loss every
/// 5 steps that is repeated until the next evaluation, and a final message.
fn language_model_job(job_id: &str, stage: Stage, steps: u64) -> Vec<JobProgress> {
    let mut log = vec![message(job_id, stage, JobState::Queued, 0, steps, &[])];
    let mut carried: BTreeMap<String, f64> = BTreeMap::new();
    if stage == Stage::Sft {
        carried.insert("base_heldout_loss".into(), 3.9);
    }
    for step in 1..=steps {
        if step % 5 == 0 {
            carried.insert("heldout_loss".into(), 4.0 - step as f64 * 0.1);
        }
        let loss = 5.0 - step as f64 * 0.15;
        carried.insert("train_loss".into(), loss);
        let mut metrics = carried.clone();
        metrics.insert("loss".into(), loss);
        metrics.insert("lr".into(), 3e-4 * step as f64 / steps as f64);
        metrics.insert("grad_norm".into(), 1.0 + 0.01 * step as f64);
        metrics.insert("tokens_per_s".into(), 1000.0 + step as f64);
        let mut entry = message(job_id, stage, JobState::Running, step, steps, &[]);
        entry.metrics = metrics;
        log.push(entry);
    }
    let mut last = message(job_id, stage, JobState::Succeeded, steps, steps, &[]);
    last.metrics = carried;
    match stage {
        Stage::Pretrain => last.metrics.insert("unigram_entropy".into(), 6.25),
        _ => last.metrics.insert("eos_rate".into(), 0.875),
    };
    log.push(last);
    log
}

fn reward_model_job(job_id: &str) -> Vec<JobProgress> {
    let mut log = Vec::new();
    let mut carried: BTreeMap<String, f64> = BTreeMap::new();
    for step in 1..=REWARD_STEPS {
        if step % 4 == 0 {
            carried.insert("heldout_loss".into(), 0.7 - step as f64 * 0.01);
            carried.insert("heldout_accuracy".into(), 0.5 + step as f64 / 64.0);
            carried.insert("eval/helpful/accuracy".into(), 0.4 + step as f64 / 80.0);
        }
        carried.insert("train_loss".into(), 0.69 - step as f64 * 0.02);
        let mut entry = message(
            job_id,
            Stage::RewardModel,
            JobState::Running,
            step,
            REWARD_STEPS,
            &[],
        );
        entry.metrics = carried.clone();
        entry.metrics.insert("loss".into(), carried["train_loss"]);
        entry.metrics.insert("lr".into(), 1e-4);
        entry.metrics.insert("grad_norm".into(), 0.5);
        log.push(entry);
    }
    let mut last = message(
        job_id,
        Stage::RewardModel,
        JobState::Succeeded,
        REWARD_STEPS,
        REWARD_STEPS,
        &[],
    );
    last.metrics = carried;
    log.push(last);
    log
}

fn ppo_job(job_id: &str) -> Vec<JobProgress> {
    let mut log = Vec::new();
    for step in 1..=PPO_STEPS {
        let x = step as f64;
        let metrics = [
            ("reward", 0.1 * x),
            ("reward_raw", -1.0 + 0.2 * x),
            ("kl", 0.01 * x),
            ("kl_k1", 0.011 * x),
            ("kl_k3", 0.009 * x),
            ("kl_coef", 0.1 + 0.001 * x),
            ("clip_fraction", 0.05),
            ("approx_kl", 0.002),
            ("entropy", 2.0 - 0.05 * x),
            ("value_loss", 1.0 / x),
            ("explained_variance", 0.05 * x),
            ("response_length", 20.0 + x),
            ("eos_rate", if step < 6 { 0.5 } else { 1.0 }),
            ("loss", 0.3),
            ("lr", 1e-5),
            ("grad_norm", 0.8),
            ("wait_s", 0.1),
        ];
        log.push(message(
            job_id,
            Stage::Ppo,
            JobState::Running,
            step,
            PPO_STEPS,
            &metrics,
        ));
    }
    log.push(message(
        job_id,
        Stage::Ppo,
        JobState::Succeeded,
        PPO_STEPS,
        PPO_STEPS,
        &[("stale_total", 2.0)],
    ));
    log
}

fn full_run() -> Vec<JobProgress> {
    let mut log = language_model_job("r1-pretrain", Stage::Pretrain, PRETRAIN_STEPS);
    log.extend(language_model_job("r1-sft", Stage::Sft, SFT_STEPS));
    log.extend(reward_model_job("r1-reward"));
    log.extend(ppo_job("r1-ppo"));
    log
}

fn to_jsonl(progress: &[JobProgress]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in progress {
        bytes.extend(serde_json::to_vec(entry).unwrap());
        bytes.push(b'\n');
    }
    bytes
}

fn file<'a>(files: &'a [(String, Vec<u8>)], name: &str) -> &'a str {
    let (_, bytes) = files
        .iter()
        .find(|(file_name, _)| file_name == name)
        .unwrap_or_else(|| panic!("no file {name}; files: {:?}", names(files)));
    std::str::from_utf8(bytes).unwrap()
}

fn names(files: &[(String, Vec<u8>)]) -> Vec<&str> {
    files.iter().map(|(name, _)| name.as_str()).collect()
}

/// Returns the value of attribute `name` on the root element.
fn root_attribute<'a>(svg: &'a str, name: &str) -> Option<&'a str> {
    let open_tag = &svg[..svg.find('>')?];
    let start = open_tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let end = start + open_tag[start..].find('"')?;
    Some(&open_tag[start..end])
}

/// Coordinate counts of every `<polyline>` in `svg`.
fn polyline_lengths(svg: &str) -> Vec<usize> {
    svg.split("<polyline")
        .skip(1)
        .filter_map(|element| {
            let start = element.find("points=\"")? + "points=\"".len();
            let end = start + element[start..].find('"')?;
            Some(element[start..end].split_whitespace().count())
        })
        .collect()
}

/// Contents of every `<text>` element, trimmed.
fn text_elements(svg: &str) -> Vec<&str> {
    svg.split("<text")
        .skip(1)
        .filter_map(|element| {
            let start = element.find('>')? + 1;
            let end = element.find("</text>")?;
            Some(element[start..end].trim())
        })
        .collect()
}

/// Checks that every start tag has its end tag in order, ignoring
/// self-closing tags, comments and declarations.
fn assert_tags_balanced(document: &str, name: &str) {
    let mut open: Vec<&str> = Vec::new();
    for piece in document.split('<').skip(1) {
        let tag = &piece[..piece
            .find('>')
            .unwrap_or_else(|| panic!("{name}: unterminated tag <{piece}"))];
        if tag.starts_with('!') || tag.starts_with('?') || tag.ends_with('/') {
            continue;
        }
        let tag_name = tag
            .trim_start_matches('/')
            .split_whitespace()
            .next()
            .unwrap_or("");
        if tag.starts_with('/') {
            assert_eq!(
                open.pop(),
                Some(tag_name),
                "{name}: unexpected </{tag_name}>"
            );
        } else if !matches!(tag_name, "meta" | "br") {
            open.push(tag_name);
        }
    }
    assert!(open.is_empty(), "{name}: unclosed tags {open:?}");
}

#[test]
fn full_run_renders_every_plot() {
    let files = render_from_progress(&full_run(), "r1").unwrap();
    assert_eq!(files[0].0, REPORT_HTML);
    let html = file(&files, REPORT_HTML);

    let expected = [
        "pretrain-loss.svg",
        "sft-loss.svg",
        "reward_model-loss.svg",
        "reward_model-accuracy.svg",
        "ppo-reward.svg",
        "ppo-kl.svg",
        "ppo-kl-coef.svg",
        "ppo-response-length.svg",
        "ppo-eos-rate.svg",
    ];
    for name in expected {
        let svg = file(&files, name);
        let stem = name.trim_end_matches(".svg");
        assert!(
            html.contains(&format!("data-plot=\"{stem}\"")),
            "report.html lacks the plot {name}"
        );
        assert!(
            html.contains(svg.trim_end()),
            "report.html does not inline {name} unchanged"
        );
    }
    for (name, _) in files.iter().skip(1) {
        assert!(name.ends_with(".svg"), "unexpected file {name}");
    }
}

#[test]
fn html_shows_run_and_final_numbers() {
    let files = render_from_progress(&full_run(), "r1").unwrap();
    let html = file(&files, REPORT_HTML);

    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("<code>r1</code>"), "run id missing");
    assert_tags_balanced(html, REPORT_HTML);
    for job in ["r1-pretrain", "r1-sft", "r1-reward", "r1-ppo"] {
        assert!(
            html.contains(&format!("<code>{job}</code>")),
            "job {job} missing"
        );
    }

    // Final values, formatted to four significant digits.
    let finals = [
        ("heldout_loss", "2"),        // pretrain at step 20: 4.0 - 2.0
        ("unigram_entropy", "6.25"),  // pretrain final message only
        ("base_heldout_loss", "3.9"), // sft
        ("eos_rate", "0.875"),        // sft final message
        ("heldout_accuracy", "0.75"), // reward model at step 16
        ("kl_coef", "0.112"),         // ppo step 12
        ("response_length", "32"),    // ppo step 12
        ("stale_total", "2"),         // ppo final message
    ];
    for (metric, value) in finals {
        let cell = format!("<b>{metric}</b> {value}</span>");
        let row = format!("<code>{metric}</code></td><td class=\"number\">{value}</td>");
        assert!(
            html.contains(&cell) || html.contains(&row),
            "final {metric} = {value} missing"
        );
    }
}

#[test]
fn html_has_no_external_assets() {
    let files = render_from_progress(&full_run(), "r1").unwrap();
    let html = file(&files, REPORT_HTML);
    for needle in ["<script", "<link", "<img", "src=", "url(", "@import"] {
        assert!(!html.contains(needle), "report.html contains {needle}");
    }
    let without_namespace = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    assert!(
        !without_namespace.contains("http"),
        "report.html refers to a URL"
    );
}

#[test]
fn svg_files_are_well_formed() {
    let files = render_from_progress(&full_run(), "r1").unwrap();
    for (name, bytes) in files.iter().skip(1) {
        let svg = std::str::from_utf8(bytes).unwrap();
        assert!(svg.starts_with("<svg "), "{name} does not start with <svg");
        assert!(
            svg.trim_end().ends_with("</svg>"),
            "{name} does not end with </svg>"
        );
        assert!(svg.contains("<title>"), "{name} has no title");
        assert!(
            text_elements(svg).contains(&"step"),
            "{name} has no x-axis label"
        );
        assert!(!polyline_lengths(svg).is_empty(), "{name} has no polyline");
        assert_tags_balanced(svg, name);
    }
}

#[test]
fn svg_titles_name_stage_and_quantity() {
    let files = render_from_progress(&full_run(), "r1").unwrap();
    let titles = [
        (
            "pretrain-loss.svg",
            "Pretraining: training and held-out loss",
        ),
        (
            "sft-loss.svg",
            "Supervised fine-tuning: training and held-out loss",
        ),
        (
            "reward_model-accuracy.svg",
            "Reward model: held-out pairwise accuracy",
        ),
        ("ppo-kl-coef.svg", "PPO: KL coefficient"),
    ];
    for (name, title) in titles {
        let svg = file(&files, name);
        assert!(
            svg.contains(&format!("<title>{title}</title>")),
            "{name} lacks title {title:?}"
        );
        assert!(
            text_elements(svg).contains(&title),
            "{name} does not draw {title:?}"
        );
    }
}

#[test]
fn plotted_points_match_steps() {
    let files = render_from_progress(&full_run(), "r1").unwrap();
    // Held-out numbers are repeated at every step until the next evaluation,
    // so only the evaluations themselves count: steps 5, 10, 15, 20 of
    // pretraining and 4, 8, 12, 16 of the reward model.
    let cases = [
        (
            "pretrain-loss.svg",
            vec![("train_loss", PRETRAIN_STEPS as usize), ("heldout_loss", 4)],
        ),
        (
            "sft-loss.svg",
            vec![("train_loss", SFT_STEPS as usize), ("heldout_loss", 3)],
        ),
        ("pretrain-lr.svg", vec![("lr", PRETRAIN_STEPS as usize)]),
        (
            "reward_model-accuracy.svg",
            vec![("heldout_accuracy", 4), ("eval/helpful/accuracy", 4)],
        ),
        (
            "ppo-reward.svg",
            vec![
                ("reward", PPO_STEPS as usize),
                ("reward_raw", PPO_STEPS as usize),
            ],
        ),
        ("ppo-kl.svg", vec![("kl", 12), ("kl_k1", 12), ("kl_k3", 12)]),
        ("ppo-eos-rate.svg", vec![("eos_rate", PPO_STEPS as usize)]),
        (
            "ppo-response-length.svg",
            vec![("response_length", PPO_STEPS as usize)],
        ),
    ];
    for (name, series) in cases {
        let svg = file(&files, name);
        let expected: Vec<String> = series
            .iter()
            .map(|(metric, count)| format!("{metric}={count}"))
            .collect();
        assert_eq!(
            root_attribute(svg, "data-points"),
            Some(expected.join(";").as_str()),
            "{name} data-points"
        );

        let lengths = polyline_lengths(svg);
        for (metric, count) in series {
            assert!(
                lengths.contains(&count),
                "{name}: no polyline with {count} points for {metric}; lengths {lengths:?}"
            );
        }
    }
}

#[test]
fn only_first_stage_renders_its_plots() {
    let log = language_model_job("solo-pretrain", Stage::Pretrain, 8);
    let files = render_from_progress(&log, "solo").unwrap();
    let html = file(&files, REPORT_HTML);

    for (name, _) in files.iter().skip(1) {
        assert!(
            name.starts_with("pretrain-"),
            "plot {name} of an absent stage"
        );
    }
    assert!(files.iter().any(|(name, _)| name == "pretrain-loss.svg"));
    for absent in [
        "id=\"sft\"",
        "id=\"reward_model\"",
        "id=\"ppo\"",
        "Supervised fine-tuning",
        "PPO",
    ] {
        assert!(!html.contains(absent), "report.html mentions {absent}");
    }
}

#[test]
fn single_point_metric_gets_no_plot() {
    // The SFT trainer reports `eos_rate` only in its final message.
    let log = language_model_job("r2-sft", Stage::Sft, 10);
    let files = render_from_progress(&log, "r2").unwrap();
    assert!(
        !names(&files).contains(&"sft-eos-rate.svg"),
        "files: {:?}",
        names(&files)
    );
    assert!(file(&files, REPORT_HTML).contains("<b>eos_rate</b> 0.875"));
}

#[test]
fn second_job_of_stage_gets_own_files() {
    let mut log = language_model_job("a-pretrain", Stage::Pretrain, 6);
    log.extend(language_model_job("b-pretrain", Stage::Pretrain, 10));
    let files = render_from_progress(&log, "twice").unwrap();
    let first = file(&files, "pretrain-loss.svg");
    let second = file(&files, "pretrain-2-loss.svg");
    assert!(root_attribute(first, "data-points")
        .unwrap()
        .starts_with("train_loss=6;"));
    assert!(root_attribute(second, "data-points")
        .unwrap()
        .starts_with("train_loss=10;"));
}

#[test]
fn null_metric_is_skipped() {
    let mut log = ppo_job("nan-ppo");
    log[3].metrics.insert("reward".into(), f64::NAN);
    // serde_json writes NaN as null.
    let bytes = to_jsonl(&log);
    assert!(String::from_utf8_lossy(&bytes).contains("\"reward\":null"));

    let parsed = parse_progress_log(&bytes, "nan.jsonl").unwrap();
    let files = render_from_progress(&parsed, "nan").unwrap();
    let points = root_attribute(file(&files, "ppo-reward.svg"), "data-points")
        .unwrap()
        .to_string();
    assert_eq!(
        points,
        format!("reward={};reward_raw={}", PPO_STEPS - 1, PPO_STEPS)
    );
}

#[test]
fn parse_round_trips_jsonl() {
    let log = full_run();
    let parsed = parse_progress_log(&to_jsonl(&log), "log.jsonl").unwrap();
    assert_eq!(parsed.len(), log.len());
    // serde_json's default float parser may differ from the written value in
    // the last bit, so metrics are compared with a tolerance.
    for (index, (read, written)) in parsed.iter().zip(&log).enumerate() {
        assert_eq!(read.job_id, written.job_id, "message {index}");
        assert_eq!(read.stage, written.stage, "message {index}");
        assert_eq!(read.state, written.state, "message {index}");
        assert_eq!(
            (read.step, read.total_steps),
            (written.step, written.total_steps),
            "message {index}"
        );
        assert_eq!(read.message, written.message, "message {index}");
        let names: Vec<&String> = read.metrics.keys().collect();
        assert_eq!(
            names,
            written.metrics.keys().collect::<Vec<_>>(),
            "message {index}"
        );
        for (name, value) in &written.metrics {
            let difference = (read.metrics[name] - value).abs();
            assert!(
                difference <= 1e-12 * value.abs().max(1.0),
                "message {index}: {name} read as {}",
                read.metrics[name]
            );
        }
    }
}

#[test]
fn malformed_line_reports_line_number() {
    let mut bytes = to_jsonl(&ppo_job("bad-ppo")[..2]);
    bytes.extend_from_slice(b"{\"job_id\": \"bad-ppo\", \"stage\": \"ppo\"\n");
    bytes.extend(to_jsonl(&ppo_job("bad-ppo")[2..4]));

    let error = parse_progress_log(&bytes, "runs/bad/progress.jsonl").unwrap_err();
    assert!(
        matches!(error, ReportError::MalformedLine { line: 3, .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(text.contains("line 3 of runs/bad/progress.jsonl"), "{text}");
}

#[test]
fn unknown_stage_is_malformed() {
    let mut line = serde_json::to_value(&ppo_job("x")[0]).unwrap();
    line["stage"] = "distill".into();
    let bytes = format!("\n{line}\n");
    let error = parse_progress_log(bytes.as_bytes(), "log.jsonl").unwrap_err();
    assert!(
        matches!(error, ReportError::MalformedLine { line: 2, .. }),
        "{error:?}"
    );
}

#[test]
fn empty_log_is_an_error() {
    let error = parse_progress_log(b"\n\n", "runs/e/progress.jsonl").unwrap_err();
    assert!(matches!(error, ReportError::EmptyLog { .. }), "{error:?}");
    assert!(render_from_progress(&[], "e").is_err());
}

#[test]
fn invalid_run_id_is_rejected() {
    let error = render_from_progress(&full_run(), "../etc").unwrap_err();
    assert!(matches!(error, ReportError::InvalidRun { .. }), "{error:?}");
    assert!(progress_log_key("a/b").is_err());
    assert_eq!(
        progress_log_key("r1").unwrap().as_str(),
        "runs/r1/progress.jsonl"
    );
}

#[tokio::test]
async fn missing_log_names_key_and_fix() {
    let store = Store::memory();
    let out = tempfile::tempdir().unwrap();
    let error = render_report(&store, "ghost", out.path())
        .await
        .unwrap_err();
    assert!(matches!(error, ReportError::MissingLog { .. }), "{error:?}");
    let text = error.to_string();
    assert!(text.contains("runs/ghost/progress.jsonl"), "{text}");
    assert!(text.contains("troupe up --run ghost"), "{text}");
    assert!(!out.path().join(REPORT_HTML).exists());
}

#[tokio::test]
async fn memory_store_round_trip() {
    let store = Store::from_url("memory://").unwrap();
    let log = full_run();
    store
        .put(
            &ObjectKey::new("runs/r1/progress.jsonl").unwrap(),
            to_jsonl(&log),
        )
        .await
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().join("nested/report");

    let summary = render_report(&store, "r1", &out_dir).await.unwrap();

    assert_eq!(summary.run, "r1");
    assert_eq!(summary.html, out_dir.join(REPORT_HTML));
    let expected = render_from_progress(&log, "r1").unwrap();
    assert_eq!(summary.files.len(), expected.len());
    for (file, (name, bytes)) in summary.files.iter().zip(&expected) {
        assert_eq!(&file.name, name);
        assert_eq!(file.key, format!("runs/r1/report/{name}"));
        assert_eq!(file.size, bytes.len());
        let local = std::fs::read(&file.path).unwrap();
        assert_eq!(&local, bytes, "local {name} differs");
        let stored = store
            .get(&ObjectKey::new(file.key.clone()).unwrap())
            .await
            .unwrap();
        assert_eq!(stored.as_ref(), bytes.as_slice(), "stored {name} differs");
    }
}

#[tokio::test]
async fn local_log_file_renders() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("progress.jsonl");
    std::fs::write(&log_path, to_jsonl(&full_run())).unwrap();
    let store = Store::memory();

    let args = CommandLine::parse_from([
        "troupe-report",
        "--run",
        "local",
        "--out",
        dir.path().join("out").to_str().unwrap(),
        "--progress-file",
        log_path.to_str().unwrap(),
    ])
    .report;
    let summary = args.execute(&store).await.unwrap();

    assert!(summary.html.exists());
    let stored = store
        .get(&ObjectKey::new("runs/local/report/report.html").unwrap())
        .await
        .unwrap();
    assert_eq!(
        stored.as_ref(),
        std::fs::read(&summary.html).unwrap().as_slice()
    );

    let missing = render_report_from_file(
        &store,
        &dir.path().join("absent.jsonl"),
        "local",
        dir.path(),
    )
    .await;
    let error = missing.unwrap_err();
    assert!(error.to_string().contains("absent.jsonl"), "{error}");
}

#[derive(Parser)]
struct CommandLine {
    #[command(flatten)]
    report: ReportArgs,
}

#[test]
fn args_default_out_folder() {
    let args = CommandLine::parse_from(["troupe-report", "--run", "r7"]).report;
    assert_eq!(args.run, "r7");
    assert_eq!(args.out, std::path::PathBuf::from("troupe-report"));
    assert_eq!(args.progress_file, None);
}
