//! The admin API as automation uses it (issue 13), against the real `sigil-server`: an operator's
//! Python script with grpcio (stubs generated from our proto files, no `:authority` override)
//! creates entries one by one and in batches, pages through them and counts them; and the CLI's
//! `entry create --data` with good and bad entries mixed stores the good ones, names each bad one
//! with its reason, and changes nothing else; and `buf curl` (a Go gRPC client, standing in for
//! grpcurl, see `sigil_tests::buf`) as a shell script would call it, including the limits a
//! caller can hit, each refused by name. On SQLite and on a fresh Postgres database.

use std::collections::BTreeSet;

use anyhow::{Context, ensure};
use sigil_tests::buf::{buf_binary, buf_curl_admin};
use sigil_tests::python::{grpcio_admin_client, grpcio_python};
use sigil_tests::{ServerProcess, postgres};

const PARENT: &str = "spiffe://example.org/sigil/agent/automation";
/// The parent of the entries `buf curl` makes, so its pages hold only those.
const BUF_PARENT: &str = "spiffe://example.org/sigil/agent/buf";

#[test]
fn automation_drives_the_admin_api_on_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(&dir.path().join("server"), None, "")?;
    drive(
        &server,
        dir.path(),
        "automation_drives_the_admin_api_on_sqlite",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automation_drives_the_admin_api_on_postgres() -> anyhow::Result<()> {
    let Some(database) = postgres::fresh_database("admin_automation_e2e").await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(&dir.path().join("server"), Some(&database.url), "")?;
    tokio::task::block_in_place(|| {
        drive(
            &server,
            dir.path(),
            "automation_drives_the_admin_api_on_postgres",
        )
    })
}

fn drive(server: &ServerProcess, scratch: &std::path::Path, test: &str) -> anyhow::Result<()> {
    a_data_file_stores_the_good_entries_and_names_the_bad(server, scratch)?;
    let before = entry_count(server)?;
    if let Some(python) = grpcio_python(test)? {
        grpcio_creates_pages_and_counts(server, &python, before)?;
    }
    if let Some(buf) = buf_binary(test)? {
        buf_curl_creates_pages_counts_and_hits_the_limits(server, &buf, scratch)?;
    }
    Ok(())
}

/// One admin call through `buf curl` with `request` as its JSON body: the JSON answer, or the
/// error buf printed (`Err` carries its stderr, which holds the gRPC code and message).
fn buf_call(
    server: &ServerProcess,
    buf: &std::path::Path,
    scratch: &std::path::Path,
    method: &str,
    request: &serde_json::Value,
) -> anyhow::Result<Result<serde_json::Value, String>> {
    let data = scratch.join(format!("{method}.json"));
    std::fs::write(&data, serde_json::to_vec(request)?)?;
    let output = buf_curl_admin(buf, &server.socket, method, &data).output()?;
    if !output.status.success() {
        return Ok(Err(String::from_utf8_lossy(&output.stderr).into_owned()));
    }
    Ok(Ok(serde_json::from_slice(&output.stdout).with_context(
        || format!("buf curl {method} printed no JSON"),
    )?))
}

/// `buf curl`: CreateEntry, BatchCreateEntries with one bad item, pages of 2 following the
/// token, CountEntries, and the three bounds a script can hit (a batch of 1 001, a page of
/// 5 001, a page token over 2 048 bytes), each refused with InvalidArgument naming the limit.
fn buf_curl_creates_pages_counts_and_hits_the_limits(
    server: &ServerProcess,
    buf: &std::path::Path,
    scratch: &std::path::Path,
) -> anyhow::Result<()> {
    let call =
        |method: &str, request: serde_json::Value| buf_call(server, buf, scratch, method, &request);
    let entry = |name: &str, uid: u32| {
        serde_json::json!({"spiffeId": format!("spiffe://example.org/buf/{name}"),
            "parentId": BUF_PARENT, "selectors": [{"type": "unix", "value": format!("uid:{uid}")}]})
    };
    let filter = serde_json::json!({"parentId": BUF_PARENT});
    let before = entry_count(server)?;

    let created = call(
        "CreateEntry",
        serde_json::json!({"entry": entry("single", 7000)}),
    )?
    .map_err(anyhow::Error::msg)?;
    ensure!(
        created["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{created}"
    );
    let batch = call(
        "BatchCreateEntries",
        serde_json::json!({"entries": [entry("b1", 7001), {"spiffeId": "nope", "parentId": BUF_PARENT},
            entry("b2", 7002), entry("b3", 7003)]}),
    )?
    .map_err(anyhow::Error::msg)?;
    let results = batch["results"].as_array().context("results")?;
    ensure!(results.len() == 4, "one result per item: {batch}");
    // proto3 JSON leaves out a zero code: written items have none.
    let codes: Vec<i64> = results
        .iter()
        .map(|r| r["code"].as_i64().unwrap_or(0))
        .collect();
    ensure!(
        codes == [0, 3, 0, 0],
        "only the bad item fails, with InvalidArgument: {batch}"
    );
    ensure!(
        results[1]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("spiffe_id"),
        "the bad item's field is named: {batch}"
    );

    let mut ids = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let mut request = filter.clone();
        request["pageSize"] = 2.into();
        request["pageToken"] = token.clone().into();
        let page = call("ListEntries", request)?.map_err(anyhow::Error::msg)?;
        pages += 1;
        for entry in page["entries"].as_array().into_iter().flatten() {
            ids.push(entry["id"].as_str().context("id")?.to_string());
        }
        token = page["nextPageToken"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if token.is_empty() {
            break;
        }
        ensure!(pages < 10_000, "the pages never end");
    }
    // proto3 JSON writes a uint64 as a string.
    let counted = call("CountEntries", filter.clone())?.map_err(anyhow::Error::msg)?;
    let count: u64 = counted["count"].as_str().unwrap_or("0").parse()?;
    ensure!(count == 4, "CountEntries says {count}, 4 expected");
    ensure!(ids.len() == 4, "{} listed, 4 expected", ids.len());
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    ensure!(sorted == ids, "pages are in a stable order without repeats");
    ensure!(pages == 2, "{pages} pages of 2 for 4 entries");

    let refused = |method: &str, request: serde_json::Value, names: &[&str]| {
        let error = match call(method, request)? {
            Ok(answer) => anyhow::bail!("{method} over its limit was answered: {answer}"),
            Err(error) => error,
        };
        ensure!(error.contains("invalid_argument"), "{method}: {error}");
        for name in names {
            ensure!(error.contains(name), "{method} names {name}: {error}");
        }
        anyhow::Ok(())
    };
    let too_many: Vec<_> = (0..1001)
        .map(|n| entry(&format!("over-{n}"), 8000 + n))
        .collect();
    refused(
        "BatchCreateEntries",
        serde_json::json!({"entries": too_many}),
        &["1001", "1000"],
    )?;
    refused(
        "ListEntries",
        serde_json::json!({"pageSize": 5001}),
        &["page_size", "5000"],
    )?;
    refused(
        "ListEntries",
        serde_json::json!({"pageToken": "x".repeat(2049)}),
        &["page_token", "2048"],
    )?;
    ensure!(
        entry_count(server)? == before + 4,
        "the refused calls stored nothing"
    );
    Ok(())
}

fn entry_count(server: &ServerProcess) -> anyhow::Result<u64> {
    let counted = server.cli_json(&["entry", "count"])?;
    counted["entries"].as_u64().context("no count")
}

/// `entry create --data`: SPIRE's shape (one entry with `spiffe_id` as an object and `ttl`),
/// three good entries, a bad SPIFFE ID, a bad selector type, a duplicate of a good one and a
/// downstream entry; then `entry update --data` changes one good entry and refuses a missing id.
fn a_data_file_stores_the_good_entries_and_names_the_bad(
    server: &ServerProcess,
    scratch: &std::path::Path,
) -> anyhow::Result<()> {
    let existing =
        server.create_entry("spiffe://example.org/existing", PARENT, "unix:uid:1", &[])?;
    let data = serde_json::json!({"entries": [
        {"spiffe_id": "spiffe://example.org/good/a", "parent_id": PARENT,
         "selectors": [{"type": "unix", "value": "uid:100"}], "x509_svid_ttl": 3600},
        {"spiffe_id": "not-a-spiffe-id", "parent_id": PARENT,
         "selectors": [{"type": "unix", "value": "uid:101"}]},
        {"spiffe_id": {"trust_domain": "example.org", "path": "/good/b"}, "parent_id": PARENT,
         "selectors": [{"type": "unix", "value": "uid:102"}], "ttl": 600, "admin": false},
        {"spiffe_id": "spiffe://example.org/good/c", "parent_id": PARENT,
         "selectors": "unix:uid:103"},
        {"spiffe_id": "spiffe://example.org/good/a", "parent_id": PARENT,
         "selectors": [{"type": "unix", "value": "uid:100"}]},
        {"spiffe_id": "spiffe://example.org/good/d", "parent_id": PARENT,
         "selectors": [{"type": "unix", "value": "uid:104"}], "downstream": true},
        {"spiffe_id": "spiffe://example.org/good/e", "parent_id": PARENT,
         "selectors": [{"type": "unix", "value": "uid:105"}], "dns_names": ["e.example.org"]},
    ]});
    let file = scratch.join("entries.json");
    std::fs::write(&file, serde_json::to_vec(&data)?)?;
    let path = file.to_str().context("path")?;
    let output = server.cli_output(&["entry", "create", "--data", path])?;
    let stdout = String::from_utf8(output.stdout)?;
    let stderr = String::from_utf8(output.stderr)?;
    ensure!(
        !output.status.success(),
        "a file with bad entries fails: {stdout}"
    );
    ensure!(stderr.contains("4 of 7 entries failed"), "{stderr}");
    let line = |n: usize| {
        stdout
            .lines()
            .find(|line| line.starts_with(&format!("entry {n}:")))
            .unwrap_or_default()
            .to_string()
    };
    ensure!(line(1).contains("created"), "{stdout}");
    ensure!(
        line(2).contains("failed") && line(2).contains("spiffe_id"),
        "{stdout}"
    );
    ensure!(line(3).contains("created"), "{stdout}");
    ensure!(
        line(4).contains("failed") && line(4).contains("selectors"),
        "{stdout}"
    );
    ensure!(
        line(5).contains("failed") && line(5).contains("already exists"),
        "{stdout}"
    );
    ensure!(
        line(6).contains("failed") && line(6).contains("downstream"),
        "{stdout}"
    );
    ensure!(line(7).contains("created"), "{stdout}");

    let listed = server.cli_json(&["entry", "list"])?;
    let ids: BTreeSet<&str> = listed["entries"]
        .as_array()
        .context("entries")?
        .iter()
        .filter_map(|e| e["spiffe_id"].as_str())
        .collect();
    let expected: BTreeSet<&str> = [
        "spiffe://example.org/existing",
        "spiffe://example.org/good/a",
        "spiffe://example.org/good/b",
        "spiffe://example.org/good/e",
    ]
    .into();
    ensure!(ids == expected, "only the good entries were added: {ids:?}");
    let b = listed["entries"]
        .as_array()
        .context("entries")?
        .iter()
        .find(|e| e["spiffe_id"] == "spiffe://example.org/good/b")
        .context("b")?;
    ensure!(
        b["x509_svid_ttl"] == 600,
        "SPIRE's `ttl` is the X509-SVID TTL: {b}"
    );

    let update = serde_json::json!({"entries": [
        {"id": existing, "spiffe_id": "spiffe://example.org/existing", "parent_id": PARENT,
         "selectors": [{"type": "unix", "value": "uid:2"}], "hint": "updated"},
        {"id": "no-such-entry", "spiffe_id": "spiffe://example.org/x", "parent_id": PARENT,
         "selectors": [{"type": "unix", "value": "uid:3"}]},
    ]});
    std::fs::write(&file, serde_json::to_vec(&update)?)?;
    let output = server.cli_output(&["entry", "update", "--data", path])?;
    let stdout = String::from_utf8(output.stdout)?;
    ensure!(!output.status.success(), "{stdout}");
    ensure!(stdout.contains("entry 1: updated"), "{stdout}");
    ensure!(
        stdout.contains("entry 2: failed") && stdout.contains("not found"),
        "{stdout}"
    );
    let shown = server.cli_json(&["entry", "show", "--id", &existing])?;
    ensure!(shown["entries"][0]["hint"] == "updated", "{shown}");
    ensure!(entry_count(server)? == 4, "the update added nothing");
    Ok(())
}

/// grpcio, as an operator's script: 2 500 entries in batches (one bad item in the first batch),
/// pages of 700, a count, and a page size over the limit refused by name.
fn grpcio_creates_pages_and_counts(
    server: &ServerProcess,
    python: &std::path::Path,
    before: u64,
) -> anyhow::Result<()> {
    let output = grpcio_admin_client(python, &server.socket, PARENT, 2500).output()?;
    ensure!(
        output.status.success(),
        "the grpcio client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let total = before + 1 + 2500;
    ensure!(report["batch_ok"] == 2500, "{report}");
    let failed = report["batch_failed"].as_array().context("batch_failed")?;
    ensure!(
        failed.len() == 1 && failed[0].as_str().unwrap_or_default().contains("spiffe_id"),
        "the bad item is named: {report}"
    );
    ensure!(
        report["listed"] == total && report["count"] == total,
        "{report}"
    );
    ensure!(report["listed_sorted_unique"] == true, "{report}");
    ensure!(report["pages"] == total.div_ceil(700), "{report}");
    ensure!(
        report["too_big_page"]
            .as_str()
            .unwrap_or_default()
            .starts_with("INVALID_ARGUMENT")
            && report["too_big_page"]
                .as_str()
                .unwrap_or_default()
                .contains("5000"),
        "{report}"
    );
    ensure!(entry_count(server)? == total, "the CLI counts the same");
    Ok(())
}
