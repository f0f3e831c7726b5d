//! `event-exporter sink`: a reference CloudEvents sink (and OAuth2 token endpoint) that
//! implements every sink requirement of the spec. Not yet implemented.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct SinkArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Path events are POSTed to.
    #[arg(long, default_value = "/api/v1/events")]
    pub path: String,
    /// Append every accepted event as one JSON line to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Accept requests without a Bearer token (no token endpoint).
    #[arg(long)]
    pub no_auth: bool,
    /// OAuth2 client id the token endpoint accepts.
    #[arg(long, default_value = "event-exporter")]
    pub client_id: String,
    /// OAuth2 client secret the token endpoint accepts.
    #[arg(
        long,
        env = "SINK_CLIENT_SECRET",
        default_value = "demo-secret",
        hide_env_values = true
    )]
    pub client_secret: String,
    /// Scope the token endpoint requires.
    #[arg(long, default_value = "events:write")]
    pub scope: String,
    /// Lifetime of issued tokens.
    #[arg(long, default_value = "1h", value_parser = crate::cli::parse_duration)]
    pub token_lifetime: Duration,
    /// Test switch: delay every answer by this long.
    #[arg(long, default_value = "0s", value_parser = crate::cli::parse_duration)]
    pub latency: Duration,
    /// Test switch: add a uniformly random extra delay of up to this long.
    #[arg(long, default_value = "0s", value_parser = crate::cli::parse_duration)]
    pub latency_jitter: Duration,
    /// Test switch: fraction (0–1) of valid requests answered with --fail-status.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Test switch: status for injected failures (e.g. 503 or 429).
    #[arg(long, default_value_t = 503)]
    pub fail_status: u16,
    /// Test switch: Retry-After seconds sent with injected failures.
    #[arg(long)]
    pub retry_after: Option<u64>,
}

pub async fn run(_args: SinkArgs) -> Result<(), crate::exporter::ExitError> {
    Err(crate::exporter::ExitError::Failed(
        "the sink subcommand is not implemented yet".into(),
    ))
}
