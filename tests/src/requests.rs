//! Request helpers: clients for a started service, a conversation with talk in it, and the
//! reads and bulk submits tests build their checks from.

use crate::listen;
use crate::processes::Service;
use crate::pusher;
use tonic::transport::Channel;

pub type ListenClient = listen::listen_client::ListenClient<Channel>;
pub type PusherClient = pusher::pusher_client::PusherClient<Channel>;

pub fn listen_client(service: &Service) -> ListenClient {
    ListenClient::new(service.channel())
}

pub fn pusher_client(service: &Service) -> PusherClient {
    PusherClient::new(service.channel())
}

/// A conversation with some talk in it.
pub fn talk(uid: &str, key: &str) -> listen::SubmitConversationRequest {
    listen::SubmitConversationRequest {
        uid: uid.to_string(),
        idempotency_key: key.to_string(),
        language: "en".to_string(),
        segments: vec![
            segment(
                "So, the quarterly budget review with the finance team.",
                0.0,
            ),
            segment("I will send the invoice summary by Friday.", 4.0),
            segment("We need to cut travel costs next quarter.", 8.0),
        ],
        priority: 0,
    }
}

pub fn segment(text: &str, start: f64) -> listen::Segment {
    listen::Segment {
        text: text.to_string(),
        speaker: "SPEAKER_0".to_string(),
        start,
        end: start + 3.5,
        is_user: true,
    }
}

/// Reads a conversation's status.
pub async fn status_of(client: &mut ListenClient, id: &str) -> listen::ConversationStatus {
    let conversation = client
        .get_conversation(listen::GetConversationRequest {
            conversation_id: id.to_string(),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner();
    listen::ConversationStatus::try_from(conversation.status).unwrap()
}

pub async fn link_status(client: &mut ListenClient) -> listen::LinkStatus {
    client
        .get_link_status(listen::GetLinkStatusRequest {})
        .await
        .expect("link status")
        .into_inner()
}

/// Submits `n` conversations for `uid` with up to 16 in flight; returns their ids in order.
pub async fn submit_many(client: &ListenClient, uid: &str, n: usize) -> Vec<String> {
    submit_many_as(client, uid, n, listen::Priority::Unspecified).await
}

/// [`submit_many`] at `priority`.
pub async fn submit_many_as(
    client: &ListenClient,
    uid: &str,
    n: usize,
    priority: listen::Priority,
) -> Vec<String> {
    let mut ids = vec![String::new(); n];
    let mut tasks = tokio::task::JoinSet::new();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..16 {
        let (client, next, uid) = (client.clone(), next.clone(), uid.to_string());
        tasks.spawn(async move {
            let mut client = client;
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= n {
                    return done;
                }
                let mut request = talk(&uid, &format!("{uid}-{i}"));
                request.priority = priority as i32;
                let response = client.submit_conversation(request).await.expect("submit");
                done.push((i, response.into_inner().conversation_id));
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        for (i, id) in done.expect("submit task") {
            ids[i] = id;
        }
    }
    ids
}

/// Counts `uid`'s conversations in `status` through ListConversations paging.
pub async fn count_listed(
    client: &ListenClient,
    uid: &str,
    status: listen::ConversationStatus,
) -> usize {
    let mut client = client.clone();
    let mut token = String::new();
    let mut count = 0;
    loop {
        let page = client
            .list_conversations(listen::ListConversationsRequest {
                uid: uid.to_string(),
                status: status as i32,
                page_size: 500,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        count += page.conversations.len();
        if page.next_page_token.is_empty() {
            return count;
        }
        token = page.next_page_token;
    }
}
