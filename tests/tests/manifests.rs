//! The Kubernetes manifests in deploy/kubernetes validate (strictly) against the Kubernetes schema
//! with PyPI's kubernetes-validate, and carry the probes, volumes and RBAC docs/kubernetes.md
//! describes; the Istio overlays in deploy/istio agree with them and with what istio-agent needs.

use std::path::Path;

use anyhow::ensure;
use sigil_tests::python;

#[test]
fn kubernetes_manifests_validate_and_carry_what_the_docs_promise() -> anyhow::Result<()> {
    let Some(python) = python::kubernetes_validate_python(
        "kubernetes_manifests_validate_and_carry_what_the_docs_promise",
    )?
    else {
        return Ok(());
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = std::process::Command::new(python)
        .arg(root.join("tests/python/check_manifests.py"))
        .arg(root.join("deploy/kubernetes"))
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
fn istio_overlays_agree_with_the_deployment_and_istio_agent() -> anyhow::Result<()> {
    let Some(python) = python::kubernetes_validate_python(
        "istio_overlays_agree_with_the_deployment_and_istio_agent",
    )?
    else {
        return Ok(());
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = std::process::Command::new(python)
        .arg(root.join("tests/python/check_istio.py"))
        .arg(&root)
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
fn federation_example_is_valid_and_consistent() -> anyhow::Result<()> {
    let Some(python) =
        python::kubernetes_validate_python("federation_example_is_valid_and_consistent")?
    else {
        return Ok(());
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = std::process::Command::new(python)
        .arg(root.join("tests/python/check_federation_example.py"))
        .arg(&root)
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
