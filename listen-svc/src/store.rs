//! Durable conversation state: the [`ConversationStore`] trait and its types.
//!
//! The store is the source of truth. A conversation is committed as PROCESSING before it is
//! ever sent to pusher; the link [`claim`](ConversationStore::claim)s rows to send (taking a
//! lease and bumping the fencing generation) and writes outcomes only with the generation it
//! claimed with, so late writes from a fenced-off owner change nothing.
//!
//! Two backends, [`SqliteStore`] and [`PostgresStore`], each keep their own dialect's SQL
//! (claims, upserts, migrations). What they share is written once: `row` reads result rows
//! (the column list, row to [`Conversation`], claimed rows), `list` builds the list query,
//! and [`queue`] decides admission and fair order (start tags).

mod list;
mod postgres;
pub(crate) mod queue;
mod row;
mod sqlite;

pub(crate) use postgres::PostgresStore;
pub(crate) use queue::{Admission, ClaimOrder, Priority, QueueBounds, QueueFull, QueueStats};
pub(crate) use sqlite::SqliteStore;

use shared::proto::listen::v1 as api;
use shared::telemetry::TraceContext;

/// Where a conversation is in its lifecycle. Stored as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Status {
    InProgress,
    Processing,
    Completed,
    Failed,
    Discarded,
}

impl Status {
    pub(crate) const ALL: [Status; 5] = [
        Status::InProgress,
        Status::Processing,
        Status::Completed,
        Status::Failed,
        Status::Discarded,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::InProgress => "in_progress",
            Status::Processing => "processing",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Discarded => "discarded",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Status> {
        Some(match text {
            "in_progress" => Status::InProgress,
            "processing" => Status::Processing,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "discarded" => Status::Discarded,
            _ => return None,
        })
    }

    pub(crate) fn to_proto(self) -> api::ConversationStatus {
        match self {
            Status::InProgress => api::ConversationStatus::InProgress,
            Status::Processing => api::ConversationStatus::Processing,
            Status::Completed => api::ConversationStatus::Completed,
            Status::Failed => api::ConversationStatus::Failed,
            Status::Discarded => api::ConversationStatus::Discarded,
        }
    }

    pub(crate) fn from_proto(status: api::ConversationStatus) -> Option<Status> {
        Some(match status {
            api::ConversationStatus::Unspecified => return None,
            api::ConversationStatus::InProgress => Status::InProgress,
            api::ConversationStatus::Processing => Status::Processing,
            api::ConversationStatus::Completed => Status::Completed,
            api::ConversationStatus::Failed => Status::Failed,
            api::ConversationStatus::Discarded => Status::Discarded,
        })
    }
}

/// A conversation to store, already validated.
#[derive(Clone, Debug)]
pub(crate) struct NewConversation {
    pub id: String,
    pub uid: String,
    pub idempotency_key: Option<String>,
    pub language: String,
    pub segments: Vec<api::Segment>,
    /// PROCESSING, or DISCARDED when there is nothing to process.
    pub status: Status,
    pub priority: Priority,
    pub now_ms: i64,
    /// The trace the Submit call is part of; every send continues it.
    pub trace: TraceContext,
    /// Claim it at submit: when nothing waits in the queue, a PROCESSING conversation is
    /// written already leased to this instance (the link set a window slot aside for it), so
    /// it needs no claim write and no re-read. None: it is queued as always.
    pub lease: Option<Lease>,
}

impl NewConversation {
    /// What a backend returns for a conversation it wrote leased at submit: the claim of it,
    /// as a claim would return it (generation 1, nothing sent yet, no wait).
    fn into_submitted_claim(self) -> Submitted {
        let claimed = Claimed {
            id: self.id.clone(),
            uid: self.uid,
            language: self.language,
            segments: self.segments,
            finished_at_ms: Some(self.now_ms),
            generation: CLAIMED_AT_SUBMIT,
            attempts: 0,
            priority: self.priority,
            waited_ms: Some(0),
            trace: self.trace,
        };
        Submitted {
            id: self.id,
            status: Status::Processing,
            created: true,
            claimed: Some(Box::new(claimed)),
        }
    }
}

/// The generation of a row written leased at submit: its first claim (claims count from 0).
const CLAIMED_AT_SUBMIT: i64 = 1;

/// A lease to take at submit, for [`NewConversation::lease`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Lease {
    pub owner: String,
    pub lease_ms: i64,
}

/// A stored conversation as read back.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Conversation {
    pub id: String,
    pub uid: String,
    pub language: String,
    pub status: Status,
    /// Empty when read without segments (a BASIC list); `segment_count` still counts them.
    pub segments: Vec<api::Segment>,
    pub segment_count: u32,
    pub structured: Option<api::Structured>,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub completed_at_ms: Option<i64>,
    pub deliveries: Vec<api::WebhookDelivery>,
}

/// A processed conversation's outcome, as pusher reported it.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Completion {
    pub structured: api::Structured,
    /// The structurer judged it empty or noise: it ends DISCARDED.
    pub discarded: bool,
    pub deliveries: Vec<api::WebhookDelivery>,
}

/// A live conversation to open for a session.
#[derive(Clone, Debug)]
pub(crate) struct NewLive {
    pub id: String,
    pub uid: String,
    pub language: String,
    /// Silence after the last segment before the conversation finishes.
    pub timeout_ms: i64,
    /// Its creation time, from which the first deadline is counted.
    pub now: Now,
    /// The trace of the session that opened it; every send continues it.
    pub trace: TraceContext,
}

/// An IN_PROGRESS conversation a new session for the same uid can resume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Resumable {
    pub id: String,
    pub segment_count: u64,
    /// Encoded bytes of its segments.
    pub segment_bytes: i64,
    /// Time left until its deadline, by the store's clock.
    pub remaining_ms: i64,
}

/// What a submit did.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Submitted {
    pub id: String,
    pub status: Status,
    /// false when (uid, idempotency_key) already existed and nothing was written.
    pub created: bool,
    /// Written already leased ([`NewConversation::lease`], nothing queued): the row as a claim
    /// would have returned it, for the link to take from memory.
    pub claimed: Option<Box<Claimed>>,
}

/// A PROCESSING row claimed by this instance for sending.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Claimed {
    pub id: String,
    pub uid: String,
    pub language: String,
    pub segments: Vec<api::Segment>,
    pub finished_at_ms: Option<i64>,
    /// Fencing token: outcome writes must carry it.
    pub generation: i64,
    /// Sends recorded so far; the next send's attempt number continues from here, so attempt
    /// numbers never repeat over a conversation's life (retries included).
    pub attempts: u32,
    pub priority: Priority,
    /// On its first claim since it entered PROCESSING: how long it waited, by the store's
    /// clock. None when claimed again (a lease that expired).
    pub waited_ms: Option<i64>,
    /// As stored when it was created (empty when traces were off).
    pub trace: TraceContext,
}

/// A page request for listing.
#[derive(Clone, Debug, Default)]
pub(crate) struct ListFilter {
    pub uid: Option<String>,
    pub status: Option<Status>,
    /// Only ids strictly before this one (the previous page's last id).
    pub before_id: Option<String>,
    pub limit: usize,
    /// Read each conversation's segments too (otherwise `segments` comes back empty).
    pub with_segments: bool,
}

/// How a retry went.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RetryOutcome {
    Retried(Box<Conversation>),
    NotFailed(Status),
    NotFound,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// The database cannot be reached or written right now; callers may try again.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored value cannot be decoded: a bug or tampering, never the caller's fault.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// The durable state behind listen. Implementations must pass the conformance tests in
/// `store/tests.rs`.
#[async_trait::async_trait]
pub(crate) trait ConversationStore: Send + Sync + 'static {
    /// Stores a new conversation, or returns the existing one for the same
    /// (uid, idempotency_key), even over the bounds. Committed durably before returning. A
    /// new PROCESSING one beyond `admission`'s bounds is refused and nothing is written.
    /// With `new.lease` and nothing queued (in any priority), it is written claimed: owned,
    /// leased, generation 1, never counted as queued; the claim comes back in
    /// [`Submitted::claimed`]. Otherwise it is queued, lease or not.
    async fn submit(
        &self,
        new: NewConversation,
        admission: Admission,
    ) -> Result<Result<Submitted, QueueFull>, StoreError>;

    async fn get(&self, id: &str) -> Result<Option<Conversation>, StoreError>;

    /// Newest first.
    async fn list(&self, filter: ListFilter) -> Result<Vec<Conversation>, StoreError>;

    /// FAILED -> PROCESSING, at the back of its uid's queue, with no owner. Attempts keep
    /// counting. Not bounded by admission (an operator's decision about stored work).
    async fn retry(&self, id: &str) -> Result<RetryOutcome, StoreError>;

    /// Claims up to `limit` PROCESSING rows that nobody holds (no owner or an expired lease),
    /// in fair order: by priority as `order` says, then start tag, then queue order. Sets
    /// owner and lease, bumps the generation, and takes rows claimed for the first time out
    /// of the queued counts, advancing each priority's virtual time.
    async fn claim(
        &self,
        owner: &str,
        now: Now,
        lease_ms: i64,
        limit: usize,
        order: ClaimOrder,
    ) -> Result<Vec<Claimed>, StoreError>;

    /// Gives up every lease `owner` holds, so any instance can claim those rows at once. Used
    /// at start-up (a restart under the same identity) and on clean shutdown.
    async fn release(&self, owner: &str) -> Result<u64, StoreError>;

    /// Extends the leases of `ids` that are still PROCESSING and held by `owner`. Returns
    /// how many. The caller names the rows it is working on (at most its pending windows),
    /// so the cost does not grow with the queue, and a row the caller no longer tracks is
    /// not kept alive: its lease runs out and it is claimed again.
    async fn renew(
        &self,
        owner: &str,
        ids: Vec<String>,
        now: Now,
        lease_ms: i64,
    ) -> Result<u64, StoreError>;

    /// PROCESSING -> COMPLETED (or DISCARDED, as the completion says) if `generation` still
    /// matches. false: late, duplicate or fenced.
    async fn complete(
        &self,
        id: &str,
        generation: i64,
        completion: Completion,
        attempts: u32,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// PROCESSING -> FAILED if `generation` still matches. false: late, duplicate or fenced.
    async fn fail(
        &self,
        id: &str,
        generation: i64,
        reason: &str,
        attempts: u32,
    ) -> Result<bool, StoreError>;

    /// Rows in PROCESSING (pending and queued).
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "tests check the counters against it")
    )]
    async fn count_processing(&self) -> Result<u64, StoreError>;

    /// Recomputes the queue's counters from the rows ([`queue::RECONCILE_SQL`]); returns the
    /// number of corrections (0 when they were right). Each store runs it when it opens.
    async fn reconcile_queue(&self) -> Result<u64, StoreError>;

    /// Conversations waiting for their first claim, per priority, and the age of the oldest
    /// (by the store's clock): two counter rows and an index lookup, whatever the backlog.
    async fn queue_stats(&self, now: Now) -> Result<[QueueStats; 2], StoreError>;
    /// How many conversations have `status`, counting at most `cap` (the cost of the
    /// query is bounded by `cap` index entries, whatever the table's size).
    async fn count_status(&self, status: Status, cap: u64) -> Result<u64, StoreError>;

    /// Opens an IN_PROGRESS conversation with no segments yet.
    async fn start_conversation(&self, new: NewLive) -> Result<(), StoreError>;

    /// Appends segments to an IN_PROGRESS conversation and moves its deadline to
    /// `now + timeout`. Returns the new segment count, or None if it is no longer in
    /// progress (finished meanwhile, e.g. by a sweeper).
    async fn append_segments(
        &self,
        id: &str,
        segments: Vec<api::Segment>,
        now: Now,
    ) -> Result<Option<u64>, StoreError>;

    /// IN_PROGRESS -> PROCESSING (queued, interactive), or DISCARDED when it holds no text.
    /// Returns the new status, or None if it was not in progress. Beyond `admission`'s
    /// bounds it is refused and stays IN_PROGRESS, unchanged.
    async fn finish(
        &self,
        id: &str,
        now: Now,
        admission: Admission,
    ) -> Result<Result<Option<Status>, QueueFull>, StoreError>;

    /// The newest IN_PROGRESS conversation of `uid` whose deadline has not passed.
    async fn find_resumable(&self, uid: &str, now: Now) -> Result<Option<Resumable>, StoreError>;

    /// Finishes up to `limit` IN_PROGRESS conversations whose deadline passed (their
    /// finish time is the deadline), whatever the admission bounds: they are stored already
    /// and nobody is there to retry. Returns what became of each.
    async fn finish_expired(
        &self,
        now: Now,
        limit: usize,
    ) -> Result<Vec<(String, Status)>, StoreError>;
}

/// The "now" a store judges leases and session deadlines by: decisions that several
/// replicas share must be made by one clock, not by each replica's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Now {
    /// The store's clock. PostgreSQL: the database server's (`clock_timestamp()`, computed
    /// inside the statement), the one clock every replica shares. SQLite (one process):
    /// [`process_now_ms`], which no step of the wall clock moves.
    Store,
    /// A given time in milliseconds since the Unix epoch: how the conformance tests move
    /// time.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "the service always uses the store's clock")
    )]
    At(i64),
}

impl Now {
    /// The time as a statement parameter: `None` lets the database use its own clock.
    pub(crate) fn param(self) -> Option<i64> {
        match self {
            Now::Store => None,
            Now::At(ms) => Some(ms),
        }
    }

    /// The time in milliseconds, for a store whose clock is this process's.
    pub(crate) fn in_process(self) -> i64 {
        match self {
            Now::Store => process_now_ms(),
            Now::At(ms) => ms,
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch, as recorded in timestamps clients read
/// (created_at, completed_at). Decides nothing.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// This process's clock for decisions: the wall clock read once, at first use, advanced by
/// monotonic time. A step of the system clock (NTP correction, a VM resumed after a
/// suspend, an operator's `date -s`) moves no lease and no deadline.
pub(crate) fn process_now_ms() -> i64 {
    static ANCHOR: std::sync::OnceLock<(i64, std::time::Instant)> = std::sync::OnceLock::new();
    let (wall, monotonic) = *ANCHOR.get_or_init(|| (now_ms(), std::time::Instant::now()));
    wall + monotonic.elapsed().as_millis() as i64
}

/// The segment list as stored: protobuf field 1, repeated. Appending encoded segments to the
/// blob appends to the list.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SegmentList {
    #[prost(message, repeated, tag = "1")]
    pub segments: Vec<api::Segment>,
}

/// Webhook delivery results as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DeliveryList {
    #[prost(message, repeated, tag = "1")]
    pub deliveries: Vec<api::WebhookDelivery>,
}

/// The stored encodings, shared by every store: protobuf blobs, and the status as text.
impl Status {
    /// Parses a stored status; anything else means the row is corrupt.
    pub(crate) fn parse_stored(id: &str, text: &str) -> Result<Status, StoreError> {
        Status::parse(text).ok_or_else(|| StoreError::Corrupt(format!("status of {id}: {text:?}")))
    }
}

pub(crate) fn encode_segments(segments: &[api::Segment]) -> Vec<u8> {
    use prost::Message;
    SegmentList {
        segments: segments.to_vec(),
    }
    .encode_to_vec()
}

pub(crate) fn decode_segments(id: &str, blob: &[u8]) -> Result<Vec<api::Segment>, StoreError> {
    use prost::Message;
    SegmentList::decode(blob)
        .map(|list| list.segments)
        .map_err(|e| StoreError::Corrupt(format!("segments of {id}: {e}")))
}

pub(crate) fn decode_structured(
    id: &str,
    blob: Option<Vec<u8>>,
) -> Result<Option<api::Structured>, StoreError> {
    use prost::Message;
    blob.map(|b| api::Structured::decode(b.as_slice()))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("result of {id}: {e}")))
}

pub(crate) fn encode_deliveries(deliveries: Vec<api::WebhookDelivery>) -> Vec<u8> {
    use prost::Message;
    DeliveryList { deliveries }.encode_to_vec()
}

pub(crate) fn decode_deliveries(
    id: &str,
    blob: Option<Vec<u8>>,
) -> Result<Vec<api::WebhookDelivery>, StoreError> {
    use prost::Message;
    blob.map(|b| DeliveryList::decode(b.as_slice()).map(|l| l.deliveries))
        .transpose()
        .map(Option::unwrap_or_default)
        .map_err(|e| StoreError::Corrupt(format!("deliveries of {id}: {e}")))
}

/// Whether any segment carries text (decides PROCESSING vs DISCARDED).
/// A trace context value as stored: NULL when empty.
pub(crate) fn stored(value: &str) -> Option<&str> {
    (!value.is_empty()).then_some(value)
}

pub(crate) fn has_text(segments: &[api::Segment]) -> bool {
    segments.iter().any(|s| !s.text.trim().is_empty())
}

#[cfg(test)]
mod tests;
