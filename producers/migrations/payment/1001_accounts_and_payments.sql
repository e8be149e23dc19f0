-- One balance per user; created on the user's first order with the configured opening balance.
CREATE TABLE accounts (
    user_id        TEXT        PRIMARY KEY,
    balance_cents  BIGINT      NOT NULL CHECK (balance_cents >= 0),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One payment per order, whatever its outcome.
CREATE TABLE payments (
    order_id      TEXT        PRIMARY KEY,
    user_id       TEXT        NOT NULL,
    amount_cents  BIGINT      NOT NULL,
    status        TEXT        NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
