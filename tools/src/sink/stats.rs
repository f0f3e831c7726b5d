//! What the sink has seen: lock-free counters on the hot path, and snapshots for the running
//! count, the final line and in-process readers.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::StatusCode;

use super::validate::{Attribute, Invalid};

/// Why an event request was not accepted; each has its own counter and HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    NotFound,
    MethodNotAllowed,
    Unauthorized,
    UnsupportedMediaType,
    PayloadTooLarge,
    UnreadableBody,
    InvalidJson,
    NotAnObject,
    InvalidSpecversion,
    InvalidId,
    InvalidSource,
    InvalidType,
    InvalidTime,
    InvalidDatacontenttype,
    InvalidSubject,
    /// The event could not be appended to `--out` (answered 500 so the sender retries).
    OutputFailed,
}

impl Reason {
    /// Every reason, in declaration order (`reason as usize` indexes this array).
    pub const ALL: [Reason; 16] = [
        Reason::NotFound,
        Reason::MethodNotAllowed,
        Reason::Unauthorized,
        Reason::UnsupportedMediaType,
        Reason::PayloadTooLarge,
        Reason::UnreadableBody,
        Reason::InvalidJson,
        Reason::NotAnObject,
        Reason::InvalidSpecversion,
        Reason::InvalidId,
        Reason::InvalidSource,
        Reason::InvalidType,
        Reason::InvalidTime,
        Reason::InvalidDatacontenttype,
        Reason::InvalidSubject,
        Reason::OutputFailed,
    ];

    /// The key used in error bodies and the running count.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotFound => "not_found",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::Unauthorized => "unauthorized",
            Reason::UnsupportedMediaType => "unsupported_media_type",
            Reason::PayloadTooLarge => "payload_too_large",
            Reason::UnreadableBody => "unreadable_body",
            Reason::InvalidJson => "invalid_json",
            Reason::NotAnObject => "not_an_object",
            Reason::InvalidSpecversion => "invalid_specversion",
            Reason::InvalidId => "invalid_id",
            Reason::InvalidSource => "invalid_source",
            Reason::InvalidType => "invalid_type",
            Reason::InvalidTime => "invalid_time",
            Reason::InvalidDatacontenttype => "invalid_datacontenttype",
            Reason::InvalidSubject => "invalid_subject",
            Reason::OutputFailed => "output_failed",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Reason::NotFound => StatusCode::NOT_FOUND,
            Reason::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reason::Unauthorized => StatusCode::UNAUTHORIZED,
            Reason::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Reason::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::OutputFailed => StatusCode::INTERNAL_SERVER_ERROR,
            Reason::UnreadableBody
            | Reason::InvalidJson
            | Reason::NotAnObject
            | Reason::InvalidSpecversion
            | Reason::InvalidId
            | Reason::InvalidSource
            | Reason::InvalidType
            | Reason::InvalidTime
            | Reason::InvalidDatacontenttype
            | Reason::InvalidSubject => StatusCode::BAD_REQUEST,
        }
    }
}

impl From<&Invalid> for Reason {
    fn from(invalid: &Invalid) -> Self {
        match invalid {
            Invalid::NotJson(_) => Reason::InvalidJson,
            Invalid::NotAnObject(_) => Reason::NotAnObject,
            Invalid::Attribute { attribute, .. } => match attribute {
                Attribute::Specversion => Reason::InvalidSpecversion,
                Attribute::Id => Reason::InvalidId,
                Attribute::Source => Reason::InvalidSource,
                Attribute::Type => Reason::InvalidType,
                Attribute::Time => Reason::InvalidTime,
                Attribute::Datacontenttype => Reason::InvalidDatacontenttype,
                Attribute::Subject => Reason::InvalidSubject,
            },
        }
    }
}

/// The live counters (atomics: the hot path never takes a lock for them).
#[derive(Default)]
pub(super) struct Counters {
    accepted: AtomicU64,
    duplicates: AtomicU64,
    injected_failures: AtomicU64,
    tokens_issued: AtomicU64,
    token_errors: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
}

impl Counters {
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }
    pub fn count_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_duplicate(&self) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_injected_failure(&self) {
        self.injected_failures.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_token_issued(&self) {
        self.tokens_issued.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_token_error(&self) {
        self.token_errors.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_rejected(&self, reason: Reason) {
        self.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> SinkStats {
        let rejected = Reason::ALL
            .iter()
            .map(|&reason| {
                (
                    reason,
                    self.rejected[reason as usize].load(Ordering::Relaxed),
                )
            })
            .filter(|&(_, count)| count > 0)
            .collect();
        SinkStats {
            accepted: self.accepted(),
            duplicates: self.duplicates(),
            injected_failures: self.injected_failures.load(Ordering::Relaxed),
            rejected,
            tokens_issued: self.tokens_issued.load(Ordering::Relaxed),
            token_errors: self.token_errors.load(Ordering::Relaxed),
        }
    }
}

/// The counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// New events accepted and stored.
    pub accepted: u64,
    /// Events accepted again (same `source` + `id`): answered 202, not stored again.
    pub duplicates: u64,
    /// Valid event requests answered `--fail-status` by the `--fail-rate` switch.
    pub injected_failures: u64,
    /// Event requests turned away, by reason (only reasons that occurred).
    pub rejected: BTreeMap<Reason, u64>,
    /// Tokens the token endpoint issued.
    pub tokens_issued: u64,
    /// Token requests refused (bad credentials, grant or scope).
    pub token_errors: u64,
}

impl SinkStats {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    pub fn rejected_for(&self, reason: Reason) -> u64 {
        self.rejected.get(&reason).copied().unwrap_or(0)
    }
}

impl fmt::Display for SinkStats {
    /// `accepted 10, duplicates 1, rejected 2 (unauthorized 1, invalid_id 1), injected failures 0,
    /// tokens issued 1 (refused 0)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "accepted {}, duplicates {}, rejected {}",
            self.accepted,
            self.duplicates,
            self.rejected_total()
        )?;
        if !self.rejected.is_empty() {
            let reasons: Vec<String> = self
                .rejected
                .iter()
                .map(|(reason, count)| format!("{} {count}", reason.as_str()))
                .collect();
            write!(f, " ({})", reasons.join(", "))?;
        }
        write!(
            f,
            ", injected failures {}, tokens issued {} (refused {})",
            self.injected_failures, self.tokens_issued, self.token_errors
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_declaration_order() {
        for (index, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{reason:?}");
        }
    }

    #[test]
    fn snapshot_lists_only_reasons_that_occurred() {
        let counters = Counters::default();
        counters.count_accepted();
        counters.count_duplicate();
        counters.count_rejected(Reason::InvalidId);
        counters.count_rejected(Reason::InvalidId);
        counters.count_rejected(Reason::Unauthorized);
        let stats = counters.snapshot();
        assert_eq!(stats.rejected_total(), 3);
        assert_eq!(stats.rejected_for(Reason::InvalidId), 2);
        assert_eq!(stats.rejected_for(Reason::NotFound), 0);
        assert_eq!(
            stats.to_string(),
            "accepted 1, duplicates 1, rejected 3 (unauthorized 1, invalid_id 2), \
             injected failures 0, tokens issued 0 (refused 0)"
        );
    }
}
