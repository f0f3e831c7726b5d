//! event-exporter: streams NVSentinel health events out of the datastore and delivers them to
//! an HTTP sink as CloudEvents, at least once.
//!
//! Data flow: `config` → `datastore` (changelog reader, resume token) → `pipeline` (dispatch,
//! workers, sequence tracker, checkpoint) → `model` + `cloudevent` → `sink` (HTTP, auth,
//! retry); `server` exposes health and metrics. `ARCHITECTURE.md` draws the data flow and
//! says where each rule lives (`Holes`, `SequenceTracker`, the dispatcher, the reconnect
//! backoff, the backfill `Pacer`, the watchdog, the reset rule).

pub mod backfill;
pub mod cli;
pub mod cloudevent;
pub mod commands;
pub mod config;
pub mod datastore;
pub mod exporter;
pub mod filter;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod panics;
pub mod pipeline;
pub mod reconnect;
pub mod server;
pub mod sink;
pub mod tls;
pub mod watchdog;
