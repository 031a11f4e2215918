//! Waits: poll a condition through listen's public API until it holds, with a deadline, and
//! panic naming what was awaited when it does not. Nothing here sleeps for readiness.

use crate::listen;
use crate::requests::{ListenClient, link_status};
use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`wait_for`] checks.
const POLL: Duration = Duration::from_millis(20);

/// Calls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: impl fmt::Display, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for_every(what, timeout, POLL, check).await
}

/// [`wait_for`], checking every `interval`.
pub async fn wait_for_every<T, F, Fut>(
    what: impl fmt::Display,
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(interval).await;
    }
}

/// Waits until every id has `status` (reading those not there yet every 50 ms), returning the
/// conversations in the order they got there.
pub async fn wait_all(
    client: &ListenClient,
    ids: &[String],
    status: listen::ConversationStatus,
    timeout: Duration,
) -> Vec<listen::Conversation> {
    let done = RefCell::new(Vec::new());
    let remaining = RefCell::new(ids.to_vec());
    let what = fmt::from_fn(|f| {
        write!(
            f,
            "every conversation to be {status:?}: {} of {} are not",
            remaining.borrow().len(),
            ids.len()
        )
    });
    wait_for_every(&what, timeout, Duration::from_millis(50), || {
        let (done, remaining) = (&done, &remaining);
        async move {
            let mut still = Vec::new();
            for id in remaining.take() {
                let mut client = client.clone();
                let conversation = client
                    .get_conversation(listen::GetConversationRequest {
                        conversation_id: id.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("get")
                    .into_inner();
                if conversation.status == status as i32 {
                    done.borrow_mut().push(conversation);
                } else {
                    still.push(id);
                }
            }
            let finished = still.is_empty();
            remaining.replace(still);
            finished.then_some(())
        }
    })
    .await;
    done.into_inner()
}

/// Waits until conversation `id` has `status`, returning it.
pub async fn wait_one(
    client: &ListenClient,
    id: &str,
    status: listen::ConversationStatus,
    timeout: Duration,
) -> listen::Conversation {
    wait_all(client, &[id.to_string()], status, timeout)
        .await
        .remove(0)
}

/// Waits until listen's link lists exactly `ips` (each at `port`) as its pusher endpoints,
/// each CONNECTED.
pub async fn wait_endpoints_connected(
    client: &ListenClient,
    ips: &[std::net::Ipv4Addr],
    port: u16,
) {
    let mut wanted: Vec<String> = ips.iter().map(|ip| format!("{ip}:{port}")).collect();
    wanted.sort();
    wait_for("the endpoints connected", Duration::from_secs(20), || {
        let (mut client, wanted) = (client.clone(), wanted.clone());
        async move {
            let status = link_status(&mut client).await;
            let mut connected: Vec<String> = status
                .endpoints
                .iter()
                .filter(|e| e.state == listen::LinkState::Connected as i32)
                .map(|e| e.address.clone())
                .collect();
            connected.sort();
            (connected == wanted && status.endpoints.len() == wanted.len()).then_some(())
        }
    })
    .await;
}

/// Waits until listen's link has nothing pending or queued, calling `observe` with every
/// status it polls; returns how long that took, or panics after `timeout`.
pub async fn wait_drained(
    client: &ListenClient,
    timeout: Duration,
    observe: impl FnMut(&listen::LinkStatus),
) -> Duration {
    let started = Instant::now();
    let observe = std::cell::RefCell::new(observe);
    wait_for(
        "the link to drain (nothing pending or queued)",
        timeout,
        || {
            let (mut client, observe) = (client.clone(), &observe);
            async move {
                let status = link_status(&mut client).await;
                (observe.borrow_mut())(&status);
                (status.queued == 0 && status.pending == 0).then_some(())
            }
        },
    )
    .await;
    started.elapsed()
}

/// What [`wait_link`] waits for: listen's link in a state, or out of it.
#[derive(Clone, Copy, Debug)]
pub enum LinkWait {
    Is(listen::LinkState),
    /// Anything but this state (a fault was noticed, when it is CONNECTED).
    Not(listen::LinkState),
}

impl From<listen::LinkState> for LinkWait {
    fn from(state: listen::LinkState) -> LinkWait {
        LinkWait::Is(state)
    }
}

impl fmt::Display for LinkWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkWait::Is(state) => write!(f, "listen's link to be {state:?}"),
            LinkWait::Not(state) => write!(f, "listen's link to leave {state:?}"),
        }
    }
}

/// Waits until listen's link (its overall state) is as `wanted` says, returning the status
/// that showed it, or panics after `timeout`.
pub async fn wait_link(
    client: &ListenClient,
    wanted: impl Into<LinkWait>,
    timeout: Duration,
) -> listen::LinkStatus {
    let wanted = wanted.into();
    wait_for(wanted, timeout, || {
        let mut client = client.clone();
        async move {
            let status = link_status(&mut client).await;
            let state = listen::LinkState::try_from(status.state).ok();
            let matches = match wanted {
                LinkWait::Is(wanted) => state == Some(wanted),
                LinkWait::Not(unwanted) => state != Some(unwanted),
            };
            matches.then_some(status)
        }
    })
    .await
}
