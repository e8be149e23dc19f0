-- The W3C trace context of the work that wrote an event; the relay sends it as the Kafka
-- header `traceparent`. Nullable: rows written before it existed have none.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS traceparent TEXT;
