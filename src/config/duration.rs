//! Go duration strings (`"30s"`, `"720h"`, `"1h30m"`, `"1.5h"`, `"500ms"`), parsed exactly as Go's
//! `time.ParseDuration` does, so a ConfigMap written for the Go exporter means the same here.
//! Negative durations are rejected: no setting of the exporter can use one.

use std::time::Duration;

/// What is wrong with a Go duration string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("negative durations are not allowed")]
    Negative,
    #[error("empty duration")]
    Empty,
    #[error("expected a number before each unit")]
    MissingNumber,
    #[error("missing unit (use ns, us, ms, s, m or h)")]
    MissingUnit,
    #[error("unknown unit {0:?} (use ns, us, ms, s, m or h)")]
    UnknownUnit(String),
    #[error("number too large")]
    NumberTooLarge,
    /// Beyond Go's range: an int64 of nanoseconds (about 292 years).
    #[error("duration too large")]
    TooLarge,
}

/// Parses a Go duration string. Errors: [`DurationError`], saying what is wrong with it.
pub fn parse_go_duration(text: &str) -> Result<Duration, DurationError> {
    let mut rest = text;
    if let Some(stripped) = rest.strip_prefix('+') {
        rest = stripped;
    } else if rest.starts_with('-') {
        return Err(DurationError::Negative);
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(DurationError::MissingNumber);
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "" => return Err(DurationError::MissingUnit),
            other => return Err(DurationError::UnknownUnit(other.to_string())),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| DurationError::NumberTooLarge)?
        };
        let mut nanos = whole
            .checked_mul(unit_nanos)
            .ok_or(DurationError::TooLarge)?;
        // Fractions are truncated to whole nanoseconds, as Go does.
        let mut scale = unit_nanos;
        for digit in fraction.chars() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            nanos = u128::from(digit.to_digit(10).unwrap_or(0))
                .checked_mul(scale)
                .and_then(|part| nanos.checked_add(part))
                .ok_or(DurationError::TooLarge)?;
        }
        total_nanos = total_nanos
            .checked_add(nanos)
            .ok_or(DurationError::TooLarge)?;
        rest = after;
    }
    // Go's limit is the range of an int64 of nanoseconds (about 292 years).
    i64::try_from(total_nanos)
        .ok()
        .and_then(|nanos| u64::try_from(nanos).ok())
        .map(Duration::from_nanos)
        .ok_or(DurationError::TooLarge)
}

/// Formats a duration the way Go prints one (`1h30m0s`, `500ms`, `0s`), for logs and
/// `check-config`, so operators see the notation they wrote.
pub fn format_go_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000_000_000 {
        let (value, unit) = if nanos < 1_000 {
            (nanos as f64, "ns")
        } else if nanos < 1_000_000 {
            (nanos as f64 / 1e3, "µs")
        } else {
            (nanos as f64 / 1e6, "ms")
        };
        return format!("{}{unit}", trim_float(value));
    }
    let hours = nanos / 3_600_000_000_000;
    let minutes = (nanos / 60_000_000_000) % 60;
    let seconds = (nanos % 60_000_000_000) as f64 / 1e9;
    let mut text = String::new();
    if hours > 0 {
        text.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        text.push_str(&format!("{minutes}m"));
    }
    text.push_str(&format!("{}s", trim_float(seconds)));
    text
}

fn trim_float(value: f64) -> String {
    let text = format!("{value:.9}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_go_parses() {
        let cases = [
            ("30s", 30_000),
            ("720h", 720 * 3_600_000),
            ("1h30m", 5_400_000),
            ("1.5h", 5_400_000),
            ("500ms", 500),
            ("2h45m30.5s", 9_930_500),
            ("0", 0),
            ("+5s", 5_000),
            (".5s", 500),
            ("1m0s", 60_000),
        ];
        for (text, millis) in cases {
            assert_eq!(
                parse_go_duration(text),
                Ok(Duration::from_millis(millis)),
                "{text}"
            );
        }
        assert_eq!(parse_go_duration("1us"), Ok(Duration::from_micros(1)));
        assert_eq!(parse_go_duration("1µs"), Ok(Duration::from_micros(1)));
        assert_eq!(parse_go_duration("7ns"), Ok(Duration::from_nanos(7)));
    }

    #[test]
    fn rejects_what_go_rejects_and_negatives() {
        for text in [
            "",
            "5",
            "1d",
            "1h 30m",
            "abc",
            "-5s",
            "s",
            "1..5s",
            "5x",
            "9999999999h",
        ] {
            assert!(parse_go_duration(text).is_err(), "{text:?} should fail");
        }
    }

    #[test]
    fn a_fraction_that_overflows_the_sum_is_too_large_not_a_panic() {
        // whole × 1e6 fits a u128; adding the fraction's 999 999 ns does not.
        assert_eq!(
            parse_go_duration("340282366920938463463374607431768.999999ms"),
            Err(DurationError::TooLarge)
        );
        assert_eq!(
            parse_go_duration("9223372036.854775807s"),
            Ok(Duration::from_nanos(i64::MAX as u64))
        );
        assert_eq!(
            parse_go_duration("9223372036.854775808s"),
            Err(DurationError::TooLarge)
        );
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format_go_duration(Duration::from_secs(5400)), "1h30m0s");
        assert_eq!(format_go_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_go_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_go_duration(Duration::from_secs(300)), "5m0s");
        assert_eq!(format_go_duration(Duration::ZERO), "0s");
    }
}
