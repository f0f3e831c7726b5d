//! Subcommands beside the exporter itself: configuration checking, a reference sink with a
//! token endpoint, an event generator, and a one-command demo.

// dev tool; leaves the product crate (issue 15)
#[allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
pub mod bench;
pub mod check_config;
// dev tool; leaves the product crate (issue 15)
#[allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
pub mod demo;
// dev tool; leaves the product crate (issue 15)
#[allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
pub mod generate;
// dev tool; leaves the product crate (issue 15)
#[allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
pub mod local_postgres;
// dev tool; leaves the product crate (issue 15)
#[allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
pub mod sink;
pub mod status;
