-- Live (IN_PROGRESS) conversations fed by Session streams.
-- deadline_ms: last segment + timeout; past it, the conversation is finished (by its session,
-- or by any instance's sweeper). has_text decides PROCESSING vs DISCARDED at finish.
ALTER TABLE conversations ADD COLUMN deadline_ms INTEGER;
ALTER TABLE conversations ADD COLUMN timeout_ms INTEGER;
ALTER TABLE conversations ADD COLUMN has_text INTEGER NOT NULL DEFAULT 0;
CREATE INDEX conversations_deadline ON conversations (status, deadline_ms);
CREATE INDEX conversations_live ON conversations (uid, status, deadline_ms);
