//! Reading the TOML tree into the serde structs of `super::raw`, and the keys the file may
//! hold: unknown keys (with the known key each most likely misspells) and misspelled tables.
//!
//! Invariant: the known keys of every table are the field names serde derives for its struct
//! (read back with [`fields`]); [`TABLES`] only says which struct reads which table. An unknown
//! key is reported, never fatal, except a table whose name is a likely misspelling of a known
//! table: `[exporter.odic]` would otherwise leave OIDC on with no settings, and
//! `[exporter.backfil]` would silently turn the backfill off.

use std::collections::BTreeMap;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};

use super::raw::{
    RawBackfill, RawCloudEvent, RawDeadLetter, RawExporter, RawFailureHandling, RawFilter, RawOidc,
    RawResumeToken, RawRoot, RawSink,
};
use super::{invalid, ConfigError};

/// The file read into its structs, with the keys that were not read.
pub(super) struct Read {
    pub exporter: RawExporter,
    /// Full dotted paths, sorted (`exporter.sink.colour`).
    pub unknown_keys: Vec<String>,
    /// Unknown key → the known key (full path) it most likely misspells.
    pub did_you_mean: BTreeMap<String, String>,
}

/// Deserializes `root` into [`RawRoot`]. A value of the wrong type fails with
/// [`ConfigError::Invalid`] naming its full key (`serde_path_to_error`); keys no struct reads
/// are collected (`serde_ignored`).
pub(super) fn read(root: toml::Table) -> Result<Read, ConfigError> {
    let mut ignored: Vec<(Vec<String>, String)> = Vec::new();
    let mut record = |path: serde_ignored::Path| {
        let mut segments = Vec::new();
        segments_of(&path, &mut segments);
        if let Some(name) = segments.pop() {
            ignored.push((segments, name));
        }
    };
    let deserializer = serde_ignored::Deserializer::new(root, &mut record);
    let raw: RawRoot = serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let key = error
            .path()
            .iter()
            .map(|segment| match segment {
                serde_path_to_error::Segment::Seq { index } => index.to_string(),
                serde_path_to_error::Segment::Map { key } => key.clone(),
                serde_path_to_error::Segment::Enum { variant } => variant.clone(),
                serde_path_to_error::Segment::Unknown => "?".to_string(),
            })
            .collect::<Vec<_>>()
            .join(".");
        let key = if key.is_empty() {
            "(config file)".to_string()
        } else {
            key
        };
        invalid(&key, error.inner().message())
    })?;
    let mut read = Read {
        exporter: raw.exporter,
        unknown_keys: Vec::new(),
        did_you_mean: BTreeMap::new(),
    };
    for (parent, name) in ignored {
        let parent = parent.join(".");
        let key = join(&parent, &name);
        if let Some(known) = table_keys(&parent).and_then(|keys| closest(&name, keys)) {
            read.did_you_mean.insert(key.clone(), join(&parent, known));
        }
        read.unknown_keys.push(key);
    }
    read.unknown_keys.sort();
    Ok(read)
}

/// The keys of a `serde_ignored` path, outermost first (`Option` and newtype layers are not
/// keys).
fn segments_of(path: &serde_ignored::Path, into: &mut Vec<String>) {
    match path {
        serde_ignored::Path::Root => {}
        serde_ignored::Path::Seq { parent, index } => {
            segments_of(parent, into);
            into.push(index.to_string());
        }
        serde_ignored::Path::Map { parent, key } => {
            segments_of(parent, into);
            into.push(key.clone());
        }
        serde_ignored::Path::Some { parent }
        | serde_ignored::Path::NewtypeStruct { parent }
        | serde_ignored::Path::NewtypeVariant { parent } => segments_of(parent, into),
    }
}

/// Fails on a table that is not read but whose name is a likely misspelling of a known table
/// next to it (`[exporter.odic]`, `[exportr]`), naming the table meant, and on a TOML datetime
/// given to a known key.
pub(super) fn check_table_names(root: &toml::Table) -> Result<(), ConfigError> {
    check_tables_in("", root)
}

fn check_tables_in(path: &str, table: &toml::Table) -> Result<(), ConfigError> {
    let Some(known) = table_keys(path) else {
        return Ok(());
    };
    let known_tables: Vec<&'static str> = known
        .iter()
        .copied()
        .filter(|key| table_keys(&join(path, key)).is_some())
        .collect();
    // `exporter.metadata` has no fixed keys: all of its keys are read.
    let reads = |key: &str| known.is_empty() || known.contains(&key);
    for (key, value) in table {
        let child_path = join(path, key);
        let child = match value {
            toml::Value::Table(child) => child,
            // serde sees a TOML datetime as its text; no setting is one, so a bare
            // `cluster = 2024-01-01` is refused here as it was before serde.
            toml::Value::Datetime(datetime) if reads(key) => {
                return Err(invalid(
                    &child_path,
                    format!(
                        "got datetime {datetime}: no setting takes a TOML datetime (quote it \
                         if it is a string)"
                    ),
                ))
            }
            _ => continue,
        };
        if reads(key) {
            check_tables_in(&child_path, child)?;
        } else if let Some(meant) = closest(key, &known_tables) {
            return Err(invalid(
                &child_path,
                format!(
                    "unknown table [{child_path}]: did you mean [{}]? (its settings would be \
                     ignored)",
                    join(path, meant)
                ),
            ));
        }
    }
    Ok(())
}

/// The known keys of one table.
type KeysOf = fn() -> &'static [&'static str];

/// Which struct reads which table (`""` is the file itself). `exporter.metadata` is a table
/// of free keys.
const TABLES: [(&str, KeysOf); 11] = [
    ("", fields::<RawRoot>),
    ("exporter", fields::<RawExporter>),
    ("exporter.metadata", || &[]),
    ("exporter.sink", fields::<RawSink>),
    ("exporter.oidc", fields::<RawOidc>),
    ("exporter.backfill", fields::<RawBackfill>),
    ("exporter.failure_handling", fields::<RawFailureHandling>),
    (
        "exporter.failure_handling.dead_letter",
        fields::<RawDeadLetter>,
    ),
    ("exporter.filter", fields::<RawFilter>),
    ("exporter.resume_token", fields::<RawResumeToken>),
    ("exporter.cloudevent", fields::<RawCloudEvent>),
];

/// The keys the table at `path` reads; `None` when no struct reads a table there.
pub(super) fn table_keys(path: &str) -> Option<&'static [&'static str]> {
    TABLES
        .iter()
        .find(|(table, _)| *table == path)
        .map(|(_, keys)| keys())
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// The known name `name` most likely misspells: the closest by Damerau-Levenshtein distance,
/// within one edit per three characters (at least one); `None` when nothing is that close.
fn closest(name: &str, known: &[&'static str]) -> Option<&'static str> {
    let limit = (name.chars().count() / 3).max(1);
    known
        .iter()
        .copied()
        .filter(|candidate| *candidate != name)
        .map(|candidate| (strsim::damerau_levenshtein(name, candidate), candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min()
        .map(|(_, candidate)| candidate)
}

/// The field names serde derives for the struct `T`: `T` is asked to deserialize itself from
/// a deserializer that records the `fields` argument of `deserialize_struct` and stops.
/// Empty for a type that is not a struct.
pub(super) fn fields<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Recorder<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for Recorder<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("fields recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    // Always an error (the recorder never yields a value); only the recorded names matter.
    let _ = T::deserialize(Recorder(&mut fields));
    fields
}
