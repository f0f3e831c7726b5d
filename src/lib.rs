//! event-exporter: streams NVSentinel health events out of the datastore and delivers them to
//! an HTTP sink as CloudEvents, at least once.
//!
//! Data flow: `config` → `datastore` (changelog reader, resume token) → `pipeline` (dispatch,
//! workers, sequence tracker, checkpoint) → `model` + `cloudevent` → `sink` (HTTP, auth,
//! retry); `server` exposes health and metrics.
//!
//! Public surface: what the `event-exporter` binary, the development tools (`tools/`, package
//! `event-exporter-dev`) and the integration tests use; every other module is `pub(crate)`.

pub(crate) mod backfill;
pub mod cli;
pub mod cloudevent;
pub mod commands;
pub mod config;
pub mod datastore;
pub mod exporter;
pub(crate) mod filter;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod panics;
pub(crate) mod pipeline;
pub(crate) mod server;
pub mod sink;
pub(crate) mod tls;
pub(crate) mod watchdog;
