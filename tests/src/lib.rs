//! The harness behind Sigil's end-to-end tests and benchmarks.
//!
//! [`ServerProcess`] and [`AgentProcess`] run the real `sigil-server` and `sigil-agent` binaries in
//! private directories on free loopback ports and drive their CLIs; [`postgres`] hands out a fresh
//! Postgres database per run and [`python`] a virtualenv with py-spiffe. Tests that need Postgres or
//! Python skip with a printed notice on a laptop without them, and fail under `CI=true`.

mod agent;
pub mod bench;
pub mod buf;
pub mod echo;
pub mod envoy;
pub mod federation;
pub mod forwarder;
pub mod ha;
pub mod kubernetes;
mod node;
pub mod postgres;
pub mod python;
pub mod scale;
mod server;
pub mod steps;
pub mod svid;
pub mod tools;

pub use agent::AgentProcess;
pub use node::{NODE_ALIAS, Node, this_uid_selector};
pub use server::{ServerProcess, entry_create};

use std::path::PathBuf;
use std::time::Duration;

/// How long a test waits on anything (a peer's answer, a log line) before it calls it a hang:
/// reaching it means something is stuck, not slow.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The directory holding the workspace's built binaries (`target/<profile>`), found from the
/// running test executable (`target/<profile>/deps/<test>`), or `SIGIL_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SIGIL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of a workspace binary, with a clear failure when it was not built.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing; build the binaries first with `cargo build --workspace --bins` (or set SIGIL_BIN_DIR)",
        path.display()
    );
    Ok(path)
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The DER certificates in a PEM text.
pub fn pem_certificates(pem: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|cert| cert.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in the PEM text");
    Ok(certs)
}

/// True when running under CI (`CI=true`), where skipping a test for a missing service is a
/// failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The one decision for every optional peer (Postgres, Envoy, Python packages, openssl, root):
/// `what` of `test` cannot run because `missing`. Under CI that is an error that says so and how
/// to fix it (`remedy`); on a developer machine it prints a notice and returns `Ok(())`, and the
/// caller skips.
pub fn skip_unless_ci(test: &str, missing: &str, remedy: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !in_ci(),
        "CI=true requires {test} to run, but {missing}; {remedy}"
    );
    eprintln!("NOTICE: skipping {test}: {missing}; {remedy}");
    Ok(())
}

/// The uid of this process (what the agent's unix attestor sees), from /proc/self/status.
pub fn current_uid() -> anyhow::Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no Uid line in /proc/self/status"))
}
