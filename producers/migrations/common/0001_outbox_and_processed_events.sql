-- Shared by every service (each in its own database).

-- Transactional outbox: a row is written in the same transaction as the state change it
-- announces; the relay publishes it to Kafka and deletes it. Rows of one key are published one
-- at a time, in id order.
CREATE TABLE outbox (
    id          BIGSERIAL PRIMARY KEY,
    topic       TEXT        NOT NULL,
    key         TEXT        NOT NULL,
    event_id    TEXT        NOT NULL,
    payload     BYTEA       NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX outbox_key_id ON outbox (key, id);

-- Idempotent consumers: a row per (consumer, event id), inserted in the same transaction as the
-- event's effect, so a redelivered event finds its row and changes nothing.
CREATE TABLE processed_events (
    consumer      TEXT        NOT NULL,
    event_id      TEXT        NOT NULL,
    processed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
