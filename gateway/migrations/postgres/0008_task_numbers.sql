-- Migration 8 (as SQLite's schema 8): tasks numbered per organization: the API shows the number,
-- so one organization cannot count another's tasks from their ids.
ALTER TABLE tasks ADD COLUMN number BIGINT;
     UPDATE tasks SET number = (SELECT COUNT(*) FROM tasks t2 WHERE t2.org_id = tasks.org_id AND t2.id <= tasks.id);
     CREATE UNIQUE INDEX tasks_org_number ON tasks (org_id, number);
