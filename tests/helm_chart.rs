//! The Helm chart (`deploy/helm/event-exporter`), the plain manifests (`deploy/kubernetes`) and
//! the container image's Dockerfile against the binary.
//!
//! The full chart checks are `tests/helm/check_chart.py`: real Helm (the Helm v4 SDK from the
//! PyPI package `helm-python-sdk`) lints and renders the chart, `kubernetes-validate` validates
//! every manifest, and this crate's binary (`check-config`) loads every rendered `config.toml`.
//! They need a Python with both packages: `HELM_CHECK_PYTHON` names its interpreter (set by
//! `scripts/test`, which installs both into `target/test-venv`), else `python3` is tried.
//! Without one the test fails: a check that cannot run is never reported as passed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use event_exporter::config::Config;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BINARY: &str = env!("CARGO_BIN_EXE_event-exporter");

fn root() -> PathBuf {
    PathBuf::from(ROOT)
}

fn read(path: &str) -> String {
    let path = root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Whether `python` can import both packages the chart checks need.
fn has_packages(python: &str) -> bool {
    Command::new(python)
        .args(["-c", "import helm_python, kubernetes_validate, yaml"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

/// The interpreter to run the checks with, or why there is none.
fn python() -> Result<String, String> {
    match std::env::var("HELM_CHECK_PYTHON") {
        Ok(python) if !python.trim().is_empty() => {
            if has_packages(&python) {
                Ok(python)
            } else {
                Err(format!(
                    "HELM_CHECK_PYTHON={python} cannot import helm_python and \
                     kubernetes_validate (pip install helm-python-sdk kubernetes-validate)"
                ))
            }
        }
        _ if has_packages("python3") => Ok("python3".to_string()),
        _ => Err(
            "no Python with helm-python-sdk and kubernetes-validate: set \
                  HELM_CHECK_PYTHON to the interpreter of a venv with both \
                  (python3 -m venv .venv && .venv/bin/pip install helm-python-sdk \
                  kubernetes-validate)"
                .to_string(),
        ),
    }
}

#[test]
fn chart_checks_with_real_helm() {
    // A check that cannot run fails: it is never reported as passed.
    let python = match python() {
        Ok(python) => python,
        Err(reason) => panic!(
            "the Helm chart checks cannot run: {reason}; run the tests with `scripts/test`, \
             which installs them (tests/requirements.txt) into target/test-venv"
        ),
    };
    let output = Command::new(&python)
        .arg(root().join("tests/helm/check_chart.py"))
        .env("EVENT_EXPORTER_BIN", BINARY)
        .env_remove("DATASTORE_PROVIDER")
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {python} tests/helm/check_chart.py: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "chart checks failed ({}):\n{}{}",
        output.status,
        stdout
            .lines()
            .filter(|line| line.starts_with("FAIL"))
            .collect::<Vec<_>>()
            .join("\n"),
        stderr
    );
}

/// `appVersion` is the default image tag: it must be the version this crate builds.
#[test]
fn chart_app_version_is_the_crate_version() {
    let chart = read("deploy/helm/event-exporter/Chart.yaml");
    let app_version = chart
        .lines()
        .find_map(|line| line.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("Chart.yaml has appVersion");
    assert_eq!(app_version, env!("CARGO_PKG_VERSION"));
    assert!(chart
        .lines()
        .any(|line| line.trim() == "name: event-exporter"));
}

/// The `config.toml` of the plain manifests (a literal block scalar) loads with the binary's
/// config loader: this holds even where Python and Helm are not installed.
#[test]
fn plain_manifest_config_loads() {
    let manifest = read("deploy/kubernetes/configmap.yaml");
    let mut lines = manifest
        .lines()
        .skip_while(|l| l.trim() != "config.toml: |");
    lines
        .next()
        .expect("configmap.yaml has a config.toml block");
    let toml: String = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let config = Config::parse(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert!(config.unknown_keys.is_empty(), "{:?}", config.unknown_keys);
    assert_eq!(config.cluster(), "my-cluster");
    assert_eq!(config.workers, Some(10));
    assert_eq!(config.backfill.rate_limit, 1000);
    assert_eq!(config.failure_handling.max_retries, 17);
    assert!(config.oidc.is_some());

    let deployment = read("deploy/kubernetes/deployment.yaml");
    for arg in [
        "--config=/etc/config/config.toml",
        "--metrics-port=2112",
        "--oidc-secret-path=/var/secrets/oidc-client-secret",
        "--workers=10",
        "--shutdown-grace=20s",
    ] {
        assert!(deployment.contains(&format!("- \"{arg}\"")), "{arg}");
    }
}

/// The chart passes only arguments: the image's ENTRYPOINT must be the binary.
#[test]
fn dockerfile_entrypoint_is_the_binary() {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("ENTRYPOINT [\"/event-exporter\"]"));
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(dockerfile.contains("FROM gcr.io/distroless/cc-debian12:nonroot"));
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .expect("the image sets USER");
    assert!(
        !matches!(user.split(':').next(), Some("0" | "root")),
        "the image runs as {user}"
    );
    assert!(Path::new(ROOT).join(".dockerignore").is_file());
}

/// The README's test command does its own set-up on a fresh machine: run on a virtualenv path
/// that does not exist yet, `scripts/test --setup-only` creates it with every Python package
/// the tests import.
#[test]
fn the_test_command_sets_up_a_fresh_virtualenv() {
    let dir = tempfile::tempdir().expect("temp dir");
    let venv = dir.path().join("fresh-venv");
    let output = Command::new(root().join("scripts/test"))
        .arg("--setup-only")
        .env("TEST_VENV", &venv)
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/test --setup-only");
    assert!(
        output.status.success(),
        "set-up failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let imports = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import cloudevents, helm_python, kubernetes_validate; print('ok')",
        ])
        .output()
        .expect("run the new virtualenv's python");
    assert_eq!(
        String::from_utf8_lossy(&imports.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&imports.stderr)
    );
}
