//! `MONGODB_ENABLE_CERT_ROTATION`: the client certificate and key are re-issued in place (the
//! Secret behind the mount changes, e.g. cert-manager renews it). The driver reads them only
//! when a client is made, so a watcher checks their content every
//! `MONGODB_CERT_ROTATION_CHECK_SECONDS` and, on a change, has the exporter restart in place
//! (`crate::restart`): stop as on SIGTERM (token saved, lease released), then start again with
//! the new files — nothing is lost or re-sent.
//!
//! The rule ([`RotationRule`]): act only on content that differs from the one in use and that
//! read the same at two checks in a row (a Secret update swaps the files one by one, so a check
//! can see the new certificate beside the old key), and only when the new files make valid
//! client options; otherwise keep running with the certificate in use and warn.

use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::MongoSettings;

/// SHA-256 over the files' contents; `None` when one cannot be read.
pub type Fingerprint = Option<Vec<u8>>;

/// The content of `files`, hashed.
pub fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for file in files {
        let bytes = std::fs::read(file).ok()?;
        context.update(&(bytes.len() as u64).to_be_bytes());
        context.update(&bytes);
    }
    Some(context.finish().as_ref().to_vec())
}

/// When a change of the files counts (see the module docs).
#[derive(Debug)]
pub struct RotationRule {
    in_use: Fingerprint,
    candidate: Fingerprint,
}

impl RotationRule {
    /// The files as they were when the client was made.
    pub fn new(in_use: Fingerprint) -> RotationRule {
        RotationRule {
            in_use,
            candidate: None,
        }
    }

    /// One check's reading; true when the files changed and read the same as at the last check.
    pub fn observe(&mut self, seen: Fingerprint) -> bool {
        if seen.is_none() || seen == self.in_use {
            self.candidate = None;
            return false;
        }
        if seen == self.candidate {
            return true;
        }
        self.candidate = seen;
        false
    }
}

/// Starts the watcher when rotation is on and a client certificate is configured; it ends on
/// `shutdown`, or after asking for a restart (and cancelling `shutdown`).
pub fn spawn(settings: &MongoSettings, shutdown: &CancellationToken) -> Option<JoinHandle<()>> {
    let interval = settings.tls.rotation_check?;
    let files: Vec<PathBuf> = [&settings.tls.cert, &settings.tls.key]
        .into_iter()
        .flatten()
        .map(|f| f.path.clone())
        .collect();
    if files.len() < 2 {
        tracing::warn!(
            "MONGODB_ENABLE_CERT_ROTATION is set but no client certificate and key are \
             configured: nothing to watch"
        );
        return None;
    }
    tracing::info!(files = ?files, every = ?interval, "watching the client certificate for rotation");
    let rule = RotationRule::new(fingerprint(&files));
    let settings = settings.clone();
    Some(tokio::spawn(watch(
        settings,
        files,
        interval,
        rule,
        shutdown.clone(),
    )))
}

async fn watch(
    settings: MongoSettings,
    files: Vec<PathBuf>,
    interval: Duration,
    mut rule: RotationRule,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if !rule.observe(fingerprint(&files)) {
            continue;
        }
        match settings.client_options().await {
            Ok(_) => {
                let reason = "the MongoDB client certificate changed \
                              (MONGODB_ENABLE_CERT_ROTATION)";
                tracing::info!("{reason}: restarting in place to use it");
                crate::restart::request(reason.into());
                shutdown.cancel();
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "the client certificate changed but cannot be used; keeping the one in use");
                rule = RotationRule::new(fingerprint(&files));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn print(byte: u8) -> Fingerprint {
        Some(vec![byte])
    }

    #[test]
    fn a_change_counts_once_it_reads_the_same_twice() {
        let mut rule = RotationRule::new(print(1));
        assert!(!rule.observe(print(1)), "unchanged");
        assert!(!rule.observe(print(2)), "first sight of new files");
        assert!(rule.observe(print(2)), "stable new files");
    }

    #[test]
    fn half_swapped_or_unreadable_files_do_not_count() {
        let mut rule = RotationRule::new(print(1));
        assert!(!rule.observe(print(2)), "new certificate, old key");
        assert!(!rule.observe(print(3)), "then both new: not yet stable");
        assert!(!rule.observe(None), "a file missing mid-swap");
        assert!(!rule.observe(print(3)), "stability restarts after a gap");
        assert!(rule.observe(print(3)));
        let mut back = RotationRule::new(print(1));
        assert!(!back.observe(print(2)));
        assert!(!back.observe(print(1)), "reverted: nothing to do");
        assert!(!back.observe(print(2)), "a new candidate again");
    }

    #[test]
    fn fingerprints_follow_content_and_fail_on_missing_files() {
        let dir = std::env::temp_dir().join(format!("rotation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert, "a").unwrap();
        std::fs::write(&key, "bc").unwrap();
        let files = vec![cert.clone(), key.clone()];
        let first = fingerprint(&files);
        assert!(first.is_some());
        std::fs::write(&cert, "ab").unwrap();
        std::fs::write(&key, "c").unwrap();
        assert_ne!(fingerprint(&files), first, "same bytes, other split");
        std::fs::remove_file(&key).unwrap();
        assert_eq!(fingerprint(&files), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
