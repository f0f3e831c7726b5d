//! Command-line arguments and environment variables that are not UTF-8 (issue 14, "no panic
//! reachable from input"): the binary reads its arguments with `std::env::args_os`, so such an
//! argument is a usage error (exit 2, clap's message) where text is expected, and a path where a
//! path is expected, never a panic (`std::env::args` panics on it, which exits 101). A datastore
//! variable that is not UTF-8 is a configuration error naming it (exit 2), not "unset".
#![cfg(unix)]

mod support;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::exporter::binary;

/// A byte that is never valid UTF-8.
const NOT_UTF8: &[u8] = b"\xff";

fn not_utf8(prefix: &str, suffix: &str) -> OsString {
    let mut bytes = prefix.as_bytes().to_vec();
    bytes.extend_from_slice(NOT_UTF8);
    bytes.extend_from_slice(suffix.as_bytes());
    OsString::from_vec(bytes)
}

/// Runs the binary with `args` and the datastore environment; exit code and stderr + stdout.
fn run(args: &[OsString]) -> (Option<i32>, String) {
    run_with(args, &[])
}

/// As [`run`], with `extra` added to (or replacing part of) the environment. The child is
/// killed after 30 s (exit code `None`).
fn run_with(args: &[OsString], extra: &[(&str, OsString)]) -> (Option<i32>, String) {
    let mut child = Command::new(binary())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs([
            ("DATASTORE_PROVIDER", "postgresql"),
            ("DATASTORE_HOST", "127.0.0.1"),
            ("DATASTORE_PORT", "5432"),
            ("DATASTORE_DATABASE", "nvsentinel"),
            ("DATASTORE_USERNAME", "postgres"),
            ("DATASTORE_SSLMODE", "disable"),
        ])
        .envs(extra.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run event-exporter");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let output = child.wait_with_output().expect("collect output");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout),
    )
}

fn os(text: &str) -> OsString {
    OsString::from(text)
}

#[test]
fn a_non_utf8_argument_where_text_is_expected_exits_2_without_a_panic() {
    let cases: Vec<(Vec<OsString>, &str)> = vec![
        (vec![not_utf8("", "")], "unrecognized subcommand"),
        (
            vec![os("--metrics-port"), not_utf8("21", "")],
            "invalid UTF-8",
        ),
        (vec![not_utf8("--log-level=", "")], "invalid UTF-8"),
        // Go-style single-dash flags are rewritten by name; the value keeps its bytes.
        (vec![not_utf8("-log-level=", "")], "invalid UTF-8"),
        (vec![os("-workers"), not_utf8("4", "")], "invalid UTF-8"),
    ];
    for (args, message) in cases {
        let (code, output) = run(&args);
        assert_eq!(
            code,
            Some(2),
            "{args:?}: expected exit 2; output:\n{output}"
        );
        assert!(output.contains(message), "{args:?}: {output}");
        assert!(
            !output.contains("panicked"),
            "{args:?}: a panic instead of a usage error:\n{output}"
        );
    }
}

#[test]
fn a_non_utf8_config_path_is_a_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let name = OsStr::from_bytes(b"config-\xff.toml");
    let config = dir.path().join(name);
    std::fs::write(
        &config,
        "[exporter.metadata]\ncluster = \"test-cluster\"\nenvironment = \"test\"\n\n\
         [exporter.sink]\nendpoint = \"http://127.0.0.1:9/api/v1/events\"\n\n\
         [exporter.oidc]\nenabled = false\n",
    )
    .expect("write config");
    let mut flag = os("--config=");
    flag.push(config.as_os_str());
    let mut go_flag = os("-config=");
    go_flag.push(config.as_os_str());
    for args in [
        vec![
            os("check-config"),
            os("--config"),
            config.clone().into_os_string(),
        ],
        vec![os("check-config"), flag],
        vec![os("check-config"), go_flag],
    ] {
        let (code, output) = run(&args);
        assert_eq!(
            code,
            Some(0),
            "{args:?}: expected exit 0; output:\n{output}"
        );
        assert!(output.contains("test-cluster"), "{args:?}: {output}");
    }

    // A path that does not exist is the usual configuration error, naming the file.
    let missing = dir
        .path()
        .join(Path::new(OsStr::from_bytes(b"missing-\xff.toml")));
    let (code, output) = run(&[os("check-config"), os("--config"), missing.into_os_string()]);
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("cannot read config file"), "{output}");
    assert!(output.contains("missing-"), "{output}");
    assert!(!output.contains("panicked"), "{output}");
}

#[test]
fn a_datastore_variable_that_is_not_utf8_is_named_not_read_as_unset() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[exporter.metadata]\ncluster = \"test-cluster\"\nenvironment = \"test\"\n\n\
         [exporter.sink]\nendpoint = \"http://127.0.0.1:9/api/v1/events\"\n\n\
         [exporter.oidc]\nenabled = false\n",
    )
    .expect("write config");
    let port = support::exporter::free_port().to_string();
    for (name, args) in [
        (
            "DATASTORE_PASSWORD",
            vec![
                os("check-config"),
                os("--config"),
                config.clone().into_os_string(),
            ],
        ),
        (
            "DATASTORE_HOST",
            vec![
                os("--config"),
                config.clone().into_os_string(),
                os("--metrics-port"),
                os(&port),
            ],
        ),
    ] {
        let (code, output) = run_with(&args, &[(name, not_utf8("pg-", ""))]);
        assert_eq!(code, Some(2), "{name}: expected exit 2; output:\n{output}");
        assert!(
            output.contains(&format!("{name} is set but is not valid UTF-8")),
            "{name}: {output}"
        );
        assert!(!output.contains("panicked"), "{name}: {output}");
    }
}

/// tokio itself panics on a `TOKIO_WORKER_THREADS` that is not a positive number; the binary
/// reads it first and exits 2 naming it (a value that is not UTF-8 included).
#[test]
fn a_bad_worker_threads_variable_is_named_not_a_panic() {
    let config = os("/nonexistent/config.toml");
    for value in [os("0"), os("two"), os("-1"), not_utf8("4", "")] {
        let (code, output) = run_with(
            &[os("--config"), config.clone()],
            &[("TOKIO_WORKER_THREADS", value.clone())],
        );
        assert_eq!(
            code,
            Some(2),
            "{value:?}: expected exit 2; output:\n{output}"
        );
        assert!(
            output.contains("TOKIO_WORKER_THREADS="),
            "{value:?}: {output}"
        );
        assert!(!output.contains("panicked"), "{value:?}: {output}");
    }
    // A good value runs the job: here it stops at the missing configuration file instead.
    let (code, output) = run_with(
        &[os("--config"), config],
        &[("TOKIO_WORKER_THREADS", os("1"))],
    );
    assert!(!output.contains("TOKIO_WORKER_THREADS"), "{output}");
    assert_ne!(code, None, "{output}");
    assert!(output.contains("config"), "{output}");
}
