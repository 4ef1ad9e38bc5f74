//! The process on the other end of a connection, held from the moment the connection is accepted.
//!
//! `SO_PEERCRED` gives the pid of the process that called `connect`, but a pid is only a number:
//! the process can exit and the number go to another process, or it can `execve` another program
//! and keep the number. Attestation reads `/proc` at every call, so reading `/proc/<pid>` by
//! number would attest whatever has the pid by then. Instead, right after accept, the server takes
//!
//! - a pidfd (`pidfd_open`), which becomes readable when the process exits, and never refers to
//!   another process;
//! - a directory fd on `/proc/<pid>`, opened while the pidfd shows the process alive, so it is the
//!   same process's directory; every later read of `/proc` goes through it;
//! - the start time (field 22 of `/proc/<pid>/stat`) and the identity (device and inode) of the
//!   program it runs (`/proc/<pid>/exe`).
//!
//! After each attestation has read what it needs, [`PeerProcess::verify`] checks that the process
//! has not exited, has the same start time, and still runs the same program; otherwise the call is
//! refused. `execve` keeps the pid and the start time, so only the program check notices it.
//!
//! The kernel's `SO_PEERPIDFD` (Linux 6.5) would give the pidfd of the connecting process itself;
//! it has no safe wrapper yet, so the pidfd is taken by pid right after accept. What is left is the
//! interval between `connect` and accept: to slip into it, a process would have to connect, exit,
//! and have the whole pid space cycle until its pid is handed to the process it wants attested,
//! all before the agent accepts (microseconds).

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fs::{AtFlags, Mode, OFlags, openat, readlinkat, statat};
use rustix::process::{Pid, PidfdFlags, pidfd_open};

use crate::source::Caller;
use crate::{Error, Result};

/// A process held from accept: read its `/proc` entry through [`PeerProcess::read`] and
/// [`PeerProcess::read_link`], then call [`PeerProcess::verify`].
#[derive(Debug)]
pub struct PeerProcess {
    pid: i32,
    pidfd: OwnedFd,
    dir: OwnedFd,
    start_time: u64,
    program: Option<FileId>,
}

/// Device and inode of a file: what stays the same while a program runs, and changes on `execve`
/// of another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    device: u64,
    inode: u64,
}

impl PeerProcess {
    /// Holds process `pid`, whose `/proc` entry is under `proc_root` (normally `/proc`).
    pub fn hold(proc_root: &Path, pid: i32) -> Result<Self> {
        let raw = Pid::from_raw(pid).ok_or_else(|| Error::Caller {
            pid,
            reason: "the kernel reported no usable pid".into(),
        })?;
        let pidfd = pidfd_open(raw, PidfdFlags::empty()).map_err(|e| Error::Caller {
            pid,
            reason: format!("the process exited before it could be attested ({e})"),
        })?;
        Self::hold_pidfd(proc_root, pid, pidfd)
    }

    /// Holds the process behind `pidfd` (from `SO_PEERPIDFD` or `pidfd_open`), whose `/proc`
    /// entry is `proc_root/<pid>`.
    pub fn hold_pidfd(proc_root: &Path, pid: i32, pidfd: OwnedFd) -> Result<Self> {
        let dir = rustix::fs::open(
            proc_root.join(pid.to_string()),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::Caller {
            pid,
            reason: format!("cannot open its /proc entry ({e}); it may have exited"),
        })?;
        let mut process = PeerProcess {
            pid,
            pidfd,
            dir,
            start_time: 0,
            program: None,
        };
        // The directory was opened while the pidfd's process had the pid only if it is still
        // alive now: then the directory is that process's.
        process.check_alive()?;
        process.start_time = process.read_start_time()?;
        process.program = process.program();
        Ok(process)
    }

    /// The pid the process had when it connected.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The text of `/proc/<pid>/<name>` of this process.
    pub fn read(&self, name: &str) -> Result<String> {
        let context = || format!("reading /proc/{}/{name}", self.pid);
        let fd = openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| Error::io(context(), e.into()))?;
        let mut text = String::new();
        File::from(fd)
            .read_to_string(&mut text)
            .map_err(|e| Error::io(context(), e))?;
        Ok(text)
    }

    /// The target of the link `/proc/<pid>/<name>` of this process (e.g. `exe`).
    pub fn read_link(&self, name: &str) -> Result<PathBuf> {
        let target = readlinkat(&self.dir, name, Vec::new())
            .map_err(|e| Error::io(format!("reading /proc/{}/{name}", self.pid), e.into()))?;
        Ok(PathBuf::from(OsString::from_vec(target.into_bytes())))
    }

    /// Checks that the process is still the one that connected: alive, same start time, same
    /// program. Call it after reading, so what was read belongs to that process.
    pub fn verify(&self) -> Result<()> {
        self.check_alive()?;
        let start_time = self.read_start_time()?;
        if start_time != self.start_time {
            return Err(self.changed(format!(
                "its start time changed from {} to {start_time}: the pid belongs to another process now",
                self.start_time
            )));
        }
        if self.program() != self.program {
            return Err(self.changed(
                "it executed another program since it connected; connect again after execve".into(),
            ));
        }
        Ok(())
    }

    fn check_alive(&self) -> Result<()> {
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let ready = poll(&mut fds, Some(&zero))
            .map_err(|e| Error::io(format!("polling the pidfd of {}", self.pid), e.into()))?;
        if ready > 0 {
            return Err(self.changed("it exited since it connected".into()));
        }
        Ok(())
    }

    fn read_start_time(&self) -> Result<u64> {
        let stat = self.read("stat").map_err(|e| self.changed(e.to_string()))?;
        start_time(&stat).ok_or_else(|| Error::Caller {
            pid: self.pid,
            reason: "its /proc stat file has no start time".into(),
        })
    }

    /// Device and inode of the program the process runs; `None` when the agent may not look
    /// (another user's process, for an agent that is not root) or the process is a zombie.
    fn program(&self) -> Option<FileId> {
        statat(&self.dir, "exe", AtFlags::empty())
            .ok()
            .map(|stat| FileId {
                device: stat.st_dev,
                inode: stat.st_ino,
            })
    }

    fn changed(&self, reason: String) -> Error {
        Error::Caller {
            pid: self.pid,
            reason: format!("the caller changed: {reason}"),
        }
    }
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line. The second field, the command name in
/// parentheses, may itself contain spaces and parentheses, so fields are counted after the last
/// `)`.
fn start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After the name come field 3 (state) onwards: field 22 is the 20th of them.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What the server learnt about a connection at accept: the caller, or why it cannot be attested.
#[derive(Debug, Clone)]
pub(crate) struct Peer(Result<Caller, Arc<str>>);

impl Peer {
    /// Reads the peer credentials of a freshly accepted connection and holds its process.
    pub(crate) fn accept(stream: &tokio::net::UnixStream, proc_root: &Path) -> Self {
        let credentials = match stream.peer_cred() {
            Ok(credentials) => credentials,
            Err(e) => {
                return Peer(Err(format!(
                    "cannot read the caller's credentials from the socket: {e}"
                )
                .into()));
            }
        };
        // pid 0: the caller is in a pid namespace the agent cannot see; it gets uid/gid only.
        let process = match credentials.pid().filter(|pid| *pid > 0) {
            Some(pid) => match PeerProcess::hold(proc_root, pid) {
                Ok(process) => Some(Arc::new(process)),
                Err(e) => {
                    tracing::debug!(pid, error = %e, "cannot hold the process of a new connection");
                    return Peer(Err(e.to_string().into()));
                }
            },
            None => None,
        };
        Peer(Ok(Caller {
            pid: credentials.pid(),
            uid: credentials.uid(),
            gid: credentials.gid(),
            process,
        }))
    }

    /// The caller, or the reason it cannot be attested.
    pub(crate) fn caller(&self) -> std::result::Result<Caller, Arc<str>> {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat = "4242 (we b) (x) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 12345 67 18446744073709551615";
        assert_eq!(start_time(stat), Some(987_654));
        assert_eq!(start_time("4242 (web) S 1 2"), None);
        assert_eq!(start_time("no parenthesis"), None);
    }

    fn own_pidfd() -> OwnedFd {
        let pid = rustix::process::getpid();
        pidfd_open(pid, PidfdFlags::empty()).expect("pidfd of this process")
    }

    #[test]
    fn the_own_process_is_held_and_verified() {
        let pid = rustix::process::getpid().as_raw_nonzero().get();
        let process = PeerProcess::hold(Path::new("/proc"), pid).expect("held");
        assert!(process.read("status").expect("status").contains("Uid:"));
        assert!(process.read_link("exe").is_ok());
        process.verify().expect("still the same process");
    }

    #[test]
    fn an_exited_process_is_refused() {
        // `cat` lives until its stdin closes.
        let mut child = std::process::Command::new("cat")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn cat");
        let pid = i32::try_from(child.id()).expect("pid");
        let process = PeerProcess::hold(Path::new("/proc"), pid).expect("held");
        process.verify().expect("alive");
        drop(child.stdin.take());
        child.wait().expect("wait");
        let err = process.verify().expect_err("exited");
        assert!(err.to_string().contains("exited"), "{err}");
        // Once reaped, the pid cannot be held at all.
        let err = PeerProcess::hold(Path::new("/proc"), pid).expect_err("gone");
        assert!(err.to_string().contains("exited"), "{err}");
    }

    #[test]
    fn a_changed_start_time_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let entry = dir.path().join("4242");
        std::fs::create_dir(&entry).expect("entry");
        let stat = |start: u64| {
            format!("4242 (web) S 1 4242 4242 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0")
        };
        std::fs::write(entry.join("stat"), stat(100)).expect("stat");
        let process = PeerProcess::hold_pidfd(dir.path(), 4242, own_pidfd()).expect("held");
        process.verify().expect("unchanged");
        std::fs::write(entry.join("stat"), stat(200)).expect("stat");
        let err = process.verify().expect_err("changed");
        assert!(err.to_string().contains("start time changed"), "{err}");
    }
}
