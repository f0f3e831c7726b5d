//! Development tools for event-exporter, kept out of the product crate and its container image
//! (as Vector keeps `vdev/`): nothing here is linked into the `event-exporter` binary.
//!
//! - [`sink`]: the reference CloudEvents sink with its OAuth2 client-credentials token endpoint
//!   and fault switches (operators, the tests, the demo and the benchmarks deliver to it);
//! - [`generate`]: writes realistic NVSentinel health events into the PostgreSQL datastore;
//! - [`demo`]: the whole job on this machine in one command;
//! - [`bench`]: the benchmarks (drain vs a `wrk` → nginx ceiling, a slow sink, latency,
//!   backfills, CPU per event, callgrind instructions per event);
//! - [`local_postgres`]: the local PostgreSQL, or a throwaway cluster started with `initdb` and
//!   `pg_ctl` when none answers (the integration tests' clusters, with TLS and restarts, too).
//!
//! The exporter itself comes from the product crate (`event_exporter`), used as a library.

pub mod bench;
pub mod demo;
pub mod generate;
pub mod local_postgres;
pub mod sink;
