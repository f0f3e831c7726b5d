//! Leadership between exporter replicas (issue 16): the pure rules, no I/O.
//!
//! Several replicas may run against one datastore; exactly one of them, the leader, may publish
//! events and write the resume token. On PostgreSQL the leader is whoever holds the
//! session-level advisory lock [`lock_key`] on its dedicated lock connection
//! (`crate::datastore::postgres::lock`); on MongoDB whoever a lease document names
//! (`crate::datastore::mongo::lease`), and its renewals feed the same [`Lease`] rule.
//!
//! The invariant this module teaches: **a replica acts as leader only while it has proved,
//! recently, that it holds the lock.** Holding the lock at some time in the past proves nothing
//! now — the process may have been paused (SIGSTOP, a GC-like stall, a partition) while
//! PostgreSQL ended its session and gave the lock to a standby. So every proof (a successful
//! check on the lock session) is stamped with a monotonic instant, and the right to act expires
//! [`Lease::validity`] after the last proof. A paused process that resumes finds its proof
//! expired (the monotonic clock keeps running while a process is stopped) and must not publish
//! before a fresh check, which fails because its session is gone.
//!
//! The lease is only the first line of defence: a resume-token write is also *fenced* in
//! PostgreSQL itself (the write succeeds only while the writer's lock session holds the lock,
//! see `crate::datastore::postgres::lock::FENCED_TOKEN_WRITE`), so no timing assumption is
//! needed for the token never to move backwards.

use std::time::{Duration, Instant};

/// The prefix hashed with `client_name` into the advisory-lock key.
pub const KEY_PREFIX: &str = "event-exporter:";

/// The advisory-lock key of the replicas sharing `client_name`: the first 8 bytes of
/// SHA-256(`"event-exporter:" + client_name`), read big-endian as a signed 64-bit integer (the
/// type of `pg_try_advisory_lock(bigint)`).
///
/// Stable across versions, architectures and processes (documented in the README so an operator
/// can find the lock in `pg_locks`); PostgreSQL computes the same value with
/// `('x' || left(encode(sha256(convert_to('event-exporter:' || <client_name>, 'UTF8')), 'hex'),
/// 16))::bit(64)::bigint`. Replicas with different client names never contend.
pub fn lock_key(client_name: &str) -> i64 {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{KEY_PREFIX}{client_name}").as_bytes(),
    );
    let mut first = [0u8; 8];
    for (slot, byte) in first.iter_mut().zip(digest.as_ref()) {
        *slot = *byte;
    }
    i64::from_be_bytes(first)
}

/// How `pg_locks` shows a bigint advisory lock: `classid` holds the high 32 bits, `objid` the
/// low 32 bits, `objsubid` is 1. Returns `(classid, objid)` as the `oid` values (0..2³²).
pub fn pg_locks_ids(key: i64) -> (u32, u32) {
    let bits = u64::from_be_bytes(key.to_be_bytes());
    let high = u32::try_from(bits >> 32).unwrap_or(u32::MAX);
    let low = u32::try_from(bits & u64::from(u32::MAX)).unwrap_or(u32::MAX);
    (high, low)
}

/// Who this replica is, for the logs ("who leads"): the pod name (`HOSTNAME`, which Kubernetes
/// sets to the pod name) and the process id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub host: String,
    pub pid: u32,
}

impl Identity {
    /// From the process: `HOSTNAME` (set by Kubernetes, not exported by most shells), else the
    /// kernel's host name (`/proc/sys/kernel/hostname`, the pod name in a pod too), else
    /// `"unknown"`.
    pub fn from_process() -> Identity {
        let hostname = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.trim().is_empty())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok());
        Identity::new(hostname, std::process::id())
    }

    pub fn new(hostname: Option<String>, pid: u32) -> Identity {
        let host = hostname
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".to_string());
        Identity { host, pid }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.host, self.pid)
    }
}

/// What one check of the lock session found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// `pg_try_advisory_lock` returned true, or the held lock answered a check in time.
    Holds,
    /// The lock is held by another session (standby: try again later).
    HeldElsewhere,
    /// The lock session failed, closed or did not answer within the check timeout: whatever
    /// this replica held is no longer proved.
    SessionLost,
}

/// What the replica must do after an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changes (still leader, or still standby).
    Stay,
    /// Became leader: start intake and publishing.
    Promoted,
    /// Was leader and can no longer prove it: stop publishing at once, cancel in-flight
    /// publishes, do not write the token.
    Demoted,
}

/// The leadership rule: a role plus the monotonic instant of the last proof.
///
/// `may_act(now)` is the single question the publishing path asks; it is true only while the
/// replica is leader **and** the last proof is younger than `validity`. The check interval must
/// be well below `validity` (the exporter uses 1 s and 3 s), so a healthy leader never sees its
/// lease expire between checks.
#[derive(Debug, Clone)]
pub struct Lease {
    validity: Duration,
    proved_at: Option<Instant>,
    changes: u64,
}

impl Lease {
    /// A standby with no proof; `validity` is how long one proof lets the replica act.
    pub fn new(validity: Duration) -> Lease {
        Lease {
            validity,
            proved_at: None,
            changes: 0,
        }
    }

    pub fn validity(&self) -> Duration {
        self.validity
    }

    /// Whether the replica believes it leads (it may still have to stop: see `may_act`).
    pub fn is_leader(&self) -> bool {
        self.proved_at.is_some()
    }

    /// Leadership changes seen so far (each promotion and each demotion counts one).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Applies one observation made at `now`.
    pub fn observe(&mut self, observation: Observation, now: Instant) -> Transition {
        let was_leader = self.is_leader();
        match observation {
            Observation::Holds => {
                // A proof that arrives after the lease expired does not extend it: the replica
                // may have been paused while another led, so it must step down and start over
                // from the stored resume token.
                if was_leader && !self.may_act(now) {
                    return self.demote();
                }
                self.proved_at = Some(now);
                if was_leader {
                    Transition::Stay
                } else {
                    self.changes = self.changes.saturating_add(1);
                    Transition::Promoted
                }
            }
            Observation::HeldElsewhere | Observation::SessionLost => {
                if was_leader {
                    self.demote()
                } else {
                    Transition::Stay
                }
            }
        }
    }

    /// Whether the replica may publish or write the token at `now`: leader, and the last proof
    /// is younger than `validity` (an instant before the proof — impossible with a monotonic
    /// clock — counts as age 0).
    pub fn may_act(&self, now: Instant) -> bool {
        self.proved_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.validity)
    }

    fn demote(&mut self) -> Transition {
        self.proved_at = None;
        self.changes = self.changes.saturating_add(1);
        Transition::Demoted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALIDITY: Duration = Duration::from_secs(3);

    #[test]
    fn the_key_is_stable_and_depends_on_the_client_name() {
        // Pinned: changing the derivation would let an old and a new replica lead at once.
        assert_eq!(lock_key("event-exporter"), lock_key("event-exporter"));
        assert_ne!(lock_key("event-exporter"), lock_key("event-exporter-2"));
        assert_ne!(lock_key(""), lock_key("event-exporter"));
        let digest = ring::digest::digest(&ring::digest::SHA256, b"event-exporter:event-exporter");
        let expected = i64::from_be_bytes(digest.as_ref()[..8].try_into().unwrap());
        assert_eq!(lock_key("event-exporter"), expected);
    }

    #[test]
    fn pg_locks_ids_split_the_key_into_high_and_low_halves() {
        assert_eq!(pg_locks_ids(0), (0, 0));
        assert_eq!(pg_locks_ids(1), (0, 1));
        assert_eq!(pg_locks_ids(-1), (u32::MAX, u32::MAX));
        assert_eq!(pg_locks_ids(i64::MIN), (0x8000_0000, 0));
        assert_eq!(
            pg_locks_ids(0x0123_4567_89ab_cdef),
            (0x0123_4567, 0x89ab_cdef)
        );
    }

    #[test]
    fn identity_falls_back_when_hostname_is_missing() {
        assert_eq!(Identity::new(None, 7).to_string(), "unknown/7");
        assert_eq!(Identity::new(Some("  ".into()), 7).to_string(), "unknown/7");
        assert_eq!(
            Identity::new(Some("exporter-0".into()), 42).to_string(),
            "exporter-0/42"
        );
    }

    #[test]
    fn the_process_identity_is_hostname_else_the_kernels_host_name() {
        let identity = Identity::from_process();
        let expected = match std::env::var("HOSTNAME") {
            Ok(name) if !name.trim().is_empty() => name.trim().to_string(),
            _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .expect("Linux host name")
                .trim()
                .to_string(),
        };
        assert_eq!(identity.host, expected);
        assert_ne!(identity.host, "unknown");
        assert_eq!(identity.pid, std::process::id());
    }

    #[test]
    fn a_standby_is_promoted_by_holding_the_lock_and_only_then_may_act() {
        let t0 = Instant::now();
        let mut lease = Lease::new(VALIDITY);
        assert!(!lease.may_act(t0));
        assert_eq!(
            lease.observe(Observation::HeldElsewhere, t0),
            Transition::Stay
        );
        assert_eq!(
            lease.observe(Observation::SessionLost, t0),
            Transition::Stay
        );
        assert!(!lease.is_leader());
        assert_eq!(lease.changes(), 0);
        assert_eq!(lease.observe(Observation::Holds, t0), Transition::Promoted);
        assert!(lease.may_act(t0));
        assert_eq!(lease.changes(), 1);
    }

    #[test]
    fn regular_proofs_keep_the_lease_and_it_expires_without_them() {
        let t0 = Instant::now();
        let mut lease = Lease::new(VALIDITY);
        lease.observe(Observation::Holds, t0);
        for second in 1..10 {
            let now = t0 + Duration::from_secs(second);
            assert_eq!(lease.observe(Observation::Holds, now), Transition::Stay);
            assert!(lease.may_act(now + Duration::from_millis(2_999)));
        }
        let last = t0 + Duration::from_secs(9);
        assert!(!lease.may_act(last + VALIDITY));
        assert_eq!(lease.changes(), 1);
    }

    #[test]
    fn losing_the_session_or_the_lock_demotes_at_once() {
        for lost in [Observation::SessionLost, Observation::HeldElsewhere] {
            let t0 = Instant::now();
            let mut lease = Lease::new(VALIDITY);
            lease.observe(Observation::Holds, t0);
            assert_eq!(lease.observe(lost, t0), Transition::Demoted);
            assert!(!lease.may_act(t0), "{lost:?} must stop publishing at once");
            assert_eq!(lease.changes(), 2);
            assert_eq!(lease.observe(lost, t0), Transition::Stay);
        }
    }

    #[test]
    fn a_late_proof_after_a_pause_demotes_instead_of_extending() {
        // SIGSTOP for longer than the lease, then SIGCONT: even if the lock session happens to
        // answer, the replica steps down and restarts from the stored token.
        let t0 = Instant::now();
        let mut lease = Lease::new(VALIDITY);
        lease.observe(Observation::Holds, t0);
        let resumed = t0 + Duration::from_secs(10);
        assert!(!lease.may_act(resumed));
        assert_eq!(
            lease.observe(Observation::Holds, resumed),
            Transition::Demoted
        );
        assert!(!lease.may_act(resumed));
        // ... and a next proof promotes it again, as a fresh leader.
        assert_eq!(
            lease.observe(Observation::Holds, resumed),
            Transition::Promoted
        );
        assert!(lease.may_act(resumed));
    }

    #[test]
    fn an_instant_before_the_proof_counts_as_fresh() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut lease = Lease::new(VALIDITY);
        lease.observe(Observation::Holds, t0);
        assert!(lease.may_act(t0 - Duration::from_secs(1)));
    }
}
