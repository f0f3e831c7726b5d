//! Subcommands beside the exporter itself: configuration checking and the datastore status.
//! The development tools (reference sink, generator, demo, benchmarks) live in the
//! `event-exporter-dev` crate under `tools/`, outside the product.

pub mod check_config;
pub mod status;
pub mod status_mongo;
