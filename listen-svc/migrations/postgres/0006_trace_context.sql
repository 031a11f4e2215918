-- The W3C trace context (traceparent, tracestate) of the call that created a conversation, so
-- that every send of it, on any listen instance and after any restart, continues that trace.
-- NULL when traces were off.
ALTER TABLE conversations ADD COLUMN traceparent TEXT;
ALTER TABLE conversations ADD COLUMN tracestate TEXT;
