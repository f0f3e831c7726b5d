//! NVSentinel's MongoDB datastore (the chart's default): a change stream on inserts into the
//! health-events collection, resumed from upstream's token document
//! `{clientName, resumeToken}` in the token collection.

pub(crate) mod settings;

pub use settings::{MongoSettings, MongoSettingsError};

/// Whether retrying later can help: a network error, a server selection timeout, a primary
/// stepping down or shutting down, or anything the server labels retryable or resumable — as
/// opposed to bad credentials, a missing collection or a lost change-stream history.
pub fn is_transient(error: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    if error.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
        || error.contains_label("ResumableChangeStreamError")
    {
        return true;
    }
    match error.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. } => true,
        ErrorKind::Command(command) => TRANSIENT_CODES.contains(&command.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteConcernError(concern)) => {
            TRANSIENT_CODES.contains(&concern.code)
        }
        _ => false,
    }
}

/// Server codes of a node that cannot serve now but will (not primary, shutting down,
/// interrupted, host unreachable, network timeout).
const TRANSIENT_CODES: &[i32] = &[
    6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 63, 150, 234, 133,
];
