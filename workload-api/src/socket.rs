//! The Workload API socket and the directory it lives in.
//!
//! Any local process may connect to the socket (mode 0777): who it is gets decided by attestation,
//! not by file access. What must not happen is another user controlling the path: whoever can
//! write the socket's directory, or any directory above it, can replace the socket with their own
//! and receive the workloads' connections, or swap a directory for a symlink so that the agent
//! changes something else. So before binding, every directory from `/` down to the socket's is
//! looked at without following symlinks, and the agent refuses (naming the directory and the
//! reason) one that
//!
//! - is a symlink (point `socket_path` at the real path instead);
//! - is owned by anyone but the agent's user or root;
//! - is writable by group or others, except a root-owned sticky directory such as `/tmp` above
//!   the socket's own: there others cannot rename or remove what they do not own, and the next
//!   directory down must be the agent's or root's.
//!
//! A directory that does not exist yet is created by the agent, mode 0755, one level at a time. If
//! the umask narrowed that mode, it is set through the fd of the directory just created (opened
//! with `O_NOFOLLOW`), never through its path.
//!
//! The socket itself: a stale one left by a crashed agent is removed (never a live one, never
//! anything that is not a socket). `bind` creates it with the umask applied, which can only make
//! it stricter than 0777 (a connect is refused, not let through); it is then set to 0777 by path.
//! That path cannot be swapped between `bind` and the chmod, because nobody but the agent's user
//! and root can write the directory, and the path is checked to be a socket the agent owns first.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use sigil_core::untrusted::untrusted;
use tokio::net::UnixListener;

use crate::{Error, Result};

/// The mode of directories the agent creates on the way to its socket.
const DIR_MODE: u32 = 0o755;
/// The mode of the socket: every local process may connect.
const SOCKET_MODE: u32 = 0o777;
const STICKY: u32 = 0o1000;

/// Creates the socket at `path` in a directory only the agent's user or root controls (see the
/// module docs), replacing a stale socket but never a live one.
pub async fn bind_socket(path: &Path) -> Result<UnixListener> {
    let path = std::path::absolute(path)
        .map_err(|e| Error::io(format!("resolving {}", path.display()), e))?;
    let dir = path.parent().ok_or_else(|| {
        Error::Endpoint(format!(
            "socket_path {} has no directory; name a socket file such as /run/sigil-agent/public/api.sock",
            path.display()
        ))
    })?;
    let euid = rustix::process::geteuid().as_raw();
    secure_dir(dir, euid)?;
    remove_stale(&path).await?;
    let listener = UnixListener::bind(&path)
        .map_err(|e| Error::io(format!("binding {}", path.display()), e))?;
    let metadata = std::fs::symlink_metadata(&path)
        .map_err(|e| Error::io(format!("checking the new socket {}", path.display()), e))?;
    if !metadata.file_type().is_socket() || metadata.uid() != euid {
        return Err(Error::Endpoint(format!(
            "{} changed under the agent right after bind; check who else writes {}",
            path.display(),
            dir.display()
        )));
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| Error::io(format!("setting permissions of {}", path.display()), e))?;
    Ok(listener)
}

/// Checks every directory from `/` down to `dir`, creating the missing ones.
fn secure_dir(dir: &Path, euid: u32) -> Result<()> {
    let mut current = PathBuf::new();
    let components: Vec<Component<'_>> = dir.components().collect();
    for (index, component) in components.iter().enumerate() {
        match component {
            Component::RootDir | Component::Normal(_) => current.push(component),
            Component::CurDir => continue,
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::SocketDirectory {
                    path: dir.to_path_buf(),
                    reason: "the path contains `..`; write the socket_path without it".into(),
                });
            }
        }
        let own = index + 1 == components.len();
        let metadata = match std::fs::symlink_metadata(&current) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_dir(&current)?,
            Err(e) => return Err(Error::io(format!("checking {}", current.display()), e)),
        };
        check_dir(&current, &metadata, euid, own)?;
    }
    Ok(())
}

/// Why a directory on the socket's path is unsafe, if it is.
fn check_dir(path: &Path, metadata: &std::fs::Metadata, euid: u32, own: bool) -> Result<()> {
    let refuse = |reason: String| Error::SocketDirectory {
        path: path.to_path_buf(),
        reason,
    };
    if metadata.file_type().is_symlink() {
        // Whoever made the link chose its target: shown truncated and escaped.
        let target = std::fs::read_link(path)
            .map(|t| untrusted(&t.to_string_lossy()).to_string())
            .unwrap_or_else(|_| "?".into());
        return Err(refuse(format!(
            "it is a symbolic link (to {target}); the agent follows no links on the way to its socket: set socket_path to the real path"
        )));
    }
    if !metadata.is_dir() {
        return Err(refuse(
            "it is not a directory; choose another socket_path".into(),
        ));
    }
    let owner = metadata.uid();
    if owner != euid && owner != 0 {
        return Err(refuse(format!(
            "it is owned by uid {owner}, not by the agent's user (uid {euid}) or root, so that user could replace the socket; remove it or choose another socket_path"
        )));
    }
    let mode = metadata.mode() & 0o7777;
    let shared = mode & 0o022 != 0;
    let sticky_root = mode & STICKY != 0 && owner == 0;
    if shared && (own || !sticky_root) {
        return Err(refuse(format!(
            "it is writable by {} (mode {mode:04o}), who could replace the socket; make it writable by its owner only (chmod go-w) or choose another socket_path",
            if mode & 0o002 != 0 {
                "every user"
            } else {
                "its group"
            },
        )));
    }
    Ok(())
}

/// Creates one directory, mode 0755 whatever the umask, and returns what is there now (another
/// process may have created it first: it is then checked like any existing one).
fn create_dir(path: &Path) -> Result<std::fs::Metadata> {
    match std::fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => {
            let fd = rustix::fs::open(
                path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io(format!("opening {}", path.display()), e.into()))?;
            let stat = rustix::fs::fstat(&fd)
                .map_err(|e| Error::io(format!("checking {}", path.display()), e.into()))?;
            if stat.st_mode & 0o7777 != DIR_MODE {
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(DIR_MODE)).map_err(|e| {
                    Error::io(format!("setting the mode of {}", path.display()), e.into())
                })?;
            }
            tracing::info!(directory = %path.display(), "created the socket directory");
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("creating {}", path.display()), e)),
    }
    std::fs::symlink_metadata(path)
        .map_err(|e| Error::io(format!("checking {}", path.display()), e))
}

/// Removes a socket a crashed agent left at `path`; refuses a live one and anything else.
async fn remove_stale(path: &Path) -> Result<()> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("checking {}", path.display()), e)),
    };
    if !metadata.file_type().is_socket() {
        return Err(Error::Endpoint(format!(
            "{} exists and is not a socket; remove it or choose another socket_path",
            path.display()
        )));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(Error::Endpoint(format!(
            "another process is serving {}; stop it or choose another socket_path",
            path.display()
        )));
    }
    std::fs::remove_file(path)
        .map_err(|e| Error::io(format!("removing stale socket {}", path.display()), e))?;
    tracing::info!(socket = %path.display(), "replaced a stale Workload API socket");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).expect("stat").mode() & 0o7777
    }

    #[tokio::test]
    async fn creates_missing_directories_0755_and_the_socket_0777() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("a/b/api.sock");
        let _listener = bind_socket(&socket).await.expect("bound");
        assert_eq!(mode(&dir.path().join("a")), 0o755);
        assert_eq!(mode(&dir.path().join("a/b")), 0o755);
        assert_eq!(mode(&socket), 0o777);
    }

    #[tokio::test]
    async fn refuses_shared_and_linked_directories_without_touching_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = bind_socket(&open.join("api.sock"))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("writable by every user"), "{err}");
        assert_eq!(mode(&open), 0o777);

        // A world-writable directory is no safer higher up, unless it is root's and sticky.
        let err = bind_socket(&open.join("sub/api.sock"))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("writable by every user"), "{err}");
        assert!(!open.join("sub").exists());

        let private = dir.path().join("private");
        std::fs::create_dir(&private).expect("mkdir");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&private, &link).expect("symlink");
        let err = bind_socket(&link.join("api.sock"))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(mode(&private), 0o700);
        assert!(!private.join("api.sock").exists());
    }

    #[tokio::test]
    async fn replaces_a_stale_socket_but_not_a_live_one_or_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("api.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale"));
        let live = bind_socket(&socket).await.expect("stale socket replaced");
        let err = bind_socket(&socket).await.expect_err("live");
        assert!(err.to_string().contains("another process"), "{err}");
        drop(live);

        let file = dir.path().join("file.sock");
        std::fs::write(&file, "data").expect("file");
        let err = bind_socket(&file).await.expect_err("not a socket");
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).expect("kept"), "data");
    }
}
