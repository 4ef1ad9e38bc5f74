//! Files only their owner may read: private keys, SVIDs, the agent's state.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `bytes` to `path` with mode 0600, durably: to a temporary file beside it first, synced,
/// then renamed over `path`, so a crash leaves either the old content or the new, never half a
/// key under the real name.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut staged = path.as_os_str().to_owned();
    staged.push(".tmp");
    let staged = Path::new(&staged);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(staged)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(staged, path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaces_the_file_whole_and_owner_only() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("sigil-core-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("key.p8");
        write_private(&path, b"first")?;
        write_private(&path, b"second")?;
        assert_eq!(std::fs::read(&path)?, b"second");
        assert_eq!(
            std::fs::metadata(&path)?.permissions().mode() & 0o777,
            0o600
        );
        assert!(
            !dir.join("key.p8.tmp").exists(),
            "nothing staged is left behind"
        );
        std::fs::remove_dir_all(&dir)
    }
}
