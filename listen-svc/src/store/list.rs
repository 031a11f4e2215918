//! The list query, written once: both backends run the same SQL and differ only in how a
//! placeholder is spelled.

use super::ListFilter;
use super::row::COLUMNS;

/// How a backend numbers its placeholders.
#[derive(Clone, Copy, Debug)]
pub(super) enum Placeholders {
    /// SQLite: `?1`, `?2`, ...
    Question,
    /// PostgreSQL: `$1`, `$2`, ...
    Dollar,
}

impl Placeholders {
    fn nth(self, n: usize) -> String {
        match self {
            Placeholders::Question => format!("?{n}"),
            Placeholders::Dollar => format!("${n}"),
        }
    }

    /// An empty blob literal, read in place of `segments` when they are not wanted.
    fn empty_blob(self) -> &'static str {
        match self {
            Placeholders::Question => "X''",
            Placeholders::Dollar => "''::bytea",
        }
    }
}

/// A bound parameter of the list query, in placeholder order.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Arg {
    Text(String),
    Int(i64),
}

/// The SQL for one page of `filter` (rows of [`COLUMNS`], newest first) and its parameters.
/// Without `with_segments`, the segments column reads as empty and is never loaded.
pub(super) fn list_query(filter: ListFilter, placeholders: Placeholders) -> (String, Vec<Arg>) {
    let columns = if filter.with_segments {
        COLUMNS.to_string()
    } else {
        COLUMNS.replacen(
            "segments,",
            &format!("{} AS segments,", placeholders.empty_blob()),
            1,
        )
    };
    let mut sql = format!("SELECT {columns} FROM conversations WHERE TRUE");
    let mut args = Vec::new();
    let mut bind = |sql: &mut String, condition: &str, arg: Arg| {
        args.push(arg);
        sql.push_str(condition);
        sql.push_str(&placeholders.nth(args.len()));
    };
    if let Some(uid) = filter.uid {
        bind(&mut sql, " AND uid = ", Arg::Text(uid));
    }
    if let Some(status) = filter.status {
        bind(
            &mut sql,
            " AND status = ",
            Arg::Text(status.as_str().to_string()),
        );
    }
    if let Some(before) = filter.before_id {
        bind(&mut sql, " AND id < ", Arg::Text(before));
    }
    bind(
        &mut sql,
        " ORDER BY id DESC LIMIT ",
        Arg::Int(filter.limit as i64),
    );
    (sql, args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Status;

    #[test]
    fn placeholders_follow_the_backend_and_number_only_the_filters_given() {
        let filter = ListFilter {
            uid: Some("u".into()),
            status: None,
            before_id: Some("b".into()),
            limit: 3,
            with_segments: true,
        };
        let (sql, args) = list_query(filter.clone(), Placeholders::Question);
        assert_eq!(
            sql,
            format!(
                "SELECT {COLUMNS} FROM conversations WHERE TRUE AND uid = ?1 AND id < ?2 \
                 ORDER BY id DESC LIMIT ?3"
            )
        );
        assert_eq!(
            args,
            [Arg::Text("u".into()), Arg::Text("b".into()), Arg::Int(3)]
        );
        let (sql, _) = list_query(filter, Placeholders::Dollar);
        assert!(
            sql.ends_with("uid = $1 AND id < $2 ORDER BY id DESC LIMIT $3"),
            "{sql}"
        );

        let (sql, args) = list_query(
            ListFilter {
                status: Some(Status::Failed),
                limit: 1,
                ..Default::default()
            },
            Placeholders::Dollar,
        );
        assert!(sql.ends_with("WHERE TRUE AND status = $1 ORDER BY id DESC LIMIT $2"));
        assert!(
            sql.starts_with(
                "SELECT id, uid, language, status, ''::bytea AS segments, segment_count,"
            ),
            "{sql}"
        );
        assert_eq!(args, [Arg::Text("failed".into()), Arg::Int(1)]);
    }
}
