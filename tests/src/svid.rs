//! SVIDs as files, for peers that read PEM from disk (openssl, curl, stunnel, HAProxy, Envoy
//! without SDS): the real ones the agent issues, and self-signed ones of a CA nobody trusts.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::AgentProcess;

/// The certificate and key files of one SVID, as `sigil-agent api fetch x509 --write` wrote them.
#[derive(Debug, Clone)]
pub struct SvidFiles {
    /// The chain, PEM.
    pub cert: PathBuf,
    /// The PKCS#8 key, PEM.
    pub key: PathBuf,
    /// The trust bundle, PEM.
    pub bundle: PathBuf,
}

/// Writes every SVID of this process into `dir` with the real CLI, and returns the files of the
/// one for `spiffe_id` (found by reading each certificate's URI SAN).
pub fn fetch_svid(agent: &AgentProcess, dir: &Path, spiffe_id: &str) -> anyhow::Result<SvidFiles> {
    agent.write_svids(dir)?;
    for index in 0.. {
        let cert = dir.join(format!("svid.{index}.pem"));
        let Ok(pem) = std::fs::read_to_string(&cert) else {
            break;
        };
        let der = crate::pem_certificates(&pem)?;
        let leaf = der.first().context("an empty chain")?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)?;
        let uri = parsed
            .subject_alternative_name()?
            .into_iter()
            .flat_map(|san| san.value.general_names.iter())
            .find_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
                _ => None,
            });
        if uri.as_deref() == Some(spiffe_id) {
            return Ok(SvidFiles {
                cert,
                key: dir.join(format!("svid.{index}.key")),
                bundle: dir.join(format!("bundle.{index}.pem")),
            });
        }
    }
    anyhow::bail!("no SVID for {spiffe_id} in {}", dir.display())
}

/// A self-signed certificate with `spiffe_id` as its URI SAN, written to `foreign.pem`,
/// `foreign.key` and (itself as the bundle) `foreign-bundle.pem` in `dir`: an SVID of a CA
/// nobody trusts.
pub fn foreign_svid(dir: &Path, spiffe_id: &str) -> anyhow::Result<SvidFiles> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into()?)];
    let cert = params.self_signed(&key)?;
    let files = SvidFiles {
        cert: dir.join("foreign.pem"),
        key: dir.join("foreign.key"),
        bundle: dir.join("foreign-bundle.pem"),
    };
    std::fs::write(&files.cert, cert.pem())?;
    std::fs::write(&files.key, key.serialize_pem())?;
    std::fs::write(&files.bundle, cert.pem())?;
    Ok(files)
}
