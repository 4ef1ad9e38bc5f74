//! Peers nobody here wrote, run as processes with SVID files: `openssl s_client` and
//! `s_server`, and `curl`; and the check that they are installed at all.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, ensure};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::PATIENCE;
use crate::svid::SvidFiles;

/// True when every one of `tools` (e.g. `openssl`, `curl`) runs. On a developer machine without
/// one, prints a notice and answers false so `test` can skip; under `CI=true` that is an error.
pub fn peer_tools(test: &str, tools: &[&str]) -> anyhow::Result<bool> {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        // Only whether it starts matters: `openssl --version` exits 1, but openssl is there.
        .filter(|tool| Command::new(tool).arg("--version").output().is_err())
        .collect();
    if missing.is_empty() {
        return Ok(true);
    }
    crate::skip_unless_ci(
        test,
        &format!("{} cannot be started", missing.join(", ")),
        "install it (Debian: apt-get install openssl curl)",
    )?;
    Ok(false)
}

/// `-cert <cert> -key <key> -CAfile <ca>`: an SVID and the bundle that verifies the peer, as
/// `openssl s_client` and `s_server` take them.
pub fn openssl_identity<'a>(cert: &'a Path, key: &'a Path, ca: &'a Path) -> [&'a OsStr; 6] {
    [
        OsStr::new("-cert"),
        cert.as_os_str(),
        OsStr::new("-key"),
        key.as_os_str(),
        OsStr::new("-CAfile"),
        ca.as_os_str(),
    ]
}

/// Starts `openssl <args>` presenting `identity` ([`openssl_identity`]), with stdout piped and
/// `stdin` and `stderr` as given; killed when dropped, so a failed test leaves no peer behind.
fn spawn_openssl(
    args: &[&str],
    identity: [&OsStr; 6],
    stdin: Stdio,
    stderr: Stdio,
) -> anyhow::Result<tokio::process::Child> {
    tokio::process::Command::new("openssl")
        .args(args)
        .args(identity)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running openssl {} (is it installed?)", args[0]))
}

/// Sends `input` through `openssl s_client` to `127.0.0.1:port` with `cert`/`key`, verifying the
/// server against `ca`; returns stdout and stderr together once it exits (the server closes).
pub async fn openssl_client(
    port: u16,
    cert: &Path,
    key: &Path,
    ca: &Path,
    input: &[u8],
) -> anyhow::Result<String> {
    let address = format!("127.0.0.1:{port}");
    let mut child = spawn_openssl(
        &[
            "s_client",
            "-connect",
            &address,
            "-quiet",
            "-verify_return_error",
        ],
        openssl_identity(cert, key, ca),
        Stdio::piped(),
        Stdio::piped(),
    )?;
    let mut stdin = child.stdin.take().context("stdin")?;
    // The write may fail when the peer refused the handshake: that is an answer too.
    let _ = stdin.write_all(input).await;
    let output = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .context("openssl s_client hung")??;
    drop(stdin);
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// `openssl s_server -rev` (answers each line reversed) with `svid`, requiring a client
/// certificate from the bundle. Ready once it prints ACCEPT.
pub async fn openssl_server(port: u16, svid: &SvidFiles) -> anyhow::Result<tokio::process::Child> {
    let accept = port.to_string();
    let mut child = spawn_openssl(
        &[
            "s_server",
            "-accept",
            &accept,
            "-rev",
            "-Verify",
            "1",
            "-verify_return_error",
        ],
        openssl_identity(&svid.cert, &svid.key, &svid.bundle),
        Stdio::null(),
        Stdio::null(),
    )?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .context("openssl s_server did not start")??
            .context("openssl s_server exited")?;
        if line.contains("ACCEPT") {
            break;
        }
    }
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

/// One request with curl, presenting `svid` (and trusting its bundle) when given, with `extra`
/// flags before the URL: (status "CODE HTTP-VERSION", e.g. `200 1.1`, and the body).
pub async fn curl(
    url: &str,
    svid: Option<&SvidFiles>,
    extra: &[&str],
) -> anyhow::Result<(String, String)> {
    let mut command = tokio::process::Command::new("curl");
    command.args([
        "-sS",
        "--max-time",
        "30",
        "-w",
        "\n%{http_code} %{http_version}",
    ]);
    if let Some(svid) = svid {
        command.arg("--cacert").arg(&svid.bundle);
        command.arg("--cert").arg(&svid.cert);
        command.arg("--key").arg(&svid.key);
    }
    let output = command
        .args(extra)
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await?;
    ensure!(
        output.status.success(),
        "curl {} {url} failed: {}",
        extra.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout)?;
    let (body, status) = text.rsplit_once('\n').context("no status from curl")?;
    Ok((status.to_string(), body.to_string()))
}

/// An operator CA made by `openssl req`: `name.pem` and `name.key` (P-256) in `dir`, valid 30
/// days; `ca` says whether it may sign certificates.
pub fn openssl_ca(dir: &Path, name: &str, ca: bool) -> anyhow::Result<()> {
    let constraints = if ca {
        "basicConstraints=critical,CA:TRUE"
    } else {
        "basicConstraints=critical,CA:FALSE"
    };
    let output = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-days", "30", "-subj", &format!("/O=Operator/CN={name}")])
        .args([
            "-addext",
            constraints,
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.pem")))
        .output()?;
    ensure!(
        output.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// `openssl verify <extra> -CAfile <trusted> [-untrusted <intermediates>] <cert>`: fails with
/// openssl's words unless it says the certificate is OK.
pub fn openssl_verify(
    trusted: &Path,
    intermediates: Option<&Path>,
    cert: &Path,
    extra: &[&str],
) -> anyhow::Result<()> {
    let mut command = Command::new("openssl");
    command
        .arg("verify")
        .args(extra)
        .arg("-CAfile")
        .arg(trusted);
    if let Some(intermediates) = intermediates {
        command.arg("-untrusted").arg(intermediates);
    }
    let output = command
        .arg(cert)
        .output()
        .context("running openssl verify")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success() && stdout.contains(": OK"),
        "openssl verify: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
