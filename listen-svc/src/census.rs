//! The census: every [`INTERVAL`], counts the store's conversations by status into the
//! `listen_store_conversations{status}` gauge. Each count reads at most [`CAP`] index
//! entries, so its cost does not grow with the table; a gauge at `CAP` means "at least".

use crate::store::{ConversationStore, Status, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::debug;

/// How often the store is counted.
pub(crate) const INTERVAL: Duration = Duration::from_secs(30);
/// Most rows counted per status.
pub(crate) const CAP: u64 = 1_000_000;

pub(crate) async fn run(store: Arc<dyn ConversationStore>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::session::stopping(&mut shutdown) => return,
        }
        count(store.as_ref()).await;
    }
}

/// Sets the gauge of each status the store could count; one it could not keeps its value.
pub(crate) async fn count(store: &dyn ConversationStore) {
    for status in Status::ALL {
        match store.count_status(status, CAP).await {
            Ok(n) => metrics::gauge!("listen_store_conversations", "status" => status.as_str())
                .set(n as f64),
            Err(error) => {
                let kind = match error {
                    StoreError::Unavailable(_) => "unavailable",
                    StoreError::Corrupt(_) => "corrupt",
                };
                metrics::counter!("listen_store_errors_total", "kind" => kind).increment(1);
                debug!(%error, status = status.as_str(), "counting conversations failed");
            }
        }
    }
}
