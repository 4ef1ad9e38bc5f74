//! The server's instance id: a random name kept in `<data_dir>/instance-id`, by which the servers
//! of one trust domain that share a datastore tell their authorities in the CA journal apart,
//! across restarts. It names no identity and grants nothing; the SPIFFE ID stays the trust
//! domain's `/sigil/server`.

use std::path::Path;

use crate::{Error, Result};

/// The file, in the data directory.
const FILE: &str = "instance-id";

/// The instance id kept in `data_dir`, made (and kept, mode 0600) on the first start.
pub(super) fn load_or_create(data_dir: &Path) -> Result<String> {
    let path = data_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if id.len() < 16 || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(Error::Integrity(format!(
                    "{} does not hold an instance id (16 to 64 letters and digits); restore it from a backup, or remove it to start as a new server whose CA in the journal is then another's",
                    path.display()
                )));
            }
            Ok(id.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = hex::encode(sigil_core::x509::random_serial()?.to_bytes());
            sigil_core::fs::write_private(&path, id.as_bytes())
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            tracing::info!(instance = %id, "this server's instance id is new");
            Ok(id)
        }
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_kept_and_a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_create(dir.path()).expect("made");
        assert!(first.len() >= 16, "{first}");
        assert_eq!(load_or_create(dir.path()).expect("kept"), first);
        std::fs::write(dir.path().join(FILE), "../../etc").expect("damaged");
        let refused = load_or_create(dir.path()).expect_err("refused");
        assert!(refused.to_string().contains("instance id"), "{refused}");
    }
}
