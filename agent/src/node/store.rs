//! The agent's identity on disk, so a restarted agent needs no new join token: its private key
//! (PKCS#8, mode 0600), its SVID chain and the last trust bundle the server sent, in the data
//! directory (mode 0700).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::KeyPair;
use sigil_core::bundle::{TrustBundle, pem_block};
use sigil_core::id::{TrustDomain, parse_spiffe_id};
use sigil_core::x509::certificate_facts;

use super::AgentIdentity;
use crate::{Error, Result};

/// Where the agent keeps its identity.
#[derive(Debug, Clone)]
pub struct IdentityStore {
    dir: PathBuf,
}

impl IdentityStore {
    /// Uses (and creates, mode 0700) `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("restricting {}", dir.display()), e))?;
        Ok(IdentityStore {
            dir: dir.to_path_buf(),
        })
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join("agent.key.p8")
    }

    fn chain_path(&self) -> PathBuf {
        self.dir.join("agent.svid.pem")
    }

    fn bundle_path(&self) -> PathBuf {
        self.dir.join("bundle.spiffe.json")
    }

    /// Writes the identity: key first (0600), then the chain, each through a temporary file and a
    /// rename so a crash leaves the old or the new, never half of one.
    pub fn save_identity(&self, identity: &AgentIdentity) -> Result<()> {
        write_private(&self.key_path(), &identity.key.serialize_der())?;
        let pem: String = identity
            .chain
            .iter()
            .map(|der| pem_block("CERTIFICATE", der))
            .collect();
        write_private(&self.chain_path(), pem.as_bytes())
    }

    /// Writes the last bundle received.
    pub fn save_bundle(&self, bundle: &TrustBundle) -> Result<()> {
        write_private(&self.bundle_path(), bundle.to_spiffe_json()?.as_bytes())
    }

    /// Writes `bytes` to the file `name` in the directory: mode 0600, through a synced temporary
    /// file and a rename, as the identity is. For the agent's other private state (the SVID cache).
    pub(crate) fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_private(&self.dir.join(name), bytes)
    }

    /// The content of the file `name` in the directory, if it exists.
    pub(crate) fn read_file(&self, name: &str) -> Result<Option<Vec<u8>>> {
        read_optional(&self.dir.join(name))
    }

    /// Removes the file `name` from the directory; returns whether it was there.
    pub(crate) fn remove_file(&self, name: &str) -> Result<bool> {
        let path = self.dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }

    /// The stored identity and bundle, if both are there.
    pub fn load(&self, trust_domain: &TrustDomain) -> Result<Option<(AgentIdentity, TrustBundle)>> {
        let (Some(key), Some(pem), Some(bundle)) = (
            read_optional(&self.key_path())?,
            read_optional(&self.chain_path())?,
            read_optional(&self.bundle_path())?,
        ) else {
            return Ok(None);
        };
        let broken = |what: &str, why: String| {
            Error::Startup(format!(
                "the stored agent {what} in {} is unreadable ({why}); remove the directory and attest again with a new join token",
                self.dir.display()
            ))
        };
        let key = KeyPair::try_from(key.as_slice()).map_err(|e| broken("key", e.to_string()))?;
        let chain = pem_certificates(&pem).map_err(|e| broken("SVID", e))?;
        let leaf = chain
            .first()
            .ok_or_else(|| broken("SVID", "no certificate".into()))?;
        let facts = certificate_facts(leaf)?;
        let spiffe_id = facts
            .spiffe_id
            .ok_or_else(|| broken("SVID", "no SPIFFE ID".into()))?;
        let bundle_text = String::from_utf8(bundle).map_err(|e| broken("bundle", e.to_string()))?;
        let bundle = TrustBundle::from_spiffe_json(trust_domain.clone(), &bundle_text)?;
        Ok(Some((
            AgentIdentity {
                spiffe_id: parse_spiffe_id("agent SVID", &spiffe_id.to_string())?,
                chain,
                expires_at: facts.not_after,
                key,
            },
            bundle,
        )))
    }
}

fn pem_certificates(pem: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .map(|cert| cert.map(|c| c.to_vec()).map_err(|e| e.to_string()))
        .collect()
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    sigil_core::fs::write_private(path, bytes)
        .map_err(|e| Error::io(format!("storing {}", path.display()), e))
}
