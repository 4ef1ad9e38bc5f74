-- Servers sharing the database learn of each other's writes at once: every statement that
-- appends change-feed events sends NOTIFY sigil_events within the writing transaction. Postgres
-- delivers it only when that transaction commits (never for one rolled back) and folds identical
-- notifications of one transaction into one. The payload is empty: a listener reads the events
-- from the feed itself, so a lost notification costs latency, never a change (the poll remains).
CREATE FUNCTION sigil_notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sigil_events', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE PROCEDURE sigil_notify_events();
