//! CSRs and certificates: the DER the agent API (`BatchSignX509Svid`), the Istio CA API and the
//! bundle endpoints hand the server, and that agents and workloads read back.

use std::net::IpAddr;
use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType,
};
use sigil_core::id::parse_spiffe_id;
use sigil_core::x509::{
    KeyType, MAX_CSR_LEN, certificate_facts, check_csr, check_csr_key, check_leaf_profile,
};

use crate::text;

/// `check_csr` and `check_csr_key` on arbitrary bytes.
///
/// Holds: whatever `check_csr` accepts, `check_csr_key` accepts with the same key; an accepted
/// SPIFFE ID is canonical.
pub fn csr(data: &[u8]) {
    let full = check_csr(data);
    let key_only = check_csr_key(data);
    if let Ok(checked) = &full {
        let key = key_only
            .as_ref()
            .unwrap_or_else(|e| panic!("check_csr accepts what check_csr_key refuses: {e}"));
        assert_eq!(checked.public_key.der_bytes(), key.public_key.der_bytes());
        if let Some(id) = &checked.spiffe_id {
            assert_eq!(parse_spiffe_id("id", &id.to_string()).as_ref(), Ok(id));
        }
    }
}

/// The key every CSR of [`csr_sans`] is signed with: made once per process, so a CSR's signature
/// always verifies and the fuzzer explores what the CSR asks for instead.
fn csr_key() -> &'static KeyPair {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    KEY.get_or_init(|| KeyType::EcP256.generate().expect("a P-256 key"))
}

/// What a line of [`csr_sans`] input asks the CSR for.
enum Request {
    San(SanType),
    Extension,
}

fn request(line: &str) -> Option<(Request, Option<&str>)> {
    let (kind, value) = line.split_once(' ').unwrap_or((line, ""));
    let ia5 = |v: &str| v.to_string().try_into().ok();
    let request = match kind {
        "uri" => (Request::San(SanType::URI(ia5(value)?)), Some(value)),
        "dns" => (Request::San(SanType::DnsName(ia5(value)?)), None),
        "email" => (Request::San(SanType::Rfc822Name(ia5(value)?)), None),
        "ip" => (
            Request::San(SanType::IpAddress(value.parse::<IpAddr>().ok()?)),
            None,
        ),
        "ca" | "ku" | "eku" => (Request::Extension, None),
        _ => return None,
    };
    Some(request)
}

/// A CSR built from text, one request per line (`uri spiffe://...`, `dns name`, `email a@b`,
/// `ip 10.0.0.1`, `ca`, `ku`, `eku`; other lines are skipped), signed with a good key, then
/// `check_csr`.
///
/// Holds: `check_csr` accepts exactly the CSRs that ask for nothing, or for one URI SAN that is
/// a canonical SPIFFE ID and nothing else, and then returns that ID; `check_csr_key` accepts
/// every one of them (its key and signature are good).
pub fn csr_sans(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let mut params = CertificateParams::default();
    let mut uris = Vec::new();
    let mut other_requests = 0;
    for line in input.lines() {
        let Some((what, uri)) = request(line) else {
            continue;
        };
        match what {
            Request::San(san) => params.subject_alt_names.push(san),
            Request::Extension if line == "ca" => {
                params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            }
            Request::Extension if line == "ku" => {
                params.key_usages.push(KeyUsagePurpose::DigitalSignature);
            }
            Request::Extension => params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth),
        }
        match uri {
            Some(uri) => uris.push(uri),
            None => other_requests += 1,
        }
    }
    let Ok(request) = params.serialize_request(csr_key()) else {
        return;
    };
    let der = request.der();
    if der.len() > MAX_CSR_LEN {
        assert!(
            check_csr(der).is_err(),
            "a CSR over MAX_CSR_LEN was accepted"
        );
        return;
    }
    if let Err(e) = check_csr_key(der) {
        panic!("a well-signed P-256 CSR was refused by check_csr_key: {e}");
    }
    let expected = match (uris.as_slice(), other_requests) {
        ([], 0) => Some(None),
        ([uri], 0) => parse_spiffe_id("uri", uri).ok().map(Some),
        _ => None,
    };
    match (check_csr(der), expected) {
        (Ok(checked), Some(id)) => assert_eq!(checked.spiffe_id, id),
        (Ok(checked), None) => panic!(
            "check_csr accepted a CSR asking for {uris:?} and {other_requests} other names or extensions (got {:?})",
            checked.spiffe_id
        ),
        (Err(e), Some(id)) => panic!("check_csr refused a CSR for {id:?}: {e}"),
        (Err(_), None) => {}
    }
}

/// `certificate_facts` and `check_leaf_profile` on arbitrary bytes (what bundles, agents and
/// peers present).
///
/// Holds: a certificate that passes the leaf profile has facts, with the same SPIFFE ID, and is
/// not a CA; any SPIFFE ID in the facts is canonical.
pub fn certificate(data: &[u8]) {
    let facts = certificate_facts(data);
    if let Ok(id) = check_leaf_profile(data) {
        let facts = facts
            .as_ref()
            .unwrap_or_else(|e| panic!("a leaf that passes the profile has no facts: {e}"));
        assert_eq!(facts.spiffe_id.as_ref(), Some(&id));
        assert!(!facts.is_ca, "a leaf that passes the profile is a CA");
    }
    if let Ok(facts) = &facts {
        if let Some(id) = &facts.spiffe_id {
            assert_eq!(parse_spiffe_id("id", &id.to_string()).as_ref(), Ok(id));
        }
        assert!(
            facts.serial.len() % 2 == 0,
            "serial is not whole bytes of hex"
        );
    }
}
