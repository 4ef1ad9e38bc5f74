-- The server instance that holds an authority's private key (its instance id, kept in the
-- server's data directory): every server of a trust domain has its own CA and JWT key in the
-- shared journal, and acts on its own. Rows from before servers were told apart have '' until
-- the server holding their key adopts them.
ALTER TABLE authorities ADD COLUMN owner TEXT NOT NULL DEFAULT '';
