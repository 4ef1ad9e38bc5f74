//! Istio's certificate service on the agent API port, so Istio can use Sigil as its external CA
//! (`caAddress`): istio-agent sends a CSR with the pod's ServiceAccount token in the
//! `authorization: Bearer <JWT>` metadata.
//!
//! The token is checked with TokenReview (audience `istio-ca` by default); the identity is
//! `spiffe://<td>/ns/<namespace>/sa/<service account>` of the token, and only that: the CSR's key
//! is certified whatever names the CSR asks for. The requested validity is clamped to the
//! configured maximum. The answer is the PEM chain, leaf first and root last.

use std::sync::Arc;
use std::time::Duration;

use sigil_core::bundle::pem_block;
use sigil_core::id::SpiffeId;
use sigil_core::x509::check_csr_key;
use sigil_proto::istio_ca::istio_certificate_service_server::IstioCertificateService;
use sigil_proto::istio_ca::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Request, Response, Status};

use super::ServerState;
use crate::ca::Recipient;
use crate::datastore::DataStore;
use crate::k8s::review;
use crate::{Error, Result};

/// The largest CSR PEM accepted, in bytes.
const MAX_CSR_PEM: usize = 16 * 1024;

/// The Istio CA API over shared server state.
pub struct IstioCa<D> {
    state: Arc<ServerState<D>>,
    client: kube::Client,
    audience: String,
    max_validity: Duration,
}

impl<D> std::fmt::Debug for IstioCa<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioCa")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl<D: DataStore> IstioCa<D> {
    /// The service: tokens must carry `audience`; validity is clamped to `max_validity`.
    pub fn new(
        state: Arc<ServerState<D>>,
        client: kube::Client,
        audience: String,
        max_validity: Duration,
    ) -> Self {
        IstioCa {
            state,
            client,
            audience,
            max_validity,
        }
    }

    /// The ServiceAccount identity of a bearer token.
    async fn identity(&self, token: &str) -> Result<SpiffeId> {
        let reviewed = review(&self.client, token.to_string(), &self.audience).await?;
        let (namespace, account) = (
            reviewed.namespace.as_str(),
            reviewed.service_account.as_str(),
        );
        SpiffeId::from_segments(
            self.state.ca.trust_domain().clone(),
            &["ns", namespace, "sa", account],
        )
        .map_err(|e| {
            Error::Unauthenticated(format!(
                "ServiceAccount {namespace}/{account} makes no SPIFFE ID: {e}"
            ))
        })
    }

    async fn sign(
        &self,
        token: &str,
        request: IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse> {
        if request.csr.len() > MAX_CSR_PEM {
            return Err(Error::Invalid(sigil_core::Error::InvalidCsr(format!(
                "the CSR is over {MAX_CSR_PEM} bytes"
            ))));
        }
        // Authenticate before looking at the CSR, so an anonymous caller learns nothing from it.
        let id = self.identity(token).await?;
        let der = pem_der(&request.csr)?;
        let csr = check_csr_key(&der)?;
        let requested = Duration::from_secs(u64::try_from(request.validity_duration).unwrap_or(0));
        let validity = if requested.is_zero() {
            self.max_validity
        } else {
            requested.min(self.max_validity)
        };
        let svid = self
            .state
            .issuer
            .workload_x509(
                &csr.public_key,
                &id,
                &[],
                validity,
                Recipient {
                    agent_id: "",
                    entry_id: "istio-ca",
                },
            )?
            .recorded()
            .await?;
        let bundle = self.state.ca.bundle();
        let mut cert_chain: Vec<String> = svid
            .chain
            .iter()
            .map(|der| pem_block("CERTIFICATE", der))
            .collect();
        cert_chain.extend(
            bundle
                .x509_authorities
                .iter()
                .map(|der| pem_block("CERTIFICATE", der)),
        );
        Ok(IstioCertificateResponse { cert_chain })
    }
}

fn pem_der(pem: &str) -> Result<Vec<u8>> {
    use rustls_pki_types::CertificateSigningRequestDer;
    use rustls_pki_types::pem::PemObject;
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map(|der| der.as_ref().to_vec())
        .map_err(|e| {
            Error::Invalid(sigil_core::Error::InvalidCsr(format!(
                "not a PEM certificate request: {e}"
            )))
        })
}

#[tonic::async_trait]
impl<D: DataStore> IstioCertificateService for IstioCa<D> {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string)
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing `authorization: Bearer <ServiceAccount token>` metadata",
                )
            })?;
        match self.sign(&token, request.into_inner()).await {
            Ok(response) => Ok(Response::new(response)),
            Err(e) => {
                tracing::warn!(error = %e, "Istio certificate request refused");
                Err(e.status())
            }
        }
    }
}
