CREATE TABLE reports (
    id               UUID        PRIMARY KEY,
    reporter_id      TEXT        NOT NULL,
    target_type      TEXT        NOT NULL,
    target_id        TEXT        NOT NULL,
    target_owner_id  TEXT        NOT NULL,
    reason           TEXT        NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One decision per report, by whichever worker took the task.
CREATE TABLE decisions (
    report_id   TEXT        PRIMARY KEY,
    decision    TEXT        NOT NULL,
    rule        TEXT        NOT NULL,
    worker      TEXT        NOT NULL,
    decided_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
