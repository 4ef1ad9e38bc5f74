//! The X509-SVID profile: what a CSR may ask for, what a leaf and a CA certificate look like, and
//! how Sigil reads the SPIFFE ID back out of a certificate.
//!
//! The profile (SPIFFE X509-SVID standard): exactly one URI SAN, the SPIFFE ID; a leaf has
//! `CA=false` and a critical key usage with `digitalSignature` and without `keyCertSign` or
//! `cRLSign`; a CA has `keyCertSign`. Sigil adds `serverAuth`+`clientAuth`, subject and authority
//! key identifiers and a random 128-bit serial.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, SignatureAlgorithm,
};
use ring::rand::{SecureRandom, SystemRandom};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::clock::unix_seconds;
use crate::id::{SpiffeId, TrustDomain, parse_spiffe_id};
use crate::untrusted::untrusted;
use crate::{Error, Result};

/// How far back a certificate's NotBefore is set, so peers whose clocks lag a little accept it.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// The largest CSR Sigil reads, in bytes. A P-256 CSR is about 300 bytes; RSA-4096 about 1.7 KiB.
pub const MAX_CSR_LEN: usize = 8 * 1024;

/// The key types Sigil generates (for its CA, its JWT keys and workload keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    /// ECDSA on NIST P-256 with SHA-256.
    EcP256,
    /// ECDSA on NIST P-384 with SHA-384.
    EcP384,
}

impl KeyType {
    /// The rcgen signature algorithm for keys of this type.
    pub fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }

    /// Generates a fresh key of this type.
    pub fn generate(self) -> Result<KeyPair> {
        KeyPair::generate_for(self.algorithm())
            .map_err(|e| Error::Crypto(format!("cannot generate a {self:?} key: {e}")))
    }
}

/// A CSR (DER) for `key`, with `spiffe_id` as its URI SAN when given: what the agent sends to be
/// signed, and what [`check_csr`] reads on the server.
pub fn csr_for(key: &KeyPair, spiffe_id: Option<&SpiffeId>) -> Result<Vec<u8>> {
    let mut params = CertificateParams::default();
    if let Some(id) = spiffe_id {
        let uri = id
            .to_string()
            .try_into()
            .map_err(|e| Error::Crypto(format!("cannot encode {id} as a URI SAN: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    let csr = params
        .serialize_request(key)
        .map_err(|e| Error::Crypto(format!("cannot build a CSR: {e}")))?;
    Ok(csr.der().to_vec())
}

/// A CSR that passed every check: its signature verifies, its key is supported and it asks for
/// nothing but (at most) one SPIFFE ID.
#[derive(Debug)]
pub struct CheckedCsr {
    /// The SPIFFE ID in the CSR's URI SAN, if it has one.
    pub spiffe_id: Option<SpiffeId>,
    /// The public key to certify.
    pub public_key: rcgen::SubjectPublicKeyInfo,
}

/// Parses and checks a DER PKCS#10 CSR.
///
/// Refused: anything over [`MAX_CSR_LEN`], trailing bytes, a signature that does not verify, a key
/// other than EC P-256/P-384 or RSA of 2048 bits or more, any requested extension other than a
/// subjectAltName, and a subjectAltName with anything but a single URI.
pub fn check_csr(der: &[u8]) -> Result<CheckedCsr> {
    let csr = verified_csr(der)?;
    let spiffe_id = requested_spiffe_id(&csr)?;
    let public_key =
        rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|e| Error::InvalidCsr(format!("unsupported public key: {e}")))?;
    Ok(CheckedCsr {
        spiffe_id,
        public_key,
    })
}

/// Checks a CSR's size, encoding, key and signature, and ignores what names or extensions it asks
/// for: for callers that decide the identity themselves (Istio's CA API signs "whatever SANs the
/// CSR asks for" with the caller's own identity only).
pub fn check_csr_key(der: &[u8]) -> Result<CheckedCsr> {
    let csr = verified_csr(der)?;
    let public_key =
        rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|e| Error::InvalidCsr(format!("unsupported public key: {e}")))?;
    Ok(CheckedCsr {
        spiffe_id: None,
        public_key,
    })
}

/// Parses a CSR and checks its size, trailing bytes, key type and signature.
fn verified_csr(der: &[u8]) -> Result<X509CertificationRequest<'_>> {
    if der.is_empty() {
        return Err(Error::InvalidCsr("the CSR is empty".into()));
    }
    if der.len() > MAX_CSR_LEN {
        return Err(Error::InvalidCsr(format!(
            "the CSR is {} bytes; at most {MAX_CSR_LEN} are accepted",
            der.len()
        )));
    }
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| Error::InvalidCsr(format!("not a DER PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::InvalidCsr(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    let spki = &csr.certification_request_info.subject_pki;
    check_key(spki)?;
    csr.verify_signature().map_err(|_| {
        Error::InvalidCsr("the signature does not verify with the request's own key".into())
    })?;
    Ok(csr)
}

/// The SPIFFE ID a CSR asks for, refusing any extension but a subjectAltName with one URI.
fn requested_spiffe_id(csr: &X509CertificationRequest<'_>) -> Result<Option<SpiffeId>> {
    let mut spiffe_id = None;
    if let Some(extensions) = csr.requested_extensions() {
        for extension in extensions {
            let ParsedExtension::SubjectAlternativeName(san) = extension else {
                return Err(Error::InvalidCsr(format!(
                    "unexpected extension request {}; only a subjectAltName with the SPIFFE ID is accepted",
                    untrusted(&format!("{extension:?}"))
                )));
            };
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) if spiffe_id.is_none() => {
                        spiffe_id = Some(
                            parse_spiffe_id("csr uri SAN", uri)
                                .map_err(|e| Error::InvalidCsr(e.to_string()))?,
                        );
                    }
                    GeneralName::URI(_) => {
                        return Err(Error::InvalidCsr(
                            "more than one URI SAN; an X509-SVID has exactly one SPIFFE ID".into(),
                        ));
                    }
                    other => {
                        return Err(Error::InvalidCsr(format!(
                            "unexpected SAN {}; DNS names come from the registration entry, not the CSR",
                            untrusted(&other.to_string())
                        )));
                    }
                }
            }
        }
    }
    Ok(spiffe_id)
}

fn check_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<()> {
    let unsupported = |what: String| {
        Error::InvalidCsr(format!(
            "unsupported key ({what}); use EC P-256, EC P-384 or RSA of 2048 bits or more"
        ))
    };
    match spki.parsed() {
        Ok(PublicKey::EC(point)) => {
            let uncompressed = point.data().first() == Some(&4);
            match point.key_size() {
                256 | 384 if uncompressed => Ok(()),
                bits => Err(unsupported(format!("EC key of {bits} bits"))),
            }
        }
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() >= 2048 => Ok(()),
        Ok(PublicKey::RSA(rsa)) => Err(unsupported(format!("RSA key of {} bits", rsa.key_size()))),
        Ok(_) => Err(unsupported(format!(
            "algorithm {}",
            spki.algorithm.algorithm
        ))),
        Err(e) => Err(unsupported(e.to_string())),
    }
}

/// A fresh random serial number: 128 bits, positive.
pub fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Crypto("the system random source failed".into()))?;
    // Clear the top bit so the DER INTEGER is positive, and set the next one so the encoding is
    // always 16 bytes long.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn organization() -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Sigil");
    name
}

fn uri_san(id: &str) -> Result<SanType> {
    Ok(SanType::URI(id.try_into().map_err(|e| {
        Error::Crypto(format!("cannot encode `{id}` as a URI SAN: {e}"))
    })?))
}

/// Certificate parameters of an X509-SVID leaf for `spiffe_id`, valid from `now - BACKDATE` to
/// `not_after`.
pub fn leaf_params(
    spiffe_id: &SpiffeId,
    dns_names: &[String],
    now: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = organization();
    if let Some(first) = dns_names.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, first.as_str());
    }
    params.subject_alt_names = vec![uri_san(&spiffe_id.to_string())?];
    for name in dns_names {
        params.subject_alt_names.push(SanType::DnsName(
            name.as_str().try_into().map_err(|e| {
                Error::field("dns_names", format!("`{name}` cannot be encoded: {e}"))
            })?,
        ));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    params.not_before = (now - BACKDATE).into();
    params.not_after = not_after.into();
    Ok(params)
}

/// Certificate parameters of a self-signed root CA for `trust_domain`, valid from
/// `now - BACKDATE` for `ttl`.
pub fn root_ca_params(
    trust_domain: &TrustDomain,
    now: SystemTime,
    ttl: Duration,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = organization();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Sigil CA {trust_domain}"));
    params.subject_alt_names = vec![uri_san(&trust_domain.id_string())?];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?);
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ttl).into();
    Ok(params)
}

/// What Sigil needs to know of a certificate it holds or receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// The single SPIFFE ID in its URI SAN, if it has exactly one.
    pub spiffe_id: Option<SpiffeId>,
    /// Lower-case hex of the serial number.
    pub serial: String,
    /// Lower-case hex of the subject key identifier (empty when absent).
    pub subject_key_id: String,
    /// Lower-case hex of the authority key identifier: the signing CA's subject key identifier,
    /// which is how Sigil names an authority (empty when absent).
    pub authority_key_id: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Whether basic constraints say CA=true.
    pub is_ca: bool,
}

/// Reads the facts of a DER certificate.
pub fn certificate_facts(der: &[u8]) -> Result<CertificateFacts> {
    let cert = parse_certificate(der)?;
    let uris = uri_sans(&cert)?;
    let spiffe_id = match uris.as_slice() {
        [one] => parse_spiffe_id("certificate URI SAN", one).ok(),
        _ => None,
    };
    let subject_key_id = cert
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(kid) => Some(hex::encode(kid.0)),
            _ => None,
        })
        .unwrap_or_default();
    let authority_key_id = cert
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|kid| hex::encode(kid.0))
            }
            _ => None,
        })
        .unwrap_or_default();
    Ok(CertificateFacts {
        spiffe_id,
        serial: hex::encode(cert.raw_serial()),
        subject_key_id,
        authority_key_id,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca: cert.is_ca(),
    })
}

/// Checks that a DER certificate is an X509-SVID leaf per the SPIFFE profile and returns its ID.
pub fn check_leaf_profile(der: &[u8]) -> Result<SpiffeId> {
    let cert = parse_certificate(der)?;
    let bad = |why: &str| Error::InvalidCertificate(why.to_string());
    let uris = uri_sans(&cert)?;
    let [uri] = uris.as_slice() else {
        return Err(bad("an X509-SVID has exactly one URI SAN"));
    };
    let id = parse_spiffe_id("certificate URI SAN", uri)
        .map_err(|e| Error::InvalidCertificate(e.to_string()))?;
    if id.path().is_empty() {
        return Err(bad("a leaf SVID's SPIFFE ID has a path"));
    }
    if cert.is_ca() {
        return Err(bad("a leaf SVID has CA=false"));
    }
    let key_usage = cert
        .key_usage()
        .map_err(|e| Error::InvalidCertificate(format!("bad key usage: {e}")))?
        .ok_or_else(|| bad("a leaf SVID has a key usage extension"))?;
    if !key_usage.critical {
        return Err(bad("a leaf SVID's key usage is critical"));
    }
    let usage = key_usage.value;
    if !usage.digital_signature() || usage.key_cert_sign() || usage.crl_sign() {
        return Err(bad(
            "a leaf SVID's key usage has digitalSignature and neither keyCertSign nor cRLSign",
        ));
    }
    Ok(id)
}

fn parse_certificate(der: &[u8]) -> Result<X509Certificate<'_>> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::InvalidCertificate(format!("not a DER certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::InvalidCertificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    Ok(cert)
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::InvalidCertificate(format!("bad subjectAltName: {e}")))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Seconds from `now` to `not_after`, never negative.
pub fn remaining_seconds(not_after: i64, now: SystemTime) -> i64 {
    (not_after - unix_seconds(now)).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::parse_trust_domain;
    use rcgen::Issuer;

    fn td() -> TrustDomain {
        parse_trust_domain("trust_domain", "example.org").expect("valid")
    }

    fn csr_with(key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(key).expect("csr").der().to_vec()
    }

    #[test]
    fn accepts_a_plain_spiffe_csr() {
        let key = KeyType::EcP256.generate().expect("key");
        let der = csr_with(
            &key,
            vec![uri_san("spiffe://example.org/web").expect("san")],
        );
        let csr = check_csr(&der).expect("valid");
        assert_eq!(
            csr.spiffe_id.map(|id| id.to_string()).as_deref(),
            Some("spiffe://example.org/web")
        );
    }

    #[test]
    fn refuses_bad_csrs() {
        let key = KeyType::EcP256.generate().expect("key");
        let two_uris = csr_with(
            &key,
            vec![
                uri_san("spiffe://example.org/a").expect("san"),
                uri_san("spiffe://example.org/b").expect("san"),
            ],
        );
        assert!(
            check_csr(&two_uris)
                .unwrap_err()
                .to_string()
                .contains("more than one URI")
        );

        let dns = csr_with(
            &key,
            vec![SanType::DnsName("x.example".try_into().expect("dns"))],
        );
        assert!(
            check_csr(&dns)
                .unwrap_err()
                .to_string()
                .contains("unexpected SAN")
        );

        let mut tampered = csr_with(&key, vec![uri_san("spiffe://example.org/a").expect("san")]);
        let at = tampered.len() - 5;
        tampered[at] ^= 0x01;
        assert!(check_csr(&tampered).is_err());

        assert!(check_csr(b"").is_err());
        assert!(check_csr(&[0x30, 0x03, 0x02, 0x01, 0x01]).is_err());
        assert!(
            check_csr(&vec![0x30; MAX_CSR_LEN + 1])
                .unwrap_err()
                .to_string()
                .contains("at most")
        );

        let mut extended = CertificateParams::default();
        extended.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let der = extended
            .serialize_request(&key)
            .expect("csr")
            .der()
            .to_vec();
        assert!(
            check_csr(&der)
                .unwrap_err()
                .to_string()
                .contains("unexpected extension")
        );

        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519");
        let der = csr_with(&ed, vec![]);
        assert!(
            check_csr(&der)
                .unwrap_err()
                .to_string()
                .contains("unsupported key")
        );
    }

    #[test]
    fn leaf_meets_the_svid_profile() {
        let now = SystemTime::now();
        let ca_key = KeyType::EcP256.generate().expect("key");
        let ca_params = root_ca_params(&td(), now, Duration::from_secs(86_400 * 7)).expect("ca");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-signed");
        let issuer = Issuer::new(ca_params, &ca_key);

        let leaf_key = KeyType::EcP256.generate().expect("key");
        let id = parse_spiffe_id("spiffe_id", "spiffe://example.org/web").expect("id");
        let params = leaf_params(
            &id,
            &["web.example.org".into()],
            now,
            now + Duration::from_secs(3600),
        )
        .expect("params");
        let leaf = params.signed_by(&leaf_key, &issuer).expect("signed");

        assert_eq!(check_leaf_profile(leaf.der()).expect("profile"), id);
        let facts = certificate_facts(leaf.der()).expect("facts");
        assert_eq!(facts.serial.len(), 32);
        assert!(!facts.subject_key_id.is_empty());
        assert!(facts.not_before <= unix_seconds(now) - 5);
        let ca_facts = certificate_facts(ca_cert.der()).expect("facts");
        assert!(ca_facts.is_ca);
        assert!(check_leaf_profile(ca_cert.der()).is_err());
    }
}
