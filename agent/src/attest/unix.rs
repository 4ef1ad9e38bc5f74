//! The unix workload attestor: selectors from the caller's peer credentials (SO_PEERCRED) and its
//! /proc entry.
//!
//! Selectors: `unix:uid:<n>`, `unix:gid:<n>`, `unix:user:<name>`, `unix:group:<name>`,
//! `unix:supplementary_gid:<n>`, `unix:supplementary_group:<name>`, `unix:path:<exe>`. Names come
//! from the passwd and group files; the path from `/proc/<pid>/exe` when the agent may read it.
//! `/proc` is read through the process held since the connection was accepted
//! ([`sigil_workload_api::peer`]), and checked afterwards to still be that process: one that
//! exited, whose pid went to another process, that executed another program, or that now runs as
//! another user is refused, because it cannot be told apart from an impostor.

use std::path::PathBuf;

use sigil_core::selector::Selector;
use sigil_workload_api::source::Caller;

use super::{WorkloadAttestor, read_proc};
use crate::{Error, Result};

/// Reads selectors for callers.
#[derive(Debug, Clone)]
pub struct UnixAttestor {
    passwd: PathBuf,
    group: PathBuf,
}

impl UnixAttestor {
    /// An attestor naming users and groups from the given passwd and group files.
    pub fn new(passwd: PathBuf, group: PathBuf) -> Self {
        UnixAttestor { passwd, group }
    }

    /// The caller's selectors, sorted.
    fn selectors(&self, caller: &Caller) -> Result<Vec<Selector>> {
        let mut selectors = vec![
            selector("uid", caller.uid.to_string())?,
            selector("gid", caller.gid.to_string())?,
        ];
        // Each names file is read once per attestation, however many groups the caller has.
        let users = std::fs::read_to_string(&self.passwd).unwrap_or_default();
        let groups = std::fs::read_to_string(&self.group).unwrap_or_default();
        if let Some(name) = name_of(&users, caller.uid) {
            selectors.push(selector("user", name)?);
        }
        if let Some(name) = name_of(&groups, caller.gid) {
            selectors.push(selector("group", name)?);
        }
        if let Some(process) = &caller.process {
            let pid = process.pid();
            let status = read_proc(process, "status", |e| {
                format!(
                    "cannot attest the caller: process {pid} is gone or unreadable ({e}); it may have exited before attestation"
                )
            })?;
            if !owned_by(&status, caller.uid) {
                return Err(Error::CallerRefused(format!(
                    "cannot attest the caller: process {pid} no longer belongs to uid {}",
                    caller.uid
                )));
            }
            for gid in supplementary_groups(&status) {
                selectors.push(selector("supplementary_gid", gid.to_string())?);
                if let Some(name) = name_of(&groups, gid) {
                    selectors.push(selector("supplementary_group", name)?);
                }
            }
            match process.read_link("exe") {
                Ok(exe) => selectors.push(selector("path", exe.display().to_string())?),
                Err(e) => {
                    tracing::debug!(pid, error = %e, "no unix:path selector: cannot read the executable path")
                }
            }
            // What was read is the connecting process's only if it is still that process.
            process.verify().map_err(Error::CallerChanged)?;
        }
        selectors.sort();
        selectors.dedup();
        Ok(selectors)
    }
}

#[tonic::async_trait]
impl WorkloadAttestor for UnixAttestor {
    async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>> {
        self.selectors(caller)
    }
}

fn selector(kind: &str, value: String) -> Result<Selector> {
    Selector::new("unix", format!("{kind}:{value}")).map_err(Error::CallerUndescribable)
}

/// The name for `id` in the text of a passwd- or group-format file (`name:x:id:...`).
fn name_of(text: &str, id: u32) -> Option<String> {
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let found: u32 = fields.next()?.parse().ok()?;
        (found == id && !name.is_empty()).then(|| name.to_string())
    })
}

/// Whether the `Uid:` line of a /proc status file has `uid` as real or effective id.
fn owned_by(status: &str, uid: u32) -> bool {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .is_some_and(|ids| {
            ids.split_whitespace()
                .take(2)
                .any(|id| id.parse() == Ok(uid))
        })
}

fn supplementary_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|ids| {
            ids.split_whitespace()
                .filter_map(|id| id.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use rustix::process::{PidfdFlags, getpid, pidfd_open};
    use sigil_workload_api::peer::PeerProcess;
    use tonic::Code;

    use super::*;
    use crate::node::fake::assert_status;

    fn stat_line(pid: i32, start_time: u64) -> String {
        format!("{pid} (web) S 1 {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start_time} 0 0\n")
    }

    fn fake_host() -> (tempfile::TempDir, UnixAttestor) {
        let dir = tempfile::tempdir().expect("tempdir");
        let proc_root = dir.path().join("proc");
        std::fs::create_dir_all(proc_root.join("4242")).expect("proc");
        std::fs::write(
            proc_root.join("4242/status"),
            "Name:\tweb\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t27 1000 \n",
        )
        .expect("status");
        std::fs::write(proc_root.join("4242/stat"), stat_line(4242, 100)).expect("stat");
        std::os::unix::fs::symlink("/usr/bin/web", proc_root.join("4242/exe")).expect("exe");
        std::fs::create_dir_all(proc_root.join("5000")).expect("proc");
        std::fs::write(proc_root.join("5000/status"), "Uid:\t0\t0\t0\t0\n").expect("status");
        std::fs::write(proc_root.join("5000/stat"), stat_line(5000, 300)).expect("stat");
        std::fs::write(
            dir.path().join("passwd"),
            "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        )
        .expect("passwd");
        std::fs::write(
            dir.path().join("group"),
            "root:x:0:\nsudo:x:27:alice\nalice:x:1000:\n",
        )
        .expect("group");
        let attestor = UnixAttestor::new(dir.path().join("passwd"), dir.path().join("group"));
        (dir, attestor)
    }

    /// A caller whose /proc entry is the fake `pid` under `dir`, held (as the server does at
    /// accept) by a pidfd of this test process, which stays alive.
    fn held(dir: &Path, pid: i32, uid: u32) -> Caller {
        let pidfd = pidfd_open(getpid(), PidfdFlags::empty()).expect("pidfd");
        let process = PeerProcess::hold_pidfd(&dir.join("proc"), pid, pidfd).expect("held");
        Caller {
            pid: Some(pid),
            uid,
            gid: uid,
            process: Some(Arc::new(process)),
        }
    }

    fn texts(selectors: &[Selector]) -> Vec<String> {
        selectors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn selectors_from_credentials_and_proc() {
        let (dir, attestor) = fake_host();
        let selectors = attestor
            .selectors(&held(dir.path(), 4242, 1000))
            .expect("attested");
        let texts = texts(&selectors);
        for expected in [
            "unix:uid:1000",
            "unix:gid:1000",
            "unix:user:alice",
            "unix:group:alice",
            "unix:supplementary_gid:27",
            "unix:supplementary_group:sudo",
            "unix:path:/usr/bin/web",
        ] {
            assert!(
                texts.contains(&expected.to_string()),
                "{expected} missing from {texts:?}"
            );
        }
    }

    #[test]
    fn a_pid_reused_between_accept_and_attestation_is_refused() {
        let (dir, attestor) = fake_host();
        let caller = held(dir.path(), 4242, 1000);
        // Another process got pid 4242 after the connection was accepted: another start time.
        std::fs::write(dir.path().join("proc/4242/stat"), stat_line(4242, 200)).expect("stat");
        assert_status(
            attestor.selectors(&caller).expect_err("refused"),
            Code::PermissionDenied,
            &["the caller changed", "start time changed"],
        );
    }

    #[test]
    fn exited_or_reused_processes_are_refused() {
        let (dir, attestor) = fake_host();
        // `cat` lives until its stdin closes: it exits after accept, before attestation.
        let mut child = std::process::Command::new("cat")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn cat");
        let pid = i32::try_from(child.id()).expect("pid");
        let process = PeerProcess::hold(Path::new("/proc"), pid).expect("held");
        drop(child.stdin.take());
        child.wait().expect("wait");
        let gone = attestor
            .selectors(&Caller {
                pid: Some(pid),
                uid: 0,
                gid: 0,
                process: Some(Arc::new(process)),
            })
            .expect_err("exited");
        assert_status(gone, Code::PermissionDenied, &["exited"]);
        let reused = attestor
            .selectors(&held(dir.path(), 5000, 1000))
            .expect_err("another user's");
        assert_status(reused, Code::PermissionDenied, &["no longer belongs"]);
    }

    #[test]
    fn unknown_ids_still_get_numeric_selectors() {
        let (_dir, attestor) = fake_host();
        let selectors = attestor
            .selectors(&Caller {
                pid: None,
                uid: 4321,
                gid: 4321,
                process: None,
            })
            .expect("attested");
        assert_eq!(texts(&selectors), ["unix:gid:4321", "unix:uid:4321"]);
    }
}
