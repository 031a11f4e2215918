-- Live (IN_PROGRESS) conversations fed by Session streams; see the SQLite migration.
ALTER TABLE conversations ADD COLUMN deadline_ms BIGINT;
ALTER TABLE conversations ADD COLUMN timeout_ms BIGINT;
ALTER TABLE conversations ADD COLUMN has_text BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX conversations_deadline ON conversations (status, deadline_ms);
CREATE INDEX conversations_live ON conversations (uid, status, deadline_ms);
