//! event-exporter: streams NVSentinel health events out of the datastore and delivers them to
//! an HTTP sink as CloudEvents, at least once.
//!
//! Data flow: `config` → `datastore` (changelog reader, resume token) → `pipeline` (dispatch,
//! workers, sequence tracker, checkpoint) → `model` + `cloudevent` → `sink` (HTTP, auth,
//! retry); `server` exposes health and metrics. `ARCHITECTURE.md` draws the data flow and
//! says where each rule lives (`Holes`, `SequenceTracker`, the dispatcher, the reconnect
//! backoff, the backfill `Pacer`, the watchdog, the reset rule).
//!
//! Public surface: what the `event-exporter` binary, the development tools (`tools/`, package
//! `event-exporter-dev`) and the integration tests use; every other module is `pub(crate)`.
//!
//! No panic is reachable from input (issue 14): the lints below deny `unwrap`/`expect`, explicit
//! panics, indexing and slicing, and unchecked integer and time arithmetic in the product code,
//! so a value from a document, an HTTP answer, the configuration, the environment or the token
//! row is turned into an error, never into a panic. Unit tests may unwrap; `tests/` is another
//! crate and is not covered.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::todo,
    clippy::unimplemented,
    clippy::unreachable,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects,
    clippy::unchecked_time_subtraction
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::string_slice,
        clippy::arithmetic_side_effects,
        clippy::unchecked_time_subtraction
    )
)]

pub(crate) mod backfill;
pub mod cli;
pub mod clock;
pub mod cloudevent;
pub mod commands;
pub mod config;
pub mod datastore;
pub mod exporter;
pub(crate) mod filter;
pub(crate) mod lag;
pub(crate) mod leader;
pub mod leadership;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod panics;
pub(crate) mod pipeline;
pub mod reconnect;
pub mod restart;
pub(crate) mod server;
pub mod sink;
pub(crate) mod tls;
pub(crate) mod watchdog;
