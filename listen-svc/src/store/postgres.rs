//! PostgreSQL store, for several listen replicas sharing one database.
//!
//! - A pool of at most `POOL_SIZE` connections; a caller waits at most `POOL_WAIT` for one,
//!   then gets `Unavailable` (a stopped server fails Submit fast rather than hanging it).
//! - Each operation is one statement or one transaction; PostgreSQL does the grouping.
//! - Claims use `FOR UPDATE SKIP LOCKED`, so replicas claiming at once never take the same
//!   row.
//! - Every transaction that changes the queue's counters and virtual times (submit, finish,
//!   retry, claim) takes one advisory lock first (`QUEUE_LOCK`): replicas never deadlock on
//!   each other's counter rows, and admission reads counts nobody is changing meanwhile.
//! - Migrations run under an advisory lock, so replicas starting together apply them once.
//! - Connections use TLS as the URL's libpq parameters say (`sslmode`, `sslrootcert`,
//!   `sslcert`, `sslkey`): `url` takes them out of the URL, `tls` connects and explains
//!   failures.

#[cfg(test)]
mod tests;
mod tls;
mod url;

use super::list::{Arg, Placeholders, list_query};
use super::queue::start_tag;
use super::row::{
    CLAIMED_COLUMNS, COLUMNS, ClaimKey, ClaimTally, RowAccess, in_claim_order, read_claimed,
    read_conversation, read_id_and_status, read_resumable, without_keys,
};
use super::{
    Admission, CLAIMED_AT_SUBMIT, ClaimOrder, Claimed, Completion, Conversation, ConversationStore,
    Lease, ListFilter, NewConversation, NewLive, Now, Priority, QueueFull, QueueStats, Resumable,
    RetryOutcome, Status, StoreError, Submitted, encode_deliveries, encode_segments, has_text,
    stored,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use prost::Message;
use shared::proto::listen::v1 as api;
use std::time::Duration;
use tls::{Connector, Endpoint};
use tokio_postgres::Transaction;
use tokio_postgres::types::ToSql;
use tracing::debug;

const POOL_SIZE: usize = 16;

/// A statement's "now", in milliseconds since the Unix epoch: parameter `$n` when the caller
/// gives a time ([`Now::At`]), otherwise the database server's clock, the one clock every
/// replica shares. Lease expiry and session deadlines are judged by it, so a replica whose
/// own clock is off takes no live lease and finishes no live conversation early.
fn now_ms_param(n: usize) -> String {
    format!("COALESCE(${n}::BIGINT, (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT)")
}
const POOL_WAIT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Arbitrary, fixed: serializes migrations across replicas.
const MIGRATION_LOCK: i64 = 0x6c69_7374_656e;
/// Arbitrary, fixed: serializes the queue's bookkeeping across replicas (see the module docs).
const QUEUE_LOCK: i64 = 0x6c69_7374_7175;

const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_conversations.sql"),
    include_str!("../../migrations/postgres/0002_live_conversations.sql"),
    include_str!("../../migrations/postgres/0003_deliveries.sql"),
    include_str!("../../migrations/postgres/0004_partial_indexes.sql"),
    include_str!("../../migrations/postgres/0005_fair_queue.sql"),
    include_str!("../../migrations/postgres/0006_trace_context.sql"),
];

pub(crate) struct PostgresStore {
    pool: Pool,
    /// Opens the pool's connections; says why one could not be opened.
    connector: Connector,
}

impl PostgresStore {
    /// Checks a postgres:// URL and reads the certificate files it names, without
    /// connecting. The error names the URL parameter at fault.
    pub(crate) fn check(url: &str) -> Result<(), String> {
        Endpoint::from_url(url).map(|_| ())
    }

    /// Connects to `url` (postgres://..., TLS as its `sslmode` says) and applies pending
    /// migrations. A server that cannot be reached as the URL asks (no TLS under `require`,
    /// a certificate that fails its check) is an error here, saying why.
    pub(crate) async fn open(url: &str) -> Result<Self, StoreError> {
        let Endpoint {
            mut config,
            connector,
        } = Endpoint::from_url(url)
            .map_err(|e| StoreError::Unavailable(format!("--store: {e}")))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("listen-svc");
        let manager = Manager::from_connect(
            config,
            connector.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot build the connection pool: {e}"))
            })?;
        let store = PostgresStore { pool, connector };
        // The first connection, apart, so that a connection failure at start names --store.
        let first = store.pool.get().await.map_err(|e| {
            StoreError::Unavailable(format!("--store: {}", store.connector.explain(&e)))
        })?;
        drop(first);
        store.migrate().await?;
        super::queue::report_reconciled(store.reconcile_queue().await?);
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| {
            StoreError::Unavailable(format!(
                "no database connection: {}",
                self.connector.explain(&e)
            ))
        })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(unavailable)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)",
        )
        .await
        .map_err(unavailable)?;
        let applied: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) AS applied FROM schema_migrations",
                &[],
            )
            .await
            .map_err(unavailable)?
            .value("applied")?;
        let known = MIGRATIONS.len() as i64;
        if applied > known {
            return Err(StoreError::Unavailable(format!(
                "database schema version {applied} is newer than this listen-svc understands ({known}); \
                 run a newer listen-svc"
            )));
        }
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
            tx.batch_execute(sql).await.map_err(unavailable)?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[&(index as i64 + 1)],
            )
            .await
            .map_err(unavailable)?;
            debug!(version = index + 1, "applied migration");
        }
        tx.commit().await.map_err(unavailable)
    }
}

fn unavailable(error: tokio_postgres::Error) -> StoreError {
    // Display of a db error is terse ("db error"); its source carries the server's message.
    let detail = match error.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => error.to_string(),
    };
    StoreError::Unavailable(detail)
}

/// Takes the queue lock until the transaction ends.
async fn lock_queue(tx: &Transaction<'_>) -> Result<(), StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&QUEUE_LOCK])
        .await
        .map(|_| ())
        .map_err(unavailable)
}

/// Under the queue lock: whether one more conversation of `uid` at `priority` fits within
/// `admission`'s bounds, and if so, counts it in and returns its start tag. A refusal writes
/// nothing.
async fn enqueue(
    tx: &Transaction<'_>,
    uid: &str,
    priority: Priority,
    admission: Admission,
) -> Result<Result<i64, QueueFull>, StoreError> {
    let priority = priority.as_i64();
    let state = tx
        .query_one(
            "SELECT (SELECT COALESCE(SUM(queued), 0) FROM queue_priorities)::BIGINT AS total, \
               (SELECT COALESCE(SUM(queued), 0) FROM queue_uids WHERE uid = $1)::BIGINT AS mine, \
               p.vtime, u.finish \
             FROM queue_priorities p \
             LEFT JOIN queue_uids u ON u.uid = $1 AND u.priority = p.priority \
             WHERE p.priority = $2",
            &[&uid, &priority],
        )
        .await
        .map_err(unavailable)?;
    let (total, mine): (i64, i64) = (state.value("total")?, state.value("mine")?);
    if let Err(full) = admission.admit(uid, total.max(0) as u64, mine.max(0) as u64) {
        return Ok(Err(full));
    }
    let tag = start_tag(state.value("vtime")?, state.value("finish")?);
    tx.execute(
        "WITH counted AS (UPDATE queue_priorities SET queued = queued + 1 WHERE priority = $2) \
         INSERT INTO queue_uids (uid, priority, queued, finish) VALUES ($1, $2, 1, $3) \
         ON CONFLICT (uid, priority) DO UPDATE \
           SET queued = queue_uids.queued + 1, finish = EXCLUDED.finish",
        &[&uid, &priority, &(tag + 1)],
    )
    .await
    .map_err(unavailable)?;
    Ok(Ok(tag))
}

/// Claims up to `limit` rows in fair order (only bulk ones with `bulk_only`).
async fn claim_picked(
    tx: &Transaction<'_>,
    bulk_only: bool,
    owner: &str,
    now: Now,
    lease_ms: i64,
    limit: usize,
) -> Result<Vec<(ClaimKey, Claimed)>, StoreError> {
    let at = now_ms_param(2);
    let filter = if bulk_only { "AND priority = 1" } else { "" };
    let rows = tx
        .query(
            &format!(
                "WITH now AS (SELECT {at} AS ms), picked AS ( \
                   SELECT id, queued_at_ms FROM conversations \
                   WHERE status = 'processing' \
                     AND (owner IS NULL OR lease_expires_at_ms < (SELECT ms FROM now)) {filter} \
                   ORDER BY priority, queue_tag, queue_seq LIMIT $4 \
                   FOR UPDATE SKIP LOCKED) \
                 UPDATE conversations c SET owner = $1, \
                   lease_expires_at_ms = (SELECT ms FROM now) + $3::BIGINT, \
                   generation = c.generation + 1, queued_at_ms = NULL \
                 FROM picked WHERE c.id = picked.id \
                 RETURNING {}, (SELECT ms FROM now) - picked.queued_at_ms AS waited_ms",
                CLAIMED_COLUMNS
                    .split(", ")
                    .map(|column| format!("c.{}", column.trim()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            &[&owner, &now.param(), &lease_ms, &(limit as i64)],
        )
        .await
        .map_err(unavailable)?;
    let claimed = rows
        .iter()
        .map(|row| {
            let (key, mut claimed) = read_claimed(row)?;
            claimed.waited_ms = row.value::<Option<i64>>("waited_ms")?.map(|ms| ms.max(0));
            Ok((key, claimed))
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(in_claim_order(claimed))
}

/// Under the queue lock: takes what a claim tallied out of the counters and moves the
/// virtual times.
async fn take_from_queue(tx: &Transaction<'_>, tally: &ClaimTally) -> Result<(), StoreError> {
    if !tally.uids.is_empty() {
        let uids: Vec<&str> = tally.uids.keys().map(|(uid, _)| uid.as_str()).collect();
        let priorities: Vec<i64> = tally.uids.keys().map(|(_, p)| *p).collect();
        let counts: Vec<i64> = tally.uids.values().copied().collect();
        tx.execute(
            "UPDATE queue_uids u SET queued = u.queued - d.n \
             FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[]) AS d(uid, priority, n) \
             WHERE u.uid = d.uid AND u.priority = d.priority",
            &[&uids, &priorities, &counts],
        )
        .await
        .map_err(unavailable)?;
        tx.execute(
            "DELETE FROM queue_uids WHERE uid = ANY($1) AND queued <= 0",
            &[&uids],
        )
        .await
        .map_err(unavailable)?;
    }
    for (priority, (n, tag)) in &tally.priorities {
        tx.execute(
            "UPDATE queue_priorities SET queued = queued - $2, vtime = GREATEST(vtime, $3) \
             WHERE priority = $1",
            &[priority, n, tag],
        )
        .await
        .map_err(unavailable)?;
    }
    Ok(())
}

/// Under the queue lock: IN_PROGRESS -> PROCESSING (interactive) or DISCARDED, finished now
/// or (`at_deadline`) at its deadline. Beyond `admission`'s bounds nothing changes.
async fn finish_one(
    tx: &Transaction<'_>,
    id: &str,
    now: Now,
    at_deadline: bool,
    admission: Admission,
) -> Result<Result<Option<Status>, QueueFull>, StoreError> {
    let live = tx
        .query_opt(
            "SELECT uid, has_text FROM conversations \
             WHERE id = $1 AND status = 'in_progress' FOR UPDATE",
            &[&id],
        )
        .await
        .map_err(unavailable)?;
    let Some(live) = live else {
        return Ok(Ok(None));
    };
    let uid: String = live.value("uid")?;
    let (status, tag) = if live.value::<bool>("has_text")? {
        match enqueue(tx, &uid, Priority::Interactive, admission).await? {
            Ok(tag) => (Status::Processing, Some(tag)),
            Err(full) => return Ok(Err(full)),
        }
    } else {
        (Status::Discarded, None)
    };
    let at = now_ms_param(4);
    tx.execute(
        &format!(
            "UPDATE conversations SET status = $2, \
               queue_seq = CASE WHEN $3::BIGINT IS NOT NULL THEN nextval('conversations_queue_seq') END, \
               queue_tag = COALESCE($3::BIGINT, 0), priority = 0, \
               queued_at_ms = CASE WHEN $3::BIGINT IS NOT NULL THEN {at} END, \
               finished_at_ms = CASE WHEN $5 THEN deadline_ms ELSE {at} END, deadline_ms = NULL \
             WHERE id = $1"
        ),
        &[&id, &status.as_str(), &tag, &now.param(), &at_deadline],
    )
    .await
    .map_err(unavailable)?;
    Ok(Ok(Some(status)))
}

#[async_trait::async_trait]
impl ConversationStore for PostgresStore {
    async fn submit(
        &self,
        new: NewConversation,
        admission: Admission,
    ) -> Result<Result<Submitted, QueueFull>, StoreError> {
        let mut client = self.client().await?;
        let queued = new.status == Status::Processing;
        if let Some(lease) = new.lease.as_ref().filter(|_| queued)
            && insert_leased(&client, &new, lease).await?
        {
            return Ok(Ok(new.into_submitted_claim()));
        }
        let tx = client.transaction().await.map_err(unavailable)?;
        let mut tag = None;
        if queued {
            lock_queue(&tx).await?;
            if let Some(existing) = existing_submit(&*tx, &new).await? {
                return Ok(Ok(existing));
            }
            match enqueue(&tx, &new.uid, new.priority, admission).await? {
                Ok(t) => tag = Some(t),
                Err(full) => return Ok(Err(full)),
            }
        }
        let at = now_ms_param(12);
        let inserted = tx
            .query_opt(
                &format!(
                    "INSERT INTO conversations (id, uid, idempotency_key, language, status, segments, \
                     segment_count, created_at_ms, finished_at_ms, queue_seq, priority, queue_tag, \
                     queued_at_ms, traceparent, tracestate) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, \
                             CASE WHEN $9 THEN nextval('conversations_queue_seq') END, $10, \
                             COALESCE($11::BIGINT, 0), CASE WHEN $9 THEN {at} END, $13, $14) \
                     ON CONFLICT (uid, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
                     RETURNING id"
                ),
                &[
                    &new.id,
                    &new.uid,
                    &new.idempotency_key,
                    &new.language,
                    &new.status.as_str(),
                    &encode_segments(&new.segments),
                    &(new.segments.len() as i64),
                    &new.now_ms,
                    &queued,
                    &new.priority.as_i64(),
                    &tag,
                    &Now::Store.param(),
                    &stored(&new.trace.traceparent),
                    &stored(&new.trace.tracestate),
                ],
            )
            .await
            .map_err(unavailable)?;
        if inserted.is_some() {
            tx.commit().await.map_err(unavailable)?;
            return Ok(Ok(Submitted {
                id: new.id,
                status: new.status,
                created: true,
                claimed: None,
            }));
        }
        // The key exists (a submit without the queue lock got there first): nothing counted.
        tx.rollback().await.map_err(unavailable)?;
        let existing = existing_submit(&**client, &new).await?;
        existing.map(Ok).ok_or_else(|| {
            StoreError::Unavailable("the conversation vanished during submit".into())
        })
    }

    async fn get(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {COLUMNS} FROM conversations WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(unavailable)?;
        row.as_ref().map(read_conversation).transpose()
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<Conversation>, StoreError> {
        let client = self.client().await?;
        let (sql, args) = list_query(filter, Placeholders::Dollar);
        let args: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|arg| match arg {
                Arg::Text(text) => text as &(dyn ToSql + Sync),
                Arg::Int(n) => n,
            })
            .collect();
        let rows = client.query(&sql, &args).await.map_err(unavailable)?;
        rows.iter().map(read_conversation).collect()
    }

    async fn retry(&self, id: &str) -> Result<RetryOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        lock_queue(&tx).await?;
        let current = tx
            .query_opt(
                "SELECT uid, priority, status FROM conversations WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(unavailable)?;
        let Some(current) = current else {
            return Ok(RetryOutcome::NotFound);
        };
        let status = Status::parse_stored(id, &current.value::<String>("status")?)?;
        if status != Status::Failed {
            return Ok(RetryOutcome::NotFailed(status));
        }
        let uid: String = current.value("uid")?;
        let priority = Priority::from_stored(id, current.value("priority")?)?;
        let Ok(tag) = enqueue(&tx, &uid, priority, Admission::Always).await? else {
            return Err(StoreError::Corrupt(
                "an unbounded enqueue was refused".into(),
            ));
        };
        let at = now_ms_param(3);
        let row = tx
            .query_one(
                &format!(
                    "UPDATE conversations SET status = 'processing', generation = generation + 1, \
                     queue_seq = nextval('conversations_queue_seq'), queue_tag = $2, \
                     queued_at_ms = {at}, owner = NULL, lease_expires_at_ms = NULL, last_error = NULL \
                     WHERE id = $1 RETURNING {COLUMNS}"
                ),
                &[&id, &tag, &Now::Store.param()],
            )
            .await
            .map_err(unavailable)?;
        let retried = read_conversation(&row)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(RetryOutcome::Retried(Box::new(retried)))
    }

    async fn claim(
        &self,
        owner: &str,
        now: Now,
        lease_ms: i64,
        limit: usize,
        order: ClaimOrder,
    ) -> Result<Vec<Claimed>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        lock_queue(&tx).await?;
        let mut claimed = Vec::new();
        if order == ClaimOrder::BulkFirst {
            claimed = claim_picked(&tx, true, owner, now, lease_ms, limit).await?;
        }
        let rest = limit - claimed.len();
        if rest > 0 {
            claimed.extend(claim_picked(&tx, false, owner, now, lease_ms, rest).await?);
        }
        take_from_queue(&tx, &ClaimTally::of(&claimed)).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(without_keys(claimed))
    }

    async fn release(&self, owner: &str) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE conversations SET owner = NULL, lease_expires_at_ms = NULL \
                 WHERE owner = $1 AND status = 'processing'",
                &[&owner],
            )
            .await
            .map_err(unavailable)
    }

    async fn renew(
        &self,
        owner: &str,
        ids: Vec<String>,
        now: Now,
        lease_ms: i64,
    ) -> Result<u64, StoreError> {
        let at = now_ms_param(3);
        let client = self.client().await?;
        client
            .execute(
                &format!(
                    "UPDATE conversations SET lease_expires_at_ms = {at} + $4::BIGINT \
                     WHERE id = ANY($1) AND owner = $2 AND status = 'processing'"
                ),
                &[&ids, &owner, &now.param(), &lease_ms],
            )
            .await
            .map_err(unavailable)
    }

    async fn complete(
        &self,
        id: &str,
        generation: i64,
        completion: Completion,
        attempts: u32,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let deliveries = encode_deliveries(completion.deliveries);
        // Prepared once per connection: one round trip per completion instead of two.
        let statement = client
            .prepare_cached(
                "UPDATE conversations SET status = CASE WHEN $6 THEN 'discarded' ELSE 'completed' END, \
                 structured = $3, attempts = $4, completed_at_ms = $5, deliveries = $7, last_error = NULL, \
                 owner = NULL, lease_expires_at_ms = NULL \
                 WHERE id = $1 AND generation = $2 AND status = 'processing'",
            )
            .await
            .map_err(unavailable)?;
        client
            .execute(
                &statement,
                &[
                    &id,
                    &generation,
                    &completion.structured.encode_to_vec(),
                    &(attempts as i64),
                    &now_ms,
                    &completion.discarded,
                    &deliveries,
                ],
            )
            .await
            .map(|n| n == 1)
            .map_err(unavailable)
    }

    async fn fail(
        &self,
        id: &str,
        generation: i64,
        reason: &str,
        attempts: u32,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE conversations SET status = 'failed', last_error = $3, attempts = $4, \
                 owner = NULL, lease_expires_at_ms = NULL \
                 WHERE id = $1 AND generation = $2 AND status = 'processing'",
                &[&id, &generation, &reason, &(attempts as i64)],
            )
            .await
            .map(|n| n == 1)
            .map_err(unavailable)
    }

    async fn reconcile_queue(&self) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        lock_queue(&tx).await?;
        let mut corrected = 0;
        for sql in super::queue::RECONCILE_SQL {
            corrected += tx.execute(sql, &[]).await.map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(corrected)
    }

    async fn count_processing(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT COUNT(*) AS processing FROM conversations WHERE status = 'processing'",
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.value::<i64>("processing")? as u64)
    }

    async fn queue_stats(&self, now: Now) -> Result<[QueueStats; 2], StoreError> {
        let at = now_ms_param(1);
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "WITH now AS (SELECT {at} AS ms) \
                     SELECT p.priority, p.queued, (SELECT ms FROM now) - \
                       (SELECT MIN(queued_at_ms) FROM conversations \
                        WHERE queued_at_ms IS NOT NULL AND priority = p.priority) AS oldest_age_ms \
                     FROM queue_priorities p"
                ),
                &[&now.param()],
            )
            .await
            .map_err(unavailable)?;
        let mut stats = [QueueStats::default(); 2];
        for row in &rows {
            let priority = Priority::from_stored("queue_priorities", row.value("priority")?)?;
            stats[priority as usize] = QueueStats {
                queued: row.value::<i64>("queued")?.max(0) as u64,
                oldest_age_ms: row
                    .value::<Option<i64>>("oldest_age_ms")?
                    .unwrap_or(0)
                    .max(0),
            };
        }
        Ok(stats)
    }

    async fn count_status(&self, status: Status, cap: u64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT COUNT(*) AS counted FROM \
                 (SELECT 1 FROM conversations WHERE status = $1 LIMIT $2) AS capped",
                &[&status.as_str(), &(cap as i64)],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.value::<i64>("counted")? as u64)
    }

    async fn start_conversation(&self, new: NewLive) -> Result<(), StoreError> {
        let at = now_ms_param(4);
        let client = self.client().await?;
        client
            .execute(
                &format!(
                    "WITH now AS (SELECT {at} AS ms) \
                     INSERT INTO conversations (id, uid, language, status, segments, \
                       segment_count, created_at_ms, deadline_ms, timeout_ms, has_text, \
                       traceparent, tracestate) \
                     SELECT $1, $2, $3, 'in_progress', ''::bytea, 0, ms, ms + $5::BIGINT, \
                       $5::BIGINT, FALSE, $6, $7 FROM now"
                ),
                &[
                    &new.id,
                    &new.uid,
                    &new.language,
                    &new.now.param(),
                    &new.timeout_ms,
                    &stored(&new.trace.traceparent),
                    &stored(&new.trace.tracestate),
                ],
            )
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn append_segments(
        &self,
        id: &str,
        segments: Vec<api::Segment>,
        now: Now,
    ) -> Result<Option<u64>, StoreError> {
        let at = now_ms_param(5);
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE conversations SET segments = segments || $2, \
                     segment_count = segment_count + $3, has_text = has_text OR $4, \
                     deadline_ms = {at} + timeout_ms \
                     WHERE id = $1 AND status = 'in_progress' RETURNING segment_count"
                ),
                &[
                    &id,
                    &encode_segments(&segments),
                    &(segments.len() as i64),
                    &has_text(&segments),
                    &now.param(),
                ],
            )
            .await
            .map_err(unavailable)?;
        let count = row.map(|r| r.value::<i64>("segment_count")).transpose()?;
        Ok(count.map(|n| n as u64))
    }

    async fn finish(
        &self,
        id: &str,
        now: Now,
        admission: Admission,
    ) -> Result<Result<Option<Status>, QueueFull>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        lock_queue(&tx).await?;
        let finished = finish_one(&tx, id, now, false, admission).await?;
        if matches!(finished, Ok(Some(_))) {
            tx.commit().await.map_err(unavailable)?;
        }
        Ok(finished)
    }

    async fn find_resumable(&self, uid: &str, now: Now) -> Result<Option<Resumable>, StoreError> {
        let at = now_ms_param(2);
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "WITH now AS (SELECT {at} AS ms) \
                     SELECT id, segment_count, octet_length(segments)::BIGINT AS segment_bytes, \
                       deadline_ms - now.ms AS remaining_ms \
                     FROM conversations, now \
                     WHERE uid = $1 AND status = 'in_progress' AND deadline_ms >= now.ms \
                     ORDER BY id DESC LIMIT 1"
                ),
                &[&uid, &now.param()],
            )
            .await
            .map_err(unavailable)?;
        row.as_ref().map(read_resumable).transpose()
    }

    async fn finish_expired(
        &self,
        now: Now,
        limit: usize,
    ) -> Result<Vec<(String, Status)>, StoreError> {
        let at = now_ms_param(1);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        lock_queue(&tx).await?;
        let expired = tx
            .query(
                &format!(
                    "SELECT id FROM conversations \
                     WHERE status = 'in_progress' AND deadline_ms < {at} \
                     ORDER BY deadline_ms LIMIT $2 FOR UPDATE SKIP LOCKED"
                ),
                &[&now.param(), &(limit as i64)],
            )
            .await
            .map_err(unavailable)?;
        let mut finished = Vec::with_capacity(expired.len());
        for row in &expired {
            let id: String = row.value("id")?;
            // Finished at its deadline, not at the sweep; admitted whatever the bounds.
            if let Ok(Some(status)) = finish_one(&tx, &id, now, true, Admission::Always).await? {
                finished.push((id, status));
            }
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(finished)
    }
}

/// Claim at submit: one statement, autocommitted, without the queue lock. Writes `new`
/// leased to `lease.owner` (generation 1, never counted as queued) if nothing is queued and
/// its idempotency key is new; false when it wrote nothing (the caller then takes the queued
/// path, which tells the two apart). Without the lock, conversations another replica queues
/// while such inserts commit may be overtaken by them, never lost.
async fn insert_leased(
    client: &deadpool_postgres::Object,
    new: &NewConversation,
    lease: &Lease,
) -> Result<bool, StoreError> {
    let at = now_ms_param(12);
    let statement = client
        .prepare_cached(&format!(
            "WITH waiting AS (SELECT COALESCE(SUM(queued), 0) AS n FROM queue_priorities) \
             INSERT INTO conversations (id, uid, idempotency_key, language, status, segments, \
               segment_count, created_at_ms, finished_at_ms, queue_seq, priority, queue_tag, \
               traceparent, tracestate, owner, lease_expires_at_ms, generation) \
             SELECT $1, $2, $3, $4, 'processing', $5, $6, $7, $7, 0, $8, 0, $9, $10, $11, \
               {at} + $13::BIGINT, $14 \
             FROM waiting WHERE n = 0 \
             ON CONFLICT (uid, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
        ))
        .await
        .map_err(unavailable)?;
    let inserted = client
        .execute(
            &statement,
            &[
                &new.id,
                &new.uid,
                &new.idempotency_key,
                &new.language,
                &encode_segments(&new.segments),
                &(new.segments.len() as i64),
                &new.now_ms,
                &new.priority.as_i64(),
                &stored(&new.trace.traceparent),
                &stored(&new.trace.tracestate),
                &lease.owner,
                &Now::Store.param(),
                &lease.lease_ms,
                &CLAIMED_AT_SUBMIT,
            ],
        )
        .await
        .map_err(unavailable)?;
    Ok(inserted == 1)
}

/// The conversation already stored under `new`'s (uid, idempotency_key), if any.
async fn existing_submit(
    client: &impl tokio_postgres::GenericClient,
    new: &NewConversation,
) -> Result<Option<Submitted>, StoreError> {
    if new.idempotency_key.is_none() {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT id, status FROM conversations WHERE uid = $1 AND idempotency_key = $2",
            &[&new.uid, &new.idempotency_key],
        )
        .await
        .map_err(unavailable)?;
    row.map(|row| {
        let (id, status) = read_id_and_status(&row)?;
        Ok(Submitted {
            id,
            status,
            created: false,
            claimed: None,
        })
    })
    .transpose()
}
