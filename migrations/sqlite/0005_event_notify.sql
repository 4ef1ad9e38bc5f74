-- Postgres sends NOTIFY when change-feed events commit (its 0005_event_notify.sql), so servers
-- sharing it learn of each other's writes at once. SQLite has no such thing and serves one server,
-- which sees its own writes as it makes them; the change-feed poll covers the rest. Nothing to do
-- here: the number is kept so both dialects' migrations stay in step.
SELECT 1;
