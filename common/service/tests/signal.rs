//! `wait_for_signal` with real signals sent to this test process.
//!
//! A file of its own, so the signals reach one test binary running one test.

use std::process::Command;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use troupe_service::shutdown::{wait_for_signal, Signal};

#[tokio::test]
async fn sigterm_resolves_wait_for_signal() {
    // Installing a handler first means a SIGTERM sent before `wait_for_signal`
    // subscribes is caught instead of ending the test process. tokio keeps a
    // signal's handler for the life of the process once it is installed.
    let _guard = signal(SignalKind::terminate()).expect("install a SIGTERM handler");
    let mut waiting = tokio::spawn(wait_for_signal());

    // `wait_for_signal` only receives signals that arrive after it subscribed,
    // and the test cannot observe that moment, so it repeats the signal.
    let deadline = Instant::now() + Duration::from_secs(10);
    let received = loop {
        let status = Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill failed: {status}");
        match tokio::time::timeout(Duration::from_millis(100), &mut waiting).await {
            Ok(joined) => {
                break joined
                    .expect("the task did not panic")
                    .expect("handlers installed")
            }
            Err(_) => assert!(Instant::now() < deadline, "no signal seen within 10 s"),
        }
    };

    assert_eq!(received, Signal::Terminate);
}
