//! Sigil as Istio's external CA: `istio.v1.auth.IstioCertificateService/CreateCertificate` on the
//! server's agent API port, with the ServiceAccount token checked by a fake TokenReview.

use std::path::Path;

use anyhow::{Context, ensure};
use rcgen::{CertificateParams, KeyPair};
use sigil_agent::node::server_channel;
use sigil_core::id::parse_trust_domain;
use sigil_proto::istio_ca::IstioCertificateRequest;
use sigil_proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
use sigil_tests::kubernetes::{FakeKubernetes, FakeToken};
use sigil_tests::{ServerProcess, pem_certificates};

fn csr_pem(key: &KeyPair) -> anyhow::Result<String> {
    // istio-agent puts its own idea of the identity in the CSR; Sigil ignores it.
    let mut params = CertificateParams::new(vec!["asked-for.example".to_string()])?;
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://example.org/ns/kube-system/sa/admin".try_into()?,
    ));
    Ok(params.serialize_request(key)?.pem()?)
}

fn request(
    token: Option<&str>,
    csr: String,
    validity: i64,
) -> tonic::Request<IstioCertificateRequest> {
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: validity,
        metadata: None,
    });
    if let Some(token) = token
        && let Ok(value) = format!("Bearer {token}").parse()
    {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_ca_signs_the_service_account_identity_only() -> anyhow::Result<()> {
    let fake = FakeKubernetes::start().await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig)?;
    fake.add_pod(
        "prod",
        "web-1",
        "pod-web-1",
        "node-a",
        "web",
        &[],
        &[("web", "web:1", &"a".repeat(64))],
    );
    let token = |audience: &str| FakeToken {
        audiences: vec![audience.into()],
        service_account: ("prod".into(), "web".into()),
        pod: ("prod".into(), "web-1".into()),
        expired: false,
    };
    fake.add_namespace("prod");
    fake.add_namespace("default");
    fake.add_token("istio-token", token("istio-ca"));
    fake.add_token("other-audience", token("sigil-server"));
    let server = ServerProcess::start(
        &dir.path().join("server"),
        None,
        &format!(
            "server_dns_names = [\"sigil-server.sigil.svc\"]\n[kubernetes]\nkubeconfig = \"{}\"\nistio_ca = true\nistio_max_validity = \"2h\"\nistio_root_cert_configmaps = true\n",
            kubeconfig.display()
        ),
    )?;
    let bundle_pem = server.cli(&["bundle", "show"])?;
    let bundle_path = dir.path().join("bundle.pem");
    std::fs::write(&bundle_path, &bundle_pem)?;
    let roots = pem_certificates(&bundle_pem)?;
    let td = parse_trust_domain("trust_domain", "example.org")?;
    let mut client =
        IstioCertificateServiceClient::new(server_channel(&server.agent_api, &td, &roots, None)?);

    // A good request: the chain is leaf first, root last; the leaf names the token's ServiceAccount.
    let key = KeyPair::generate()?;
    let response = client
        .create_certificate(request(Some("istio-token"), csr_pem(&key)?, 36_000))
        .await?
        .into_inner();
    ensure!(
        response.cert_chain.len() == 2,
        "leaf and root: {}",
        response.cert_chain.len()
    );
    ensure!(
        pem_certificates(&response.cert_chain[1])? == roots,
        "the root is last"
    );
    let leaf_der = pem_certificates(&response.cert_chain[0])?.remove(0);
    let id = sigil_core::x509::check_leaf_profile(&leaf_der)?;
    ensure!(
        id.to_string() == "spiffe://example.org/ns/prod/sa/web",
        "{id}"
    );
    let (_, leaf) =
        x509_parser::parse_x509_certificate(&leaf_der).map_err(|e| anyhow::anyhow!("{e}"))?;
    let sans = leaf
        .subject_alternative_name()?
        .context("SANs")?
        .value
        .general_names
        .len();
    ensure!(
        sans == 1,
        "only the identity, not what the CSR asked for: {sans} SANs"
    );
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    ensure!(
        lifetime <= 2 * 3600 + 10,
        "10 h asked, clamped to the 2 h maximum: {lifetime}s"
    );
    openssl_verify(&bundle_path, &response.cert_chain[0], dir.path())?;

    // Refusals, each with its reason.
    let no_token = client
        .create_certificate(request(None, csr_pem(&key)?, 0))
        .await
        .err()
        .context("no token")?;
    ensure!(
        no_token.code() == tonic::Code::Unauthenticated,
        "{no_token:?}"
    );
    // A token TokenReview does not accept (a forged signature, say).
    let forged = client
        .create_certificate(request(Some("forged-token"), csr_pem(&key)?, 0))
        .await
        .err()
        .context("forged token")?;
    ensure!(forged.code() == tonic::Code::Unauthenticated, "{forged:?}");
    let wrong = client
        .create_certificate(request(Some("other-audience"), csr_pem(&key)?, 0))
        .await
        .err()
        .context("audience")?;
    ensure!(
        wrong.code() == tonic::Code::Unauthenticated && wrong.message().contains("audience"),
        "{wrong:?}"
    );
    let mut tampered = pem_certificates(&csr_as_cert_pem(&csr_pem(&key)?))?.remove(0);
    let last = tampered.len() - 4;
    tampered[last] ^= 0x01;
    let bad_signature = sigil_core::bundle::pem_block("CERTIFICATE REQUEST", &tampered);
    let refused = client
        .create_certificate(request(Some("istio-token"), bad_signature, 0))
        .await
        .err()
        .context("bad signature")?;
    ensure!(
        refused.code() == tonic::Code::InvalidArgument && refused.message().contains("signature"),
        "{refused:?}"
    );
    let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let refused = client
        .create_certificate(request(Some("istio-token"), csr_pem(&ed25519)?, 0))
        .await
        .err()
        .context("key")?;
    ensure!(
        refused.code() == tonic::Code::InvalidArgument
            && refused.message().contains("unsupported key"),
        "{refused:?}"
    );

    // istio-ca-root-cert holds the bundle in every namespace, including one created later.
    fake.add_namespace("late");
    for namespace in ["prod", "default", "late"] {
        fake.wait_for_configmap(namespace, "istio-ca-root-cert", |data| {
            data["root-cert.pem"] == bundle_pem.as_str()
        })
        .await?;
    }
    Ok(())
}

/// The DER of a PEM CSR, relabelled so the certificate PEM reader takes it.
fn csr_as_cert_pem(csr: &str) -> String {
    csr.replace("CERTIFICATE REQUEST", "CERTIFICATE")
}

fn openssl_verify(bundle: &Path, leaf_pem: &str, dir: &Path) -> anyhow::Result<()> {
    let leaf = dir.join("istio-leaf.pem");
    std::fs::write(&leaf, leaf_pem)?;
    let output = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(bundle)
        .arg(&leaf)
        .output()?;
    ensure!(
        output.status.success(),
        "openssl verify: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    Ok(())
}
