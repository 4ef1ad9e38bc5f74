//! The unix workload attestor: selectors from the caller's peer credentials (SO_PEERCRED) and its
//! /proc entry.
//!
//! Selectors: `unix:uid:<n>`, `unix:gid:<n>`, `unix:user:<name>`, `unix:group:<name>`,
//! `unix:supplementary_gid:<n>`, `unix:supplementary_group:<name>`, `unix:path:<exe>`. Names come
//! from the passwd and group files; the path from `/proc/<pid>/exe` when the agent may read it.
//! A process that exits before it is attested, or whose pid now belongs to another user, is
//! refused: it cannot be told apart from an impostor.

use std::path::PathBuf;

use sigil_core::selector::Selector;
use sigil_workload_api::source::Caller;
use tonic::Status;

/// Reads selectors for callers.
#[derive(Debug, Clone)]
pub struct UnixAttestor {
    proc_root: PathBuf,
    passwd: PathBuf,
    group: PathBuf,
}

impl UnixAttestor {
    /// An attestor reading `proc_root` (normally `/proc`) and the given passwd and group files.
    pub fn new(proc_root: PathBuf, passwd: PathBuf, group: PathBuf) -> Self {
        UnixAttestor {
            proc_root,
            passwd,
            group,
        }
    }

    /// The caller's selectors.
    pub fn attest(&self, caller: Caller) -> Result<Vec<Selector>, Status> {
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
        if let Some(pid) = caller.pid.filter(|pid| *pid > 0) {
            let process = self.proc_root.join(pid.to_string());
            let status = std::fs::read_to_string(process.join("status")).map_err(|e| {
                Status::permission_denied(format!(
                    "cannot attest the caller: process {pid} is gone or unreadable ({e}); it may have exited before attestation"
                ))
            })?;
            if !owned_by(&status, caller.uid) {
                return Err(Status::permission_denied(format!(
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
            match std::fs::read_link(process.join("exe")) {
                Ok(exe) => selectors.push(selector("path", exe.display().to_string())?),
                Err(e) => {
                    tracing::debug!(pid, error = %e, "no unix:path selector: cannot read the executable path")
                }
            }
        }
        selectors.sort();
        selectors.dedup();
        Ok(selectors)
    }
}

fn selector(kind: &str, value: String) -> Result<Selector, Status> {
    Selector::new("unix", format!("{kind}:{value}"))
        .map_err(|e| Status::permission_denied(format!("cannot describe the caller: {e}")))
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
    use super::*;

    fn fake_host() -> (tempfile::TempDir, UnixAttestor) {
        let dir = tempfile::tempdir().expect("tempdir");
        let proc_root = dir.path().join("proc");
        std::fs::create_dir_all(proc_root.join("4242")).expect("proc");
        std::fs::write(
            proc_root.join("4242/status"),
            "Name:\tweb\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t27 1000 \n",
        )
        .expect("status");
        std::os::unix::fs::symlink("/usr/bin/web", proc_root.join("4242/exe")).expect("exe");
        std::fs::create_dir_all(proc_root.join("5000")).expect("proc");
        std::fs::write(proc_root.join("5000/status"), "Uid:\t0\t0\t0\t0\n").expect("status");
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
        let attestor = UnixAttestor::new(
            proc_root,
            dir.path().join("passwd"),
            dir.path().join("group"),
        );
        (dir, attestor)
    }

    #[test]
    fn selectors_from_credentials_and_proc() {
        let (_dir, attestor) = fake_host();
        let selectors = attestor
            .attest(Caller {
                pid: Some(4242),
                uid: 1000,
                gid: 1000,
            })
            .expect("attested");
        let texts: Vec<String> = selectors.iter().map(ToString::to_string).collect();
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
    fn exited_or_reused_processes_are_refused() {
        let (_dir, attestor) = fake_host();
        let gone = attestor
            .attest(Caller {
                pid: Some(9999),
                uid: 1000,
                gid: 1000,
            })
            .unwrap_err();
        assert_eq!(gone.code(), tonic::Code::PermissionDenied);
        assert!(gone.message().contains("exited"), "{}", gone.message());
        let reused = attestor
            .attest(Caller {
                pid: Some(5000),
                uid: 1000,
                gid: 1000,
            })
            .unwrap_err();
        assert!(
            reused.message().contains("no longer belongs"),
            "{}",
            reused.message()
        );
    }

    #[test]
    fn unknown_ids_still_get_numeric_selectors() {
        let (_dir, attestor) = fake_host();
        let selectors = attestor
            .attest(Caller {
                pid: None,
                uid: 4321,
                gid: 4321,
            })
            .expect("attested");
        let texts: Vec<String> = selectors.iter().map(ToString::to_string).collect();
        assert_eq!(texts, ["unix:gid:4321", "unix:uid:4321"]);
    }
}
