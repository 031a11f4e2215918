-- Conversations and their lifecycle. One row per conversation. Same shape as the SQLite
-- schema; see migrations/sqlite/0001_conversations.sql for the meaning of each column.
CREATE TABLE conversations (
    id                  TEXT PRIMARY KEY,
    uid                 TEXT NOT NULL,
    idempotency_key     TEXT,
    language            TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN
                          ('in_progress', 'processing', 'completed', 'failed', 'discarded')),
    segments            BYTEA NOT NULL,
    segment_count       BIGINT NOT NULL,
    structured          BYTEA,
    attempts            BIGINT NOT NULL DEFAULT 0,
    last_error          TEXT,
    created_at_ms       BIGINT NOT NULL,
    finished_at_ms      BIGINT,
    completed_at_ms     BIGINT,
    queue_seq           BIGINT,
    owner               TEXT,
    lease_expires_at_ms BIGINT,
    generation          BIGINT NOT NULL DEFAULT 0
);

CREATE UNIQUE INDEX conversations_idempotency
    ON conversations (uid, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX conversations_queue ON conversations (status, queue_seq);
CREATE INDEX conversations_uid ON conversations (uid, id);
CREATE INDEX conversations_status ON conversations (status, id);

CREATE SEQUENCE conversations_queue_seq;
