//! Issuing: the one door every SVID the server hands out goes through. It signs with the CA,
//! hands the issuance record (which `ca revoke` trusts to know what a CA still has out there) to
//! the recorder and counts the SVID, so no path can sign without recording. What it returns is
//! [`Unrecorded`]: the caller gets the SVID only by awaiting the record, and may sign a whole
//! batch first so the batch's records are written together.

use std::sync::Arc;
use std::time::Duration;

use rcgen::PublicKeyData;
use sigil_core::id::SpiffeId;

use super::sign::Holder;
use super::{Ca, IssuanceRecorder, SignedJwtSvid, SignedX509Svid, Unrecorded};
use crate::Result;
use crate::datastore::IssuedSvid;
use crate::metrics::{Metrics, SvidLabels};

/// Whom an SVID was issued to, as the issuance record keeps it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recipient<'a> {
    /// The agent that asked for it (empty when no agent did).
    pub agent_id: &'a str,
    /// The entry it was issued under, or the API that issued it (`istio-ca`).
    pub entry_id: &'a str,
}

/// Signs, records and counts.
#[derive(Debug, Clone)]
pub struct Issuer {
    ca: Arc<Ca>,
    recorder: IssuanceRecorder,
    metrics: Arc<Metrics>,
}

impl Issuer {
    /// An issuer signing with `ca`, recording to `recorder` and counting in `metrics`.
    pub fn new(ca: Arc<Ca>, recorder: IssuanceRecorder, metrics: Arc<Metrics>) -> Self {
        Issuer {
            ca,
            recorder,
            metrics,
        }
    }

    /// A workload's X509-SVID: never an ID in the reserved `/sigil/` namespace, nor a DNS name
    /// of the server itself.
    pub fn workload_x509(
        &self,
        public_key: &impl PublicKeyData,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
        to: Recipient<'_>,
    ) -> Result<Unrecorded<SignedX509Svid>> {
        let svid =
            self.ca
                .sign_x509_svid(Holder::Workload, public_key, spiffe_id, dns_names, ttl)?;
        Ok(self.record_x509("x509", spiffe_id, svid, to))
    }

    /// An agent's own SVID, valid for `ttl`.
    pub fn agent_x509(
        &self,
        public_key: &impl PublicKeyData,
        agent_id: &SpiffeId,
        ttl: Duration,
    ) -> Result<Unrecorded<SignedX509Svid>> {
        let svid = self
            .ca
            .sign_x509_svid(Holder::Component, public_key, agent_id, &[], ttl)?;
        let agent = agent_id.to_string();
        let to = Recipient {
            agent_id: &agent,
            entry_id: "",
        };
        Ok(self.record_x509("agent", agent_id, svid, to))
    }

    /// The server's own TLS certificate, with its DNS names, for the CA's default lifetime.
    pub fn server_x509(
        &self,
        public_key: &impl PublicKeyData,
        server_id: &SpiffeId,
        dns_names: &[String],
    ) -> Result<Unrecorded<SignedX509Svid>> {
        let svid = self.ca.sign_x509_svid(
            Holder::Component,
            public_key,
            server_id,
            dns_names,
            Duration::ZERO,
        )?;
        Ok(self.record_x509("server", server_id, svid, Recipient::default()))
    }

    /// A workload's JWT-SVID for `audience`.
    pub fn workload_jwt(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        to: Recipient<'_>,
    ) -> Result<Unrecorded<SignedJwtSvid>> {
        let signed = self.ca.sign_jwt_svid(spiffe_id, audience, ttl)?;
        self.count("jwt");
        let record = IssuedSvid {
            serial: signed.token_id.clone(),
            kind: "jwt".into(),
            spiffe_id: spiffe_id.to_string(),
            agent_id: to.agent_id.to_string(),
            entry_id: to.entry_id.to_string(),
            authority_id: signed.key_id.clone(),
            not_before: signed.issued_at,
            not_after: signed.expires_at,
        };
        Ok(self.recorder.record(signed, record))
    }

    fn record_x509(
        &self,
        kind: &'static str,
        spiffe_id: &SpiffeId,
        svid: SignedX509Svid,
        to: Recipient<'_>,
    ) -> Unrecorded<SignedX509Svid> {
        self.count(kind);
        let record = IssuedSvid {
            serial: svid.serial.clone(),
            kind: "x509".into(),
            spiffe_id: spiffe_id.to_string(),
            agent_id: to.agent_id.to_string(),
            entry_id: to.entry_id.to_string(),
            authority_id: svid.authority_id.clone(),
            not_before: svid.not_before,
            not_after: svid.not_after,
        };
        self.recorder.record(svid, record)
    }

    fn count(&self, kind: &'static str) {
        self.metrics
            .svids_signed
            .get_or_create(&SvidLabels { kind })
            .inc();
    }
}
