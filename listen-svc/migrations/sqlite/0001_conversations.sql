-- Conversations and their lifecycle. One row per conversation.
CREATE TABLE conversations (
    id                  TEXT PRIMARY KEY,          -- UUIDv7: sorts by creation time
    uid                 TEXT NOT NULL,
    idempotency_key     TEXT,                      -- NULL when the client gave none
    language            TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN
                          ('in_progress', 'processing', 'completed', 'failed', 'discarded')),
    segments            BLOB NOT NULL,             -- protobuf: repeated listen.v1.Segment (field 1)
    segment_count       INTEGER NOT NULL,
    structured          BLOB,                      -- protobuf: listen.v1.Structured
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    created_at_ms       INTEGER NOT NULL,
    finished_at_ms      INTEGER,
    completed_at_ms     INTEGER,
    -- Work queue: order of PROCESSING rows; reassigned on retry so a retried row goes last.
    queue_seq           INTEGER,
    -- Lease: the listen instance sending this row to pusher, until when, and a fencing
    -- generation bumped on every claim. Writes carry the generation they claimed with.
    owner               TEXT,
    lease_expires_at_ms INTEGER,
    generation          INTEGER NOT NULL DEFAULT 0
);

CREATE UNIQUE INDEX conversations_idempotency
    ON conversations (uid, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX conversations_queue ON conversations (status, queue_seq);
CREATE INDEX conversations_uid ON conversations (uid, id);
CREATE INDEX conversations_status ON conversations (status, id);

CREATE TABLE queue_counter (next INTEGER NOT NULL);
INSERT INTO queue_counter (next) VALUES (0);
