//! PostgreSQL store, for several listen replicas sharing one database.
//!
//! - A pool of at most `POOL_SIZE` connections; a caller waits at most `POOL_WAIT` for one,
//!   then gets `Unavailable` (a stopped server fails Submit fast rather than hanging it).
//! - Each operation is one statement or one transaction; PostgreSQL does the grouping.
//! - Claims use `FOR UPDATE SKIP LOCKED`, so replicas claiming at once never take the same
//!   row and never wait on each other.
//! - Migrations run under an advisory lock, so replicas starting together apply them once.
//! - Connections use TLS as the URL's libpq parameters say (`sslmode`, `sslrootcert`,
//!   `sslcert`, `sslkey`): `url` takes them out of the URL, `tls` connects and explains
//!   failures.

#[cfg(test)]
mod tests;
mod tls;
mod url;

use super::list::{Arg, Placeholders, list_query};
use super::row::{
    COLUMNS, RowAccess, in_queue_order, read_claimed, read_conversation, read_id_and_status,
    read_resumable,
};
use super::{
    Claimed, Completion, Conversation, ConversationStore, ListFilter, NewConversation, NewLive,
    Now, Resumable, RetryOutcome, Status, StoreError, Submitted, encode_deliveries,
    encode_segments, has_text, stored,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use prost::Message;
use shared::proto::listen::v1 as api;
use std::time::Duration;
use tls::{Connector, Endpoint};
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

const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_conversations.sql"),
    include_str!("../../migrations/postgres/0002_live_conversations.sql"),
    include_str!("../../migrations/postgres/0003_deliveries.sql"),
    include_str!("../../migrations/postgres/0004_partial_indexes.sql"),
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

#[async_trait::async_trait]
impl ConversationStore for PostgresStore {
    async fn submit(&self, new: NewConversation) -> Result<Submitted, StoreError> {
        let client = self.client().await?;
        let queued = new.status == Status::Processing;
        let inserted = client
            .query_opt(
                "INSERT INTO conversations (id, uid, idempotency_key, language, status, segments, \
                 segment_count, created_at_ms, finished_at_ms, queue_seq, traceparent, \
                 tracestate) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, \
                         CASE WHEN $9 THEN nextval('conversations_queue_seq') END, $10, $11) \
                 ON CONFLICT (uid, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
                 RETURNING id",
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
                    &stored(&new.trace.traceparent),
                    &stored(&new.trace.tracestate),
                ],
            )
            .await
            .map_err(unavailable)?;
        if inserted.is_some() {
            return Ok(Submitted {
                id: new.id,
                status: new.status,
                created: true,
            });
        }
        let row = client
            .query_one(
                "SELECT id, status FROM conversations WHERE uid = $1 AND idempotency_key = $2",
                &[&new.uid, &new.idempotency_key],
            )
            .await
            .map_err(unavailable)?;
        let (id, status) = read_id_and_status(&row)?;
        Ok(Submitted {
            id,
            status,
            created: false,
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
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE conversations SET status = 'processing', \
                     queue_seq = nextval('conversations_queue_seq'), owner = NULL, \
                     lease_expires_at_ms = NULL, last_error = NULL \
                     WHERE id = $1 AND status = 'failed' RETURNING {COLUMNS}"
                ),
                &[&id],
            )
            .await
            .map_err(unavailable)?;
        if let Some(row) = row {
            return Ok(RetryOutcome::Retried(Box::new(read_conversation(&row)?)));
        }
        let status = client
            .query_opt("SELECT status FROM conversations WHERE id = $1", &[&id])
            .await
            .map_err(unavailable)?;
        Ok(match status {
            None => RetryOutcome::NotFound,
            Some(row) => {
                let status: String = row.value("status")?;
                RetryOutcome::NotFailed(Status::parse_stored(id, &status)?)
            }
        })
    }

    async fn claim(
        &self,
        owner: &str,
        now: Now,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        let at = now_ms_param(2);
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "WITH now AS (SELECT {at} AS ms), picked AS ( \
                       SELECT id FROM conversations \
                       WHERE status = 'processing' \
                         AND (owner IS NULL OR lease_expires_at_ms < (SELECT ms FROM now)) \
                       ORDER BY queue_seq LIMIT $4 \
                       FOR UPDATE SKIP LOCKED) \
                     UPDATE conversations c SET owner = $1, \
                       lease_expires_at_ms = (SELECT ms FROM now) + $3::BIGINT, \
                       generation = c.generation + 1 \
                     FROM picked WHERE c.id = picked.id \
                     RETURNING c.id, c.uid, c.language, c.segments, c.finished_at_ms, \
                       c.generation, c.queue_seq, c.attempts, c.traceparent, c.tracestate"
                ),
                &[&owner, &now.param(), &lease_ms, &(limit as i64)],
            )
            .await
            .map_err(unavailable)?;
        let claimed = rows.iter().map(read_claimed).collect::<Result<_, _>>()?;
        Ok(in_queue_order(claimed))
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
        client
            .execute(
                "UPDATE conversations SET status = CASE WHEN $6 THEN 'discarded' ELSE 'completed' END, \
                 structured = $3, attempts = $4, completed_at_ms = $5, deliveries = $7, last_error = NULL, \
                 owner = NULL, lease_expires_at_ms = NULL \
                 WHERE id = $1 AND generation = $2 AND status = 'processing'",
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

    async fn finish(&self, id: &str, now: Now) -> Result<Option<Status>, StoreError> {
        let at = now_ms_param(2);
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE conversations SET \
                       status = CASE WHEN has_text THEN 'processing' ELSE 'discarded' END, \
                       queue_seq = CASE WHEN has_text THEN nextval('conversations_queue_seq') END, \
                       finished_at_ms = {at}, deadline_ms = NULL \
                     WHERE id = $1 AND status = 'in_progress' RETURNING status"
                ),
                &[&id, &now.param()],
            )
            .await
            .map_err(unavailable)?;
        row.map(|r| {
            let status: String = r.value("status")?;
            Status::parse_stored(id, &status)
        })
        .transpose()
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
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "WITH expired AS ( \
                   SELECT id FROM conversations \
                   WHERE status = 'in_progress' AND deadline_ms < {at} \
                   ORDER BY deadline_ms LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 UPDATE conversations c SET \
                   status = CASE WHEN c.has_text THEN 'processing' ELSE 'discarded' END, \
                   queue_seq = CASE WHEN c.has_text THEN nextval('conversations_queue_seq') END, \
                   finished_at_ms = c.deadline_ms, deadline_ms = NULL \
                 FROM expired WHERE c.id = expired.id RETURNING c.id, c.status"
                ),
                &[&now.param(), &(limit as i64)],
            )
            .await
            .map_err(unavailable)?;
        rows.iter().map(read_id_and_status).collect()
    }
}
