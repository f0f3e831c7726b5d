//! `event-exporter-dev generate` against a real PostgreSQL database.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::process::Command;

use support::pg::{self, TestDb};

fn generate(db: &TestDb, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_event-exporter-dev"))
        .arg("generate")
        .args(args)
        .envs(db.env())
        .output()
        .expect("run generate")
}

#[tokio::test]
async fn writes_health_events_as_platform_connectors_do() {
    let db = TestDb::create().await;
    let output = generate(&db, &["--count", "400", "--nodes", "16", "--seed", "3"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT node_name), \
                    count(*) FILTER (WHERE document->'healthevent' ? 'nodeName'), \
                    count(*) FILTER (WHERE document->'healthevent' ? 'nodename'), \
                    count(DISTINCT event_type) \
             FROM health_events",
            &[],
        )
        .await
        .expect("query");
    let (total, nodes, camel, lower, kinds): (i64, i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(total, 400);
    assert!(nodes > 8 && nodes <= 16, "{nodes} nodes");
    assert!(
        camel > 0 && lower > 0 && camel + lower == 400,
        "{camel} camelCase, {lower} lowercase"
    );
    assert!(kinds >= 4, "{kinds} kinds of check");
    // Every insert went through NVSentinel's changelog trigger.
    assert_eq!(pg::changelog_max_id(&client).await, 400);
}

#[tokio::test]
async fn init_schema_prepares_an_empty_database_once() {
    let db = TestDb::create().await;
    let client = db.client().await;
    client
        .batch_execute(
            "DROP TABLE health_events, maintenance_events, datastore_changelog, resume_tokens, \
             nvsentinel_schema_migrations CASCADE",
        )
        .await
        .expect("empty the database");
    let without = generate(&db, &["--count", "1"]);
    assert_eq!(without.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&without.stderr).contains("migrations"));

    let first = generate(&db, &["--init-schema", "--count", "10"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stderr).contains("applied NVSentinel's schema"));
    let again = generate(&db, &["--init-schema", "--count", "10"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("schema already present"));
    assert_eq!(pg::schema_version(&client).await, 3);
}

#[tokio::test]
async fn history_spreads_created_at_over_the_window() {
    let db = TestDb::create().await;
    let output = generate(&db, &["--count", "100", "--history", "10h"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let client = db.client().await;
    let span_hours: f64 = client
        .query_one(
            "SELECT (extract(epoch FROM max(created_at) - min(created_at)) / 3600)::float8 FROM health_events",
            &[],
        )
        .await
        .expect("query")
        .get::<_, f64>(0);
    assert!(
        (9.5..=10.0).contains(&span_hours),
        "created_at spans {span_hours} h"
    );
}
