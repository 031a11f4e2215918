//! Waits: poll a condition through listen's public API until it holds, with a deadline, and
//! panic naming what was awaited when it does not. Nothing here sleeps for readiness.

use crate::listen;
use crate::requests::{ListenClient, link_status};
use std::future::Future;
use std::time::{Duration, Instant};

/// Calls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every id has `status`, returning the conversations.
pub async fn wait_all(
    client: &ListenClient,
    ids: &[String],
    status: listen::ConversationStatus,
    timeout: Duration,
) -> Vec<listen::Conversation> {
    let mut done = Vec::new();
    let mut remaining: Vec<String> = ids.to_vec();
    let deadline = Instant::now() + timeout;
    while !remaining.is_empty() {
        let mut still = Vec::new();
        for id in remaining {
            let mut client = client.clone();
            let conversation = client
                .get_conversation(listen::GetConversationRequest {
                    conversation_id: id.clone(),
                })
                .await
                .expect("get")
                .into_inner();
            if conversation.status == status as i32 {
                done.push(conversation);
            } else {
                still.push(id);
            }
        }
        remaining = still;
        if !remaining.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} of {} not {status:?} after {timeout:?}",
                remaining.len(),
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    done
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

/// Waits until listen's link is CONNECTED, or panics.
pub async fn wait_link_up(client: &ListenClient) {
    wait_for(
        "the link to pusher connected",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            async move {
                (link_status(&mut client).await.state == listen::LinkState::Connected as i32)
                    .then_some(())
            }
        },
    )
    .await
}

/// Waits until listen's link has left CONNECTED (a fault was noticed), or panics naming `what`.
pub async fn wait_link_down(client: &ListenClient, what: &str, timeout: Duration) {
    wait_for(what, timeout, || {
        let mut client = client.clone();
        async move {
            (link_status(&mut client).await.state != listen::LinkState::Connected as i32)
                .then_some(())
        }
    })
    .await
}
