//! `listen.v1.Listen`: request validation, store calls, and conversions to the wire types.
//!
//! Submit commits to the store and wakes the link; it never waits on pusher.

use crate::auth;
use crate::error::{ApiError, reject};
use crate::link::LinkHandle;
use crate::session;
use crate::store::{
    Admission, ConversationStore, ListFilter, Now, Priority, QueueBounds, RetryOutcome, Status,
    StoreError,
};
use crate::validate::{
    Limits, MAX_ID_BYTES, validate_id, validate_submit, validate_text, validate_view,
};
use crate::wire::{View, status_name, to_proto, to_proto_in};
use shared::proto::listen::v1 as api;
use shared::proto::listen::v1::listen_server::Listen;
use shared::telemetry::{TraceContext, remote_parent};
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Streaming};
use tracing::{Instrument, Span, field, info_span};

const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 500;
/// Conversations read from the store at once while filling a FULL page: bounds the memory
/// of one page to this many conversations beyond what the page keeps.
const FULL_PAGE_BATCH: usize = 8;

pub(crate) struct ListenService {
    pub store: Arc<dyn ConversationStore>,
    pub link: LinkHandle,
    pub limits: Limits,
    pub pusher_url: String,
    pub max_in_flight: usize,
    /// Most encoded bytes in one ListConversations response (`--max-page-bytes`).
    pub max_page_bytes: usize,
    pub sessions: session::Context,
    /// `--max-queued`, `--max-queued-per-uid`.
    pub queue_bounds: QueueBounds,
    /// The delay a full queue's refusal asks for (`--queue-retry-after`).
    pub queue_retry_after: std::time::Duration,
}

type Reply<T> = Result<Response<T>, tonic::Status>;
type SessionStream = ReceiverStream<Result<api::SessionEvent, tonic::Status>>;

/// The gRPC edge: each call runs its handler below and passes a refusal through [`reject`].
#[tonic::async_trait]
impl Listen for ListenService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<api::SessionRequest>>,
    ) -> Reply<Self::SessionStream> {
        self.open_session(request)
            .await
            .map(Response::new)
            .map_err(reject)
    }

    async fn submit_conversation(
        &self,
        request: Request<api::SubmitConversationRequest>,
    ) -> Reply<api::SubmitConversationResponse> {
        let span = info_span!(
            "submit",
            otel.name = "listen.v1.Listen/SubmitConversation",
            otel.kind = "server",
            rpc.system = "grpc",
            conversation_id = field::Empty,
        );
        remote_parent(request.metadata(), &span);
        self.submit(request)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(reject)
    }

    async fn get_conversation(
        &self,
        request: Request<api::GetConversationRequest>,
    ) -> Reply<api::Conversation> {
        self.get(request).await.map(Response::new).map_err(reject)
    }

    async fn list_conversations(
        &self,
        request: Request<api::ListConversationsRequest>,
    ) -> Reply<api::ListConversationsResponse> {
        self.list(request).await.map(Response::new).map_err(reject)
    }

    async fn retry_conversation(
        &self,
        request: Request<api::RetryConversationRequest>,
    ) -> Reply<api::Conversation> {
        self.retry(request).await.map(Response::new).map_err(reject)
    }

    async fn get_link_status(
        &self,
        request: Request<api::GetLinkStatusRequest>,
    ) -> Reply<api::LinkStatus> {
        self.link_status(request)
            .await
            .map(Response::new)
            .map_err(reject)
    }
}

impl ListenService {
    async fn open_session(
        &self,
        request: Request<Streaming<api::SessionRequest>>,
    ) -> Result<SessionStream, ApiError> {
        let caller = auth::caller(&request)?;
        let slot = self.sessions.sessions.enter()?;
        let (tx, rx) = tokio::sync::mpsc::channel(session::EVENT_BUFFER);
        let span = info_span!(
            "session",
            otel.name = "listen.v1.Listen/Session",
            otel.kind = "server",
            rpc.system = "grpc",
        );
        remote_parent(request.metadata(), &span);
        tokio::spawn(
            session::run(
                self.sessions.clone(),
                caller,
                request.into_inner(),
                tx,
                slot,
            )
            .instrument(span),
        );
        Ok(ReceiverStream::new(rx))
    }

    async fn submit(
        &self,
        request: Request<api::SubmitConversationRequest>,
    ) -> Result<api::SubmitConversationResponse, ApiError> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let mut new = validate_submit(request, self.limits)?;
        caller.require("uid", &new.uid)?;
        new.trace = TraceContext::of(&Span::current());
        // Claim at submit: with a window slot free, the store may write it already leased to
        // this instance and the link takes it from memory. An unused slot goes back on drop.
        let slot = match new.status {
            Status::Processing => self.link.reserve(),
            _ => None,
        };
        new.lease = slot.as_ref().map(|slot| slot.lease());
        // In a task of its own, with the slot: a caller that gives up mid-commit (a deadline,
        // a cancelled call) drops this future, but a row committed as claimed still reaches
        // the link, instead of waiting out its lease unsent.
        let store = Arc::clone(&self.store);
        let admission = Admission::Bounded(self.queue_bounds);
        let commit = async move {
            let mut submitted = store.submit(new, admission).await?;
            let handed_over = match (slot, submitted.as_mut().ok().and_then(|s| s.claimed.take())) {
                (Some(slot), Some(claimed)) => {
                    slot.fill(*claimed);
                    true
                }
                _ => false,
            };
            Ok::<_, StoreError>((submitted, handed_over))
        };
        let (submitted, handed_over) =
            tokio::spawn(commit.instrument(info_span!("store.commit", db.operation = "submit")))
                .await
                .map_err(|e| StoreError::Unavailable(format!("the submit task failed: {e}")))??;
        let submitted =
            submitted.map_err(|full| ApiError::queue_full(full, self.queue_retry_after))?;
        Span::current().record("conversation_id", submitted.id.as_str());
        if submitted.created {
            let status = if submitted.status == Status::Processing {
                "processing"
            } else {
                "discarded"
            };
            metrics::counter!("listen_conversations_total", "status" => status).increment(1);
        }
        if submitted.created && submitted.status == Status::Processing && !handed_over {
            self.link.wake();
        }
        Ok(api::SubmitConversationResponse {
            conversation_id: submitted.id,
            status: submitted.status.to_proto() as i32,
        })
    }

    async fn get(
        &self,
        request: Request<api::GetConversationRequest>,
    ) -> Result<api::Conversation, ApiError> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let id = validate_id("conversation_id", &request.conversation_id)?;
        let view = validate_view("view", request.view, View::Full)?;
        let conversation = self.store.get(&id).await?.ok_or(ApiError::NotFound(id))?;
        caller.require("conversation_id", &conversation.uid)?;
        Ok(to_proto_in(view, conversation))
    }

    async fn list(
        &self,
        request: Request<api::ListConversationsRequest>,
    ) -> Result<api::ListConversationsResponse, ApiError> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let uid = match request.uid.as_str() {
            // A user lists its own conversations; services and open mode may list everyone's.
            "" => caller.own_uid().map(String::from),
            uid => {
                let uid = validate_text("uid", uid, MAX_ID_BYTES)?.to_string();
                caller.require("uid", &uid)?;
                Some(uid)
            }
        };
        let status = match api::ConversationStatus::try_from(request.status) {
            Ok(status) => Status::from_proto(status),
            Err(_) => {
                return Err(ApiError::invalid(
                    "status",
                    format!(
                        "{} is not a conversation status; use 0 (any) or CONVERSATION_STATUS_IN_PROGRESS (1) to CONVERSATION_STATUS_DISCARDED (5)",
                        request.status
                    ),
                ));
            }
        };
        let view = validate_view("view", request.view, View::Basic)?;
        let mut cursor = match request.page_token.as_str() {
            "" => None,
            token => Some(validate_id("page_token", token).map_err(|_| {
                ApiError::invalid(
                    "page_token",
                    "not a next_page_token from this API; send it back as received, or empty for the first page",
                )
            })?),
        };
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        } as usize;
        let batch = match view {
            View::Basic => page_size,
            View::Full => FULL_PAGE_BATCH,
        };
        // The page is cut at page_size conversations or at max_page_bytes, whichever comes
        // first (but holds at least one); each store read asks for one more row than it
        // needs, to know whether anything follows.
        let mut page = Vec::new();
        let mut bytes = NEXT_PAGE_TOKEN_BYTES;
        let mut more = false;
        'fill: loop {
            let limit = batch.min(page_size - page.len()) + 1;
            let rows = self
                .store
                .list(ListFilter {
                    uid: uid.clone(),
                    status,
                    before_id: cursor.clone(),
                    limit,
                    with_segments: view == View::Full,
                })
                .await?;
            let exhausted = rows.len() < limit;
            for row in rows {
                let conversation = to_proto_in(view, row);
                let size = repeated_field_len(&conversation);
                if page.len() == page_size
                    || (!page.is_empty() && bytes + size > self.max_page_bytes)
                {
                    more = true;
                    break 'fill;
                }
                bytes += size;
                cursor = Some(conversation.id.clone());
                page.push(conversation);
            }
            if exhausted {
                break;
            }
        }
        Ok(api::ListConversationsResponse {
            next_page_token: if more {
                cursor.unwrap_or_default()
            } else {
                String::new()
            },
            conversations: page,
        })
    }

    async fn retry(
        &self,
        request: Request<api::RetryConversationRequest>,
    ) -> Result<api::Conversation, ApiError> {
        let caller = auth::caller(&request)?;
        let id = validate_id("conversation_id", &request.into_inner().conversation_id)?;
        if caller.own_uid().is_some() {
            let owner = self
                .store
                .get(&id)
                .await?
                .ok_or_else(|| ApiError::NotFound(id.clone()))?;
            caller.require("conversation_id", &owner.uid)?;
        }
        match self.store.retry(&id).await? {
            RetryOutcome::Retried(conversation) => {
                self.link.wake();
                Ok(to_proto(*conversation))
            }
            RetryOutcome::NotFailed(status) => Err(ApiError::NotRetryable {
                id,
                status: status_name(status),
            }),
            RetryOutcome::NotFound => Err(ApiError::NotFound(id)),
        }
    }

    async fn link_status(
        &self,
        request: Request<api::GetLinkStatusRequest>,
    ) -> Result<api::LinkStatus, ApiError> {
        if let Some(uid) = auth::caller(&request)?.own_uid() {
            return Err(ApiError::PermissionDenied(format!(
                "the link status is for services (token scope --auth-service-scope); {uid:?} is a user"
            )));
        }
        let snapshot = self.link.snapshot();
        // The link's own state is reported even when the store cannot be counted.
        let (queues, last_error) = match self.store.queue_stats(Now::Store).await {
            Ok(stats) => (stats, snapshot.last_error),
            Err(error) => (
                Default::default(),
                format!("cannot count queued work: {error}"),
            ),
        };
        Ok(api::LinkStatus {
            state: snapshot.state as i32,
            pending: snapshot.pending as u32,
            queued: queues.iter().map(|q| q.queued).sum(),
            queues: Priority::ALL
                .into_iter()
                .zip(queues)
                .map(|(priority, stats)| api::QueueStatus {
                    priority: to_proto_priority(priority) as i32,
                    queued: stats.queued,
                    oldest_age_seconds: stats.oldest_age_ms as f64 / 1e3,
                })
                .collect(),
            reconnects: snapshot.reconnects,
            last_error,
            consecutive_failures: snapshot.consecutive_failures,
            max_in_flight: self.max_in_flight as u32,
            pusher_url: self.pusher_url.clone(),
            acks_ignored: snapshot.acks_ignored,
            transcripts_dropped: snapshot.transcripts_dropped,
            endpoints: snapshot
                .endpoints
                .into_iter()
                .map(|e| api::EndpointStatus {
                    address: e.address,
                    state: e.state as i32,
                    pending: e.pending as u32,
                    reconnects: e.reconnects,
                    consecutive_failures: e.consecutive_failures,
                    last_error: e.last_error,
                    draining: e.draining,
                    retiring: e.retiring,
                    pusher_id: e.pusher_id,
                })
                .collect(),
        })
    }
}

fn to_proto_priority(priority: Priority) -> api::Priority {
    match priority {
        Priority::Interactive => api::Priority::Interactive,
        Priority::Bulk => api::Priority::Bulk,
    }
}

/// Bytes `next_page_token` can add to a page (tag, length, a conversation id).
const NEXT_PAGE_TOKEN_BYTES: usize = 2 + MAX_ID_BYTES;

/// Bytes `conversation` adds to a response as one element of a repeated message field.
fn repeated_field_len(conversation: &api::Conversation) -> usize {
    let len = prost::Message::encoded_len(conversation);
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}
