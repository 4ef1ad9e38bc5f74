//! The CA journal end to end: `ca prepare` publishes the next CA at once (workloads trust it
//! before it signs anything), `ca activate` makes it sign, `ca taint` makes the agent replace
//! every SVID the old CA signed (its own included) at once rather than at half-life, and `ca
//! revoke` takes the old CA out of the bundle once nothing valid depends on it.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::StreamExt;
use sigil_tests::{Node, ServerProcess};

fn issuer_of(svid: &spiffe::X509Svid) -> anyhow::Result<String> {
    Ok(sigil_core::x509::certificate_facts(svid.leaf().as_ref())?.authority_key_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tainted_ca_is_replaced_at_once_and_then_revoked() -> anyhow::Result<()> {
    // 24 h SVIDs: nothing renews on its own during the test.
    let node = Node::for_this_uid(&[("spiffe://example.org/workload", &[])])?;
    let server = &node.server;
    let client = node.agent.workload_client().await?;
    let mut updates = client.stream_x509_contexts().await?;
    let first = updates.next().await.context("stream ended")??;
    let first_svid = first.default_svid().context("no SVID")?;
    let old_ca = issuer_of(first_svid)?;

    // Prepared: in the bundle at once, and in the workload's bundle, before it signs anything.
    let prepared = server.cli_json(&["ca", "prepare"])?;
    ensure!(
        prepared["authorities"].as_array().map(Vec::len) == Some(2),
        "an X.509 CA and a JWT key: {prepared}"
    );
    ensure!(server.trust()?.roots.len() == 2, "both roots are published");
    let td = spiffe::TrustDomain::new("example.org")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let context = tokio::time::timeout_at(deadline.into(), updates.next())
            .await
            .context("the workload never received the prepared root")?
            .context("stream ended")??;
        let roots = context
            .bundle_set()
            .get(&td)
            .map_or(0, |b| b.authorities().len());
        if roots == 2 {
            ensure!(
                issuer_of(context.default_svid().context("svid")?)? == old_ca,
                "preparing changes no SVID"
            );
            break;
        }
    }

    // Activated, then the old CA tainted: the SVID (24 h, far from half-life) is replaced now.
    server.cli(&["ca", "activate"])?;
    let journal = server.cli_json(&["ca", "show"])?;
    let state_of = |id: &str| {
        journal["authorities"]
            .as_array()
            .and_then(|all| all.iter().find(|a| a["id"] == id))
            .map(|a| a["state"].clone())
    };
    ensure!(
        state_of(&old_ca) == Some(serde_json::json!("old")),
        "{journal}"
    );
    let refused = server.cli_error(&["ca", "revoke", "--id", &old_ca])?;
    ensure!(refused.contains("taint it first"), "{refused}");
    server.cli(&["ca", "taint", "--id", &old_ca])?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let replaced = loop {
        let context = tokio::time::timeout_at(deadline.into(), updates.next())
            .await
            .with_context(|| {
                format!(
                    "the SVID of the tainted CA was not replaced within 20 s; agent:\n{}\nserver:\n{}",
                    node.agent.logs(),
                    node.server.logs()
                )
            })?
            .context("stream ended")??;
        let svid = context.default_svid().context("svid")?;
        if issuer_of(svid)? != old_ca {
            break svid.clone();
        }
    };
    ensure!(
        replaced.leaf().as_ref() != first_svid.leaf().as_ref(),
        "a new certificate"
    );
    ensure!(
        node.agent
            .wait_for_log("tainted authorities", 1, Duration::from_secs(5)),
        "{}",
        node.agent.logs()
    );

    // Revocation: once the issuance record shows every SVID of the old CA replaced (the agent's
    // own included), the old root leaves the bundle. The record is written in batches, so the
    // first attempts may be refused with the count still outstanding.
    let deadline = Instant::now() + Duration::from_secs(20);
    // `cli_error` fails once the command succeeds: the CA is revoked.
    while let Ok(reason) = server.cli_error(&["ca", "revoke", "--id", &old_ca]) {
        ensure!(reason.contains("not been replaced"), "{reason}");
        ensure!(
            Instant::now() < deadline,
            "still not revocable: {reason}\nserver:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(
        server.trust()?.roots.len() == 1,
        "the revoked root left the bundle"
    );
    Ok(())
}

/// Two servers of one trust domain on one SQLite file: each keeps its own CA in the shared
/// journal (named by its instance id), both are published, and the second is told that SQLite
/// serves one server at a time.
#[tokio::test]
async fn servers_on_one_sqlite_file_keep_their_own_cas_and_are_told_to_use_postgres()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("shared.sqlite3").display());
    let one_server = "SQLite serves one server at a time";
    let first = ServerProcess::start(&dir.path().join("a"), Some(&url), "")?;
    ensure!(!first.logs().contains(one_server), "{}", first.logs());
    let second = ServerProcess::start(&dir.path().join("b"), Some(&url), "")?;
    ensure!(second.logs().contains(one_server), "{}", second.logs());

    let shown = second.cli_json(&["ca", "show"])?;
    let authorities = shown["authorities"].as_array().context("no authorities")?;
    let mut owners: Vec<&str> = authorities
        .iter()
        .filter(|a| a["kind"] == "x509" && a["state"] == "active")
        .filter_map(|a| a["owner"].as_str())
        .collect();
    owners.sort_unstable();
    owners.dedup();
    ensure!(owners.len() == 2, "one active CA per server: {shown}");
    ensure!(second.trust()?.roots.len() == 2, "both CAs are published");
    Ok(())
}
