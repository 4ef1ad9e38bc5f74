//! Where the CA's private keys live.
//!
//! [`KeyManager`] is deliberately small: keep a key under an id, load it back. The CA names each
//! key after the authority it signs for (`x509-<subject key id>`, `jwt-<key id>`), so no two
//! authorities, and no two servers sharing a journal, ever name the same key. The disk
//! implementation keeps PKCS#8 files with mode 0600 in the data directory, so a restarted server
//! keeps its CA; the memory implementation is for tests and throwaway servers. Keys never go to
//! the datastore or the logs; the journal holds only the key's id.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Mutex;

use rcgen::KeyPair;

use crate::{Error, Result};

/// Keeps and loads private keys by id.
pub trait KeyManager: Send + Sync + std::fmt::Debug + 'static {
    /// Keeps `key` under `id`; refused when a key of that id exists (a key is never replaced).
    fn store(&self, id: &str, key: &KeyPair) -> Result<()>;
    /// The key stored under `id`, if any.
    fn load(&self, id: &str) -> Result<Option<KeyPair>>;
}

/// Keys as PKCS#8 DER files, mode 0600, in one directory (mode 0700).
#[derive(Debug)]
pub struct DiskKeyManager {
    dir: PathBuf,
}

impl DiskKeyManager {
    /// Uses (and creates) `dir`.
    pub fn new(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating key directory {}", dir.display()), e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("restricting {}", dir.display()), e))?;
        Ok(DiskKeyManager { dir })
    }

    fn path(&self, id: &str) -> Result<PathBuf> {
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::ca(format!("key id `{id}` is not a safe file name")));
        }
        Ok(self.dir.join(format!("{id}.p8")))
    }
}

impl KeyManager for DiskKeyManager {
    fn store(&self, id: &str, key: &KeyPair) -> Result<()> {
        let path = self.path(id)?;
        if path.exists() {
            return Err(Error::ca(format!(
                "a key named {} exists already; keys are never replaced",
                path.display()
            )));
        }
        sigil_core::fs::write_private(&path, &key.serialize_der())
            .map_err(|e| Error::io(format!("storing key {}", path.display()), e))
    }

    fn load(&self, id: &str) -> Result<Option<KeyPair>> {
        let path = self.path(id)?;
        let der = match std::fs::read(&path) {
            Ok(der) => der,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading key {}", path.display()), e)),
        };
        let key = KeyPair::try_from(der.as_slice()).map_err(|e| {
            Error::ca_caused(format!("key file {} is unreadable", path.display()), e)
        })?;
        Ok(Some(key))
    }
}

/// Keys in memory only: gone when the process exits.
#[derive(Debug, Default)]
pub struct MemoryKeyManager {
    keys: Mutex<HashMap<String, Vec<u8>>>,
}

impl KeyManager for MemoryKeyManager {
    fn store(&self, id: &str, key: &KeyPair) -> Result<()> {
        let mut keys = self
            .keys
            .lock()
            .map_err(|_| Error::ca("key store lock poisoned"))?;
        if keys.contains_key(id) {
            return Err(Error::ca(format!(
                "a key named `{id}` exists already; keys are never replaced"
            )));
        }
        keys.insert(id.to_string(), key.serialize_der());
        Ok(())
    }

    fn load(&self, id: &str) -> Result<Option<KeyPair>> {
        let keys = self
            .keys
            .lock()
            .map_err(|_| Error::ca("key store lock poisoned"))?;
        keys.get(id)
            .map(|der| {
                KeyPair::try_from(der.as_slice())
                    .map_err(|e| Error::ca_caused(format!("stored key `{id}` is unreadable"), e))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use sigil_core::x509::KeyType;

    use super::*;
    use rcgen::PublicKeyData;
    use std::os::unix::fs::MetadataExt;

    fn round_trip(manager: &dyn KeyManager) {
        assert!(manager.load("ca-1").expect("load").is_none());
        let key = KeyType::EcP256.generate().expect("generate");
        manager.store("ca-1", &key).expect("stored");
        let loaded = manager.load("ca-1").expect("load").expect("present");
        assert_eq!(loaded.der_bytes(), key.der_bytes());
        let other = KeyType::EcP256.generate().expect("generate");
        assert!(manager.store("ca-1", &other).is_err(), "never replaced");
        let kept = manager.load("ca-1").expect("load").expect("present");
        assert_eq!(kept.der_bytes(), key.der_bytes());
    }

    #[test]
    fn disk_keys_survive_and_are_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let manager = DiskKeyManager::new(dir.path().join("keys")).expect("manager");
        round_trip(&manager);
        let mode = std::fs::metadata(dir.path().join("keys/ca-1.p8"))
            .expect("file")
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = DiskKeyManager::new(dir.path().join("keys")).expect("manager");
        assert!(again.load("ca-1").expect("load").is_some());
        assert!(again.load("../escape").is_err());
    }

    #[test]
    fn memory_keys() {
        round_trip(&MemoryKeyManager::default());
    }
}
