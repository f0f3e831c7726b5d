//! Subcommands beside the exporter itself: configuration checking, a reference sink with a
//! token endpoint, an event generator, and a one-command demo.

pub mod bench;
pub mod check_config;
pub mod demo;
pub mod generate;
pub mod local_postgres;
pub mod sink;
pub mod status;
