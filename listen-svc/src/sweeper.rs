//! The sweeper: on every listen instance, finishes IN_PROGRESS conversations whose deadline
//! passed (their session is gone and nobody resumed them), so none stays in progress
//! forever. Leases of PROCESSING rows need no sweeping here: the link claims expired ones.

use crate::link::LinkHandle;
use crate::store::{ConversationStore, Now, Status};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// Most conversations finished per store call; a full batch is followed by another at once.
/// Small, because on PostgreSQL a batch is one transaction holding the queue lock (about
/// four statements per conversation), which every Submit and claim waits for.
const BATCH: usize = 32;

pub(crate) async fn run(
    store: Arc<dyn ConversationStore>,
    link: LinkHandle,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::session::stopping(&mut shutdown) => return,
        }
        loop {
            match store.finish_expired(Now::Store, BATCH).await {
                Ok(finished) => {
                    let queued = finished
                        .iter()
                        .filter(|(_, s)| *s == Status::Processing)
                        .count();
                    metrics::counter!("listen_sweeper_finished_total")
                        .increment(finished.len() as u64);
                    if !finished.is_empty() {
                        info!(
                            finished = finished.len(),
                            queued, "sweeper finished conversations past their deadline"
                        );
                    }
                    if queued > 0 {
                        link.wake();
                    }
                    if finished.len() < BATCH {
                        break;
                    }
                }
                Err(error) => {
                    warn!(%error, "sweeper could not finish expired conversations; will retry");
                    break;
                }
            }
        }
    }
}
