-- Fair scheduling and admission.
--
-- Start-time fair queueing per priority: every uid has a finish tag per priority
-- (queue_uids.finish) and every priority a virtual time (queue_priorities.vtime, the highest
-- tag claimed so far). A conversation entering PROCESSING gets the start tag
-- max(vtime, its uid's finish) and its uid's finish becomes tag + 1; claims go in
-- (priority, queue_tag, queue_seq) order, so uids take turns and each uid stays FIFO.
-- queued_at_ms is set while the row waits for its first claim (NULL once claimed); the
-- counters of such rows per uid and per priority are kept in the same transactions, so
-- admission (--max-queued, --max-queued-per-uid) reads two small rows, never a count.
ALTER TABLE conversations ADD COLUMN priority INTEGER NOT NULL DEFAULT 0; -- 0 interactive, 1 bulk
ALTER TABLE conversations ADD COLUMN queue_tag INTEGER NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN queued_at_ms INTEGER;
-- Set by each claim: how long the row had waited for it (NULL when claimed again). The claim
-- returns it; SQLite's RETURNING sees only the new values, so queued_at_ms is gone by then.
ALTER TABLE conversations ADD COLUMN queue_wait_ms INTEGER;

-- Rows queued before this migration: unclaimed ones wait, and each uid's keep their order.
UPDATE conversations SET queued_at_ms = COALESCE(finished_at_ms, created_at_ms)
    WHERE status = 'processing' AND owner IS NULL;
UPDATE conversations SET queue_tag = ranked.tag
    FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY uid ORDER BY queue_seq) - 1 AS tag
          FROM conversations WHERE status = 'processing') AS ranked
    WHERE conversations.id = ranked.id;

-- next_seq replaces queue_counter: one row update per enqueue gives the count, the virtual
-- time and the queue order (queue_seq only orders rows of one priority and tag).
CREATE TABLE queue_priorities (
    priority INTEGER PRIMARY KEY,
    vtime    INTEGER NOT NULL,  -- highest start tag claimed
    queued   INTEGER NOT NULL,  -- rows waiting for their first claim
    next_seq INTEGER NOT NULL   -- the last queue_seq given out
);
INSERT INTO queue_priorities (priority, vtime, queued, next_seq)
    SELECT 0, 0, COUNT(queued_at_ms), (SELECT next FROM queue_counter)
    FROM conversations WHERE status = 'processing';
INSERT INTO queue_priorities (priority, vtime, queued, next_seq)
    SELECT 1, 0, 0, next FROM queue_counter;
DROP TABLE queue_counter;

-- One row per uid and priority with rows waiting; deleted when its count reaches 0.
CREATE TABLE queue_uids (
    uid      TEXT NOT NULL,
    priority INTEGER NOT NULL,
    queued   INTEGER NOT NULL,
    finish   INTEGER NOT NULL,  -- start tag of the uid's next conversation, at least
    PRIMARY KEY (uid, priority)
);
INSERT INTO queue_uids (uid, priority, queued, finish)
    SELECT uid, 0, COUNT(queued_at_ms), COUNT(*) FROM conversations
    WHERE status = 'processing' GROUP BY uid HAVING COUNT(queued_at_ms) > 0;

DROP INDEX conversations_queue;
CREATE INDEX conversations_queue ON conversations (status, priority, queue_tag, queue_seq)
    WHERE status = 'processing';
-- The oldest waiting row per priority (the age gauge).
CREATE INDEX conversations_waiting ON conversations (priority, queued_at_ms)
    WHERE queued_at_ms IS NOT NULL;
