-- The queue, deadline and live-session indexes only ever serve queries for one status
-- (PROCESSING, IN_PROGRESS, IN_PROGRESS). As partial indexes they hold only those rows, so
-- a Submit no longer writes the two IN_PROGRESS ones, and a completion removes a row from
-- the queue index instead of moving it to another status's part of all three. They keep
-- the status column so that SQLite's planner (which has no statistics) still picks them
-- over conversations_status for these queries; store::tests checks the plans.
DROP INDEX conversations_queue;
DROP INDEX conversations_deadline;
DROP INDEX conversations_live;
CREATE INDEX conversations_queue ON conversations (status, queue_seq) WHERE status = 'processing';
CREATE INDEX conversations_deadline ON conversations (status, deadline_ms) WHERE status = 'in_progress';
CREATE INDEX conversations_live ON conversations (uid, status, deadline_ms) WHERE status = 'in_progress';
