//! `event-exporter-dev generate`: writes realistic NVSentinel health events into the PostgreSQL
//! datastore, as NVSentinel's platform connectors do (the same columns, documents in both
//! spellings), at a given rate or count. `--init-schema` applies NVSentinel's schema to an
//! empty database for development and tests; the exporter itself never runs DDL.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Args;
use serde_json::{json, Map, Value};
use tokio_postgres::Client;

use event_exporter::datastore::postgres::{Connector, PgSettings};
use event_exporter::datastore::DatastoreError;
use event_exporter::exporter::ExitError;

/// NVSentinel's schema as migrations 1–3 leave it.
pub const SCHEMA_SQL: &str = include_str!("../../sql/nvsentinel-schema.sql");

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Events to write (with --rate: stop after this many; 0 = until interrupted).
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Events per second; 0 writes as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Number of distinct nodes the events come from.
    #[arg(long, default_value_t = 64)]
    pub nodes: u32,
    /// Spread `created_at` over this long before now (history for a backfill) instead of now.
    #[arg(long, value_parser = event_exporter::cli::parse_duration)]
    pub history: Option<Duration>,
    /// Fraction (0–1) of documents written in MongoDB's lowercase spelling.
    #[arg(long, default_value_t = 0.1)]
    pub lowercase_fraction: f64,
    /// Apply NVSentinel's schema first (to an empty database; skipped when it exists).
    #[arg(long)]
    pub init_schema: bool,
    /// Random seed, for repeatable data.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Makes health event documents.
pub struct Generator {
    rng: fastrand::Rng,
    nodes: u32,
    lowercase_fraction: f64,
}

/// One row for `health_events`.
pub struct Row {
    pub node_name: String,
    pub check_name: String,
    pub component_class: String,
    pub recommended_action: String,
    pub document: Value,
    pub created_at: Option<DateTime<Utc>>,
}

const XIDS: &[(&str, &str, i64, bool)] = &[
    ("79", "GPU has fallen off the bus", 15, true),
    ("48", "Double Bit ECC Error", 24, true),
    (
        "63",
        "ECC page retirement or row remapping recording event",
        0,
        false,
    ),
    ("94", "Contained ECC error", 2, false),
    ("95", "Uncontained ECC error", 24, true),
    ("13", "Graphics Engine Exception", 0, false),
    ("31", "GPU memory page fault", 0, false),
    ("119", "GSP RPC timeout", 5, true),
];

const ACTION_NAMES: &[(i64, &str)] = &[
    (0, "NONE"),
    (2, "COMPONENT_RESET"),
    (5, "CONTACT_SUPPORT"),
    (15, "RESTART_VM"),
    (24, "RESTART_BM"),
];

impl Generator {
    pub fn new(nodes: u32, lowercase_fraction: f64, seed: Option<u64>) -> Generator {
        Generator {
            rng: seed.map(fastrand::Rng::with_seed).unwrap_or_default(),
            nodes: nodes.max(1),
            lowercase_fraction,
        }
    }

    /// A random but realistic event generated at `at`.
    pub fn row(&mut self, at: DateTime<Utc>, created_at: Option<DateTime<Utc>>) -> Row {
        let node = format!("gpu-node-{:04}", self.rng.u32(0..self.nodes));
        let gpu = self.rng.u8(0..8);
        let pci = format!("0000:{:02x}:00.0", 0x18 + gpu * 0x10);
        let mut event = Map::new();
        let (agent, class, check, fatal, healthy, action, codes, message) =
            match self.rng.u8(0..100) {
                0..=44 => {
                    let (code, text, action, fatal) = XIDS[self.rng.usize(0..XIDS.len())];
                    (
                        "gpu-health-monitor",
                        "GPU",
                        "GpuXidError",
                        fatal,
                        false,
                        action,
                        vec![code],
                        format!("XID {code}: {text}"),
                    )
                }
                45..=54 => (
                    "gpu-health-monitor",
                    "GPU",
                    "GpuDbeError",
                    true,
                    false,
                    24,
                    vec!["DBE"],
                    "Double bit ECC error detected".to_string(),
                ),
                55..=64 => (
                    "gpu-health-monitor",
                    "NVLink",
                    "NVLinkDown",
                    false,
                    false,
                    5,
                    vec!["NVLINK_DOWN"],
                    format!("NVLink {} is down", self.rng.u8(0..18)),
                ),
                65..=74 => (
                    "gpu-health-monitor",
                    "GPU",
                    "GpuThermalWatch",
                    false,
                    false,
                    0,
                    vec![],
                    format!(
                        "GPU temperature {} C above slowdown threshold",
                        85 + self.rng.u8(0..15)
                    ),
                ),
                75..=84 => (
                    "syslog-health-monitor",
                    "GPU",
                    "SysLogsXIDError",
                    false,
                    false,
                    0,
                    vec!["13"],
                    "NVRM: Xid 13 in syslog".to_string(),
                ),
                _ => (
                    "gpu-health-monitor",
                    "GPU",
                    "GpuXidError",
                    false,
                    true,
                    0,
                    vec![],
                    "GPU is healthy".to_string(),
                ),
            };
        let strategy = if self.rng.u8(0..10) == 0 { 2 } else { 1 };
        let lowercase = self.rng.f64() < self.lowercase_fraction;
        let key = |camel: &str| {
            if lowercase {
                camel.to_ascii_lowercase()
            } else {
                camel.to_string()
            }
        };
        // camelCase documents omit zero values (Go's omitempty); BSON stores them.
        let mut put = |name: &str, value: Value, zero: bool| {
            if lowercase || !zero {
                event.insert(key(name), value);
            }
        };
        put("version", json!(1), false);
        put("agent", json!(agent), false);
        put("componentClass", json!(class), false);
        put("checkName", json!(check), false);
        put("isFatal", json!(fatal), !fatal);
        put("isHealthy", json!(healthy), !healthy);
        put("message", json!(message), false);
        put("recommendedAction", json!(action), action == 0);
        put("errorCode", json!(codes), codes.is_empty());
        let entity = |t: &str, v: &str| {
            if lowercase {
                json!({"entitytype": t, "entityvalue": v})
            } else {
                json!({"entityType": t, "entityValue": v})
            }
        };
        put(
            "entitiesImpacted",
            json!([entity("GPU", &gpu.to_string()), entity("PCI", &pci)]),
            false,
        );
        put(
            "metadata",
            json!({
                "providerID": format!("aws:///us-west-2a/i-{:017x}", self.rng.u64(..)),
                "topology.kubernetes.io/zone": "us-west-2a",
                "chassis_serial": format!("CS{:08}", self.rng.u32(0..100_000_000)),
            }),
            false,
        );
        put(
            "generatedTimestamp",
            json!({"seconds": at.timestamp(), "nanos": at.timestamp_subsec_nanos()}),
            false,
        );
        put("nodeName", json!(node), false);
        put("processingStrategy", json!(strategy), false);
        let document = json!({
            "createdAt": created_at.unwrap_or(at).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            "healthevent": event,
            "healtheventstatus": {"nodequarantined": null, "userpodsevictionstatus": {"status": ""}, "faultremediated": null},
        });
        Row {
            node_name: node,
            check_name: check.to_string(),
            component_class: class.to_string(),
            recommended_action: ACTION_NAMES
                .iter()
                .find(|(n, _)| *n == action)
                .map(|(_, name)| name.to_string())
                .unwrap_or_default(),
            document,
            created_at,
        }
    }
}

/// Applies NVSentinel's schema unless `health_events` already exists; returns whether it did.
pub async fn init_schema(client: &Client) -> Result<bool, DatastoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('health_events') IS NOT NULL", &[])
        .await?
        .get(0);
    if exists {
        return Ok(false);
    }
    client.batch_execute(SCHEMA_SQL).await?;
    Ok(true)
}

/// Inserts rows in one statement, as a platform connector's batch.
pub async fn insert(client: &Client, rows: &[Row]) -> Result<(), DatastoreError> {
    let column = |f: fn(&Row) -> String| rows.iter().map(f).collect::<Vec<String>>();
    let documents: Vec<Value> = rows.iter().map(|r| r.document.clone()).collect();
    let created: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.created_at).collect();
    client
        .execute(
            "INSERT INTO health_events (node_name, event_type, severity, recommended_action, document, created_at) \
             SELECT n, e, s, r, d, coalesce(c, now()) \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::timestamptz[]) \
                  AS t(n, e, s, r, d, c)",
            &[
                &column(|r| r.node_name.clone()),
                &column(|r| r.check_name.clone()),
                &column(|r| r.component_class.clone()),
                &column(|r| r.recommended_action.clone()),
                &documents,
                &created,
            ],
        )
        .await?;
    Ok(())
}

/// Writes `count` events spread over `history` before now (or at now), in batches.
pub async fn write_history(
    client: &Client,
    generator: &mut Generator,
    count: u64,
    history: Option<Duration>,
) -> Result<(), DatastoreError> {
    let now = Utc::now();
    let span = history.map(|h| h.as_millis() as i64).unwrap_or(0);
    let mut written = 0;
    while written < count {
        let batch = (count - written).min(500);
        let rows: Vec<Row> = (0..batch)
            .map(|i| {
                // Oldest first, evenly spread, so created_at follows insertion order.
                let offset = span - span * (written + i) as i64 / count.max(1) as i64;
                let at = now - chrono::Duration::milliseconds(offset);
                generator.row(at, history.map(|_| at))
            })
            .collect();
        insert(client, &rows).await?;
        written += batch;
    }
    Ok(())
}

pub async fn run(args: GenerateArgs) -> Result<(), ExitError> {
    let settings =
        PgSettings::from_env(|name| std::env::var(name).ok()).map_err(ExitError::config)?;
    let connector = Connector::new(settings).map_err(ExitError::config)?;
    let failed = |e: DatastoreError| ExitError::failed(e);
    let client = connector.connect().await.map_err(failed)?;
    if args.init_schema {
        if init_schema(&client).await.map_err(failed)? {
            eprintln!("applied NVSentinel's schema");
        } else {
            eprintln!("schema already present; not applied");
        }
    } else {
        connector.check_schema(&client).await.map_err(failed)?;
    }
    let mut generator = Generator::new(args.nodes, args.lowercase_fraction, args.seed);
    let started = Instant::now();
    if args.rate <= 0.0 {
        write_history(&client, &mut generator, args.count, args.history)
            .await
            .map_err(failed)?;
        eprintln!("wrote {} events in {:.1?}", args.count, started.elapsed());
        return Ok(());
    }
    // Paced: a batch every 100 ms, sized to hold the rate.
    let mut written = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    while args.count == 0 || written < args.count {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let due = (started.elapsed().as_secs_f64() * args.rate) as u64;
        let mut batch = due.saturating_sub(written);
        if args.count > 0 {
            batch = batch.min(args.count - written);
        }
        if batch == 0 {
            continue;
        }
        let now = Utc::now();
        let rows: Vec<Row> = (0..batch).map(|_| generator.row(now, None)).collect();
        insert(&client, &rows).await.map_err(failed)?;
        written += batch;
    }
    eprintln!(
        "wrote {written} events in {:.1?} ({:.0}/s)",
        started.elapsed(),
        written as f64 / started.elapsed().as_secs_f64().max(0.001)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_exporter::model::decode_document;

    #[test]
    fn documents_decode_in_both_spellings() {
        let mut generator = Generator::new(8, 0.5, Some(7));
        let mut lowercase = 0;
        for _ in 0..500 {
            let row = generator.row(Utc::now(), None);
            let event = decode_document(&row.document)
                .expect("decodable")
                .expect("has a health event");
            assert_eq!(event.node_name, row.node_name);
            assert_eq!(event.check_name, row.check_name);
            assert_eq!(event.recommended_action, row.recommended_action);
            if row.document["healthevent"].get("nodename").is_some() {
                lowercase += 1;
            }
        }
        assert!(
            (150..350).contains(&lowercase),
            "{lowercase} of 500 lowercase"
        );
    }

    #[test]
    fn camel_case_documents_omit_zero_values() {
        let mut generator = Generator::new(8, 0.0, Some(1));
        for _ in 0..200 {
            let row = generator.row(Utc::now(), None);
            let event = &row.document["healthevent"];
            assert_ne!(event.get("isFatal"), Some(&json!(false)));
            assert_ne!(event.get("recommendedAction"), Some(&json!(0)));
            assert_ne!(event.get("errorCode"), Some(&json!([])));
        }
    }
}
