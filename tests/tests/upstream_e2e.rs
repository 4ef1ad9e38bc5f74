//! An upstream authority: the server's CA is an intermediate signed by an operator's existing CA
//! (made here with openssl), so the bundle carries the operator's root and the chain a workload
//! receives ends there; `openssl verify` accepts it. An upstream whose key does not match its
//! certificate, or that is not a CA, stops start-up with the reason.

use std::path::Path;

use anyhow::{Context, ensure};
use sigil_tests::tools::{openssl_ca, openssl_verify};
use sigil_tests::{Node, ServerProcess, pem_certificates};

fn upstream_config(dir: &Path, cert: &str, key: &str) -> String {
    format!(
        "[ca.upstream]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        dir.join(cert).display(),
        dir.join(key).display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_chain_to_the_operators_root() -> anyhow::Result<()> {
    let ca_dir = tempfile::tempdir()?;
    openssl_ca(ca_dir.path(), "root", true)?;
    let selector = format!("unix:uid:{}", sigil_tests::current_uid()?);
    let node = Node::start_with(
        &upstream_config(ca_dir.path(), "root.pem", "root.key"),
        |server| Node::entry(server, "spiffe://example.org/workload", &selector, &[]),
    )?;
    let root = pem_certificates(&std::fs::read_to_string(ca_dir.path().join("root.pem"))?)?;
    ensure!(
        pem_certificates(&node.server.cli(&["bundle", "show"])?)? == root,
        "the bundle is the operator's root"
    );

    let out = node.dir.path().join("svid");
    node.agent.write_svids(&out)?;
    let chain = pem_certificates(&std::fs::read_to_string(out.join("svid.0.pem"))?)?;
    ensure!(
        chain.len() == 2,
        "leaf and Sigil's intermediate: {}",
        chain.len()
    );
    ensure!(
        sigil_core::x509::certificate_facts(&chain[1])?.is_ca,
        "the second certificate is Sigil's CA"
    );
    let chain = out.join("svid.0.pem");
    openssl_verify(&ca_dir.path().join("root.pem"), Some(&chain), &chain, &[])?;
    Ok(())
}

#[test]
fn an_unusable_upstream_stops_start_up() -> anyhow::Result<()> {
    let ca_dir = tempfile::tempdir()?;
    openssl_ca(ca_dir.path(), "root", true)?;
    openssl_ca(ca_dir.path(), "other", true)?;
    openssl_ca(ca_dir.path(), "leaf", false)?;
    let cases = [
        (
            upstream_config(ca_dir.path(), "root.pem", "other.key"),
            "does not belong",
        ),
        (
            upstream_config(ca_dir.path(), "leaf.pem", "leaf.key"),
            "not a CA",
        ),
    ];
    for (index, (config, reason)) in cases.iter().enumerate() {
        let error =
            ServerProcess::start(&ca_dir.path().join(format!("server-{index}")), None, config)
                .err()
                .context("the server started with an unusable upstream")?;
        ensure!(error.to_string().contains(reason), "{error:#}");
    }
    Ok(())
}
