//! Why a benchmark run failed. Every variant names what was being done and keeps the error
//! that stopped it as its `source()`, so the binary's edge ([`ExitError`]) prints the chain.
//!
//! [`ExitError`]: event_exporter::exporter::ExitError

use std::net::SocketAddr;
use std::process::ExitStatus;

use event_exporter::datastore::DatastoreError;

use crate::local_postgres::LocalPostgresError;
use crate::sink::SinkError;

/// A failed benchmark step.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file or process operation (`what`: the path or the program, and what was done).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A statement of the bench's own (`what`: the statement's purpose).
    #[error("{what}: {source}")]
    Sql {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The product's PostgreSQL connector, or the generator's inserts through it.
    #[error("{what}: {source}")]
    Datastore {
        what: String,
        #[source]
        source: DatastoreError,
    },
    /// Finding, starting or using the local PostgreSQL server.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] LocalPostgresError),
    /// Starting or stopping the reference sink.
    #[error("the reference sink: {0}")]
    Sink(#[from] SinkError),
    /// A program the bench starts could not be started (`hint`: how to install it).
    #[error("cannot start {program}: {source}{hint}")]
    Spawn {
        program: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// nginx stopped before it listened; `log` is its error log.
    #[error("nginx exited with {status}: {log}")]
    NginxExited { status: ExitStatus, log: String },
    /// nginx did not accept connections within 10 s.
    #[error("nginx did not listen on {addr} within 10 s")]
    NginxNotListening { addr: SocketAddr },
    /// wrk ran but its output had no `Requests/sec:` line.
    #[error("wrk printed no Requests/sec: {output}")]
    WrkOutput { output: String },
    /// The exporter under measurement exited before every event arrived.
    #[error("the exporter exited early with {status}")]
    ExporterExited { status: ExitStatus },
    /// Nothing arrived at the sink for two minutes.
    #[error("no progress for 2 minutes at {delivered}/{count} events")]
    Stalled { delivered: u64, count: u64 },
    /// The exporter did not write its resume token (it was not streaming) within 60 s.
    #[error("the exporter did not write a resume token within 60 s")]
    NoResumeToken,
    /// The TLS sink's self-signed certificate could not be made.
    #[error("the TLS sink's certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// The TLS sink's server configuration was refused.
    #[error("the TLS sink's configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A task of the bench (the writer) panicked or was cancelled.
    #[error("a bench task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// `map_err` for an I/O step described by `what`.
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// `map_err` for a statement described by `what`.
pub fn sql(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Sql { what, source }
}

/// `map_err` for a connector or generator step described by `what`.
pub fn datastore(what: impl Into<String>) -> impl FnOnce(DatastoreError) -> BenchError {
    let what = what.into();
    move |source| BenchError::Datastore { what, source }
}
