//! SQLite store: one file, WAL mode, `synchronous=FULL` (a returned submit survives a crash
//! or power loss).
//!
//! - **Writes** go to one writer thread over a bounded channel (`WRITE_QUEUE` operations; a
//!   caller waits for room when full). The thread takes whatever has queued, up to
//!   `MAX_BATCH`, and runs it in one transaction: group commit with no artificial wait. Each
//!   operation runs in its own savepoint, so one failing operation does not undo the others,
//!   and no caller hears "done" before the commit.
//! - **Reads** run on `spawn_blocking` with a pool of read connections (WAL readers do not
//!   block the writer).
//! - **Checkpoints** run on their own thread (PASSIVE, every `CHECKPOINT_INTERVAL`). When the
//!   WAL passes `WAL_RESTART_FRAMES`, the writer rewinds it between two batches (RESTART), so
//!   the file is reused instead of growing without bound under sustained writes;
//!   automatic checkpoints are off on the writer so its commits never pay for them.

use super::list::{Arg, Placeholders, list_query};
use super::queue::{RECONCILE_SQL, start_tag};
use super::row::{
    CLAIMED_COLUMNS, COLUMNS, ClaimKey, ClaimTally, in_claim_order, read_claimed,
    read_conversation, read_id_and_status, read_resumable, without_keys,
};
use super::{
    Admission, CLAIMED_AT_SUBMIT, ClaimOrder, Claimed, Completion, Conversation, ConversationStore,
    ListFilter, NewConversation, NewLive, Now, Priority, QueueFull, QueueStats, Resumable,
    RetryOutcome, Status, StoreError, Submitted, encode_deliveries, encode_segments, has_text,
    stored,
};
use prost::Message;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use shared::proto::listen::v1 as api;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

const WRITE_QUEUE: usize = 4096;
const MAX_BATCH: usize = 512;
const READ_POOL: usize = 8;
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);
/// WAL size (in frames, 4 KiB pages) past which the checkpoint thread makes SQLite rewind it.
const WAL_RESTART_FRAMES: i64 = 4_096;
/// Size the WAL file is cut back to after a rewind.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_conversations.sql"),
    include_str!("../../migrations/sqlite/0002_live_conversations.sql"),
    include_str!("../../migrations/sqlite/0003_deliveries.sql"),
    include_str!("../../migrations/sqlite/0004_partial_indexes.sql"),
    include_str!("../../migrations/sqlite/0005_fair_queue.sql"),
    include_str!("../../migrations/sqlite/0006_trace_context.sql"),
];

/// The next unowned (or lease-expired) PROCESSING rows in fair order, with `$filter` (a
/// priority) if any: one scan of `conversations_queue`.
///
/// `LIMIT +?2`, not `LIMIT ?2`: SQLite plans a bare parameter limit with its value and
/// re-compiles the statement whenever the value changes (every claim: it is the number of
/// free slots). The unary plus makes it an expression.
macro_rules! pick_sql {
    ($filter:literal) => {
        concat!(
            "SELECT id, queued_at_ms FROM conversations \
             WHERE status = 'processing' AND (owner IS NULL OR lease_expires_at_ms < ?1) ",
            $filter,
            " ORDER BY priority, queue_tag, queue_seq LIMIT +?2"
        )
    };
}
const PICK_SQL: &str = pick_sql!("");
const PICK_BULK_SQL: &str = pick_sql!("AND priority = 1");
/// What an enqueue of uid ?1 at priority ?2 decides by: the queued counts (all, and the
/// uid's) and the uid's finish tag.
const QUEUE_STATE_SQL: &str = "SELECT \
     (SELECT COALESCE(SUM(queued), 0) FROM queue_priorities), \
     (SELECT COALESCE(SUM(queued), 0) FROM queue_uids WHERE uid = ?1), \
     (SELECT finish FROM queue_uids WHERE uid = ?1 AND priority = ?2)";
/// Per priority: rows waiting for their first claim, and when the oldest began to wait.
const QUEUE_STATS_SQL: &str = "SELECT p.queued, \
     (SELECT MIN(queued_at_ms) FROM conversations \
      WHERE queued_at_ms IS NOT NULL AND priority = p.priority) AS oldest \
     FROM queue_priorities p WHERE p.priority = ?1";
/// The newest IN_PROGRESS conversation of ?1 whose deadline has not passed.
const RESUMABLE_SQL: &str = "SELECT id, segment_count, length(segments) AS segment_bytes, \
     deadline_ms - ?2 AS remaining_ms \
     FROM conversations \
     WHERE uid = ?1 AND status = 'in_progress' AND deadline_ms >= ?2 \
     ORDER BY id DESC LIMIT 1";
/// IN_PROGRESS conversations whose deadline passed, earliest first.
const EXPIRED_SQL: &str = "SELECT id FROM conversations \
     WHERE status = 'in_progress' AND deadline_ms < ?1 ORDER BY deadline_ms LIMIT +?2";
const COUNT_PROCESSING_SQL: &str = "SELECT COUNT(*) FROM conversations WHERE status = 'processing'";

/// Runs inside the write transaction; returns what to tell the caller once the commit's
/// outcome is known.
type WriteOp = Box<dyn FnOnce(&Connection) -> Reply + Send>;
type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;

pub(crate) struct SqliteStore {
    writes: mpsc::Sender<WriteOp>,
    readers: Arc<ReadPool>,
    /// Dropping this stops the checkpoint thread.
    _checkpointer: std::sync::mpsc::Sender<()>,
}

struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let mut writer = open_connection(path, true)?;
        migrate(&mut writer)?;
        let tx = writer.transaction().map_err(unavailable)?;
        let corrected = reconcile_queue(&tx)?;
        tx.commit().map_err(unavailable)?;
        super::queue::report_reconciled(corrected);
        // The writer never checkpoints; the checkpoint thread does.
        writer
            .pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
            .map_err(unavailable)?;
        writer
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(unavailable)?;

        // Set by the checkpoint thread when the WAL should be rewound; done by the writer.
        let restart = Arc::new(AtomicBool::new(false));
        let writer_restart = Arc::clone(&restart);
        let (writes, rx) = mpsc::channel(WRITE_QUEUE);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || write_loop(writer, rx, writer_restart))
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer thread: {e}")))?;

        let checkpoint_conn = open_connection(path, true)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpoint_conn, stopped, restart))
            .map_err(|e| StoreError::Unavailable(format!("cannot start checkpoint thread: {e}")))?;

        Ok(SqliteStore {
            writes,
            readers: Arc::new(ReadPool {
                path: path.to_path_buf(),
                idle: Mutex::new(Vec::new()),
            }),
            _checkpointer: stop,
        })
    }

    /// Runs `op` in the next group-commit transaction, in a savepoint of its own (so a failing
    /// operation undoes only its own writes), and returns its result once committed.
    async fn write<R: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.write_with(true, op).await
    }

    /// As [`Self::write`], for an `op` that writes with **one statement at most**, its last:
    /// SQLite undoes a failing statement's changes by itself, so it needs no savepoint.
    /// (A savepoint per operation copies every page the operation touches into the savepoint
    /// journal: about 5 % of listen's CPU end to end. Completions and most Submits take
    /// this path.)
    async fn write_statement<R: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.write_with(false, op).await
    }

    async fn write_with<R: Send + 'static>(
        &self,
        savepoint: bool,
        op: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (tx, rx) = oneshot::channel();
        let op: WriteOp = Box::new(move |conn| {
            let result = if savepoint {
                in_savepoint(conn, op)
            } else {
                op(conn)
            };
            Box::new(move |commit_error: Option<&StoreError>| {
                let outcome = match commit_error {
                    None => result,
                    Some(error) => Err(StoreError::Unavailable(error.to_string())),
                };
                let _ = tx.send(outcome);
            })
        });
        self.writes
            .send(op)
            .await
            .map_err(|_| StoreError::Unavailable("the store writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the store writer stopped mid-write".into()))?
    }

    /// Runs `op` on a pooled read connection off the runtime.
    async fn read<R: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let pool = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || {
            let conn = match pool.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
                Some(conn) => conn,
                None => open_connection(&pool.path, false)?,
            };
            let result = op(&conn);
            let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < READ_POOL {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?
    }
}

fn open_connection(path: &Path, write: bool) -> Result<Connection, StoreError> {
    let flags = if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(unavailable)?;
    if write {
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(unavailable)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unavailable(format!(
                "cannot enable WAL mode (got {mode})"
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(unavailable)?;
        // Savepoint journals in memory, not in temporary files (one per operation).
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(unavailable)?;
        // Every statement the writer runs stays prepared.
        conn.set_prepared_statement_cache_capacity(64);
    }
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(unavailable)?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Unavailable(format!(
            "database schema version {version} is newer than this listen-svc understands ({known}); \
             run a newer listen-svc"
        )));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(unavailable)?;
        tx.execute_batch(sql).map_err(unavailable)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)
            .map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        debug!(version = index + 1, "applied migration");
    }
    Ok(())
}

/// Runs [`RECONCILE_SQL`] in the caller's transaction; returns the corrections.
fn reconcile_queue(conn: &Connection) -> Result<u64, StoreError> {
    let mut corrected = 0;
    for sql in RECONCILE_SQL {
        corrected += conn.execute(sql, []).map_err(unavailable)? as u64;
    }
    Ok(corrected)
}

fn write_loop(conn: Connection, mut rx: mpsc::Receiver<WriteOp>, restart: Arc<AtomicBool>) {
    let mut batch: Vec<WriteOp> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let replies: Vec<Reply>;
        let commit = match run_cached(&conn, "BEGIN IMMEDIATE") {
            Ok(()) => {
                // Some errors (a full disk, I/O, out of memory) make SQLite roll the whole
                // transaction back. The operations after it are then not run (dropped, their
                // callers get Unavailable) rather than run outside the transaction and
                // committed one by one; the COMMIT then fails for the ones before.
                replies = batch
                    .drain(..)
                    .filter_map(|op| (!conn.is_autocommit()).then(|| op(&conn)))
                    .collect();
                run_cached(&conn, "COMMIT").map_err(unavailable)
            }
            Err(error) => {
                replies = batch
                    .drain(..)
                    .map(|_| -> Reply { Box::new(|_| {}) })
                    .collect();
                Err(unavailable(error))
            }
        };
        if let Err(error) = &commit {
            error!(%error, batch = replies.len(), "store commit failed");
            let _ = conn.execute_batch("ROLLBACK");
        }
        for reply in replies {
            reply(commit.as_ref().err());
        }
        if restart.swap(false, Ordering::Relaxed) {
            // Outside any transaction, with the replies already sent.
            if let Err(error) = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(())) {
                warn!(%error, "WAL restart failed; will retry");
            }
        }
    }
    debug!("store writer stopped");
}

/// Runs `op` in a savepoint: on error its writes are undone and the rest of the batch stands.
fn in_savepoint<R>(
    conn: &Connection,
    op: impl FnOnce(&Connection) -> Result<R, StoreError>,
) -> Result<R, StoreError> {
    run_cached(conn, "SAVEPOINT op").map_err(unavailable)?;
    let result = op(conn);
    if result.is_err() {
        run_cached(conn, "ROLLBACK TO op").map_err(unavailable)?;
    }
    run_cached(conn, "RELEASE op").map_err(unavailable)?;
    result
}

/// Runs a statement without results from the connection's statement cache (these run
/// several times per operation; parsing them each time was a measurable share of a Submit).
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn checkpoint_loop(
    conn: Connection,
    stop: std::sync::mpsc::Receiver<()>,
    restart: Arc<AtomicBool>,
) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        stop.recv_timeout(CHECKPOINT_INTERVAL)
    {
        // (busy, frames in the WAL, frames copied back) for PASSIVE, which never blocks.
        let passive = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        });
        match passive {
            // Under sustained writes a PASSIVE checkpoint never catches up, so SQLite never
            // rewinds the WAL and it grows without bound (measured: 540 MiB after 30 000
            // submits). Past the threshold, ask the writer to rewind it between two batches:
            // it holds the write lock anyway, and PASSIVE has already copied most frames.
            Ok((_, frames)) if frames > WAL_RESTART_FRAMES => {
                restart.store(true, Ordering::Relaxed)
            }
            Ok(_) => {}
            Err(error) => warn!(%error, "WAL checkpoint failed"),
        }
    }
    // Last one on the way out, so a clean stop leaves a small WAL.
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}

fn unavailable(error: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

fn get_conversation(conn: &Connection, id: &str) -> Result<Option<Conversation>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM conversations WHERE id = ?1"
        ))
        .map_err(unavailable)?;
    let mut rows = stmt.query(params![id]).map_err(unavailable)?;
    match rows.next().map_err(unavailable)? {
        Some(row) => read_conversation(row).map(Some),
        None => Ok(None),
    }
}

/// IN_PROGRESS -> PROCESSING (interactive) or DISCARDED. `finished_at_ms` None means "at
/// its deadline". Beyond `admission`'s bounds nothing changes.
fn finish_one(
    conn: &Connection,
    id: &str,
    finished_at_ms: Option<i64>,
    admission: Admission,
) -> Result<Result<Option<Status>, QueueFull>, StoreError> {
    let live: Option<(String, bool)> = conn
        .prepare_cached(
            "SELECT uid, has_text FROM conversations WHERE id = ?1 AND status = 'in_progress'",
        )
        .map_err(unavailable)?
        .query_row(params![id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
        .map_err(unavailable)?;
    let Some((uid, has_text)) = live else {
        return Ok(Ok(None));
    };
    let (status, queued) = if has_text {
        match enqueue(conn, &uid, Priority::Interactive, admission)? {
            Ok(place) => (Status::Processing, Some(place)),
            Err(full) => return Ok(Err(full)),
        }
    } else {
        (Status::Discarded, None)
    };
    conn.prepare_cached(
        "UPDATE conversations SET status = ?2, queue_seq = ?3, queue_tag = COALESCE(?4, 0), \
           priority = 0, queued_at_ms = ?5, finished_at_ms = COALESCE(?6, deadline_ms), \
           deadline_ms = NULL \
         WHERE id = ?1 AND status = 'in_progress'",
    )
    .map_err(unavailable)?
    .execute(params![
        id,
        status.as_str(),
        queued.map(|q| q.seq),
        queued.map(|q| q.tag),
        queued.map(|q| q.at_ms),
        finished_at_ms
    ])
    .map_err(unavailable)?;
    Ok(Ok(Some(status)))
}

/// Where an enqueued conversation goes: its start tag, queue order and enqueue time.
#[derive(Clone, Copy)]
struct Place {
    tag: i64,
    seq: i64,
    at_ms: i64,
}

/// Counts a conversation of `uid` into the queue and returns its place, or refuses it
/// beyond `admission`'s bounds, writing nothing. Three statements: the state it decides by,
/// the priority's row (count, queue order, virtual time) and the uid's row.
fn enqueue(
    conn: &Connection,
    uid: &str,
    priority: Priority,
    admission: Admission,
) -> Result<Result<Place, QueueFull>, StoreError> {
    let priority = priority.as_i64();
    let (total, mine, finish): (i64, i64, Option<i64>) = conn
        .prepare_cached(QUEUE_STATE_SQL)
        .map_err(unavailable)?
        .query_row(params![uid, priority], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .map_err(unavailable)?;
    if let Err(full) = admission.admit(uid, total.max(0) as u64, mine.max(0) as u64) {
        return Ok(Err(full));
    }
    let (vtime, seq): (i64, i64) = conn
        .prepare_cached(
            "UPDATE queue_priorities SET queued = queued + 1, next_seq = next_seq + 1 \
             WHERE priority = ?1 RETURNING vtime, next_seq",
        )
        .map_err(unavailable)?
        .query_row(params![priority], |row| Ok((row.get(0)?, row.get(1)?)))
        .map_err(unavailable)?;
    let tag = start_tag(vtime, finish);
    conn.prepare_cached(
        "INSERT INTO queue_uids (uid, priority, queued, finish) VALUES (?1, ?2, 1, ?3) \
         ON CONFLICT (uid, priority) DO UPDATE SET queued = queued + 1, finish = excluded.finish",
    )
    .map_err(unavailable)?
    .execute(params![uid, priority, tag + 1])
    .map_err(unavailable)?;
    Ok(Ok(Place {
        tag,
        seq,
        at_ms: Now::Store.in_process(),
    }))
}

/// The claim of what `pick` selects (?1 now, ?2 limit), leased to ?3 until ?4. One
/// statement: the SET expressions read the old row, so queue_wait_ms is the wait since
/// queued_at_ms (NULL when the row was claimed before).
fn claim_sql(pick: &str) -> String {
    format!(
        "UPDATE conversations SET owner = ?3, lease_expires_at_ms = ?4, \
         generation = generation + 1, queue_wait_ms = ?1 - queued_at_ms, queued_at_ms = NULL \
         WHERE id IN (SELECT id FROM ({pick})) \
         RETURNING {CLAIMED_COLUMNS}, queue_wait_ms"
    )
}

/// Claims up to `limit` rows that `pick` (one of the pick statements) selects.
fn claim_picked(
    conn: &Connection,
    pick: &str,
    owner: &str,
    now_ms: i64,
    lease_until_ms: i64,
    limit: usize,
) -> Result<Vec<(ClaimKey, Claimed)>, StoreError> {
    let mut stmt = conn.prepare_cached(&claim_sql(pick)).map_err(unavailable)?;
    let mut rows = stmt
        .query(params![now_ms, limit as i64, owner, lease_until_ms])
        .map_err(unavailable)?;
    let mut claimed = Vec::new();
    while let Some(row) = rows.next().map_err(unavailable)? {
        let (key, mut claimed_row) = read_claimed(row)?;
        claimed_row.waited_ms = row
            .get::<_, Option<i64>>("queue_wait_ms")
            .map_err(unavailable)?
            .map(|ms| ms.max(0));
        claimed.push((key, claimed_row));
    }
    Ok(in_claim_order(claimed))
}

/// Inserts a new conversation: queued at `place`, leased as `lease` (owner, lease end), or
/// neither (DISCARDED). One statement.
fn insert_conversation(
    conn: &Connection,
    new: &NewConversation,
    place: Option<Place>,
    lease: Option<(&str, i64)>,
) -> Result<(), StoreError> {
    conn.prepare_cached(
                "INSERT INTO conversations (id, uid, idempotency_key, language, status, segments, \
                 segment_count, created_at_ms, finished_at_ms, queue_seq, priority, queue_tag, \
                 queued_at_ms, traceparent, tracestate, owner, lease_expires_at_ms, generation) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, COALESCE(?9, 0), ?10, COALESCE(?11, 0), \
                         ?12, ?13, ?14, ?15, ?16, ?17)",
            )
            .map_err(unavailable)?
            .execute(params![
                new.id,
                new.uid,
                new.idempotency_key,
                new.language,
                new.status.as_str(),
                encode_segments(&new.segments),
                new.segments.len() as i64,
                new.now_ms,
                place.map(|p| p.seq),
                new.priority.as_i64(),
                place.map(|p| p.tag),
                place.map(|p| p.at_ms),
                stored(&new.trace.traceparent),
                stored(&new.trace.tracestate),
        lease.map(|(owner, _)| owner),
        lease.map(|(_, until)| until),
        if lease.is_some() { CLAIMED_AT_SUBMIT } else { 0 },
    ])
    .map(|_| ())
    .map_err(unavailable)
}

/// Whether no conversation waits for its first claim, in any priority (so one claimed at
/// submit overtakes nobody).
fn nothing_queued(conn: &Connection) -> Result<bool, StoreError> {
    conn.prepare_cached("SELECT COALESCE(SUM(queued), 0) FROM queue_priorities")
        .map_err(unavailable)?
        .query_row([], |row| row.get::<_, i64>(0))
        .map(|queued| queued <= 0)
        .map_err(unavailable)
}

/// Takes what a claim tallied out of the queue's counters and moves the virtual times.
fn take_from_queue(conn: &Connection, tally: &ClaimTally) -> Result<(), StoreError> {
    for ((uid, priority), n) in &tally.uids {
        let left: Option<i64> = conn
            .prepare_cached(
                "UPDATE queue_uids SET queued = queued - ?3 WHERE uid = ?1 AND priority = ?2 \
                 RETURNING queued",
            )
            .map_err(unavailable)?
            .query_row(params![uid, priority, n], |row| row.get(0))
            .optional()
            .map_err(unavailable)?;
        if left.is_some_and(|left| left <= 0) {
            conn.prepare_cached("DELETE FROM queue_uids WHERE uid = ?1 AND priority = ?2")
                .map_err(unavailable)?
                .execute(params![uid, priority])
                .map_err(unavailable)?;
        }
    }
    for (priority, (n, tag)) in &tally.priorities {
        conn.prepare_cached(
            "UPDATE queue_priorities SET queued = queued - ?2, vtime = MAX(vtime, ?3) \
             WHERE priority = ?1",
        )
        .map_err(unavailable)?
        .execute(params![priority, n, tag])
        .map_err(unavailable)?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl ConversationStore for SqliteStore {
    async fn submit(
        &self,
        new: NewConversation,
        admission: Admission,
    ) -> Result<Result<Submitted, QueueFull>, StoreError> {
        self.write_statement(move |conn| {
            if let Some(key) = &new.idempotency_key {
                let existing = conn
                    .prepare_cached(
                        "SELECT id, status FROM conversations WHERE uid = ?1 AND idempotency_key = ?2",
                    )
                    .map_err(unavailable)?
                    .query_row(params![new.uid, key], |r| Ok(read_id_and_status(r)))
                    .optional()
                    .map_err(unavailable)?
                    .transpose()?;
                if let Some((id, status)) = existing {
                    return Ok(Ok(Submitted { id, status, created: false, claimed: None }));
                }
            }
            let lease = match &new.lease {
                Some(lease) if new.status == Status::Processing && nothing_queued(conn)? => {
                    let now_ms = Now::Store.in_process();
                    Some((lease.owner.as_str(), now_ms.saturating_add(lease.lease_ms)))
                }
                _ => None,
            };
            match new.status {
                // Several writes (the counters, then the row): in a savepoint of their own.
                Status::Processing if lease.is_none() => in_savepoint(conn, |conn| {
                    let place = match enqueue(conn, &new.uid, new.priority, admission)? {
                        Ok(place) => place,
                        Err(full) => return Ok(Err(full)),
                    };
                    insert_conversation(conn, &new, Some(place), None)?;
                    Ok(Ok(Submitted { id: new.id.clone(), status: new.status, created: true, claimed: None }))
                }),
                _ => {
                    insert_conversation(conn, &new, None, lease)?;
                    Ok(Ok(match lease {
                        Some(_) => new.into_submitted_claim(),
                        None => Submitted { id: new.id, status: new.status, created: true, claimed: None },
                    }))
                }
            }
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        let id = id.to_string();
        self.read(move |conn| get_conversation(conn, &id)).await
    }

    async fn list(&self, filter: ListFilter) -> Result<Vec<Conversation>, StoreError> {
        self.read(move |conn| {
            let (sql, args) = list_query(filter, Placeholders::Question);
            let args = args.into_iter().map(|arg| match arg {
                Arg::Text(text) => rusqlite::types::Value::Text(text),
                Arg::Int(n) => rusqlite::types::Value::Integer(n),
            });
            let mut stmt = conn.prepare_cached(&sql).map_err(unavailable)?;
            let mut rows = stmt
                .query(rusqlite::params_from_iter(args))
                .map_err(unavailable)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(unavailable)? {
                out.push(read_conversation(row)?);
            }
            Ok(out)
        })
        .await
    }

    async fn retry(&self, id: &str) -> Result<RetryOutcome, StoreError> {
        let id = id.to_string();
        self.write(move |conn| {
            let Some(current) = get_conversation(conn, &id)? else {
                return Ok(RetryOutcome::NotFound);
            };
            if current.status != Status::Failed {
                return Ok(RetryOutcome::NotFailed(current.status));
            }
            let priority: i64 = conn
                .prepare_cached("SELECT priority FROM conversations WHERE id = ?1")
                .map_err(unavailable)?
                .query_row(params![id], |row| row.get(0))
                .map_err(unavailable)?;
            let priority = Priority::from_stored(&id, priority)?;
            let Ok(place) = enqueue(conn, &current.uid, priority, Admission::Always)? else {
                return Err(StoreError::Corrupt(
                    "an unbounded enqueue was refused".into(),
                ));
            };
            conn.prepare_cached(
                "UPDATE conversations SET status = 'processing', queue_seq = ?2, queue_tag = ?3, \
                 generation = generation + 1, \
                 queued_at_ms = ?4, owner = NULL, lease_expires_at_ms = NULL, last_error = NULL \
                 WHERE id = ?1 AND status = 'failed'",
            )
            .map_err(unavailable)?
            .execute(params![id, place.seq, place.tag, place.at_ms])
            .map_err(unavailable)?;
            let updated = get_conversation(conn, &id)?
                .ok_or_else(|| StoreError::Corrupt(format!("{id} vanished during retry")))?;
            Ok(RetryOutcome::Retried(Box::new(updated)))
        })
        .await
    }

    async fn claim(
        &self,
        owner: &str,
        now: Now,
        lease_ms: i64,
        limit: usize,
        order: ClaimOrder,
    ) -> Result<Vec<Claimed>, StoreError> {
        let owner = owner.to_string();
        self.write(move |conn| {
            let now_ms = now.in_process();
            let lease_until_ms = now_ms.saturating_add(lease_ms);
            let mut claimed = Vec::new();
            if order == ClaimOrder::BulkFirst {
                claimed = claim_picked(conn, PICK_BULK_SQL, &owner, now_ms, lease_until_ms, limit)?;
            }
            let rest = limit - claimed.len();
            if rest > 0 {
                claimed.extend(claim_picked(
                    conn,
                    PICK_SQL,
                    &owner,
                    now_ms,
                    lease_until_ms,
                    rest,
                )?);
            }
            take_from_queue(conn, &ClaimTally::of(&claimed))?;
            Ok(without_keys(claimed))
        })
        .await
    }

    async fn release(&self, owner: &str) -> Result<u64, StoreError> {
        let owner = owner.to_string();
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE conversations SET owner = NULL, lease_expires_at_ms = NULL \
                 WHERE owner = ?1 AND status = 'processing'",
            )
            .map_err(unavailable)?
            .execute(params![owner])
            .map(|n| n as u64)
            .map_err(unavailable)
        })
        .await
    }

    async fn renew(
        &self,
        owner: &str,
        ids: Vec<String>,
        now: Now,
        lease_ms: i64,
    ) -> Result<u64, StoreError> {
        let owner = owner.to_string();
        self.write(move |conn| {
            let lease_until_ms = now.in_process().saturating_add(lease_ms);
            let mut renew = conn
                .prepare_cached(
                    "UPDATE conversations SET lease_expires_at_ms = ?3 \
                     WHERE id = ?1 AND owner = ?2 AND status = 'processing'",
                )
                .map_err(unavailable)?;
            let mut renewed = 0;
            for id in &ids {
                renewed += renew
                    .execute(params![id, owner, lease_until_ms])
                    .map_err(unavailable)? as u64;
            }
            Ok(renewed)
        })
        .await
    }

    async fn complete(
        &self,
        id: &str,
        generation: i64,
        completion: Completion,
        attempts: u32,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.write_statement(move |conn| {
            conn.prepare_cached(
                "UPDATE conversations SET status = CASE WHEN ?6 THEN 'discarded' ELSE 'completed' END, \
                 structured = ?3, attempts = ?4, completed_at_ms = ?5, deliveries = ?7, last_error = NULL, \
                 owner = NULL, lease_expires_at_ms = NULL \
                 WHERE id = ?1 AND generation = ?2 AND status = 'processing'",
            )
            .map_err(unavailable)?
            .execute(params![
                id,
                generation,
                completion.structured.encode_to_vec(),
                attempts,
                now_ms,
                completion.discarded,
                encode_deliveries(completion.deliveries),
            ])
            .map(|n| n == 1)
            .map_err(unavailable)
        })
        .await
    }

    async fn fail(
        &self,
        id: &str,
        generation: i64,
        reason: &str,
        attempts: u32,
    ) -> Result<bool, StoreError> {
        let (id, reason) = (id.to_string(), reason.to_string());
        self.write_statement(move |conn| {
            conn.prepare_cached(
                "UPDATE conversations SET status = 'failed', last_error = ?3, attempts = ?4, \
                 owner = NULL, lease_expires_at_ms = NULL \
                 WHERE id = ?1 AND generation = ?2 AND status = 'processing'",
            )
            .map_err(unavailable)?
            .execute(params![id, generation, reason, attempts])
            .map(|n| n == 1)
            .map_err(unavailable)
        })
        .await
    }

    async fn reconcile_queue(&self) -> Result<u64, StoreError> {
        self.write(reconcile_queue).await
    }

    async fn count_processing(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            conn.query_row(COUNT_PROCESSING_SQL, [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(unavailable)
        })
        .await
    }

    async fn queue_stats(&self, now: Now) -> Result<[QueueStats; 2], StoreError> {
        self.read(move |conn| {
            let now_ms = now.in_process();
            let mut stats = [QueueStats::default(); 2];
            let mut stmt = conn.prepare_cached(QUEUE_STATS_SQL).map_err(unavailable)?;
            for (priority, stat) in Priority::ALL.into_iter().zip(&mut stats) {
                let (queued, oldest): (i64, Option<i64>) = stmt
                    .query_row(params![priority.as_i64()], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(unavailable)?;
                *stat = QueueStats {
                    queued: queued.max(0) as u64,
                    oldest_age_ms: oldest.map_or(0, |at| (now_ms - at).max(0)),
                };
            }
            Ok(stats)
        })
        .await
    }

    async fn count_status(&self, status: Status, cap: u64) -> Result<u64, StoreError> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT COUNT(*) FROM (SELECT 1 FROM conversations WHERE status = ?1 LIMIT ?2)",
            )
            .map_err(unavailable)?
            .query_row(params![status.as_str(), cap as i64], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(unavailable)
        })
        .await
    }

    async fn start_conversation(&self, new: NewLive) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO conversations (id, uid, language, status, segments, segment_count, \
                 created_at_ms, deadline_ms, timeout_ms, has_text, traceparent, tracestate) \
                 VALUES (?1, ?2, ?3, 'in_progress', x'', 0, ?4, ?4 + ?5, ?5, 0, ?6, ?7)",
            )
            .map_err(unavailable)?
            .execute(params![
                new.id,
                new.uid,
                new.language,
                new.now.in_process(),
                new.timeout_ms,
                stored(&new.trace.traceparent),
                stored(&new.trace.tracestate),
            ])
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    async fn append_segments(
        &self,
        id: &str,
        segments: Vec<api::Segment>,
        now: Now,
    ) -> Result<Option<u64>, StoreError> {
        let id = id.to_string();
        self.write(move |conn| {
            let now_ms = now.in_process();
            conn.prepare_cached(
                "UPDATE conversations SET segments = CAST(segments || ?2 AS BLOB), \
                 segment_count = segment_count + ?3, \
                 has_text = has_text OR ?4, deadline_ms = ?5 + timeout_ms \
                 WHERE id = ?1 AND status = 'in_progress' RETURNING segment_count",
            )
            .map_err(unavailable)?
            .query_row(
                params![
                    id,
                    encode_segments(&segments),
                    segments.len() as i64,
                    has_text(&segments),
                    now_ms
                ],
                |row| row.get::<_, i64>(0),
            )
            .optional()
            .map(|count| count.map(|n| n as u64))
            .map_err(unavailable)
        })
        .await
    }

    async fn finish(
        &self,
        id: &str,
        now: Now,
        admission: Admission,
    ) -> Result<Result<Option<Status>, QueueFull>, StoreError> {
        let id = id.to_string();
        self.write(move |conn| finish_one(conn, &id, Some(now.in_process()), admission))
            .await
    }

    async fn find_resumable(&self, uid: &str, now: Now) -> Result<Option<Resumable>, StoreError> {
        let uid = uid.to_string();
        self.read(move |conn| {
            let now_ms = now.in_process();
            conn.prepare_cached(RESUMABLE_SQL)
                .map_err(unavailable)?
                .query_row(params![uid, now_ms], |row| Ok(read_resumable(row)))
                .optional()
                .map_err(unavailable)?
                .transpose()
        })
        .await
    }

    async fn finish_expired(
        &self,
        now: Now,
        limit: usize,
    ) -> Result<Vec<(String, Status)>, StoreError> {
        self.write(move |conn| {
            let now_ms = now.in_process();
            let ids: Vec<String> = conn
                .prepare_cached(EXPIRED_SQL)
                .map_err(unavailable)?
                .query_map(params![now_ms, limit as i64], |row| row.get(0))
                .map_err(unavailable)?
                .collect::<Result<_, _>>()
                .map_err(unavailable)?;
            let mut finished = Vec::with_capacity(ids.len());
            for id in ids {
                // Finished at its deadline, not at the sweep.
                if let Ok(Some(status)) = finish_one(conn, &id, None, Admission::Always)? {
                    finished.push((id, status));
                }
            }
            Ok(finished)
        })
        .await
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    /// The queue, sweeper and resume queries use their (partial) indexes, and the claim and
    /// sweep never sort a whole status in a temporary b-tree: with 100 000 queued rows that
    /// would be a full scan per claim. (Resume sorts one user's live conversations: a few.)
    #[test]
    fn hot_queries_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_connection(&dir.path().join("plan.db"), true).unwrap();
        migrate(&mut conn).unwrap();
        let (claim, claim_bulk) = (claim_sql(PICK_SQL), claim_sql(PICK_BULK_SQL));
        for (sql, index, may_sort) in [
            (PICK_SQL, "conversations_queue", false),
            (PICK_BULK_SQL, "conversations_queue", false),
            (claim.as_str(), "conversations_queue", false),
            (claim_bulk.as_str(), "conversations_queue", false),
            (COUNT_PROCESSING_SQL, "conversations_queue", false),
            (QUEUE_STATS_SQL, "conversations_waiting", false),
            (EXPIRED_SQL, "conversations_deadline", false),
            (RESUMABLE_SQL, "conversations_live", true),
        ] {
            let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let params = explain.parameter_count();
            let plan: Vec<String> = explain
                .query_map(
                    rusqlite::params_from_iter(std::iter::repeat_n(0, params)),
                    |row| row.get(3),
                )
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let plan = plan.join(" | ");
            assert!(plan.contains(index), "{sql}\n  plan: {plan}");
            assert!(
                may_sort || !plan.contains("TEMP B-TREE"),
                "{sql}\n  plan: {plan}"
            );
        }
    }

    /// The claim and the sweep are compiled once, whatever limits they are run with.
    #[test]
    fn hot_statements_are_not_recompiled_per_run() {
        use rusqlite::StatementStatus;
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_connection(&dir.path().join("prepare.db"), true).unwrap();
        migrate(&mut conn).unwrap();
        let mut claim = conn.prepare(&claim_sql(PICK_SQL)).unwrap();
        let mut expired = conn.prepare(EXPIRED_SQL).unwrap();
        for limit in 1..=5i64 {
            let mut rows = claim.query(params![0, limit, "owner", 1]).unwrap();
            while rows.next().unwrap().is_some() {}
            let mut rows = expired.query(params![0, limit]).unwrap();
            while rows.next().unwrap().is_some() {}
        }
        assert_eq!(claim.get_status(StatementStatus::RePrepare), 0);
        assert_eq!(expired.get_status(StatementStatus::RePrepare), 0);
    }
}

#[cfg(test)]
mod migration_tests {
    use super::*;
    use crate::store::{ClaimOrder, ConversationStore};

    /// A database from before the fair queue (schema 4) with work in flight: after
    /// migration 0005, what waited still waits, what was claimed stays claimed, the counters
    /// match the rows, and uids take turns while each keeps its order.
    #[tokio::test]
    async fn the_fair_queue_migration_keeps_what_waits_and_each_uids_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("schema4.db");
        {
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..4] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 4).unwrap();
            let insert = |id: &str, uid: &str, status: &str, seq: i64, owner: Option<&str>| {
                conn.execute(
                    "INSERT INTO conversations (id, uid, language, status, segments, \
                     segment_count, created_at_ms, queue_seq, owner, lease_expires_at_ms) \
                     VALUES (?1, ?2, 'en', ?3, x'', 0, ?4, ?4, ?5, ?6)",
                    params![id, uid, status, seq, owner, owner.map(|_| i64::MAX)],
                )
                .unwrap();
            };
            insert("c0", "a", "processing", 0, Some("old-listen"));
            insert("c1", "a", "processing", 1, None);
            insert("c2", "a", "processing", 2, None);
            insert("c3", "b", "processing", 3, None);
            insert("c4", "a", "processing", 4, None);
            insert("c5", "a", "completed", 5, None);
            conn.execute("UPDATE queue_counter SET next = 6", [])
                .unwrap();
        }

        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(
            store.reconcile_queue().await.unwrap(),
            0,
            "the migration's counters match its rows"
        );
        let stats = store.queue_stats(Now::Store).await.unwrap();
        assert_eq!((stats[0].queued, stats[1].queued), (4, 0));
        let order: Vec<String> = store
            .claim(
                "new-listen",
                Now::Store,
                30_000,
                10,
                ClaimOrder::InteractiveFirst,
            )
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(
            order,
            ["c3", "c1", "c2", "c4"],
            "b's one first, then a's in order"
        );
    }
}
