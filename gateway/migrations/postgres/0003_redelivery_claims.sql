-- Migration 3: cluster-wide re-delivery: the last send (any node) and a node's claim on the next
-- one.
ALTER TABLE executions ADD COLUMN last_sent_at BIGINT, ADD COLUMN retry_claimed_until BIGINT;
