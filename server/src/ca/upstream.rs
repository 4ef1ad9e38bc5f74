//! Upstream authorities: an operator's existing CA that signs Sigil's CA as an intermediate, so
//! every SVID chains to the operator's root, which the bundle publishes in place of Sigil's own.
//!
//! [`UpstreamAuthority`] is the narrow interface the CA needs; [`DiskUpstream`] reads a CA
//! certificate and key from files. Other upstreams (Vault's PKI, a cloud private CA) implement
//! the same trait: sign a CA certificate, say which roots to trust and which certificates sit
//! between.

use std::path::Path;

use rcgen::{CertificateParams, Issuer, KeyPair, PublicKeyData};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{Error, Result};

/// An authority above Sigil's own CA.
pub trait UpstreamAuthority: Send + Sync + std::fmt::Debug + 'static {
    /// Signs Sigil's CA certificate described by `params` (CA=true) for `key`; returns its DER.
    fn sign_ca(&self, params: &CertificateParams, key: &KeyPair) -> Result<Vec<u8>>;
    /// The certificates between a CA it signed and a trust anchor (DER, lowest first).
    fn chain(&self) -> &[Vec<u8>];
    /// The roots workloads verify against: the bundle's X.509 authorities.
    fn trust_anchors(&self) -> &[Vec<u8>];
    /// Whether `ca` (DER) is a CA certificate this upstream issued.
    fn issued(&self, ca: &[u8]) -> bool;
    /// Unix seconds after which it can sign nothing (its own certificate's end).
    fn not_after(&self) -> i64;
}

/// An upstream CA from PEM files: its certificate (followed by any intermediates above it), its
/// key, and optionally the root(s) to trust when the certificate is not itself a root.
#[derive(Debug)]
pub struct DiskUpstream {
    issuer: Issuer<'static, KeyPair>,
    subject: Vec<u8>,
    chain: Vec<Vec<u8>>,
    anchors: Vec<Vec<u8>>,
    not_after: i64,
}

fn read_certificates(path: &Path) -> Result<Vec<Vec<u8>>> {
    let bad = |reason: String| Error::config(path, reason);
    let certificates: Vec<Vec<u8>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| bad(format!("cannot read PEM certificates: {e}")))?
        .into_iter()
        .map(|c| c.to_vec())
        .collect();
    if certificates.is_empty() {
        return Err(bad("holds no PEM certificate".to_string()));
    }
    Ok(certificates)
}

fn parse(der: &[u8]) -> Option<X509Certificate<'_>> {
    X509Certificate::from_der(der).ok().map(|(_, cert)| cert)
}

/// Whether a DER certificate is self-issued (subject = issuer): a root.
pub fn is_self_issued(der: &[u8]) -> bool {
    parse(der).is_some_and(|cert| cert.subject().as_raw() == cert.issuer().as_raw())
}

impl DiskUpstream {
    /// Reads and checks the files. A key that does not match the certificate, a certificate that
    /// is not a CA, or a non-root certificate without `bundle_file` stops start-up with the
    /// reason.
    pub fn load(cert_file: &Path, key_file: &Path, bundle_file: Option<&Path>) -> Result<Self> {
        let mut certificates = read_certificates(cert_file)?;
        let own = certificates.remove(0);
        let key_pem = std::fs::read_to_string(key_file).map_err(|e| {
            Error::config(key_file, format!("cannot read the upstream CA key: {e}"))
        })?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| Error::config(key_file, format!("not a usable PEM private key: {e}")))?;
        let cert = parse(&own)
            .ok_or_else(|| Error::config(cert_file, "the first certificate is unreadable"))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(Error::config(
                key_file,
                format!(
                    "this key does not belong to the certificate in {}",
                    cert_file.display()
                ),
            ));
        }
        let facts = sigil_core::x509::certificate_facts(&own)
            .map_err(|e| Error::config(cert_file, format!("unreadable certificate: {e}")))?;
        if !facts.is_ca {
            return Err(Error::config(
                cert_file,
                "the upstream certificate is not a CA (basicConstraints CA:TRUE is required)",
            ));
        }
        let subject = cert.subject().as_raw().to_vec();
        let anchors = match bundle_file {
            Some(path) => read_certificates(path)?,
            None if is_self_issued(&own) => vec![own.clone()],
            None => {
                return Err(Error::config(
                    cert_file,
                    "the upstream certificate is not a root: name the root(s) to trust in upstream.bundle_file",
                ));
            }
        };
        // Everything between Sigil's CA and an anchor: the upstream certificate and the ones
        // after it in the file, less any that are anchors themselves.
        let chain = std::iter::once(own.clone())
            .chain(certificates)
            .filter(|der| !anchors.contains(der))
            .collect();
        let issuer = Issuer::from_ca_cert_der(&own.as_slice().into(), key)
            .map_err(|e| Error::config(cert_file, format!("cannot sign with this CA: {e}")))?;
        Ok(DiskUpstream {
            issuer,
            subject,
            chain,
            anchors,
            not_after: facts.not_after,
        })
    }
}

impl UpstreamAuthority for DiskUpstream {
    fn sign_ca(&self, params: &CertificateParams, key: &KeyPair) -> Result<Vec<u8>> {
        params
            .clone()
            .signed_by(key, &self.issuer)
            .map(|certificate| certificate.der().to_vec())
            .map_err(|e| Error::ca_caused("the upstream CA cannot sign Sigil's CA", e))
    }

    fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    fn trust_anchors(&self) -> &[Vec<u8>] {
        &self.anchors
    }

    fn issued(&self, ca: &[u8]) -> bool {
        parse(ca).is_some_and(|cert| cert.issuer().as_raw() == self.subject.as_slice())
    }

    fn not_after(&self) -> i64 {
        self.not_after
    }
}
