//! `event-exporter-dev generate`: writes realistic NVSentinel health events into the PostgreSQL
//! datastore, as NVSentinel's platform connectors do (the same columns, documents in both
//! spellings), at a given rate or count. `--init-schema` applies NVSentinel's schema to an
//! empty database for development and tests; the exporter itself never runs DDL.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Args;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio_postgres::types::{Json, ToSql};
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

/// One row for `health_events`; `D` is the document's form: a [`Value`], or [`RawDocument`]
/// (serialized once, ahead of time, for a writer that must not spend CPU while measuring).
pub struct Row<D = Value> {
    pub node_name: String,
    pub check_name: String,
    pub component_class: String,
    pub recommended_action: String,
    pub document: D,
    pub created_at: Option<DateTime<Utc>>,
}

/// A document already serialized: inserted as `jsonb` by copying its text (about a sixth of a
/// [`Value`]'s memory, and no serializing at INSERT time).
pub type RawDocument = Json<Box<RawValue>>;

impl Row {
    /// The row with its document serialized.
    pub fn serialized(self) -> Row<RawDocument> {
        // Serializing a `Value` cannot fail (the default, `null`, is never used).
        let document = serde_json::value::to_raw_value(&self.document).unwrap_or_default();
        Row {
            node_name: self.node_name,
            check_name: self.check_name,
            component_class: self.component_class,
            recommended_action: self.recommended_action,
            document: Json(document),
            created_at: self.created_at,
        }
    }
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
        let check = self.check();
        let strategy = if self.rng.u8(0..10) == 0 { 2 } else { 1 };
        let lowercase = self.rng.f64() < self.lowercase_fraction;
        let event = self.health_event(&check, &node, gpu, strategy, lowercase, at);
        let document = json!({
            "createdAt": created_at.unwrap_or(at).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            "healthevent": event,
            "healtheventstatus": {"nodequarantined": null, "userpodsevictionstatus": {"status": ""}, "faultremediated": null},
        });
        Row {
            node_name: node,
            check_name: check.check.to_string(),
            component_class: check.class.to_string(),
            recommended_action: ACTION_NAMES
                .iter()
                .find(|(n, _)| *n == check.action)
                .map(|(_, name)| name.to_string())
                .unwrap_or_default(),
            document,
            created_at,
        }
    }

    /// Which check fired: 45 % XID errors, 10 % each of DBE, NVLink down, thermal watch and
    /// syslog XID, 15 % healthy.
    fn check(&mut self) -> Check {
        let gpu = "gpu-health-monitor";
        // One row per kind: (agent, class, check, fatal, healthy, action, codes, message).
        #[rustfmt::skip]
        let fields: CheckFields = match self.rng.u8(0..100) {
            0..=44 => {
                let (code, text, action, fatal) = XIDS[self.rng.usize(0..XIDS.len())];
                let message = format!("XID {code}: {text}");
                (gpu, "GPU", "GpuXidError", fatal, false, action, vec![code], message)
            }
            45..=54 => {
                let message = "Double bit ECC error detected".to_string();
                (gpu, "GPU", "GpuDbeError", true, false, 24, vec!["DBE"], message)
            }
            55..=64 => {
                let message = format!("NVLink {} is down", self.rng.u8(0..18));
                (gpu, "NVLink", "NVLinkDown", false, false, 5, vec!["NVLINK_DOWN"], message)
            }
            65..=74 => {
                let celsius = 85 + self.rng.u8(0..15);
                let message = format!("GPU temperature {celsius} C above slowdown threshold");
                (gpu, "GPU", "GpuThermalWatch", false, false, 0, vec![], message)
            }
            75..=84 => {
                let message = "NVRM: Xid 13 in syslog".to_string();
                let agent = "syslog-health-monitor";
                (agent, "GPU", "SysLogsXIDError", false, false, 0, vec!["13"], message)
            }
            _ => {
                let message = "GPU is healthy".to_string();
                (gpu, "GPU", "GpuXidError", false, true, 0, vec![], message)
            }
        };
        Check::from(fields)
    }

    /// The `healthevent` document of `check` on `node`'s `gpu`, in MongoDB's lowercase
    /// spelling when `lowercase` (zero values stored, as BSON does) or else camelCase (zero
    /// values omitted, as Go's omitempty does).
    fn health_event(
        &mut self,
        check: &Check,
        node: &str,
        gpu: u8,
        strategy: i64,
        lowercase: bool,
        at: DateTime<Utc>,
    ) -> Map<String, Value> {
        let mut event = Map::new();
        let key = |camel: &str| {
            if lowercase {
                camel.to_ascii_lowercase()
            } else {
                camel.to_string()
            }
        };
        let mut put = |name: &str, value: Value, zero: bool| {
            if lowercase || !zero {
                event.insert(key(name), value);
            }
        };
        let (fatal, healthy, action) = (check.fatal, check.healthy, check.action);
        put("version", json!(1), false);
        put("agent", json!(check.agent), false);
        put("componentClass", json!(check.class), false);
        put("checkName", json!(check.check), false);
        put("isFatal", json!(fatal), !fatal);
        put("isHealthy", json!(healthy), !healthy);
        put("message", json!(check.message), false);
        put("recommendedAction", json!(action), action == 0);
        put("errorCode", json!(check.codes), check.codes.is_empty());
        put("entitiesImpacted", entities(gpu, lowercase), false);
        put("metadata", self.node_metadata(), false);
        let seconds = at.timestamp();
        let nanos = at.timestamp_subsec_nanos();
        put(
            "generatedTimestamp",
            json!({"seconds": seconds, "nanos": nanos}),
            false,
        );
        put("nodeName", json!(node), false);
        put("processingStrategy", json!(strategy), false);
        event
    }

    /// A node's metadata as the platform connector records it.
    fn node_metadata(&mut self) -> Value {
        json!({
            "providerID": format!("aws:///us-west-2a/i-{:017x}", self.rng.u64(..)),
            "topology.kubernetes.io/zone": "us-west-2a",
            "chassis_serial": format!("CS{:08}", self.rng.u32(0..100_000_000)),
        })
    }
}

/// What fired: the fields of one kind of health event.
struct Check {
    agent: &'static str,
    class: &'static str,
    check: &'static str,
    fatal: bool,
    healthy: bool,
    /// The recommended action's number (see [`ACTION_NAMES`]).
    action: i64,
    codes: Vec<&'static str>,
    message: String,
}

/// (agent, class, check, fatal, healthy, action, codes, message).
type CheckFields = (
    &'static str,
    &'static str,
    &'static str,
    bool,
    bool,
    i64,
    Vec<&'static str>,
    String,
);

impl From<CheckFields> for Check {
    fn from(fields: CheckFields) -> Check {
        let (agent, class, check, fatal, healthy, action, codes, message) = fields;
        Check {
            agent,
            class,
            check,
            fatal,
            healthy,
            action,
            codes,
            message,
        }
    }
}

/// `entitiesImpacted`: the GPU and its PCI address.
fn entities(gpu: u8, lowercase: bool) -> Value {
    let pci = format!("0000:{:02x}:00.0", 0x18 + gpu * 0x10);
    let entity = |t: &str, v: &str| {
        if lowercase {
            json!({"entitytype": t, "entityvalue": v})
        } else {
            json!({"entityType": t, "entityValue": v})
        }
    };
    json!([entity("GPU", &gpu.to_string()), entity("PCI", &pci)])
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

/// The INSERT of a batch: one statement over parallel arrays, as a platform connector's batch
/// (`created_at` defaults to now()).
const INSERT: &str = "INSERT INTO health_events \
     (node_name, event_type, severity, recommended_action, document, created_at) \
     SELECT n, e, s, r, d, coalesce(c, now()) \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::timestamptz[]) \
          AS t(n, e, s, r, d, c)";

/// Inserts rows in one statement, as a platform connector's batch.
pub async fn insert<D: ToSql + Sync>(
    client: &Client,
    rows: &[Row<D>],
) -> Result<(), DatastoreError> {
    let columns = Columns::of(rows);
    client.execute(INSERT, &columns.params()).await?;
    Ok(())
}

/// [`insert`], returning the new rows' ids (`health_events.id` as text, which is the
/// CloudEvent `id` the exporter sends), in no particular order.
pub async fn insert_returning_ids<D: ToSql + Sync>(
    client: &Client,
    rows: &[Row<D>],
) -> Result<Vec<String>, DatastoreError> {
    let columns = Columns::of(rows);
    let statement = format!("{INSERT} RETURNING id::text");
    let returned = client.query(&statement, &columns.params()).await?;
    Ok(returned.iter().map(|row| row.get(0)).collect())
}

/// A batch of rows as the INSERT's parallel arrays, borrowed from the rows (no copies: the
/// documents are the costly part to clone).
struct Columns<'a, D> {
    node_names: Vec<&'a str>,
    check_names: Vec<&'a str>,
    component_classes: Vec<&'a str>,
    recommended_actions: Vec<&'a str>,
    documents: Vec<&'a D>,
    created: Vec<Option<DateTime<Utc>>>,
}

impl<'a, D: ToSql + Sync> Columns<'a, D> {
    fn of(rows: &'a [Row<D>]) -> Columns<'a, D> {
        let column = |f: fn(&Row<D>) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
        Columns {
            node_names: column(|r| r.node_name.as_str()),
            check_names: column(|r| r.check_name.as_str()),
            component_classes: column(|r| r.component_class.as_str()),
            recommended_actions: column(|r| r.recommended_action.as_str()),
            documents: rows.iter().map(|r| &r.document).collect(),
            created: rows.iter().map(|r| r.created_at).collect(),
        }
    }

    /// `$1`…`$6` of [`INSERT`].
    fn params(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.node_names,
            &self.check_names,
            &self.component_classes,
            &self.recommended_actions,
            &self.documents,
            &self.created,
        ]
    }
}

/// How many rows [`write_history`] writes per INSERT.
pub const HISTORY_BATCH: u64 = 500;

/// Writes `count` events spread over `history` before now (or at now), in batches.
pub async fn write_history(
    client: &Client,
    generator: &mut Generator,
    count: u64,
    history: Option<Duration>,
) -> Result<(), DatastoreError> {
    let spread = Spread::new(count, history);
    let mut written = 0;
    while written < count {
        let batch = (count - written).min(HISTORY_BATCH);
        insert(client, &spread.rows(generator, written..written + batch)).await?;
        written += batch;
    }
    Ok(())
}

/// `count` events spread evenly over `history` before `now` (or all at `now`), oldest first,
/// so `created_at` follows the events' order.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    now: DateTime<Utc>,
    count: u64,
    history: Option<Duration>,
}

impl Spread {
    pub fn new(count: u64, history: Option<Duration>) -> Spread {
        Spread {
            now: Utc::now(),
            count,
            history,
        }
    }

    /// The rows of events `range` (indices into the `count`), from `generator`.
    pub fn rows(&self, generator: &mut Generator, range: std::ops::Range<u64>) -> Vec<Row> {
        let span = self.history.map(|h| h.as_millis() as i64).unwrap_or(0);
        range
            .map(|i| {
                let offset = span - span * i as i64 / self.count.max(1) as i64;
                let at = self.now - chrono::Duration::milliseconds(offset);
                generator.row(at, self.history.map(|_| at))
            })
            .collect()
    }
}

pub async fn run(args: GenerateArgs) -> Result<(), ExitError> {
    let client = connect(&args).await?;
    let mut generator = Generator::new(args.nodes, args.lowercase_fraction, args.seed);
    let started = Instant::now();
    if args.rate <= 0.0 {
        write_history(&client, &mut generator, args.count, args.history)
            .await
            .map_err(ExitError::failed)?;
        eprintln!("wrote {} events in {:.1?}", args.count, started.elapsed());
        return Ok(());
    }
    let written = write_at_rate(&client, &mut generator, &args, started).await?;
    eprintln!(
        "wrote {written} events in {:.1?} ({:.0}/s)",
        started.elapsed(),
        written as f64 / started.elapsed().as_secs_f64().max(0.001)
    );
    Ok(())
}

/// Connects to the datastore of the `DATASTORE_*` environment and applies (`--init-schema`)
/// or checks NVSentinel's schema. Errors: exit 2 for the environment, 1 for the rest.
async fn connect(args: &GenerateArgs) -> Result<Client, ExitError> {
    let settings =
        PgSettings::from_env(|name| std::env::var(name).ok()).map_err(ExitError::config)?;
    let connector = Connector::new(settings).map_err(ExitError::config)?;
    let failed = |e: DatastoreError| ExitError::failed(e);
    let client = connector.connect().await.map_err(failed)?;
    if !args.init_schema {
        connector.check_schema(&client).await.map_err(failed)?;
    } else if init_schema(&client).await.map_err(failed)? {
        eprintln!("applied NVSentinel's schema");
    } else {
        eprintln!("schema already present; not applied");
    }
    Ok(client)
}

/// Writes at `--rate` (a batch every 100 ms, sized to hold the rate) until `--count` events
/// (0: until interrupted) or Ctrl-C; returns how many were written.
async fn write_at_rate(
    client: &Client,
    generator: &mut Generator,
    args: &GenerateArgs,
    started: Instant,
) -> Result<u64, ExitError> {
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
        insert(client, &rows).await.map_err(ExitError::failed)?;
        written += batch;
    }
    Ok(written)
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
