//! `buf curl`, the generic gRPC command-line client of the buf Protocol Buffers toolchain (Go,
//! `connect-go`'s HTTP/2 stack): the admin API test drives the server with it as an operator's
//! shell script would. It stands in for `grpcurl`, which none of the registries this project's CI
//! reaches carries (not in Debian, PyPI or npm); buf publishes its release binaries on npm, so the
//! binary is fetched from there, checked against a pinned digest, and kept under the target
//! directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};

/// The buf release the tests pin, and the SHA-256 of its npm tarball for x86-64 Linux.
const VERSION: &str = "1.75.0";
const TARBALL_SHA256: &str = "98b19d4b2b46130e083157490c54dfdcb8ea771e53204d3c6a06a2b12edd0503";

/// The `buf` binary, fetched on first use; `None` (with a printed notice) where it cannot be
/// fetched on a developer machine. Under `CI=true` that is an error instead.
pub fn buf_binary(test: &str) -> anyhow::Result<Option<PathBuf>> {
    let dir = crate::bin_dir().join(format!("buf-{VERSION}"));
    let binary = dir.join("package/bin/buf");
    if binary.is_file() {
        return Ok(Some(binary));
    }
    // Tests run as separate processes at once: one fetches while the others wait on this lock.
    std::fs::create_dir_all(&dir)?;
    let lock = std::fs::File::create(dir.join(".lock"))?;
    lock.lock()?;
    if binary.is_file() {
        return Ok(Some(binary));
    }
    match fetch(&dir) {
        Ok(()) => Ok(Some(binary)),
        Err(e) => {
            crate::skip_unless_ci(
                test,
                &format!("buf {VERSION} cannot be fetched from registry.npmjs.org ({e:#})"),
                "let the machine reach registry.npmjs.org, and install curl and tar",
            )?;
            Ok(None)
        }
    }
}

/// Downloads the npm tarball into `dir`, checks its digest, and unpacks it there.
fn fetch(dir: &Path) -> anyhow::Result<()> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        anyhow::bail!("the pinned buf tarball is for x86-64 Linux only");
    }
    let url =
        format!("https://registry.npmjs.org/@bufbuild/buf-linux-x64/-/buf-linux-x64-{VERSION}.tgz");
    let tarball = dir.join("buf.tgz");
    let output = Command::new("curl")
        .args([
            "--fail",
            "--silent",
            "--show-error",
            "--location",
            "--output",
        ])
        .arg(&tarball)
        .arg(&url)
        .output()
        .context("running curl")?;
    ensure!(
        output.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bytes = std::fs::read(&tarball)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let hex: String = digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    ensure!(
        hex == TARBALL_SHA256,
        "{url} has SHA-256 {hex}, not the pinned {TARBALL_SHA256}"
    );
    // Unpacked beside the final place and moved there in one rename: a test that finds the
    // binary before this one has finished must never exec a file tar is still writing (the
    // kernel refuses that with "Text file busy").
    let staging = dir.join(format!("staging-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;
    let output = Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&staging)
        .output()
        .context("running tar")?;
    ensure!(
        output.status.success(),
        "unpacking {}: {}",
        tarball.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    // A `package` without the binary is what an interrupted older run left behind.
    if dir.join("package").exists() {
        std::fs::remove_dir_all(dir.join("package"))?;
    }
    std::fs::rename(staging.join("package"), dir.join("package"))?;
    std::fs::remove_dir_all(&staging)?;
    std::fs::remove_file(&tarball)?;
    Ok(())
}

/// `buf curl` calling `method` (e.g. `CountEntries`) of the admin API on the Unix socket
/// `socket` with the JSON request `data`, the schema read from the project's proto files.
pub fn buf_curl_admin(buf: &Path, socket: &Path, method: &str, data: &Path) -> Command {
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/proto");
    let mut command = Command::new(buf);
    command
        .args(["curl", "--protocol", "grpc", "--http2-prior-knowledge"])
        .arg("--unix-socket")
        .arg(socket)
        .arg("--schema")
        .arg(proto)
        .arg("--data")
        .arg(format!("@{}", data.display()))
        .arg(format!("http://localhost/sigil.admin.v1.AdminApi/{method}"))
        // buf keeps a module cache; a scratch one per call leaves nothing in the user's home.
        .env("BUF_CACHE_DIR", data.with_extension("buf-cache"));
    command
}
