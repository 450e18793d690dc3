//! Installing the global tracing subscriber.
//!
//! One test in a file of its own, because a process has one global
//! subscriber and the order of these steps matters.

use troupe_service::logging::{init_tracing, LogFormat, LogSettings, TracingError};

#[test]
fn init_tracing_installs_once() {
    let invalid = LogSettings {
        format: LogFormat::Json,
        filter: "info,troupe_bus=loud".into(),
    };
    let json = LogSettings {
        format: LogFormat::Json,
        filter: "debug".into(),
    };
    let human = LogSettings::default();

    let rejected = init_tracing(&invalid);
    let installed = init_tracing(&json);
    let second = init_tracing(&human);

    assert!(
        matches!(rejected, Err(TracingError::Filter { .. })),
        "{rejected:?}"
    );
    assert!(installed.is_ok(), "{installed:?}");
    assert!(
        matches!(second, Err(TracingError::Install(_))),
        "{second:?}"
    );
    tracing::info!(step = 1, "json subscriber installed");
}
