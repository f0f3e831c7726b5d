//! `event-exporter status`: where the exporter stands, read from the datastore it reads (the
//! same `DATASTORE_*` environment and the same config file), for people or as JSON, with an
//! exit status a cron job or a probe can act on.
//!
//! **What "behind" means.** The resume token (`resume_tokens` row `exporter.client_name`) is a
//! changelog position: every id up to it is exported. Everything above it up to the changelog
//! head is not yet exported: the rows visible now are *waiting*, and ids below the head with
//! no visible row are *open* (their transaction has not committed, or never will). The lag in
//! seconds is the age of the oldest waiting row (`now() − changed_at`, both on the database's
//! clock), 0 when nothing waits. It is the datastore's view of the exporter's
//! `health_events_exporter_stream_lag_seconds`, and needs no running exporter to read.
//!
//! Exit status: 0 healthy; 1 unhealthy (lag above `--max-behind`, or no resume token saved
//! yet); 2 bad input (configuration, datastore environment, unreachable datastore, a resume
//! token that cannot be read).
//!
//! MongoDB: `super::status_mongo` (the same exit statuses).
//!
//! Who leads: the replica whose lock session holds `client_name`'s advisory lock
//! (`crate::leadership`), read from `pg_locks`; none when no exporter runs or every replica is
//! a standby that cannot take the lock.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Client;

use crate::backfill::{self, BackfillPlan};
use crate::config::{format_go_duration, Config, ConfigError};
use crate::datastore::postgres::{Connector, PgSettings, StartPoint};
use crate::datastore::DatastoreError;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Path to the exporter's TOML configuration file (for `exporter.client_name` and the
    /// backfill settings).
    #[arg(long, value_name = "PATH", default_value = "/etc/config/config.toml")]
    pub config: PathBuf,

    /// Output: text for people, or one JSON document.
    #[arg(long, value_enum, default_value = "text")]
    pub output: StatusOutput,

    /// Unhealthy (exit 1) when the oldest changelog row not yet exported is older than this
    /// (Go duration: 30s, 5m, 1h).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = crate::cli::parse_duration)]
    pub max_behind: Duration,

    /// How long connecting to and querying the datastore may take before exit 2.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::cli::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusOutput {
    Text,
    Json,
}

/// Why no status could be read (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("datastore: {0}")]
    Datastore(#[from] DatastoreError),
    #[error("datastore {datastore}: no answer within {}", format_go_duration(*.timeout))]
    Timeout {
        datastore: String,
        timeout: Duration,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// The resume token row of `exporter.client_name`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatus {
    /// Changelog id every row up to which is exported.
    pub position: u64,
    /// `contiguous` (this exporter's), `keyset` (the Go exporter's `(changed_at, id)`
    /// bookmark: the position is approximate) or `eventId` (upstream's older form).
    pub kind: &'static str,
    /// `changed_at` of the changelog row at `position` (absent when that row is gone).
    pub changed_at: Option<DateTime<Utc>>,
    /// When the row was last written (`resume_tokens.last_updated`).
    pub saved_at: Option<DateTime<Utc>>,
    /// The stored JSON, as is.
    pub value: Value,
}

/// The newest changelog row.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeadStatus {
    /// Highest `datastore_changelog.id` (0 when the changelog is empty).
    pub id: u64,
    pub changed_at: Option<DateTime<Utc>>,
}

/// How far the token is behind the head.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BehindStatus {
    /// Head id − token position.
    pub ids: u64,
    /// Age in seconds of the oldest row above the token (0 when none waits).
    pub seconds: f64,
    /// Visible rows above the token, waiting to be exported.
    pub waiting_rows: u64,
    /// Ids above the token and below the head with no visible row (open transactions, or
    /// ones that rolled back): the token cannot pass them until they resolve.
    pub open_ids: u64,
    pub oldest_waiting_changed_at: Option<DateTime<Utc>>,
}

/// The backfill record `<client>-backfill`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackfillStatus {
    pub done: bool,
    pub total: u64,
    pub delivered: u64,
    pub remaining: u64,
    /// delivered / total × 100 (100 for an empty plan).
    pub percent: f64,
    /// The window: `[from, startedAt)` of `created_at`.
    pub from: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub saved_at: Option<DateTime<Utc>>,
}

/// The replica that holds `client_name`'s leadership lock (see `crate::leadership`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderStatus {
    /// `host/pid` of the leading exporter (its lock session's `application_name`), or the
    /// session's whole `application_name` when it is not an exporter's.
    pub replica: String,
    /// PostgreSQL backend pid of the lock session.
    pub backend_pid: i32,
}

/// Everything `status` reports, for either datastore; the JSON output is this, camelCased,
/// with the datastore's own part (`D`: [`PgPosition`] or MongoDB's) flattened in.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report<D> {
    pub client_name: String,
    pub datastore: String,
    /// Where the resume token stands, how far behind it is, who leads.
    #[serde(flatten)]
    pub position: D,
    /// `exporter.backfill.enabled` of the configuration.
    pub backfill_enabled: bool,
    /// Absent when no backfill was ever planned for this client.
    pub backfill: Option<BackfillStatus>,
    pub max_behind_seconds: f64,
    pub healthy: bool,
    /// Why `healthy` is false (empty when healthy).
    pub problems: Vec<String>,
}

/// The PostgreSQL report.
pub type Status = Report<PgPosition>;

/// A datastore's own part of the report, as `(key, value)` lines for the text output.
pub trait Position: Serialize {
    fn lines(&self) -> Vec<(&'static str, String)>;
}

/// PostgreSQL's part of the report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PgPosition {
    pub resume_token: Option<TokenStatus>,
    pub changelog_head: HeadStatus,
    /// Absent without a resume token.
    pub behind: Option<BehindStatus>,
    /// Who leads now; absent when no session holds the leadership lock (no exporter running,
    /// or every replica is a standby that cannot take it).
    pub leader: Option<LeaderStatus>,
}

/// What the report's shared part is built from.
pub(crate) struct Verdict<'a> {
    pub config: &'a Config,
    pub datastore: String,
    pub backfill: Option<BackfillStatus>,
    pub max_behind: Duration,
    /// Whether a resume token is stored.
    pub has_token: bool,
    /// Age in seconds of the oldest change not yet exported, when known.
    pub waiting_seconds: Option<f64>,
    /// What a change is called in the messages (`changelog row`, `event`).
    pub change_noun: &'static str,
}

impl<D: Position> Report<D> {
    /// The report, unhealthy without a resume token or when the oldest waiting change is older
    /// than `max_behind`.
    pub(crate) fn new(verdict: Verdict<'_>, position: D) -> Report<D> {
        let problems = problems(&verdict);
        Report {
            client_name: verdict.config.client_name.clone(),
            datastore: verdict.datastore,
            position,
            backfill_enabled: verdict.config.backfill.enabled,
            backfill: verdict.backfill,
            max_behind_seconds: verdict.max_behind.as_secs_f64(),
            healthy: problems.is_empty(),
            problems,
        }
    }
}

/// Runs the command: prints the status and returns 0, 1 or 2 (see the module docs).
pub fn main(args: &StatusArgs) -> ExitCode {
    let report = match crate::datastore::DatastoreSettings::from_process_env() {
        Ok(crate::datastore::DatastoreSettings::Mongo(settings)) => {
            return super::status_mongo::main(args, settings);
        }
        Ok(crate::datastore::DatastoreSettings::Postgres(settings)) => read_status(args, settings),
        // A configuration error is reported before a datastore one, as `read_status` does.
        Err(error) => Config::load(&args.config)
            .map_err(StatusError::from)
            .and_then(|_| Err(StatusError::from(error))),
    };
    print_report(report, args.output)
}

/// Prints a report (JSON or text) and maps it to the exit status: 0 healthy, 1 unhealthy, 2 when
/// no report could be read. Shared by both backends' reports.
pub(crate) fn print_report<D: Position>(
    report: Result<Report<D>, StatusError>,
    output: StatusOutput,
) -> ExitCode {
    match report {
        Ok(status) => {
            let text = match output {
                StatusOutput::Json => {
                    serde_json::to_string_pretty(&status).unwrap_or_default() + "\n"
                }
                StatusOutput::Text => render_text(&status),
            };
            // A closed stdout (`status | head`) must not panic; the exit status still counts.
            let _ = std::io::stdout().write_all(text.as_bytes());
            if status.healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(error) => {
            eprintln!("event-exporter status: {error}");
            ExitCode::from(2)
        }
    }
}

/// Loads the configuration, then queries PostgreSQL with `settings`.
pub fn read_status(args: &StatusArgs, settings: PgSettings) -> Result<Status, StatusError> {
    let config = Config::load(&args.config)?;
    let datastore = settings.describe();
    let connector = Connector::new(settings)?;
    let query = async {
        let client = connector.connect().await?;
        connector.check_schema(&client).await?;
        query_status(&client, &config, datastore.clone(), args.max_behind).await
    };
    run_query(query, &datastore, args.timeout)
}

/// Runs a datastore's queries on a one-thread runtime, bounded by `timeout` (`--timeout`).
pub(crate) fn run_query<T>(
    query: impl std::future::Future<Output = Result<T, DatastoreError>>,
    datastore: &str,
    timeout: Duration,
) -> Result<T, StatusError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StatusError::Runtime)?;
    runtime.block_on(async {
        tokio::time::timeout(timeout, query)
            .await
            .map_err(|_| StatusError::Timeout {
                datastore: datastore.to_string(),
                timeout,
            })?
            .map_err(StatusError::from)
    })
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The queries behind [`Status`], all read-only.
pub async fn query_status(
    client: &Client,
    config: &Config,
    datastore: String,
    max_behind: Duration,
) -> Result<Status, DatastoreError> {
    let client_name = config.client_name.clone();
    let changelog_head = head_status(client).await?;
    let resume_token = token_status(client, &client_name, changelog_head.id).await?;
    let behind = match &resume_token {
        None => None,
        Some(token) => Some(behind_status(client, token.position, changelog_head.id).await?),
    };
    let backfill = backfill_record(client, &client_name).await?;
    let leader = leader_status(client, &client_name).await?;
    let verdict = Verdict {
        config,
        datastore,
        backfill,
        max_behind,
        has_token: resume_token.is_some(),
        waiting_seconds: behind.as_ref().map(|b| b.seconds),
        change_noun: "changelog row",
    };
    let position = PgPosition {
        resume_token,
        changelog_head,
        behind,
        leader,
    };
    Ok(Report::new(verdict, position))
}

/// The changelog's newest row (id 0 when it is empty).
async fn head_status(client: &Client) -> Result<HeadStatus, DatastoreError> {
    let head = client
        .query_opt(
            "SELECT id, changed_at FROM datastore_changelog ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await?;
    // try_get throughout: a column of an unexpected type is an error, not a panic.
    Ok(match &head {
        Some(row) => HeadStatus {
            id: to_u64(row.try_get(0)?),
            changed_at: row.try_get(1)?,
        },
        None => HeadStatus {
            id: 0,
            changed_at: None,
        },
    })
}

/// `client_name`'s resume token, the position it stands for (`head` for an `end` token) and
/// that changelog row's time.
async fn token_status(
    client: &Client,
    client_name: &str,
    head: u64,
) -> Result<Option<TokenStatus>, DatastoreError> {
    let token_row = client
        .query_opt(
            "SELECT resume_token, last_updated FROM resume_tokens WHERE client_name = $1",
            &[&client_name],
        )
        .await?;
    let Some(row) = token_row else {
        return Ok(None);
    };
    let value: Value = row.try_get(0)?;
    let saved_at: Option<DateTime<Utc>> = row.try_get(1)?;
    let (position, kind) = match StartPoint::from_token(client_name, &value)? {
        StartPoint::Contiguous(id) => (id, "contiguous"),
        StartPoint::Keyset { id, .. } => (id, "keyset"),
        StartPoint::EventId(id) => (id, "eventId"),
        StartPoint::End => (head, "end"),
    };
    let changed_at = match client
        .query_opt(
            "SELECT changed_at FROM datastore_changelog WHERE id = $1",
            &[&to_i64(position)],
        )
        .await?
    {
        Some(row) => row.try_get::<_, Option<DateTime<Utc>>>(0)?,
        None => None,
    };
    Ok(Some(TokenStatus {
        position,
        kind,
        changed_at,
        saved_at,
        value,
    }))
}

/// How far the changelog is past `position`: ids, rows waiting, and the oldest one's age.
async fn behind_status(
    client: &Client,
    position: u64,
    head: u64,
) -> Result<BehindStatus, DatastoreError> {
    let row = client
        .query_one(
            "SELECT count(*), min(changed_at), \
                    coalesce(extract(epoch FROM now() - min(changed_at))::float8, 0) \
             FROM datastore_changelog WHERE id > $1",
            &[&to_i64(position)],
        )
        .await?;
    let waiting_rows = to_u64(row.try_get(0)?);
    let ids = head.saturating_sub(position);
    let seconds: f64 = row.try_get(2)?;
    Ok(BehindStatus {
        ids,
        seconds: seconds.max(0.0),
        waiting_rows,
        open_ids: ids.saturating_sub(waiting_rows),
        oldest_waiting_changed_at: row.try_get(1)?,
    })
}

/// `client_name`'s backfill record, when there is one. Errors: `DatastoreError::Token` naming
/// the record when it is not a backfill plan.
async fn backfill_record(
    client: &Client,
    client_name: &str,
) -> Result<Option<BackfillStatus>, DatastoreError> {
    let record = backfill::record_name(client_name);
    let Some(row) = client
        .query_opt(
            "SELECT resume_token, last_updated FROM resume_tokens WHERE client_name = $1",
            &[&record],
        )
        .await?
    else {
        return Ok(None);
    };
    let value: Value = row.try_get(0)?;
    let saved_at: Option<DateTime<Utc>> = row.try_get(1)?;
    match BackfillPlan::from_value(&value) {
        Some(plan) => Ok(Some(backfill_status(&plan, saved_at))),
        None => Err(DatastoreError::Token {
            client: record,
            reason: format!("not a backfill record: {value}"),
        }),
    }
}

/// What makes the status unhealthy: no resume token, or a change waiting longer than
/// `max_behind`.
fn problems(verdict: &Verdict<'_>) -> Vec<String> {
    let client_name = &verdict.config.client_name;
    if !verdict.has_token {
        return vec![format!(
            "no resume token for client {client_name:?}: the exporter has not saved a position yet"
        )];
    }
    match verdict.waiting_seconds {
        Some(seconds) if seconds > verdict.max_behind.as_secs_f64() => vec![format!(
            "the oldest {} not yet exported is {} old (more than --max-behind {})",
            verdict.change_noun,
            format_seconds(seconds),
            format_go_duration(verdict.max_behind)
        )],
        _ => Vec::new(),
    }
}

/// The session holding `client_name`'s advisory lock, from `pg_locks` (read-only).
async fn leader_status(
    client: &Client,
    client_name: &str,
) -> Result<Option<LeaderStatus>, DatastoreError> {
    let (high, low) = crate::leadership::pg_locks_ids(crate::leadership::lock_key(client_name));
    let row = client
        .query_opt(
            "SELECT coalesce(a.application_name, ''), l.pid FROM pg_locks l \
               LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND l.classid::text::bigint = $1 AND l.objid::text::bigint = $2 \
             LIMIT 1",
            &[&i64::from(high), &i64::from(low)],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let application_name: String = row.try_get(0)?;
    let replica = application_name
        .strip_prefix(crate::datastore::postgres::lock::APPLICATION_NAME_PREFIX)
        .unwrap_or(&application_name)
        .to_string();
    Ok(Some(LeaderStatus {
        replica,
        backend_pid: row.try_get(1)?,
    }))
}

pub(crate) fn backfill_status(
    plan: &BackfillPlan,
    saved_at: Option<DateTime<Utc>>,
) -> BackfillStatus {
    let delivered = plan.delivered.min(plan.total);
    BackfillStatus {
        done: plan.done,
        total: plan.total,
        delivered,
        remaining: plan.total.saturating_sub(delivered),
        percent: if plan.total == 0 {
            100.0
        } else {
            delivered as f64 * 100.0 / plan.total as f64
        },
        from: plan.from,
        started_at: plan.started_at,
        saved_at,
    }
}

pub(crate) fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into())
}

/// `12.3s`, `4m5s`, `2h0m0s`.
pub(crate) fn format_seconds(seconds: f64) -> String {
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else {
        format_go_duration(Duration::from_secs(seconds as u64))
    }
}

/// The report for people: one `key value` line each, the datastore's own lines in the middle.
pub fn render_text<D: Position>(status: &Report<D>) -> String {
    let mut lines = vec![(
        "client",
        format!("{} ({})", status.client_name, status.datastore),
    )];
    lines.extend(status.position.lines());
    lines.push(("backfill", backfill_text(status)));
    if status.healthy {
        let ok = format!(
            "OK (max behind {})",
            format_seconds(status.max_behind_seconds)
        );
        lines.push(("status", ok));
    } else {
        for problem in &status.problems {
            lines.push(("status", format!("UNHEALTHY: {problem}")));
        }
    }
    lines
        .iter()
        .map(|(key, value)| format!("{key:<15} {value}\n"))
        .collect()
}

impl Position for PgPosition {
    fn lines(&self) -> Vec<(&'static str, String)> {
        let head = &self.changelog_head;
        let mut lines = vec![
            ("resume token", token_text(self.resume_token.as_ref())),
            (
                "changelog head",
                format!("id {}, changed at {}", head.id, time(head.changed_at)),
            ),
        ];
        if let Some(behind) = &self.behind {
            lines.push(("behind", behind_text(behind)));
        }
        lines.push(("leader", leader_text(self.leader.as_ref())));
        lines
    }
}

fn token_text(token: Option<&TokenStatus>) -> String {
    match token {
        Some(token) => format!(
            "changelog id {} ({}), row changed at {}, saved at {}",
            token.position,
            token.kind,
            time(token.changed_at),
            time(token.saved_at)
        ),
        None => "none saved".into(),
    }
}

fn behind_text(behind: &BehindStatus) -> String {
    if behind.ids == 0 {
        return "caught up (0 ids)".into();
    }
    format!(
        "{} ids: {} rows waiting, {} open ids; oldest waiting {} ({})",
        behind.ids,
        behind.waiting_rows,
        behind.open_ids,
        format_seconds(behind.seconds),
        time(behind.oldest_waiting_changed_at)
    )
}

fn leader_text(leader: Option<&LeaderStatus>) -> String {
    match leader {
        Some(leader) => format!("{} (backend pid {})", leader.replica, leader.backend_pid),
        None => "none: no exporter holds the leadership lock".into(),
    }
}

fn backfill_text<D>(status: &Report<D>) -> String {
    let enabled = if status.backfill_enabled {
        "enabled"
    } else {
        "disabled"
    };
    match &status.backfill {
        None => format!("none recorded ({enabled})"),
        Some(b) if b.done => format!("complete: {} events ({enabled})", b.delivered),
        Some(b) => format!(
            "unfinished: {}/{} delivered ({:.1}%), {} remaining, window {} .. {}, saved at {} ({enabled})",
            b.delivered,
            b.total,
            b.percent,
            b.remaining,
            time(Some(b.from)),
            time(Some(b.started_at)),
            time(b.saved_at)
        ),
    }
}
