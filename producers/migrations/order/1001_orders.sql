CREATE TABLE orders (
    id                UUID        PRIMARY KEY,
    user_id           TEXT        NOT NULL,
    status            TEXT        NOT NULL,
    items             JSONB       NOT NULL,
    total_cents       BIGINT      NOT NULL CHECK (total_cents >= 0),
    delivery_address  TEXT        NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX orders_user_created ON orders (user_id, created_at DESC);

-- Every status an order went through, for GET /orders/{id} and for audits.
CREATE TABLE order_status_history (
    order_id    UUID        NOT NULL REFERENCES orders (id),
    status      TEXT        NOT NULL,
    changed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, status)
);
