//! The one-command demo, end to end: every written event delivered, none lost.

use std::time::Duration;

use event_exporter_dev::demo::{run_demo, DemoArgs};

#[tokio::test(flavor = "multi_thread")]
async fn demo_delivers_every_event_it_writes() {
    let output = tempfile::tempdir().expect("temp dir");
    let summary = run_demo(DemoArgs {
        history: 800,
        rate: 100.0,
        live_for: Duration::from_secs(3),
        workers: 4,
        output: Some(output.path().to_path_buf()),
    })
    .await
    .expect("demo runs");
    assert_eq!(summary.written, 1_100, "800 history + 3 s at 100/s");
    assert_eq!(summary.delivered, summary.written);
    assert_eq!(summary.missing, 0);
    assert!(
        summary.p50 > Duration::ZERO && summary.p50 <= summary.p99,
        "{summary:?}"
    );
    let received = summary.received_file.clone().expect("kept with --output");
    assert_eq!(received, output.path().join("received.ndjson"));
    let lines = std::fs::read_to_string(&received).expect("received file");
    assert_eq!(
        lines.lines().count() as u64,
        summary.written,
        "one line per delivered event"
    );

    assert!(
        !scratch_database_exists(std::process::id()).await,
        "the demo drops its scratch database"
    );
}

/// Whether the scratch database of the demo run by process `pid` is still there.
async fn scratch_database_exists(pid: u32) -> bool {
    let (client, connection) = tokio_postgres::connect(
        "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    tokio::spawn(connection);
    let count: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&format!("event_exporter_demo_{pid}")],
        )
        .await
        .expect("query")
        .get(0);
    count > 0
}

/// `event-exporter-dev demo` with `args`, its stderr piped.
fn demo_command(args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_event-exporter-dev"));
    command
        .arg("demo")
        .args(args)
        .stderr(std::process::Stdio::piped());
    command
}

/// Without `--output` the demo keeps nothing: its temporary directory is gone when it exits,
/// and the summary says the events were not kept. With stderr not a terminal, progress comes
/// as whole lines, never `\r` rewrites.
#[test]
fn demo_command_prints_a_summary_and_leaves_nothing_behind() {
    let child = demo_command(&["--history", "200", "--rate", "50", "--live-for", "2s"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run demo");
    let scratch = std::env::temp_dir().join(format!("event-exporter-demo-{}", child.id()));
    let run = child.wait_with_output().expect("demo output");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("events written:    300"), "{stdout}");
    assert!(
        stdout.contains("events delivered:  300 (missing: 0)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("received events:   not kept (--output DIR keeps them"),
        "{stdout}"
    );
    assert!(!scratch.exists(), "{} is left behind", scratch.display());
    assert!(
        !stderr.contains('\r'),
        "progress used \\r off a terminal:\n{stderr}"
    );
    assert!(stderr.contains("demo: delivered 300/300"), "{stderr}");
}

/// SIGINT or SIGTERM in the middle of the run: the demo stops at once and still removes what
/// it created (the scratch database, its temporary directory, the secret's directory).
#[tokio::test]
async fn an_interrupted_demo_leaves_nothing_behind() {
    use std::io::BufRead;
    for signal in ["-INT", "-TERM"] {
        let mut child = demo_command(&["--history", "200", "--rate", "50", "--live-for", "120s"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run demo");
        let pid = child.id();
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = std::io::BufReader::new(stderr).lines();
        let mut seen = String::new();
        // Wait until the exporter runs and live events are being written.
        for line in lines.by_ref() {
            let line = line.expect("stderr line");
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("exporter running") {
                break;
            }
        }
        assert!(seen.contains("exporter running"), "{seen}");
        std::thread::sleep(std::time::Duration::from_millis(500));
        let killed = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(killed.success());
        for line in lines {
            seen.push_str(&line.expect("stderr line"));
            seen.push('\n');
        }
        let status = child.wait().expect("demo exits");
        assert!(
            !status.success(),
            "{signal}: an interrupted demo is not a success"
        );
        assert!(seen.contains("interrupted"), "{signal}:\n{seen}");

        let scratch = std::env::temp_dir().join(format!("event-exporter-demo-{pid}"));
        assert!(!scratch.exists(), "{} is left behind", scratch.display());
        let secrets = format!("event-exporter-demo-secrets-{pid}-");
        let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .expect("temp dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(&secrets))
            .map(|e| e.path())
            .collect();
        assert!(
            left.is_empty(),
            "{signal}: secret directories left: {left:?}"
        );
        assert!(
            !scratch_database_exists(pid).await,
            "{signal}: event_exporter_demo_{pid} is left behind"
        );
    }
}
