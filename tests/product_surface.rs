//! The product binary carries the exporter and its operator commands only: the development
//! tools (reference sink, generator, demo, benchmarks) live in `tools/` (package
//! `event-exporter-dev`) and are neither subcommands nor normal dependencies of the product.

use std::process::{Command, Stdio};

const BINARY: &str = env!("CARGO_BIN_EXE_event-exporter");
const DEV_TOOLS: [&str; 4] = ["sink", "generate", "demo", "bench"];

#[test]
fn help_lists_the_product_commands_and_no_dev_tool() {
    let output = Command::new(BINARY)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .expect("run event-exporter --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .and_then(|rest| rest.split("Options:").next())
        .expect("a Commands: section")
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(commands, ["check-config", "status", "help"], "{help}");
}

#[test]
fn dev_tool_commands_are_unknown_to_the_product() {
    for tool in DEV_TOOLS {
        let output = Command::new(BINARY)
            .arg(tool)
            .stdin(Stdio::null())
            .output()
            .expect("run event-exporter");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{tool}: {stderr}");
        assert!(
            stderr.contains(&format!("unrecognized subcommand '{tool}'")),
            "{tool}: {stderr}"
        );
    }
}

#[test]
fn the_tools_crate_is_no_normal_dependency_of_the_product() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("read Cargo.toml");
    let manifest: toml::Table = manifest.parse().expect("Cargo.toml is TOML");
    let dependencies = manifest
        .get("dependencies")
        .and_then(toml::Value::as_table)
        .expect("[dependencies]");
    assert!(!dependencies.contains_key("event-exporter-dev"));
    let members = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(toml::Value::as_array)
        .expect("[workspace] members");
    assert!(members.iter().any(|m| m.as_str() == Some("tools")));
}
