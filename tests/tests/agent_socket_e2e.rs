//! End to end: the agent serves its Workload API socket only from a directory no other user
//! controls, and changes nothing it finds unsafe.
//!
//! The attack: the socket's directory was created beforehand by another user (or is world
//! writable), who then replaces `api.sock` with a socket of their own and receives the workloads'
//! connections; or the directory is a symlink, and the agent, setting the mode of "its" directory,
//! changes a directory it was never meant to touch. Each case must stop the real agent at start
//! with the reason, leaving the directory as it was.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, ensure};
use sigil_tests::{AgentProcess, ServerProcess};

/// The uid and gid of `nobody`: another user than the agent's.
const NOBODY: u32 = 65534;

fn mode(path: &Path) -> anyhow::Result<u32> {
    Ok(std::fs::symlink_metadata(path)?.mode() & 0o7777)
}

/// Starts an agent in `dir` (whose socket is `dir/public/api.sock`) and returns its log, failing
/// if it started.
fn refused_start(dir: &Path, server: &ServerProcess, bundle: &Path) -> anyhow::Result<String> {
    let token = server.cli_json(&["token", "generate"])?;
    let token = token["token"].as_str().context("no token")?;
    match AgentProcess::start(dir, server, bundle, Some(token), "") {
        Ok(_) => anyhow::bail!("the agent started with its socket in {}", dir.display()),
        Err(e) => Ok(format!("{e:#}")),
    }
}

#[test]
fn the_agent_refuses_socket_directories_it_does_not_control() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(&dir.path().join("server"), None, "")?;
    let bundle = dir.path().join("bundle.pem");
    server.write_trust(&bundle)?;

    // The admin socket is owner-only from the start, and nothing of its staging is left behind.
    ensure!(mode(&server.socket)? == 0o600, "admin socket mode");
    let leftovers: Vec<_> = std::fs::read_dir(&server.data_dir)?
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with(".admin.sock")
        })
        .collect();
    ensure!(leftovers.is_empty(), "staging left: {leftovers:?}");

    // A world-writable directory someone made beforehand.
    let case = dir.path().join("world-writable");
    std::fs::create_dir_all(case.join("public"))?;
    std::fs::set_permissions(case.join("public"), std::fs::Permissions::from_mode(0o777))?;
    let log = refused_start(&case, &server, &bundle)?;
    ensure!(log.contains("writable by every user"), "{log}");
    ensure!(
        mode(&case.join("public"))? == 0o777,
        "the directory was changed"
    );
    ensure!(!case.join("public/api.sock").exists(), "a socket was made");

    // A directory of another user.
    if rustix::process::geteuid().is_root() {
        let case = dir.path().join("other-user");
        std::fs::create_dir_all(case.join("public"))?;
        std::os::unix::fs::chown(case.join("public"), Some(NOBODY), Some(NOBODY))?;
        let log = refused_start(&case, &server, &bundle)?;
        ensure!(log.contains(&format!("owned by uid {NOBODY}")), "{log}");
        let metadata = std::fs::symlink_metadata(case.join("public"))?;
        ensure!(
            metadata.uid() == NOBODY && metadata.mode() & 0o7777 == 0o755,
            "the directory was changed"
        );
        ensure!(!case.join("public/api.sock").exists(), "a socket was made");
    } else {
        sigil_tests::skip_unless_ci(
            "the other-user case of the socket directory test",
            "it needs root to chown a directory to nobody",
            "run the tests as root (CI does)",
        )?;
    }

    // A symlink to a root-only directory in place of the socket directory.
    let case = dir.path().join("symlink");
    let private = dir.path().join("root-only");
    std::fs::create_dir_all(&case)?;
    std::fs::create_dir(&private)?;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::symlink(&private, case.join("public"))?;
    let log = refused_start(&case, &server, &bundle)?;
    ensure!(log.contains("symbolic link"), "{log}");
    ensure!(mode(&private)? == 0o700, "the link's target was changed");
    ensure!(!private.join("api.sock").exists(), "a socket was made");

    // A writable directory higher up is as bad: the agent creates nothing beneath it.
    let case = dir.path().join("writable-ancestor");
    std::fs::create_dir_all(&case)?;
    std::fs::set_permissions(&case, std::fs::Permissions::from_mode(0o777))?;
    let log = refused_start(&case, &server, &bundle)?;
    ensure!(log.contains("writable by every user"), "{log}");
    ensure!(!case.join("public").exists(), "a directory was made");

    // The agent's own directory, created by it: served, mode 0755, socket 0777.
    let case = dir.path().join("fresh");
    let token = server.cli_json(&["token", "generate"])?;
    let agent = AgentProcess::start(
        &case,
        &server,
        &bundle,
        Some(token["token"].as_str().context("no token")?),
        "",
    )?;
    ensure!(
        mode(&case.join("public"))? == 0o755,
        "socket directory mode"
    );
    ensure!(mode(&agent.socket)? == 0o777, "socket mode");
    Ok(())
}
