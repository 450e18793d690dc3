//! The shutdown notice and the bounded drain.

use std::time::Duration;

use troupe_service::shutdown::{Drain, Shutdown};

/// Upper bound on waits that should end at once, so a bug fails instead of
/// hanging.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn drain_without_listeners_completes() {
    let shutdown = Shutdown::new();

    let drain = shutdown.drain(STEP_TIMEOUT).await;

    assert!(matches!(drain, Drain::Complete { .. }), "{drain:?}");
}

#[tokio::test]
async fn listener_receives_notice() {
    let shutdown = Shutdown::new();
    let mut listener = shutdown.listener();
    assert!(!listener.is_shutdown());

    shutdown.trigger();
    tokio::time::timeout(STEP_TIMEOUT, listener.recv())
        .await
        .expect("the notice arrives");

    assert!(listener.is_shutdown());
    assert!(shutdown.is_triggered());
}

#[tokio::test]
async fn late_listener_sees_notice() {
    let shutdown = Shutdown::new();
    shutdown.trigger();

    let listener = shutdown.listener();

    assert!(listener.is_shutdown());
}

#[tokio::test]
async fn dropped_shutdown_counts_as_notice() {
    let shutdown = Shutdown::new();
    let mut listener = shutdown.listener();

    drop(shutdown);
    tokio::time::timeout(STEP_TIMEOUT, listener.recv())
        .await
        .expect("recv returns");

    assert!(listener.is_shutdown());
}

#[tokio::test]
async fn drain_waits_for_every_task() {
    let shutdown = Shutdown::new();
    let mut tasks = Vec::new();
    for work in [10, 50, 100] {
        let mut listener = shutdown.listener();
        tasks.push(tokio::spawn(async move {
            listener.recv().await;
            // Finishing the unit of work in progress after the notice.
            tokio::time::sleep(Duration::from_millis(work)).await;
        }));
    }
    assert_eq!(shutdown.running(), 3);

    let drain = shutdown.drain(STEP_TIMEOUT).await;

    let Drain::Complete { elapsed } = drain else {
        panic!("expected a complete drain, got {drain:?}")
    };
    assert!(
        elapsed >= Duration::from_millis(100),
        "drained after {elapsed:?}"
    );
    for task in tasks {
        assert!(task.is_finished());
    }
}

#[tokio::test]
async fn drain_overrun_returns_running_count() {
    let shutdown = Shutdown::new();
    // A task that ignores the notice and keeps its listener.
    let _stuck = shutdown.listener();
    let mut prompt = shutdown.listener();
    let prompt_task = tokio::spawn(async move { prompt.recv().await });

    let drain = shutdown.drain(Duration::from_millis(100)).await;

    assert_eq!(drain, Drain::Overrun { running: 1 });
    prompt_task.await.expect("the prompt task did not panic");
}

#[tokio::test]
async fn cloned_listener_counts_as_running() {
    let shutdown = Shutdown::new();
    let listener = shutdown.listener();
    let clone = listener.clone();
    drop(listener);

    assert_eq!(shutdown.running(), 1);
    drop(clone);
    assert_eq!(shutdown.running(), 0);
}
