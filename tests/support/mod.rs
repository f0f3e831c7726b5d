//! Integration-test harness for event-exporter: real PostgreSQL (shared server
//! and throwaway clusters), a real OAuth2 token endpoint and a real CloudEvents
//! HTTP(S) sink, all on 127.0.0.1 with random ports. No mocks.
//!
//! Every test binary that says `mod support;` compiles all of these modules but
//! uses only some of them, hence the crate-wide dead-code allowance.
#![allow(dead_code)]

pub mod cluster;
pub mod exporter;
pub mod http_proxy;
pub mod peers;
pub mod pg;
pub mod proxy;
pub mod sink;
pub mod tls;
pub mod token;
