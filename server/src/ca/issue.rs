//! Issuing: the one door every SVID the server hands out goes through. It signs with the CA,
//! writes the issuance record (which `ca revoke` trusts to know what a CA still has out there)
//! and counts the SVID, so no path can sign without recording.

use std::sync::Arc;
use std::time::Duration;

use rcgen::PublicKeyData;
use sigil_core::id::SpiffeId;

use super::sign::Holder;
use super::{Ca, IssuanceRecorder, SignedJwtSvid, SignedX509Svid};
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
    ) -> Result<SignedX509Svid> {
        let svid =
            self.ca
                .sign_x509_svid(Holder::Workload, public_key, spiffe_id, dns_names, ttl)?;
        self.record_x509("x509", spiffe_id, &svid, to);
        Ok(svid)
    }

    /// An agent's own SVID, valid for `ttl`.
    pub fn agent_x509(
        &self,
        public_key: &impl PublicKeyData,
        agent_id: &SpiffeId,
        ttl: Duration,
    ) -> Result<SignedX509Svid> {
        let svid = self
            .ca
            .sign_x509_svid(Holder::Component, public_key, agent_id, &[], ttl)?;
        let agent = agent_id.to_string();
        let to = Recipient {
            agent_id: &agent,
            entry_id: "",
        };
        self.record_x509("agent", agent_id, &svid, to);
        Ok(svid)
    }

    /// The server's own TLS certificate, with its DNS names, for the CA's default lifetime.
    pub fn server_x509(
        &self,
        public_key: &impl PublicKeyData,
        server_id: &SpiffeId,
        dns_names: &[String],
    ) -> Result<SignedX509Svid> {
        let svid = self.ca.sign_x509_svid(
            Holder::Component,
            public_key,
            server_id,
            dns_names,
            Duration::ZERO,
        )?;
        self.record_x509("server", server_id, &svid, Recipient::default());
        Ok(svid)
    }

    /// A workload's JWT-SVID for `audience`.
    pub fn workload_jwt(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        to: Recipient<'_>,
    ) -> Result<SignedJwtSvid> {
        let signed = self.ca.sign_jwt_svid(spiffe_id, audience, ttl)?;
        self.count("jwt");
        self.recorder.record(IssuedSvid {
            serial: signed.token_id.clone(),
            kind: "jwt".into(),
            spiffe_id: spiffe_id.to_string(),
            agent_id: to.agent_id.to_string(),
            entry_id: to.entry_id.to_string(),
            authority_id: signed.key_id.clone(),
            not_before: signed.issued_at,
            not_after: signed.expires_at,
        });
        Ok(signed)
    }

    fn record_x509(
        &self,
        kind: &'static str,
        spiffe_id: &SpiffeId,
        svid: &SignedX509Svid,
        to: Recipient<'_>,
    ) {
        self.count(kind);
        self.recorder.record(IssuedSvid {
            serial: svid.serial.clone(),
            kind: "x509".into(),
            spiffe_id: spiffe_id.to_string(),
            agent_id: to.agent_id.to_string(),
            entry_id: to.entry_id.to_string(),
            authority_id: svid.authority_id.clone(),
            not_before: svid.not_before,
            not_after: svid.not_after,
        });
    }

    fn count(&self, kind: &'static str) {
        self.metrics
            .svids_signed
            .get_or_create(&SvidLabels { kind })
            .inc();
    }
}
