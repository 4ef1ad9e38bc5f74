-- Federation relationships: which foreign trust domains this server fetches bundles from, and how.
-- The fetched bundles live in `bundles` beside the own one, one row per trust domain.
CREATE TABLE federation_relationships (
    trust_domain TEXT PRIMARY KEY,
    bundle_endpoint_url TEXT NOT NULL,
    -- `https_web` or `https_spiffe`.
    profile TEXT NOT NULL,
    -- For `https_spiffe`: the SPIFFE ID the endpoint must present; empty otherwise.
    endpoint_spiffe_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
