-- One delivery per paid order. `next_at` is when the next step is due (NULL once delivered).
CREATE TABLE deliveries (
    id          UUID        PRIMARY KEY,
    order_id    TEXT        NOT NULL UNIQUE,
    user_id     TEXT        NOT NULL,
    status      TEXT        NOT NULL,
    next_at     TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX deliveries_due ON deliveries (next_at) WHERE next_at IS NOT NULL;
