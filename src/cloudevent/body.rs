//! The structured-mode body, written straight into bytes: the same bytes `serde_json` writes
//! for [`CloudEvent`] (keys in declaration order, the same skip rules, the same string escapes),
//! without its byte-at-a-time escape loop. A string is copied in runs of eight bytes that need
//! no escape; only `"`, `\` and control characters (below U+0020) are escaped, as serde_json
//! escapes them (`\b \t \n \f \r`, else `\u00xx` in lowercase hex). The unit tests compare both
//! writers on hostile strings.

use std::collections::BTreeMap;
use std::io::Write as _;

use super::{CloudEvent, EntityData, HealthEventData, OverridesData};

/// Writes `event` as JSON onto `out`.
pub(super) fn write_event(out: &mut Vec<u8>, event: &CloudEvent<'_>) {
    out.extend_from_slice(b"{\"specversion\":");
    string(out, event.specversion);
    out.extend_from_slice(b",\"type\":");
    string(out, event.event_type);
    out.extend_from_slice(b",\"source\":");
    string(out, event.source);
    out.extend_from_slice(b",\"id\":");
    string(out, event.id);
    out.extend_from_slice(b",\"time\":");
    string(out, &event.time);
    if let Some(subject) = event.subject {
        out.extend_from_slice(b",\"subject\":");
        string(out, subject);
    }
    out.extend_from_slice(b",\"data\":{\"healthEvent\":");
    health_event(out, &event.data.health_event);
    out.extend_from_slice(b",\"metadata\":");
    string_map(out, event.data.metadata);
    out.extend_from_slice(b"}}");
}

/// `data.healthEvent`, keys in `HealthEventData`'s order (Go's sorted map order).
fn health_event(out: &mut Vec<u8>, event: &HealthEventData<'_>) {
    out.extend_from_slice(b"{\"agent\":");
    string(out, event.agent);
    out.extend_from_slice(b",\"checkName\":");
    string(out, event.check_name);
    out.extend_from_slice(b",\"componentClass\":");
    string(out, event.component_class);
    if !event.custom_recommended_action.is_empty() {
        out.extend_from_slice(b",\"customRecommendedAction\":");
        string(out, event.custom_recommended_action);
    }
    if let Some(drain) = &event.drain_overrides {
        out.extend_from_slice(b",\"drainOverrides\":");
        overrides(out, drain);
    }
    out.extend_from_slice(b",\"entitiesImpacted\":");
    entities(out, &event.entities_impacted);
    out.extend_from_slice(b",\"errorCode\":");
    string_list(out, event.error_code);
    out.extend_from_slice(b",\"generatedTimestamp\":");
    string(out, &event.generated_timestamp);
    out.extend_from_slice(b",\"isFatal\":");
    boolean(out, event.is_fatal);
    out.extend_from_slice(b",\"isHealthy\":");
    boolean(out, event.is_healthy);
    out.extend_from_slice(b",\"message\":");
    string(out, event.message);
    if !event.metadata.is_empty() {
        out.extend_from_slice(b",\"metadata\":");
        string_map(out, event.metadata);
    }
    out.extend_from_slice(b",\"nodeName\":");
    string(out, event.node_name);
    out.extend_from_slice(b",\"processingStrategy\":");
    string(out, event.processing_strategy);
    if let Some(quarantine) = &event.quarantine_overrides {
        out.extend_from_slice(b",\"quarantineOverrides\":");
        overrides(out, quarantine);
    }
    out.extend_from_slice(b",\"recommendedAction\":");
    string(out, event.recommended_action);
    out.extend_from_slice(b",\"version\":");
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{}", event.version);
    out.push(b'}');
}

fn overrides(out: &mut Vec<u8>, value: &OverridesData) {
    out.extend_from_slice(b"{\"force\":");
    boolean(out, value.force);
    out.extend_from_slice(b",\"skip\":");
    boolean(out, value.skip);
    out.push(b'}');
}

fn entities(out: &mut Vec<u8>, entities: &[EntityData<'_>]) {
    out.push(b'[');
    for (i, entity) in entities.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"entityType\":");
        string(out, entity.entity_type);
        out.extend_from_slice(b",\"entityValue\":");
        string(out, entity.entity_value);
        out.push(b'}');
    }
    out.push(b']');
}

fn string_list(out: &mut Vec<u8>, items: &[String]) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, item);
    }
    out.push(b']');
}

fn string_map(out: &mut Vec<u8>, entries: &BTreeMap<String, String>) {
    out.push(b'{');
    for (i, (key, value)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, key);
        out.push(b':');
        string(out, value);
    }
    out.push(b'}');
}

fn boolean(out: &mut Vec<u8>, value: bool) {
    out.extend_from_slice(if value { b"true" } else { b"false" });
}

/// `text` as a JSON string, escaped as serde_json escapes it.
fn string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let mut rest = text.as_bytes();
    loop {
        let (plain, tail) = rest.split_at(plain_prefix(rest));
        out.extend_from_slice(plain);
        let Some((&byte, tail)) = tail.split_first() else {
            break;
        };
        escape(out, byte);
        rest = tail;
    }
    out.push(b'"');
}

/// How many leading bytes of `bytes` need no escape (at most `bytes.len()`).
fn plain_prefix(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const QUOTES: u64 = 0x2222_2222_2222_2222;
    const BACKSLASHES: u64 = 0x5c5c_5c5c_5c5c_5c5c;
    const SPACES: u64 = 0x2020_2020_2020_2020;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let mut plain: usize = 0;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let v = u64::from_le_bytes(word);
        // A byte below 0x20, a quote or a backslash (exact for "is there one"; a chunk
        // flagged is then looked at byte by byte).
        let below_space = v.wrapping_sub(SPACES) & !v & HIGH;
        if below_space | has_zero(v ^ QUOTES) | has_zero(v ^ BACKSLASHES) != 0 {
            break;
        }
        plain = plain.saturating_add(8);
    }
    let tail = bytes.get(plain..).unwrap_or_default();
    plain.saturating_add(tail.iter().take_while(|b| !needs_escape(**b)).count())
}

fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

fn escape(out: &mut Vec<u8>, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match byte {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        0x08 => out.extend_from_slice(b"\\b"),
        b'\t' => out.extend_from_slice(b"\\t"),
        b'\n' => out.extend_from_slice(b"\\n"),
        0x0c => out.extend_from_slice(b"\\f"),
        b'\r' => out.extend_from_slice(b"\\r"),
        other => {
            let digit = |nibble: u8| HEX.get(usize::from(nibble)).copied().unwrap_or(b'0');
            out.extend_from_slice(b"\\u00");
            out.push(digit(other >> 4));
            out.push(digit(other & 0x0f));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(text: &str) -> String {
        let mut out = Vec::new();
        string(&mut out, text);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut samples: Vec<String> = vec![
            String::new(),
            "plain ascii text that is longer than eight bytes".into(),
            "quote \" backslash \\ slash / tab \t newline \n".into(),
            "ünïcödé ✓ \u{2028} \u{2029} \u{7f} 𝄞".into(),
            "\"\"\"\"\"\"\"\"\"\\\\\\\\\\\\\\\\".into(),
        ];
        // Every byte below 0x80 at every position of a 17-byte string.
        for byte in 0u8..0x80 {
            for at in 0..17 {
                let mut text = "abcdefghijklmnopq".to_string().into_bytes();
                text[at] = byte;
                samples.push(String::from_utf8(text).unwrap());
            }
        }
        for text in samples {
            assert_eq!(
                ours(&text),
                serde_json::to_string(&text).unwrap(),
                "{text:?}"
            );
        }
    }
}
