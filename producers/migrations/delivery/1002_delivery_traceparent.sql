-- The trace context of the payment that created a delivery, so each later step (a separate
-- transaction of the stepper) continues the order's trace.
ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS traceparent TEXT;
