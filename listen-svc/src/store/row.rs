//! Reading result rows, written once for both backends: the columns a [`Conversation`] is
//! read from, and how a conversation, claimed, resumable or (id, status) row becomes values.
//!
//! Columns are read by name through [`RowAccess`], so a query may return them in any order
//! (and PostgreSQL's `c.id` reads as `id`). A missing or mistyped column is
//! [`StoreError::Corrupt`] naming the column, never a panic.

use super::{
    Claimed, Conversation, Resumable, Status, StoreError, decode_deliveries, decode_segments,
    decode_structured,
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

/// A row a claim returned (id, uid, language, segments, finished_at_ms, generation,
/// queue_seq, attempts, traceparent, tracestate): the [`Claimed`] and its place in the queue.
pub(super) fn read_claimed(row: &impl RowAccess) -> Result<(i64, Claimed), StoreError> {
    let id: String = row.value("id")?;
    let claimed = Claimed {
        uid: row.value("uid")?,
        language: row.value("language")?,
        segments: decode_segments(&id, &row.value::<Vec<u8>>("segments")?)?,
        finished_at_ms: row.value("finished_at_ms")?,
        generation: row.value("generation")?,
        attempts: attempts(row)?,
        trace: TraceContext::new(row.value("traceparent")?, row.value("tracestate")?),
        id,
    };
    Ok((row.value("queue_seq")?, claimed))
}

/// Claimed rows oldest queued first (`RETURNING` gives no order).
pub(super) fn in_queue_order(mut claimed: Vec<(i64, Claimed)>) -> Vec<Claimed> {
    claimed.sort_by_key(|(queue_seq, _)| *queue_seq);
    claimed.into_iter().map(|(_, c)| c).collect()
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
