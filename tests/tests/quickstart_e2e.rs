//! The README's first command: `sigil-quickstart` starts an embedded server and agent, gives the
//! invoking user an identity, prints how to fetch it, and stops cleanly on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, ensure};

#[test]
fn quickstart_serves_the_invoking_user_and_stops_on_ctrl_c() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for run in 0..2 {
        let mut child = Command::new(sigil_tests::binary("sigil-quickstart")?)
            .current_dir(dir.path())
            .env("USER", "tester")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let (lines_tx, lines_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    return;
                }
            }
        });
        // The quickstart prints "Press Ctrl-C to stop." once both are serving.
        let mut printed = Vec::new();
        loop {
            let line = lines_rx
                .recv_timeout(Duration::from_secs(60))
                .context("the quickstart did not become ready")?;
            let done = line.contains("Press Ctrl-C");
            printed.push(line);
            if done {
                break;
            }
        }
        let text = printed.join("\n");
        ensure!(text.contains("spiffe://example.org/dev/tester"), "{text}");
        let endpoint = printed
            .iter()
            .find_map(|line| line.trim().strip_prefix("export SPIFFE_ENDPOINT_SOCKET="))
            .context("no export line")?
            .to_string();
        let fetched = Command::new(sigil_tests::binary("sigil-agent")?)
            .args(["api", "fetch", "x509", "--output", "json"])
            .env("SPIFFE_ENDPOINT_SOCKET", &endpoint)
            .output()?;
        let json = sigil_tests::steps::json_stdout(fetched, &format!("run {run}"))?;
        ensure!(
            json["svids"][0]["spiffe_id"] == "spiffe://example.org/dev/tester",
            "{json}"
        );

        let status = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill -INT");
        let exit = child.wait()?;
        ensure!(
            exit.success(),
            "run {run}: the quickstart exited with {exit}"
        );
    }
    Ok(())
}
