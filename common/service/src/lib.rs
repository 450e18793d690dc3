//! Code that every troupe service binary shares: settings checks, logging, the
//! operators' HTTP server and graceful shutdown.
//!
//! - [`settings`]: reports every invalid setting at once and exits with
//!   `EX_USAGE` (64); parses from a map in tests.
//! - [`logging`]: `--log-format` and `--log` flags and the tracing subscriber.
//! - [`http`]: `--http-addr`, `/healthz`, `/readyz`, `/metrics` and a service's
//!   own routes.
//! - [`shutdown`]: SIGINT/SIGTERM, the notice to every task, and a drain
//!   bounded by `--shutdown-grace`.
//!
//! A service's `main` uses them in that order: parse and check settings,
//! install tracing, bind the HTTP server and log its address, run, then drain.
//! Nothing here depends on the bus, the object store or models.

pub mod http;
pub mod logging;
pub mod settings;
pub mod shutdown;
