-- Sigil's datastore, Postgres dialect. Times are Unix seconds; booleans are 0/1 integers so the
-- same queries run on SQLite and Postgres through sqlx's Any driver.

-- The change feed: every write to entries, agents or bundles appends one event in the same
-- transaction, so in-memory caches follow by reading events after the last id they saw.
CREATE TABLE events (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE entries (
    id TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    -- Sorted `type:value` lines; with spiffe_id and parent_id it identifies an entry uniquely.
    selectors TEXT NOT NULL,
    x509_svid_ttl BIGINT NOT NULL,
    jwt_svid_ttl BIGINT NOT NULL,
    dns_names TEXT NOT NULL,
    federates_with TEXT NOT NULL,
    admin BIGINT NOT NULL,
    downstream BIGINT NOT NULL,
    hint TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    revision BIGINT NOT NULL,
    UNIQUE (spiffe_id, parent_id, selectors)
);
CREATE INDEX entries_parent_id ON entries (parent_id);
CREATE INDEX entries_spiffe_id ON entries (spiffe_id);

CREATE TABLE agents (
    spiffe_id TEXT PRIMARY KEY,
    attestor TEXT NOT NULL,
    selectors TEXT NOT NULL,
    svid_serial TEXT NOT NULL,
    svid_expires_at BIGINT NOT NULL,
    banned BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Join tokens are stored as SHA-256 hashes; `used_at` is set once, atomically, on first use.
CREATE TABLE join_tokens (
    token_hash TEXT PRIMARY KEY,
    alias_spiffe_id TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Trust bundles as SPIFFE bundle JSON documents, one per trust domain.
CREATE TABLE bundles (
    trust_domain TEXT PRIMARY KEY,
    document TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- The CA journal: X.509 authorities and JWT keys, with the key manager's key id (never a key).
CREATE TABLE authorities (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    key_ref TEXT NOT NULL,
    public_data BYTEA NOT NULL,
    state TEXT NOT NULL,
    not_after BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Every SVID the server signed: the audit trail (never a key).
CREATE TABLE issued_svids (
    serial TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    spiffe_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    entry_id TEXT NOT NULL,
    authority_id TEXT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL
);
CREATE INDEX issued_svids_spiffe_id ON issued_svids (spiffe_id);
CREATE INDEX issued_svids_agent_id ON issued_svids (agent_id);
CREATE INDEX issued_svids_not_after ON issued_svids (not_after);
