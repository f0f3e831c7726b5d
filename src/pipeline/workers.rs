//! The publishes in flight: long-lived worker tasks, each publishing one job (an event, or a
//! batch in batch mode) at a time, and the channel their outcomes come back on.
//!
//! A task per event cost a spawn (the publish future copied into a new task and bound to the
//! runtime) and a `JoinSet` entry (a lock to add it, another to reap it) for every event:
//! about 3 % of a drain's instructions (callgrind, 80.8k → 78.5k per event). Workers are
//! started as jobs need them (never more than the permits a pipeline ever held at once, so at
//! most `workers` each for the stream and a backfill, which share the permits) and are handed
//! jobs through their own channel.
//!
//! Rules (the pure part is [`Pool`]):
//! - A job carries the permit it was given; the permit comes back with the job's outcomes and
//!   is released only once the worker is idle again, so a new permit always finds an idle
//!   worker or starts one of at most `workers`.
//! - Every job sent gets exactly one [`Done`]: its outcomes, or, if its worker panicked or was
//!   aborted mid-job, none (a `lost` job: its positions stay unfinished, as a cancelled event's
//!   do, so the checkpoint stops below them). The pipeline waits for in-flight work by counting
//!   jobs, not tasks.

use std::sync::Arc;

use smallvec::SmallVec;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::dispatcher::{Dispatcher, Flow};
use super::{batch, EventHandler, Feed, Outcome};
use crate::datastore::Change;
use crate::metrics;

/// One worker's events (one, or a batch) and the permit it publishes them under.
struct Job {
    permit: OwnedSemaphorePermit,
    events: SmallVec<[Change; 1]>,
}

/// A job ended: each of its changes with its outcome, from worker `worker`.
pub(super) struct Done {
    worker: usize,
    /// `None` when the job was lost (its worker panicked or was aborted): the worker is gone.
    finished: Option<Finished>,
}

/// A job's outcomes and the permit it held, back from a worker that is idle again.
struct Finished {
    permit: OwnedSemaphorePermit,
    outcomes: SmallVec<[(Change, Outcome); 1]>,
}

/// The workers and their bookkeeping (I/O around [`Pool`]).
pub(super) struct Workers {
    handler: Arc<EventHandler>,
    feed: Feed,
    pool: Pool,
    /// Each worker's job channel, by worker number (capacity 1: a worker gets a job only when
    /// idle).
    jobs: Vec<mpsc::Sender<Job>>,
    results_tx: mpsc::UnboundedSender<Done>,
    results: mpsc::UnboundedReceiver<Done>,
    tasks: JoinSet<()>,
    /// Intake is over: no new job is taken.
    closed: bool,
    /// Cancels retry waits once the grace period is over.
    cancel: CancellationToken,
}

impl Workers {
    pub fn new(handler: Arc<EventHandler>, feed: Feed) -> Workers {
        let (results_tx, results) = mpsc::unbounded_channel();
        Workers {
            handler,
            feed,
            pool: Pool::default(),
            jobs: Vec::new(),
            results_tx,
            results,
            tasks: JoinSet::new(),
            closed: false,
            cancel: CancellationToken::new(),
        }
    }

    /// Jobs sent and not yet done.
    pub fn in_flight(&self) -> usize {
        self.pool.busy()
    }

    /// Intake is over: later [`Workers::send`] calls are ignored.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Hands `events` (each a change carrying its event) to an idle worker, or to a new one.
    pub fn send(&mut self, permit: OwnedSemaphorePermit, events: SmallVec<[Change; 1]>) {
        if self.closed {
            return;
        }
        let mut job = Job { permit, events };
        loop {
            let worker = match self.pool.take() {
                Slot::Idle(worker) => worker,
                Slot::New(worker) => self.start(worker),
            };
            let Some(sender) = self.jobs.get(worker) else {
                // Not reached: `start` made a channel for every new worker number.
                self.pool.lost(worker);
                continue;
            };
            match sender.try_send(job) {
                Ok(()) => return,
                // Its task is gone (a panic ends the process soon after): try another worker.
                Err(refused) => {
                    job = match refused {
                        mpsc::error::TrySendError::Full(job)
                        | mpsc::error::TrySendError::Closed(job) => job,
                    };
                    self.pool.lost(worker);
                }
            }
        }
    }

    /// Starts worker `worker` (the next number) and returns it.
    fn start(&mut self, worker: usize) -> usize {
        let (sender, jobs) = mpsc::channel(1);
        if let Some(slot) = self.jobs.get_mut(worker) {
            *slot = sender;
        } else {
            self.jobs.push(sender);
        }
        let (handler, feed) = (self.handler.clone(), self.feed);
        let (results, cancel) = (self.results_tx.clone(), self.cancel.clone());
        self.tasks
            .spawn(work(worker, jobs, results, handler, feed, cancel));
        worker
    }

    /// The next job to end, waiting for it; pending while none is in flight. Cancel-safe.
    pub async fn next_done(&mut self) -> Option<Done> {
        if self.pool.busy() == 0 {
            return std::future::pending().await;
        }
        self.results.recv().await
    }

    /// Applies a job's end: each outcome to the dispatcher, then the worker back to idle and
    /// its permit released. `Stop` if an event failed.
    pub fn record(&mut self, done: Done, dispatcher: &mut Dispatcher) -> Flow {
        let Some(Finished { permit, outcomes }) = done.finished else {
            self.pool.lost(done.worker);
            return Flow::Continue;
        };
        let mut flow = Flow::Continue;
        let now = tokio::time::Instant::now();
        for (change, outcome) in outcomes {
            if dispatcher.on_result(change, outcome, now) == Flow::Stop {
                flow = Flow::Stop;
            }
        }
        self.pool.give_back(done.worker);
        drop(permit);
        flow
    }

    /// Records every job already done; `Stop` if an event failed.
    pub fn record_ready(&mut self, dispatcher: &mut Dispatcher) -> Flow {
        let mut flow = Flow::Continue;
        while let Ok(done) = self.results.try_recv() {
            if self.record(done, dispatcher) == Flow::Stop {
                flow = Flow::Stop;
            }
        }
        flow
    }

    /// The grace period is over: cancels and aborts what is still in flight, records the jobs
    /// that ended meanwhile, and forgets the rest (their positions stay unfinished). `Stop` if
    /// an event failed.
    pub async fn abandon(&mut self, dispatcher: &mut Dispatcher) -> Flow {
        tracing::warn!(
            abandoned = self.pool.busy(),
            "grace period over; abandoning in-flight events (they will be re-sent after restart)"
        );
        self.cancel.cancel();
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let flow = self.record_ready(dispatcher);
        self.pool = Pool::default();
        self.jobs.clear();
        flow
    }
}

/// One worker: publishes each job it is handed until its channel closes (the pipeline ended).
async fn work(
    worker: usize,
    mut jobs: mpsc::Receiver<Job>,
    results: mpsc::UnboundedSender<Done>,
    handler: Arc<EventHandler>,
    feed: Feed,
    cancel: CancellationToken,
) {
    while let Some(Job { permit, events }) = jobs.recv().await {
        let lost = LostOnDrop {
            worker,
            results: Some(&results),
        };
        crate::panics::debug_panic_point("publish");
        let outcomes = publish(&handler, feed, events, &cancel).await;
        lost.defuse();
        let finished = Some(Finished { permit, outcomes });
        if results.send(Done { worker, finished }).is_err() {
            return; // the pipeline is gone
        }
    }
}

/// Each of `events` published (one by one, or as batches in batch mode), with its outcome.
async fn publish(
    handler: &EventHandler,
    feed: Feed,
    events: SmallVec<[Change; 1]>,
    cancel: &CancellationToken,
) -> SmallVec<[(Change, Outcome); 1]> {
    let gauge = &metrics::get().events_in_flight;
    let count = i64::try_from(events.len()).unwrap_or(i64::MAX);
    gauge.inc_by(count);
    let finished = |change: Change, outcome: Outcome| {
        crate::watchdog::global().finished();
        (change, outcome)
    };
    match handler.batch {
        Some(limits) => {
            let outcomes = batch::handle(handler, feed, &events, limits, cancel).await;
            gauge.dec_by(count);
            events
                .into_iter()
                .zip(outcomes)
                .map(|(change, outcome)| finished(change, outcome))
                .collect()
        }
        None => {
            let mut done = SmallVec::new();
            for change in events {
                let outcome = match change.event() {
                    Some(event) => handler.handle(feed, change.position, event, cancel).await,
                    // Only changes with an event wait for a worker.
                    None => Outcome::Skipped,
                };
                gauge.dec();
                done.push(finished(change, outcome));
            }
            done
        }
    }
}

/// Sends a lost job's [`Done`] if dropped armed: the worker panicked or was aborted mid-job.
struct LostOnDrop<'a> {
    worker: usize,
    results: Option<&'a mpsc::UnboundedSender<Done>>,
}

impl LostOnDrop<'_> {
    /// The job ended normally; its outcomes are sent instead.
    fn defuse(mut self) {
        self.results = None;
    }
}

impl Drop for LostOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(results) = self.results.take() {
            let worker = self.worker;
            let _ = results.send(Done {
                worker,
                finished: None,
            });
        }
    }
}

/// Which worker takes a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// An idle worker.
    Idle(usize),
    /// None is idle: start worker number `n` (a lost worker's number is used again).
    New(usize),
}

/// The workers' states, without I/O: which are idle, how many jobs are in flight, which
/// numbers are free for a new worker.
#[derive(Debug, Default)]
struct Pool {
    /// Idle workers, the most recently idle last (taken first: its task is warm).
    idle: Vec<usize>,
    /// Numbers of workers that are gone (lost), free for a new one.
    free: Vec<usize>,
    /// Workers ever started (numbers `0..started`).
    started: usize,
    /// Jobs handed out and not yet done.
    busy: usize,
}

impl Pool {
    /// A worker for the next job, counted busy.
    fn take(&mut self) -> Slot {
        self.busy = self.busy.saturating_add(1);
        if let Some(worker) = self.idle.pop() {
            return Slot::Idle(worker);
        }
        if let Some(worker) = self.free.pop() {
            return Slot::New(worker);
        }
        let worker = self.started;
        self.started = self.started.saturating_add(1);
        Slot::New(worker)
    }

    /// `worker` finished its job and is idle.
    fn give_back(&mut self, worker: usize) {
        self.busy = self.busy.saturating_sub(1);
        self.idle.push(worker);
    }

    /// `worker`'s job ended without outcomes (or never reached it): the worker is gone.
    fn lost(&mut self, worker: usize) {
        self.busy = self.busy.saturating_sub(1);
        self.free.push(worker);
    }

    fn busy(&self) -> usize {
        self.busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_idle_worker_is_used_before_a_new_one_is_started() {
        let mut pool = Pool::default();
        assert_eq!(pool.take(), Slot::New(0));
        assert_eq!(pool.take(), Slot::New(1));
        pool.give_back(0);
        assert_eq!(pool.take(), Slot::Idle(0));
        assert_eq!(pool.busy(), 2);
    }

    #[test]
    fn a_lost_workers_number_is_used_again_for_a_new_worker() {
        let mut pool = Pool::default();
        assert_eq!(pool.take(), Slot::New(0));
        assert_eq!(pool.take(), Slot::New(1));
        pool.lost(0);
        assert_eq!(pool.busy(), 1);
        assert_eq!(pool.take(), Slot::New(0));
        assert_eq!(pool.take(), Slot::New(2));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Take,
        /// The n-th busy worker (mod their count) finishes.
        Finish(usize),
        /// The n-th busy worker (mod their count) is lost.
        Lose(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => Just(Step::Take),
            2 => any::<usize>().prop_map(Step::Finish),
            1 => any::<usize>().prop_map(Step::Lose),
        ]
    }

    proptest! {
        /// Whatever the order of jobs, ends and losses: the busy count is the jobs in flight,
        /// no worker gets a second job while busy, and no more workers live than jobs were
        /// ever in flight at once (so never more than the permits: `workers`).
        #[test]
        fn workers_never_outnumber_the_most_jobs_in_flight(steps in proptest::collection::vec(step(), 0..200)) {
            let mut pool = Pool::default();
            let mut busy: Vec<usize> = Vec::new();
            let mut live: std::collections::BTreeSet<usize> = Default::default();
            let mut most = 0;
            for step in steps {
                match step {
                    Step::Take => {
                        let worker = match pool.take() {
                            Slot::Idle(worker) => {
                                prop_assert!(live.contains(&worker));
                                worker
                            }
                            Slot::New(worker) => {
                                prop_assert!(live.insert(worker), "worker {} started twice", worker);
                                worker
                            }
                        };
                        prop_assert!(!busy.contains(&worker), "worker {} got two jobs", worker);
                        busy.push(worker);
                        most = most.max(busy.len());
                    }
                    Step::Finish(n) if !busy.is_empty() => {
                        let worker = busy.remove(n % busy.len());
                        pool.give_back(worker);
                    }
                    Step::Lose(n) if !busy.is_empty() => {
                        let worker = busy.remove(n % busy.len());
                        live.remove(&worker);
                        pool.lost(worker);
                    }
                    _ => {}
                }
                prop_assert_eq!(pool.busy(), busy.len());
                prop_assert!(live.len() <= most);
            }
        }
    }
}
