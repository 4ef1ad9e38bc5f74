//! rustls verification by SPIFFE ID.
//!
//! SPIFFE peers carry no DNS names, so the usual hostname check does not apply: a peer is
//! authenticated when its chain verifies against the trust bundle of its domain and its single URI
//! SAN is the SPIFFE ID we expect. Everything runs on rustls' ring provider.

use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, TrustAnchor, UnixTime,
};

use crate::id::SpiffeId;
use crate::x509::certificate_facts;
use crate::{Error, Result};

/// The crates [`handshake_signatures!`](crate::handshake_signatures) names, so that its callers
/// need not depend on them under the same names.
#[doc(hidden)]
pub mod macro_support {
    pub use rustls;
    pub use rustls_pki_types;
}

/// Implements the three handshake-signature methods of a rustls certificate verifier
/// (`ServerCertVerifier` or `ClientCertVerifier`): TLS 1.2 and 1.3 signatures checked, and schemes
/// offered, with the `WebPkiSupportedAlgorithms` in the field `$algorithms` of `self`.
///
/// Every Sigil verifier checks the chain its own way but the handshake signature the same way,
/// and rustls' traits ask for these methods one by one; this is written once here. Use it inside
/// the `impl` block: `sigil_core::handshake_signatures!(algorithms);` (`0` for a tuple struct, a
/// path such as `peers.algorithms` for a field's field).
#[macro_export]
macro_rules! handshake_signatures {
    // One version's check: the trait method and the rustls function share the name.
    (@check $check:ident, $($algorithms:tt)+) => {
        fn $check(
            &self,
            message: &[u8],
            cert: &$crate::tls::macro_support::rustls_pki_types::CertificateDer<'_>,
            dss: &$crate::tls::macro_support::rustls::DigitallySignedStruct,
        ) -> ::std::result::Result<
            $crate::tls::macro_support::rustls::client::danger::HandshakeSignatureValid,
            $crate::tls::macro_support::rustls::Error,
        > {
            $crate::tls::macro_support::rustls::crypto::$check(
                message,
                cert,
                dss,
                &self.$($algorithms)+,
            )
        }
    };
    ($($algorithms:tt)+) => {
        $crate::handshake_signatures!(@check verify_tls12_signature, $($algorithms)+);
        $crate::handshake_signatures!(@check verify_tls13_signature, $($algorithms)+);

        fn supported_verify_schemes(
            &self,
        ) -> ::std::vec::Vec<$crate::tls::macro_support::rustls::SignatureScheme> {
            self.$($algorithms)+.supported_schemes()
        }
    };
}

/// The crypto provider every Sigil TLS endpoint uses.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An identity as rustls takes it: the DER certificate chain (leaf first) and the PKCS#8 DER key.
pub fn chain_and_key(
    chain: &[Vec<u8>],
    pkcs8_key: Vec<u8>,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        chain.iter().cloned().map(CertificateDer::from).collect(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8_key)),
    )
}

/// Trust anchors from DER root certificates.
pub fn trust_anchors(roots: &[Vec<u8>]) -> Result<Vec<TrustAnchor<'static>>> {
    roots
        .iter()
        .map(|der| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                .map(|anchor| anchor.to_owned())
                .map_err(|e| Error::InvalidCertificate(format!("unusable trust anchor: {e}")))
        })
        .collect()
}

/// Authenticates a TLS server by SPIFFE ID: its chain must verify against `roots` and its URI SAN
/// must equal the expected ID. The TLS server name is ignored.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Vec<TrustAnchor<'static>>,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// A verifier that accepts only `expected`, signed by one of `roots` (DER).
    pub fn new(roots: &[Vec<u8>], expected: SpiffeId) -> Result<Self> {
        Ok(SpiffeServerVerifier {
            roots: trust_anchors(roots)?,
            expected,
            algorithms: crypto_provider().signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("bad server certificate: {e}")))?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            rustls::Error::General(format!(
                "the server's certificate does not verify against the trust bundle: {e}"
            ))
        })?;
        let facts =
            certificate_facts(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        match facts.spiffe_id {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!(
                "the server presented {id}, expected {}",
                self.expected
            ))),
            None => Err(rustls::Error::General(
                "the server's certificate has no single SPIFFE ID".into(),
            )),
        }
    }

    crate::handshake_signatures!(algorithms);
}
