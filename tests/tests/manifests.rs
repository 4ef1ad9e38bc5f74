//! The Kubernetes manifests in deploy/kubernetes validate (strictly) against the Kubernetes schema
//! with PyPI's kubernetes-validate, and carry the probes, volumes and RBAC docs/kubernetes.md
//! describes; so does the HA overlay deploy/kubernetes/ha, rendered by tests/python/kustomize.py
//! (and compared with `kubectl kustomize` where kubectl is installed), which also carries the
//! topology docs/operations.md describes; the Istio overlays in deploy/istio agree with them and with what istio-agent needs;
//! the federation example is valid and consistent.

use std::path::{Path, PathBuf};

use anyhow::ensure;
use sigil_tests::python;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `tests/python/<script> <argument>` with kubernetes-validate installed; the script prints
/// one line per problem and `... 0 problems` when there is none.
fn python_check(test: &str, script: &str, argument: &Path) -> anyhow::Result<()> {
    let Some(python) = python::kubernetes_validate_python(test)? else {
        return Ok(());
    };
    let output = std::process::Command::new(python)
        .arg(repository().join("tests/python").join(script))
        .arg(argument)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(stdout.contains("0 problems"), "{stdout}");
    Ok(())
}

#[test]
fn kubernetes_manifests_validate_and_carry_what_the_docs_promise() -> anyhow::Result<()> {
    python_check(
        "kubernetes_manifests_validate_and_carry_what_the_docs_promise",
        "check_manifests.py",
        &repository().join("deploy/kubernetes"),
    )
}

#[test]
fn ha_overlay_renders_validates_and_runs_three_servers_on_postgres() -> anyhow::Result<()> {
    python_check(
        "ha_overlay_renders_validates_and_runs_three_servers_on_postgres",
        "check_ha_overlay.py",
        &repository().join("deploy/kubernetes/ha"),
    )
}

#[test]
fn istio_overlays_agree_with_the_deployment_and_istio_agent() -> anyhow::Result<()> {
    python_check(
        "istio_overlays_agree_with_the_deployment_and_istio_agent",
        "check_istio.py",
        &repository(),
    )
}

#[test]
fn federation_example_is_valid_and_consistent() -> anyhow::Result<()> {
    python_check(
        "federation_example_is_valid_and_consistent",
        "check_federation_example.py",
        &repository(),
    )
}
