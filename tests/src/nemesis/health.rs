//! Health monitors: each listen's gRPC health is asked every [`INTERVAL`] for the whole run;
//! every check that did not answer SERVING within [`CHECK_TIMEOUT`] is recorded, for the
//! checker to hold against the times that listen was down.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

pub const INTERVAL: Duration = Duration::from_millis(250);
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks that failed, per listen: when each was sent.
#[derive(Default)]
pub struct Misses {
    pub at: Mutex<Vec<(usize, Instant)>>,
    pub checks: AtomicU64,
}

/// Asks listen `i` at `addr` until `stop`.
pub async fn monitor(i: usize, addr: SocketAddr, misses: Arc<Misses>, stop: watch::Receiver<bool>) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("listen url")
        .connect_timeout(CHECK_TIMEOUT)
        .connect_lazy();
    let mut client = HealthClient::new(channel);
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*stop.borrow() {
        ticks.tick().await;
        let sent = Instant::now();
        let answer =
            tokio::time::timeout(CHECK_TIMEOUT, client.check(HealthCheckRequest::default())).await;
        let serving = matches!(
            answer,
            Ok(Ok(response)) if response.get_ref().status == ServingStatus::Serving as i32
        );
        misses.checks.fetch_add(1, Ordering::Relaxed);
        if !serving {
            misses.at.lock().unwrap().push((i, sent));
        }
    }
}
