use super::*;

const FULL: &str = r#"
[exporter]
workers = 4

[exporter.metadata]
cluster = "prod-us-west-2"
environment = "production"
"topology.kubernetes.io/zone" = "us-west-2a"

[exporter.sink]
endpoint = "https://events.example.com/api/v1/events"
timeout = "10s"
insecure_skip_verify = true

[exporter.oidc]
token_url = "https://auth.example.com/oauth2/token"
client_id = "nvsentinel-exporter"
scope = "events:write"

[exporter.backfill]
enabled = true
max_age = "168h"
max_events = 10000
batch_size = 100
rate_limit = 100

[exporter.resume_token]
database = "nvsentinel"
collection = "resumetokens"

[exporter.failure_handling]
max_retries = 17
initial_backoff = "1s"
max_backoff = "5m"
backoff_multiplier = 2.0
"#;

fn error_of(text: &str) -> String {
    Config::parse(text)
        .expect_err("config should be rejected")
        .to_string()
}

#[test]
fn reads_every_section() {
    let config = Config::parse(FULL).expect("valid config");
    assert_eq!(config.cluster(), "prod-us-west-2");
    assert_eq!(config.metadata["topology.kubernetes.io/zone"], "us-west-2a");
    assert_eq!(config.workers, Some(4));
    assert_eq!(config.client_name, "event-exporter");
    assert_eq!(config.sink.timeout, Duration::from_secs(10));
    assert!(config.sink.insecure_skip_verify);
    let oidc = config.oidc.expect("oidc enabled by default");
    assert_eq!(oidc.scope, "events:write");
    assert!(config.backfill.enabled);
    assert_eq!(config.backfill.max_age, Duration::from_secs(168 * 3600));
    assert_eq!(config.backfill.max_events, 10000);
    assert_eq!(config.backfill.batch_size, 100);
    assert_eq!(config.backfill.rate_limit, 100);
    assert_eq!(config.failure_handling.max_retries, 17);
    assert_eq!(
        config.failure_handling.max_backoff,
        Duration::from_secs(300)
    );
    assert_eq!(config.failure_handling.backoff_multiplier, 2.0);
    assert_eq!(config.resume_token["collection"], "resumetokens");
    assert!(config.unknown_keys.is_empty(), "{:?}", config.unknown_keys);
}

#[test]
fn upstream_defaults_apply() {
    let config = Config::parse(
        r#"
[exporter.metadata]
cluster = "c"
[exporter.sink]
endpoint = "http://127.0.0.1:9/x"
[exporter.oidc]
enabled = false
"#,
    )
    .expect("valid config");
    assert!(config.oidc.is_none());
    assert_eq!(config.sink.timeout, Duration::from_secs(30));
    assert!(!config.backfill.enabled);
    assert_eq!(config.backfill.max_age, Duration::from_secs(720 * 3600));
    assert_eq!(config.failure_handling.max_retries, 0);
    assert_eq!(
        config.failure_handling.initial_backoff,
        Duration::from_secs(1)
    );
    assert_eq!(config.failure_handling.max_backoff, Duration::from_secs(60));
    assert_eq!(config.failure_handling.backoff_multiplier, 0.0);
    assert_eq!(config.workers, None);
    assert!(config.filter_expression.is_none());
}

#[test]
fn unknown_keys_are_reported_with_their_path() {
    let text = FULL.replace("timeout = \"10s\"", "timeout = \"10s\"\nretries = 3")
        + "\n[exporter.extra]\nx = 1\n[other]\ny = 2\n";
    let config = Config::parse(&text).expect("unknown keys are not fatal");
    assert_eq!(
        config.unknown_keys,
        vec!["exporter.extra", "exporter.sink.retries", "other"]
    );
}

#[test]
fn every_invalid_value_names_its_key() {
    let cases = [
        (
            "cluster = \"prod-us-west-2\"",
            "",
            "exporter.metadata.cluster",
        ),
        (
            "cluster = \"prod-us-west-2\"",
            "cluster = \"  \"",
            "exporter.metadata.cluster",
        ),
        (
            "environment = \"production\"",
            "environment = 3",
            "exporter.metadata.environment",
        ),
        (
            "endpoint = \"https://events.example.com/api/v1/events\"",
            "",
            "exporter.sink.endpoint",
        ),
        (
            "endpoint = \"https://events.example.com/api/v1/events\"",
            "endpoint = \"ftp://x/y\"",
            "exporter.sink.endpoint",
        ),
        (
            "endpoint = \"https://events.example.com/api/v1/events\"",
            "endpoint = \"not a url\"",
            "exporter.sink.endpoint",
        ),
        (
            "timeout = \"10s\"",
            "timeout = \"10\"",
            "exporter.sink.timeout",
        ),
        (
            "timeout = \"10s\"",
            "timeout = \"-1s\"",
            "exporter.sink.timeout",
        ),
        ("timeout = \"10s\"", "timeout = 10", "exporter.sink.timeout"),
        (
            "insecure_skip_verify = true",
            "insecure_skip_verify = \"yes\"",
            "exporter.sink.insecure_skip_verify",
        ),
        (
            "token_url = \"https://auth.example.com/oauth2/token\"",
            "",
            "exporter.oidc.token_url",
        ),
        (
            "client_id = \"nvsentinel-exporter\"",
            "",
            "exporter.oidc.client_id",
        ),
        ("scope = \"events:write\"", "", "exporter.oidc.scope"),
        (
            "max_age = \"168h\"",
            "max_age = \"7d\"",
            "exporter.backfill.max_age",
        ),
        (
            "max_events = 10000",
            "max_events = -5",
            "exporter.backfill.max_events",
        ),
        (
            "max_events = 10000",
            "max_events = 0",
            "exporter.backfill.max_events",
        ),
        (
            "batch_size = 100",
            "batch_size = \"many\"",
            "exporter.backfill.batch_size",
        ),
        (
            "rate_limit = 100",
            "rate_limit = -1",
            "exporter.backfill.rate_limit",
        ),
        (
            "max_retries = 17",
            "max_retries = -1",
            "exporter.failure_handling.max_retries",
        ),
        (
            "initial_backoff = \"1s\"",
            "initial_backoff = \"soon\"",
            "exporter.failure_handling.initial_backoff",
        ),
        (
            "backoff_multiplier = 2.0",
            "backoff_multiplier = -2.0",
            "exporter.failure_handling.backoff_multiplier",
        ),
        ("workers = 4", "workers = 0", "exporter.workers"),
        ("workers = 4", "workers = \"4\"", "exporter.workers"),
    ];
    for (from, to, key) in cases {
        assert!(FULL.contains(from), "test case does not apply: {from}");
        let message = error_of(&FULL.replace(from, to));
        assert!(
            message.starts_with(&format!("{key}:")),
            "replacing {from:?} by {to:?}: message {message:?} should name {key}"
        );
    }
}

#[test]
fn bad_value_is_quoted_in_the_message() {
    let message = error_of(&FULL.replace("max_age = \"168h\"", "max_age = \"7d\""));
    assert!(message.contains("\"7d\""), "{message}");
    let message = error_of(&FULL.replace("max_events = 10000", "max_events = -5"));
    assert!(message.contains("-5"), "{message}");
}

#[test]
fn syntax_errors_are_reported() {
    let message = error_of("[exporter\ncluster=");
    assert!(message.contains("not valid TOML"), "{message}");
}

#[test]
fn disabling_oidc_needs_no_oidc_keys() {
    let text = FULL
        .replace(
            "token_url = \"https://auth.example.com/oauth2/token\"",
            "enabled = false",
        )
        .replace("client_id = \"nvsentinel-exporter\"", "")
        .replace("scope = \"events:write\"", "");
    let config = Config::parse(&text).expect("valid");
    assert!(config.oidc.is_none());
}

#[test]
fn blank_filter_means_no_filter() {
    for blank in ["\"\"", "\"   \"", "\"\\t\\n\""] {
        let config = Config::parse(&format!(
            "{FULL}\n[exporter.filter]\nexpression = {blank}\n"
        ))
        .expect("valid");
        assert!(config.filter_expression.is_none(), "{blank}");
    }
}

#[test]
fn example_configs_are_valid_and_use_only_known_keys() {
    for file in ["examples/config.toml", "examples/config-local.toml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(
            config.unknown_keys.is_empty(),
            "{file}: {:?}",
            config.unknown_keys
        );
    }
}

#[test]
fn liveness_timeout_defaults_above_the_retry_gap_and_is_range_checked() {
    // FULL: sink.timeout 10s, max_backoff 5m → 2 × 310s.
    let config = Config::parse(FULL).expect("valid config");
    assert_eq!(config.liveness_timeout, Duration::from_secs(620));
    // Upstream defaults (30s, 60s) → the 5 minute floor.
    let minimal = "[exporter.metadata]\ncluster = \"c\"\n[exporter.sink]\nendpoint = \"http://s/\"\n[exporter.oidc]\nenabled = false\n";
    let config = Config::parse(minimal).expect("valid config");
    assert_eq!(config.liveness_timeout, Duration::from_secs(300));
    let set = format!("{minimal}[exporter]\nliveness_timeout = \"90s\"\n");
    let config = Config::parse(&set).expect("valid config");
    assert_eq!(config.liveness_timeout, Duration::from_secs(90));
    assert!(config.unknown_keys.is_empty(), "{:?}", config.unknown_keys);
    for bad in ["\"500ms\"", "\"0s\"", "\"-1s\"", "\"soon\"", "30"] {
        let text = format!("{minimal}[exporter]\nliveness_timeout = {bad}\n");
        let error = error_of(&text);
        assert!(
            error.starts_with("exporter.liveness_timeout:"),
            "{bad}: {error}"
        );
    }
}

#[test]
fn out_of_range_numbers_are_rejected_naming_the_key() {
    let cases = [
        (
            "backoff_multiplier = 2.0",
            "backoff_multiplier = 1e300",
            "exporter.failure_handling.backoff_multiplier",
        ),
        (
            "backoff_multiplier = 2.0",
            "backoff_multiplier = nan",
            "exporter.failure_handling.backoff_multiplier",
        ),
        (
            "backoff_multiplier = 2.0",
            "backoff_multiplier = inf",
            "exporter.failure_handling.backoff_multiplier",
        ),
        (
            "backoff_multiplier = 2.0",
            "backoff_multiplier = -inf",
            "exporter.failure_handling.backoff_multiplier",
        ),
        (
            "max_backoff = \"5m\"",
            "max_backoff = \"2562047h\"",
            "exporter.failure_handling.max_backoff",
        ),
        (
            "initial_backoff = \"1s\"",
            "initial_backoff = \"25h\"",
            "exporter.failure_handling.initial_backoff",
        ),
        (
            "max_retries = 17",
            "max_retries = 9223372036854775807",
            "exporter.failure_handling.max_retries",
        ),
        (
            "timeout = \"10s\"",
            "timeout = \"2562047h\"",
            "exporter.sink.timeout",
        ),
        (
            "max_age = \"168h\"",
            "max_age = \"2562047h\"",
            "exporter.backfill.max_age",
        ),
        (
            "max_events = 10000",
            "max_events = 9223372036854775807",
            "exporter.backfill.max_events",
        ),
        (
            "batch_size = 100",
            "batch_size = 0",
            "exporter.backfill.batch_size",
        ),
        (
            "batch_size = 100",
            "batch_size = 100000000",
            "exporter.backfill.batch_size",
        ),
        (
            "rate_limit = 100",
            "rate_limit = 9223372036854775807",
            "exporter.backfill.rate_limit",
        ),
        ("workers = 4", "workers = 100000000", "exporter.workers"),
        ("workers = 4", "workers = -3", "exporter.workers"),
        (
            "max_events = 10000",
            "max_events = 1.5",
            "exporter.backfill.max_events",
        ),
        (
            "max_events = 10000",
            "max_events = 1e300",
            "exporter.backfill.max_events",
        ),
        ("workers = 4", "workers = nan", "exporter.workers"),
    ];
    for (from, to, key) in cases {
        assert!(FULL.contains(from), "test case does not apply: {from}");
        let message = error_of(&FULL.replace(from, to));
        assert!(
            message.starts_with(&format!("{key}:")),
            "replacing {from:?} by {to:?}: message {message:?} should name {key}"
        );
    }
}

const MINIMAL: &str = r#"
[exporter.metadata]
cluster = "c"
[exporter.sink]
endpoint = "http://127.0.0.1:9/x"
[exporter.oidc]
enabled = false
"#;

#[test]
fn rejection_policy_and_save_interval_defaults_keep_todays_behaviour() {
    let config = Config::parse(MINIMAL).expect("valid config");
    assert_eq!(config.rejections.on_rejected, OnRejected::Stop);
    assert_eq!(
        config.rejections.rejected_statuses,
        vec![400, 413, 415, 422]
    );
    assert!(config.rejections.already_delivered_statuses.is_empty());
    assert!(config.rejections.dead_letter.is_none());
    assert_eq!(
        config.resume_token_save_interval,
        Duration::from_millis(100)
    );
}

#[test]
fn dead_letter_policy_is_read_with_its_destinations() {
    let text = format!(
        "{MINIMAL}\n[exporter.resume_token]\nsave_interval = \"250ms\"\n\
         [exporter.failure_handling]\non_rejected = \"dead_letter\"\n\
         rejected_statuses = [400, 404, 422]\nalready_delivered_statuses = [409]\n\
         [exporter.failure_handling.dead_letter]\nfile = \"/var/lib/dl.ndjson\"\n\
         endpoint = \"https://dl.example.com/events\"\n"
    );
    let config = Config::parse(&text).expect("valid config");
    assert!(config.unknown_keys.is_empty(), "{:?}", config.unknown_keys);
    assert_eq!(config.rejections.on_rejected, OnRejected::DeadLetter);
    assert_eq!(config.rejections.rejected_statuses, vec![400, 404, 422]);
    assert_eq!(config.rejections.already_delivered_statuses, vec![409]);
    let dead_letter = config.rejections.dead_letter.expect("dead letter");
    assert_eq!(
        dead_letter.file.as_deref(),
        Some(Path::new("/var/lib/dl.ndjson"))
    );
    assert_eq!(
        dead_letter.endpoint.as_deref(),
        Some("https://dl.example.com/events")
    );
    assert_eq!(
        config.resume_token_save_interval,
        Duration::from_millis(250)
    );
}

#[test]
fn invalid_rejection_settings_name_their_key() {
    let cases = [
        (
            "on_rejected = \"skip\"",
            "exporter.failure_handling.on_rejected",
        ),
        (
            "on_rejected = \"dead_letter\"",
            "exporter.failure_handling.on_rejected",
        ),
        (
            "rejected_statuses = [400, 503]",
            "exporter.failure_handling.rejected_statuses",
        ),
        (
            "rejected_statuses = [429]",
            "exporter.failure_handling.rejected_statuses",
        ),
        (
            "rejected_statuses = \"400\"",
            "exporter.failure_handling.rejected_statuses",
        ),
        (
            "already_delivered_statuses = [401]",
            "exporter.failure_handling.already_delivered_statuses",
        ),
        (
            "already_delivered_statuses = [400]",
            "exporter.failure_handling.already_delivered_statuses",
        ),
        (
            "[exporter.failure_handling.dead_letter]\nfile = \"/x\"",
            "exporter.failure_handling.dead_letter",
        ),
        (
            "on_rejected = \"dead_letter\"\n[exporter.failure_handling.dead_letter]\nendpoint = \"ftp://x\"",
            "exporter.failure_handling.dead_letter.endpoint",
        ),
        (
            "on_rejected = \"dead_letter\"\n[exporter.failure_handling.dead_letter]",
            "exporter.failure_handling.dead_letter",
        ),
    ];
    for (keys, key) in cases {
        let text = format!("{MINIMAL}\n[exporter.failure_handling]\n{keys}\n");
        let error = error_of(&text);
        assert!(error.starts_with(&format!("{key}:")), "{keys}: {error}");
    }
    let error = error_of(&format!(
        "{MINIMAL}\n[exporter.resume_token]\nsave_interval = \"soon\"\n"
    ));
    assert!(
        error.starts_with("exporter.resume_token.save_interval:"),
        "{error}"
    );
}

#[test]
fn bounds_are_inclusive() {
    let text = FULL
        .replace("backoff_multiplier = 2.0", "backoff_multiplier = 100")
        .replace("workers = 4", "workers = 1024")
        .replace("max_backoff = \"5m\"", "max_backoff = \"24h\"")
        .replace("batch_size = 100", "batch_size = 100000");
    let config = Config::parse(&text).expect("bounds are allowed");
    assert_eq!(config.failure_handling.backoff_multiplier, 100.0);
    assert_eq!(config.workers, Some(1024));
    assert_eq!(config.backfill.batch_size, 100_000);
    // The largest retry schedule the bounds allow computes without overflow.
    let policy = RetryPolicy {
        max_retries: MAX_RETRIES,
        initial_backoff: MAX_WAIT,
        max_backoff: MAX_WAIT,
        backoff_multiplier: MAX_BACKOFF_MULTIPLIER,
    };
    assert!(crate::sink::retry::total_base_delay(&policy) >= MAX_WAIT);
}

#[test]
fn floats_with_integral_values_are_read_as_integers_with_a_warning() {
    let text = FULL
        .replace("max_events = 10000", "max_events = 1e+06")
        .replace("max_retries = 17", "max_retries = 17.0");
    let config = Config::parse(&text).expect("integral floats are accepted");
    assert_eq!(config.backfill.max_events, 1_000_000);
    assert_eq!(config.failure_handling.max_retries, 17);
    assert_eq!(config.warnings.len(), 2, "{:?}", config.warnings);
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.starts_with("exporter.backfill.max_events:")),
        "{:?}",
        config.warnings
    );
    assert!(Config::parse(FULL).expect("valid").warnings.is_empty());
}

#[test]
fn cluster_must_be_a_uri_host() {
    for bad in [
        "my cluster",
        "a/b",
        "a@b",
        "x:1",
        "é",
        "a%20b",
        "a?b",
        "a#b",
    ] {
        let text = FULL.replace(
            "cluster = \"prod-us-west-2\"",
            &format!("cluster = {bad:?}"),
        );
        let message = error_of(&text);
        assert!(
            message.starts_with("exporter.metadata.cluster:") && message.contains("allowed"),
            "{bad}: {message}"
        );
    }
    for good in ["prod-us-west-2", "gke_proj_zone_name", "a.b~c", "C1"] {
        let text = FULL.replace(
            "cluster = \"prod-us-west-2\"",
            &format!("cluster = {good:?}"),
        );
        let config = Config::parse(&text).expect("valid cluster");
        let source = crate::cloudevent::Transformer::new(config.metadata.clone())
            .source()
            .to_string();
        assert_eq!(source, format!("nvsentinel://{good}/healthevents"));
        assert!(
            reqwest::Url::parse(&source).is_ok_and(|url| url.host_str().is_some()),
            "{source}"
        );
    }
}

#[test]
fn known_keys_are_the_serde_field_names() {
    assert_eq!(
        keys::fields::<raw::RawSink>(),
        [
            "endpoint",
            "timeout",
            "insecure_skip_verify",
            "ca_file",
            "concurrency",
            "mode",
            "batch_max_events",
            "batch_max_bytes",
            "batch_linger"
        ]
    );
    assert_eq!(keys::table_keys(""), Some(&["exporter"][..]));
    assert_eq!(keys::table_keys("exporter.metadata"), Some(&[][..]));
    assert_eq!(keys::table_keys("exporter.nope"), None);
    // Every table the map names is a field of its parent table, so no path can drift from
    // the structs.
    for path in [
        "exporter",
        "exporter.metadata",
        "exporter.sink",
        "exporter.oidc",
        "exporter.backfill",
        "exporter.failure_handling",
        "exporter.failure_handling.dead_letter",
        "exporter.filter",
        "exporter.resume_token",
    ] {
        let (parent, name) = path.rsplit_once('.').unwrap_or(("", path));
        let parent_keys = keys::table_keys(parent).expect("parent is a table");
        assert!(parent_keys.contains(&name), "{path}");
        assert!(keys::table_keys(path).is_some(), "{path}");
    }
    // A struct with no known keys would make every key of its table "unknown".
    assert!(keys::fields::<raw::RawExporter>().contains(&"liveness_timeout"));
}

#[test]
fn wrong_types_keep_their_messages() {
    for (from, to, message) in [
        (
            "environment = \"production\"",
            "environment = 3",
            "exporter.metadata.environment: expected a string, got integer 3",
        ),
        (
            "insecure_skip_verify = true",
            "insecure_skip_verify = \"yes\"",
            "exporter.sink.insecure_skip_verify: expected true or false, got string \"yes\"",
        ),
        (
            "timeout = \"10s\"",
            "timeout = 10",
            "exporter.sink.timeout: expected a string, got integer 10",
        ),
        (
            "timeout = \"10s\"",
            "timeout = \"10\"",
            "exporter.sink.timeout: invalid duration \"10\": missing unit (use ns, us, ms, s, m \
             or h) (examples: \"30s\", \"1h30m\")",
        ),
        (
            "max_events = 10000",
            "max_events = 1.5",
            "exporter.backfill.max_events: expected an integer, got float 1.5",
        ),
        (
            "max_events = 10000",
            "max_events = -5",
            "exporter.backfill.max_events: must not be negative, got -5",
        ),
        (
            "workers = 4",
            "workers = \"4\"",
            "exporter.workers: expected an integer, got string \"4\"",
        ),
        (
            "workers = 4",
            "workers = 0",
            "exporter.workers: must be from 1 to 1024, got 0",
        ),
        (
            "backoff_multiplier = 2.0",
            "backoff_multiplier = true",
            "exporter.failure_handling.backoff_multiplier: expected a number, got boolean true",
        ),
    ] {
        assert!(FULL.contains(from), "test case does not apply: {from}");
        assert_eq!(error_of(&FULL.replace(from, to)), message);
    }
    let message = error_of(&format!(
        "{MINIMAL}\n[exporter.failure_handling]\nrejected_statuses = [400, 503]\n"
    ));
    assert_eq!(
        message,
        "exporter.failure_handling.rejected_statuses: 503 is not allowed: each entry must be a \
         4xx status other than 401, 407, 408 and 429 (those and 5xx are always retried)"
    );
    // A table where a value belongs, and a value where a table belongs: still key first.
    let message = error_of(&FULL.replace("workers = 4", "workers = { n = 4 }"));
    assert!(
        message.starts_with("exporter.workers: expected an integer, got table"),
        "{message}"
    );
    for table in ["filter", "metadata", "sink"] {
        let text = format!("[exporter]\n{table} = 3\n");
        let message = error_of(&text);
        assert_eq!(
            message,
            format!("exporter.{table}: invalid type: integer `3`, expected a table")
        );
    }
    assert_eq!(
        error_of("exporter = 3\n"),
        "exporter: invalid type: integer `3`, expected a table"
    );
}

#[test]
fn float_warning_names_the_key_and_the_integer() {
    let config = Config::parse(&FULL.replace("batch_size = 100", "batch_size = 1e2"))
        .expect("integral float accepted");
    assert_eq!(config.backfill.batch_size, 100);
    assert_eq!(
        config.warnings,
        vec!["exporter.backfill.batch_size: 100 is a float; read as the integer 100 (write 100)"]
    );
}

#[test]
fn unknown_keys_get_corrections_from_their_own_table() {
    let text = FULL
        .replace("timeout = \"10s\"", "timout = \"10s\"")
        .replace("max_retries = 17", "max_retries = 17\nmax_retires = 3")
        .replace("collection = \"resumetokens\"", "colection = \"x\"");
    let text = format!("exporterr = 1\n{text}");
    let config = Config::parse(&text).expect("unknown keys are not fatal");
    assert_eq!(
        config.unknown_key_messages(),
        vec![
            "exporter.failure_handling.max_retires: unknown key (did you mean \
             exporter.failure_handling.max_retries?)",
            "exporter.resume_token.colection: unknown key (did you mean \
             exporter.resume_token.collection?)",
            "exporter.sink.timout: unknown key (did you mean exporter.sink.timeout?)",
            "exporterr: unknown key (did you mean exporter?)",
        ]
    );
}

#[test]
fn misspelled_tables_are_errors_at_every_level() {
    for (table, name, meant) in [
        ("[exporter.odic]", "exporter.odic", "[exporter.oidc]"),
        (
            "[exporter.backfil]",
            "exporter.backfil",
            "[exporter.backfill]",
        ),
        ("[exportr.sink]", "exportr", "[exporter]"),
        (
            "[exporter.failure_handling.dead_leter]",
            "exporter.failure_handling.dead_leter",
            "[exporter.failure_handling.dead_letter]",
        ),
    ] {
        let message = error_of(&format!("{MINIMAL}\n{table}\nx = 1\n"));
        assert!(
            message.starts_with(&format!(
                "{name}: unknown table [{name}]: did you mean {meant}?"
            )),
            "{table}: {message}"
        );
    }
    // Far from every known table: an unknown key, not an error.
    let config = Config::parse(&format!("{MINIMAL}\n[exporter.tracing]\nx = 1\n")).expect("ok");
    assert_eq!(config.unknown_keys, vec!["exporter.tracing"]);
}

#[test]
fn a_datetime_is_not_taken_for_a_string() {
    for (from, to, key) in [
        (
            "cluster = \"prod-us-west-2\"",
            "cluster = 2024-01-01",
            "exporter.metadata.cluster",
        ),
        (
            "timeout = \"10s\"",
            "timeout = 10:00:00",
            "exporter.sink.timeout",
        ),
        (
            "workers = 4",
            "client_name = 1979-05-27T07:32:00Z",
            "exporter.client_name",
        ),
    ] {
        let message = error_of(&FULL.replace(from, to));
        assert!(
            message.starts_with(&format!("{key}: got datetime ")),
            "{to}: {message}"
        );
    }
    // An unknown key may hold one: it is only reported.
    let config = Config::parse(&FULL.replace("workers = 4", "started = 2024-01-01"))
        .expect("unknown keys are not fatal");
    assert_eq!(config.unknown_keys, vec!["exporter.started"]);
}

#[test]
fn cloudevent_subject_is_none_unless_asked_for() {
    use crate::cloudevent::Subject;
    assert_eq!(Config::parse(FULL).expect("valid").subject, Subject::None);
    let text = format!("{FULL}\n[exporter.cloudevent]\nsubject = \"node_name\"\n");
    let config = Config::parse(&text).expect("valid");
    assert_eq!(config.subject, Subject::NodeName);
    assert!(config.unknown_keys.is_empty(), "{:?}", config.unknown_keys);
    let error = error_of(&format!(
        "{FULL}\n[exporter.cloudevent]\nsubject = \"node\"\n"
    ));
    assert!(error.starts_with("exporter.cloudevent.subject:"), "{error}");
    assert!(error.contains("node_name"), "{error}");
}

#[test]
fn sink_concurrency_is_fixed_unless_adaptive_is_asked_for() {
    let config = Config::parse(FULL).expect("valid config");
    assert_eq!(config.sink.concurrency, ConcurrencyMode::Fixed);
    let adaptive = FULL.replace(
        "timeout = \"10s\"",
        "timeout = \"10s\"\nconcurrency = \"adaptive\"",
    );
    let config = Config::parse(&adaptive).expect("valid config");
    assert_eq!(config.sink.concurrency, ConcurrencyMode::Adaptive);
    let shown = serde_json::to_value(&config.sink).expect("serializable");
    assert_eq!(shown["concurrency"], "adaptive");

    let unknown = FULL.replace(
        "timeout = \"10s\"",
        "timeout = \"10s\"\nconcurrency = \"aimd\"",
    );
    assert_eq!(
        error_of(&unknown),
        "exporter.sink.concurrency: unknown mode \"aimd\"; expected one of fixed, adaptive"
    );
    let misspelled = FULL.replace(
        "timeout = \"10s\"",
        "timeout = \"10s\"\nconcurency = \"adaptive\"",
    );
    let config = Config::parse(&misspelled).expect("unknown keys are not fatal");
    assert_eq!(
        config.unknown_key_messages(),
        vec!["exporter.sink.concurency: unknown key (did you mean exporter.sink.concurrency?)"]
    );
}

#[test]
fn sink_mode_is_structured_unless_batch_is_asked_for() {
    let config = Config::parse(FULL).expect("valid config");
    assert_eq!(config.sink.mode, SinkMode::Structured);
    assert_eq!(config.sink.batch, DEFAULT_BATCH);
    let with =
        |extra: &str| FULL.replace("timeout = \"10s\"", &format!("timeout = \"10s\"\n{extra}"));
    let config = Config::parse(&with(
        "mode = \"batch\"\nbatch_max_events = 500\nbatch_max_bytes = 65536\nbatch_linger = \"50ms\"",
    ))
    .expect("valid config");
    assert_eq!(config.sink.mode, SinkMode::Batch);
    assert_eq!(
        config.sink.batch,
        BatchLimits {
            max_events: 500,
            max_bytes: 65536,
            linger: Duration::from_millis(50)
        }
    );
    for (extra, message) in [
        (
            "mode = \"binary\"",
            "exporter.sink.mode: unknown mode \"binary\"; expected one of structured, batch",
        ),
        (
            "batch_max_events = 0",
            "exporter.sink.batch_max_events: must be from 1 to 10000, got 0",
        ),
        (
            "batch_max_bytes = 10",
            "exporter.sink.batch_max_bytes: must be from 1024 to 67108864, got 10",
        ),
    ] {
        assert_eq!(error_of(&with(extra)), message);
    }
    assert!(error_of(&with("batch_linger = \"2s\"")).starts_with("exporter.sink.batch_linger:"));
}

#[test]
fn shown_settings_mask_a_password_in_the_sink_and_dead_letter_endpoints() {
    let text = FULL
        .replace(
            "https://events.example.com/api/v1/events",
            "https://ingest:s3cret@events.example.com/api/v1/events",
        )
        .replace(
            "backoff_multiplier = 2.0",
            "backoff_multiplier = 2.0\non_rejected = \"dead_letter\"\n\n\
             [exporter.failure_handling.dead_letter]\n\
             endpoint = \"https://dl:s3cret@dead.example.com/in\"",
        );
    let config = Config::parse(&text).expect("valid config");
    // The exporter itself uses the endpoint as written.
    assert!(config.sink.endpoint.contains("ingest:s3cret@"));
    let shown = serde_json::to_string(&config.sink).expect("serializable");
    assert!(shown.contains("ingest:***@events.example.com"), "{shown}");
    let dead_letter = config
        .rejections
        .dead_letter
        .as_ref()
        .expect("a dead-letter table");
    let shown_dl = serde_json::to_string(dead_letter).expect("serializable");
    assert!(shown_dl.contains("dl:***@dead.example.com"), "{shown_dl}");
    assert!(!shown.contains("s3cret") && !shown_dl.contains("s3cret"));
}
