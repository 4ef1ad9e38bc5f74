//! deploy/monitoring is usable against the real binaries: the alert rules parse and every alert
//! carries expr, for, labels.severity and annotations.summary; the Grafana dashboard parses and
//! every panel queries something (tests/python/check_monitoring.py); and every Sigil series the
//! rules and the dashboard use is exported by a running `sigil-server` or `sigil-agent`, scraped
//! with curl, with the label values the rules select on. A renamed metric fails here, not in a
//! silent alert.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use sigil_tests::{Node, python, this_uid_selector};

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Sigil series the rules and dashboard use, from check_monitoring.py (which fails on a
/// malformed rule or panel); `None` when Python is not available on a developer machine.
fn series_used(test: &str) -> anyhow::Result<Option<BTreeSet<String>>> {
    let Some(python) = python::kubernetes_validate_python(test)? else {
        return Ok(None);
    };
    let output = Command::new(python)
        .arg(repository().join("tests/python/check_monitoring.py"))
        .arg(repository().join("deploy/monitoring"))
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success() && stdout.contains("\n0 problems"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let list = stdout
        .lines()
        .find_map(|line| line.strip_prefix("metrics: "))
        .context("check_monitoring.py printed no metrics line")?;
    Ok(Some(serde_json::from_str(list)?))
}

/// `/metrics` at `address`, fetched with curl (an HTTP client nobody here wrote).
fn scrape(address: &str) -> anyhow::Result<String> {
    let output = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--max-time", "10"])
        .arg(format!("http://{address}/metrics"))
        .output()
        .context("running curl (install curl)")?;
    ensure!(
        output.status.success(),
        "curl http://{address}/metrics: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// Every series name a query can use from this exposition: the names of the samples, and for
/// each `# TYPE` the names its samples take (a counter's `_total`, a histogram's `_bucket`,
/// `_sum` and `_count`), so that a labelled family with no sample yet counts as well.
fn series_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(typed) = line.strip_prefix("# TYPE ") {
            let mut parts = typed.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            if end > 0 {
                names.insert(line[..end].to_string());
            }
        }
    }
    names
}

/// The value of the sample written exactly `series` (name and labels as exported), if any.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
    })
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

#[test]
fn every_series_the_alerts_and_dashboard_use_exists_on_a_running_server_and_agent()
-> anyhow::Result<()> {
    let test = "every_series_the_alerts_and_dashboard_use_exists_on_a_running_server_and_agent";
    let Some(used) = series_used(test)? else {
        return Ok(());
    };
    ensure!(
        !used.is_empty(),
        "the rules and dashboard use no Sigil series"
    );

    // A server and an agent that has synced and holds a workload SVID, so the agent's series
    // have values the alerts would judge. Labelled series appear once they count something: a
    // federation relationship with an endpoint where nothing listens makes refreshes that are
    // refused.
    let federation = format!(
        "[[federation.relationships]]\ntrust_domain = \"unreachable.test\"\nbundle_endpoint_url = \"https://127.0.0.1:{}/\"\nprofile = \"https_web\"\n",
        sigil_tests::free_port()?
    );
    let selector = this_uid_selector()?;
    let node = Node::start_with(&federation, |server| {
        Node::entry(server, "spiffe://example.org/monitored", &selector, &[])
    })?;
    node.agent.cli(&["api", "fetch", "x509"])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (server, agent) = loop {
        let server = scrape(&node.server.health)?;
        let agent = scrape(&node.agent.health)?;
        let settled = sample(&agent, "sigil_agent_sync_connected") == Some(1.0)
            && sample(&server, "sigil_server_agents_connected") == Some(1.0)
            && server.contains("sigil_server_federated_bundle_refreshes_total{");
        if settled || std::time::Instant::now() > deadline {
            break (server, agent);
        }
        std::thread::sleep(Duration::from_millis(200));
    };

    let exported: BTreeSet<String> = series_names(&server)
        .into_iter()
        .chain(series_names(&agent))
        .collect();
    let missing: Vec<&String> = used.difference(&exported).collect();
    ensure!(
        missing.is_empty(),
        "deploy/monitoring uses series that neither the server nor the agent exports: {missing:?}\n\
         server:\n{server}\nagent:\n{agent}"
    );

    // The label values and value ranges the rules rely on, on a healthy pair.
    let now = now();
    for kind in ["x509", "jwt"] {
        let series = format!("sigil_server_ca_expiry_timestamp_seconds{{kind=\"{kind}\"}}");
        let expiry = sample(&server, &series).with_context(|| format!("no {series}:\n{server}"))?;
        ensure!(
            expiry > now + 36.0 * 3600.0,
            "{series} is {expiry}, not a Unix time more than 36 h ahead (the alert's threshold)"
        );
    }
    for (exposition, series, wanted) in [
        (&server, "sigil_server_datastore_up", 1.0),
        (&server, "sigil_server_issuance_spool_records", 0.0),
        (&server, "sigil_server_agents_connected", 1.0),
        (&agent, "sigil_agent_sync_connected", 1.0),
    ] {
        ensure!(
            sample(exposition, series) == Some(wanted),
            "{series} is {:?}, not {wanted}, on a healthy server and agent",
            sample(exposition, series)
        );
    }
    let earliest = sample(&agent, "sigil_agent_svid_earliest_expiry_timestamp_seconds")
        .context("no sigil_agent_svid_earliest_expiry_timestamp_seconds")?;
    ensure!(
        earliest > now + 15.0 * 60.0,
        "the agent holds an SVID, yet its earliest expiry is {earliest} (now {now})"
    );
    Ok(())
}
