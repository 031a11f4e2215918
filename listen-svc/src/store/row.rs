//! Reading result rows, written once for both backends: the columns a [`Conversation`] is
//! read from, and how a conversation, claimed, resumable or (id, status) row becomes values.
//!
//! Columns are read by name through [`RowAccess`], so a query may return them in any order
//! (and PostgreSQL's `c.id` reads as `id`). A missing or mistyped column is
//! [`StoreError::Corrupt`] naming the column, never a panic.

use super::{
    Claimed, Conversation, Priority, Resumable, Status, StoreError, decode_deliveries,
    decode_segments, decode_structured,
};
use shared::telemetry::TraceContext;

/// What a `SELECT` or `RETURNING` of a whole [`Conversation`] lists; read by [`read_conversation`].
pub(super) const COLUMNS: &str = "id, uid, language, status, segments, segment_count, \
                                  structured, attempts, last_error, created_at_ms, \
                                  finished_at_ms, completed_at_ms, deliveries";

/// A value both drivers decode: text, 64-bit integers, blobs, and their `Option`s.
pub(super) trait Value:
    rusqlite::types::FromSql + tokio_postgres::types::FromSqlOwned
{
}

impl<T: rusqlite::types::FromSql + tokio_postgres::types::FromSqlOwned> Value for T {}

/// A result row of either backend, read column by column.
pub(super) trait RowAccess {
    /// The value of `column`; `Corrupt`, naming it, if it is missing or of another type.
    fn value<T: Value>(&self, column: &str) -> Result<T, StoreError>;
}

impl RowAccess for rusqlite::Row<'_> {
    fn value<T: Value>(&self, column: &str) -> Result<T, StoreError> {
        self.get(column).map_err(|e| mistyped(column, e))
    }
}

impl RowAccess for tokio_postgres::Row {
    fn value<T: Value>(&self, column: &str) -> Result<T, StoreError> {
        self.try_get(column).map_err(|e| mistyped(column, e))
    }
}

fn mistyped(column: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("column {column}: {error}"))
}

/// A row of [`COLUMNS`] as a [`Conversation`].
pub(super) fn read_conversation(row: &impl RowAccess) -> Result<Conversation, StoreError> {
    let id: String = row.value("id")?;
    let status: String = row.value("status")?;
    Ok(Conversation {
        uid: row.value("uid")?,
        language: row.value("language")?,
        status: Status::parse_stored(&id, &status)?,
        segments: decode_segments(&id, &row.value::<Vec<u8>>("segments")?)?,
        segment_count: row.value::<i64>("segment_count")?.clamp(0, u32::MAX as i64) as u32,
        structured: decode_structured(&id, row.value("structured")?)?,
        attempts: attempts(row)?,
        last_error: row.value("last_error")?,
        created_at_ms: row.value("created_at_ms")?,
        finished_at_ms: row.value("finished_at_ms")?,
        completed_at_ms: row.value("completed_at_ms")?,
        deliveries: decode_deliveries(&id, row.value("deliveries")?)?,
        id,
    })
}

/// A claimed row's place in claim order: (priority, start tag, queue_seq).
pub(super) type ClaimKey = (i64, i64, i64);

/// The columns a claim returns, read by [`read_claimed`].
pub(super) const CLAIMED_COLUMNS: &str = "id, uid, language, segments, finished_at_ms, \
                                          generation, queue_seq, attempts, priority, queue_tag, \
                                          traceparent, tracestate";

/// A row of [`CLAIMED_COLUMNS`]: the [`Claimed`] (its `waited_ms` for the backend to set)
/// and its place in claim order.
pub(super) fn read_claimed(row: &impl RowAccess) -> Result<(ClaimKey, Claimed), StoreError> {
    let id: String = row.value("id")?;
    let priority: i64 = row.value("priority")?;
    let claimed = Claimed {
        uid: row.value("uid")?,
        language: row.value("language")?,
        segments: decode_segments(&id, &row.value::<Vec<u8>>("segments")?)?,
        finished_at_ms: row.value("finished_at_ms")?,
        generation: row.value("generation")?,
        attempts: attempts(row)?,
        priority: Priority::from_stored(&id, priority)?,
        waited_ms: None,
        trace: TraceContext::new(row.value("traceparent")?, row.value("tracestate")?),
        id,
    };
    let key = (priority, row.value("queue_tag")?, row.value("queue_seq")?);
    Ok((key, claimed))
}

/// Rows one claim statement returned, in claim order (`RETURNING` gives no order).
pub(super) fn in_claim_order(mut claimed: Vec<(ClaimKey, Claimed)>) -> Vec<(ClaimKey, Claimed)> {
    claimed.sort_by_key(|(key, _)| *key);
    claimed
}

/// The claimed rows without their keys.
pub(super) fn without_keys(claimed: Vec<(ClaimKey, Claimed)>) -> Vec<Claimed> {
    claimed.into_iter().map(|(_, c)| c).collect()
}

/// What a claim takes out of the queue's counters: per (uid, priority) the rows claimed for
/// the first time, and per priority those and the highest start tag claimed (the virtual
/// time moves up to it).
#[derive(Debug, Default, PartialEq)]
pub(super) struct ClaimTally {
    pub uids: std::collections::BTreeMap<(String, i64), i64>,
    pub priorities: std::collections::BTreeMap<i64, (i64, i64)>,
}

impl ClaimTally {
    pub(super) fn of(claimed: &[(ClaimKey, Claimed)]) -> ClaimTally {
        let mut tally = ClaimTally::default();
        for ((priority, tag, _), row) in claimed {
            let first = i64::from(row.waited_ms.is_some());
            *tally.uids.entry((row.uid.clone(), *priority)).or_default() += first;
            let entry = tally.priorities.entry(*priority).or_insert((0, *tag));
            entry.0 += first;
            entry.1 = entry.1.max(*tag);
        }
        tally.uids.retain(|_, n| *n > 0);
        tally
    }
}

/// A row of `id, status`: a conversation's id and its status.
pub(super) fn read_id_and_status(row: &impl RowAccess) -> Result<(String, Status), StoreError> {
    let id: String = row.value("id")?;
    let status = Status::parse_stored(&id, &row.value::<String>("status")?)?;
    Ok((id, status))
}

/// A row of `id, segment_count, segment_bytes, remaining_ms` as a [`Resumable`].
pub(super) fn read_resumable(row: &impl RowAccess) -> Result<Resumable, StoreError> {
    Ok(Resumable {
        id: row.value("id")?,
        segment_count: row.value::<i64>("segment_count")? as u64,
        segment_bytes: row.value("segment_bytes")?,
        remaining_ms: row.value("remaining_ms")?,
    })
}

/// Stored as a 64-bit integer; read back clamped into `u32`.
fn attempts(row: &impl RowAccess) -> Result<u32, StoreError> {
    Ok(row.value::<i64>("attempts")?.clamp(0, u32::MAX as i64) as u32)
}
