-- The service's own catalogue of ads. A report's target owner is looked up here (for an ad) or
-- is the reported user, never taken from the request.
CREATE TABLE ads (
    id          TEXT        PRIMARY KEY,
    owner_id    TEXT        NOT NULL,
    title       TEXT        NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX ads_by_creation ON ads (created_at DESC);
