//! The main job as a person runs it: `troupe up` with every stage shortened,
//! in a fresh store folder, then `troupe report` on the same run.

use std::process::Command;

#[test]
fn up_runs_three_stages_then_reports() {
    let store = tempfile::tempdir().unwrap();
    let store_path = store.path().to_str().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["up", "--store", store_path, "--run", "cli-up", "--web-addr", "127.0.0.1:0"])
        .args(["--pretrain-steps", "30", "--sft-steps", "60", "--reward-steps", "40", "--ppo-steps", "3"])
        .env("TROUPE_LOG", "warn")
        .output()
        .expect("run troupe up");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "troupe up failed\nstdout:\n{stdout}\nstderr:\n{stderr}");

    for expected in ["== stage 1", "== stage 2", "== stage 3", "== summary", "reward model reward@", "policy policy@"] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    // Each compared model has a line with its mean score under the labeler's rule.
    let scored = stdout.lines().filter(|line| line.contains("mean score")).count();
    assert_eq!(scored, 3, "expected base, SFT and aligned score lines in:\n{stdout}");
    assert!(store.path().join("runs/cli-up/progress.jsonl").is_file());

    let status = Command::new(env!("CARGO_BIN_EXE_troupe")).args(["status", "--store", store_path]).output().unwrap();
    let status_text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "troupe status failed: {}", String::from_utf8_lossy(&status.stderr));
    for expected in ["model base", "model sft", "model reward", "model policy", "dataset preferences"] {
        assert!(status_text.contains(expected), "missing {expected:?} in:\n{status_text}");
    }

    let out = tempfile::tempdir().unwrap();
    let report = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .args(["report", "--run", "cli-up", "--store", store_path, "--out", out.path().to_str().unwrap()])
        .output()
        .expect("run troupe report");
    assert!(report.status.success(), "troupe report failed: {}", String::from_utf8_lossy(&report.stderr));
    let html = std::fs::read_to_string(out.path().join("report.html")).unwrap();
    assert!(html.contains("cli-up"), "the report does not name its run");
    let plots = std::fs::read_dir(out.path()).unwrap().filter(|entry| {
        entry.as_ref().is_ok_and(|entry| entry.path().extension().is_some_and(|ext| ext == "svg"))
    });
    assert!(plots.count() >= 4, "expected plots of several stages");
}

/// The same actors over a real nats-server and a real S3 API (SeaweedFS),
/// as `troupe up --nats URL --store s3://...` runs them.
#[test]
fn up_runs_over_nats_and_s3() {
    let (Some(nats), Some(s3)) = (troupe_testkit::nats_url(), troupe_testkit::s3()) else { return };
    let prefix = format!("cli-up-{}", std::process::id());
    let store = format!("s3://{}/{prefix}", s3.bucket);
    let output = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["up", "--nats", &nats, "--run", &prefix, "--store", &store, "--web-addr", "127.0.0.1:0"])
        .args(["--s3-endpoint", &s3.endpoint, "--s3-access-key-id", "test", "--s3-secret-access-key", "test"])
        .args(["--pretrain-steps", "20", "--sft-steps", "60", "--reward-steps", "30", "--ppo-steps", "2"])
        .env("TROUPE_LOG", "warn")
        .output()
        .expect("run troupe up");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "troupe up over NATS and S3 failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains(&format!("bus {nats}")), "{stdout}");
    assert!(stdout.contains("policy policy@"), "{stdout}");
}
