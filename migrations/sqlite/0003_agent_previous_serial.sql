-- The serial of an agent's SVID before its last renewal. The agent API accepts an agent
-- certificate only with the current or this previous serial (connections made just before a
-- renewal keep working until the agent reconnects); attestation clears it, so a certificate
-- from before an eviction never works again.
ALTER TABLE agents ADD COLUMN previous_svid_serial TEXT NOT NULL DEFAULT '';
