//! Sigil as Istio's external CA: `istio.v1.auth.IstioCertificateService/CreateCertificate` on the
//! server's agent API port, with the ServiceAccount token checked by a fake TokenReview.

use std::path::PathBuf;

use anyhow::{Context, ensure};
use rcgen::{CertificateParams, KeyPair};
use sigil_agent::node::server_channel;
use sigil_proto::istio_ca::IstioCertificateRequest;
use sigil_proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
use sigil_tests::kubernetes::{FakeCluster, FakeToken, KubernetesServer};
use sigil_tests::steps::{ServerTrust, ensure_count, refused_with};
use sigil_tests::{ServerProcess, pem_certificates};
use tonic::Code;
use tonic::transport::Channel;

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

/// The server as Istio's CA, its ServiceAccount tokens checked by a fake TokenReview that knows
/// two tokens of prod/web-1: `istio-token` (audience `istio-ca`) and `other-audience`.
struct IstioCa {
    client: IstioCertificateServiceClient<Channel>,
    /// Kept running for `client`.
    _server: ServerProcess,
    trust: ServerTrust,
    /// The server's bundle, PEM, for openssl.
    bundle_path: PathBuf,
    k8s: FakeCluster,
}

impl IstioCa {
    async fn start() -> anyhow::Result<Self> {
        let k8s = FakeCluster::start().await?;
        let fake = &k8s.fake;
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
        let KubernetesServer {
            server,
            trust,
            bundle_path,
        } = k8s.start_server(
            "server_dns_names = [\"sigil-server.sigil.svc\"]\n",
            "istio_ca = true\nistio_max_validity = \"2h\"\nistio_root_cert_configmaps = true\n",
        )?;
        let channel = server_channel(&server.agent_api, &trust.trust_domain, &trust.roots, None)?;
        Ok(IstioCa {
            client: IstioCertificateServiceClient::new(channel),
            _server: server,
            trust,
            bundle_path,
            k8s,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_ca_signs_the_service_account_identity_only() -> anyhow::Result<()> {
    let mut ca = IstioCa::start().await?;
    let key = KeyPair::generate()?;
    a_good_request_gets_the_service_account_identity(&mut ca, &key).await?;
    bad_requests_are_refused_with_the_reason(&mut ca, &key).await?;

    // istio-ca-root-cert holds the bundle in every namespace, including one created later.
    ca.k8s.fake.add_namespace("late");
    for namespace in ["prod", "default", "late"] {
        ca.k8s
            .fake
            .wait_for_configmap(namespace, "istio-ca-root-cert", |data| {
                data["root-cert.pem"] == ca.trust.pem.as_str()
            })
            .await?;
    }
    Ok(())
}

/// A good request: the chain is leaf first, root last; the leaf names the token's ServiceAccount
/// (not what the CSR asked for), lives at most the configured 2 h, and openssl verifies it.
async fn a_good_request_gets_the_service_account_identity(
    ca: &mut IstioCa,
    key: &KeyPair,
) -> anyhow::Result<()> {
    let response = ca
        .client
        .create_certificate(request(Some("istio-token"), csr_pem(key)?, 36_000))
        .await?
        .into_inner();
    ensure_count(response.cert_chain.len(), 2, "certificates (leaf and root)")?;
    ensure!(
        pem_certificates(&response.cert_chain[1])? == ca.trust.roots,
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
    let leaf_path = ca.k8s.dir.path().join("istio-leaf.pem");
    std::fs::write(&leaf_path, &response.cert_chain[0])?;
    sigil_tests::tools::openssl_verify(&ca.bundle_path, None, &leaf_path, &[])
}

/// Refusals, each with its code and reason: no token, a token TokenReview does not accept (a
/// forged signature, say), a token for another audience, a CSR whose signature is broken, and a
/// key type Istio's CA does not sign.
async fn bad_requests_are_refused_with_the_reason(
    ca: &mut IstioCa,
    key: &KeyPair,
) -> anyhow::Result<()> {
    let mut tampered = pem_certificates(&csr_as_cert_pem(&csr_pem(key)?))?.remove(0);
    let last = tampered.len() - 4;
    tampered[last] ^= 0x01;
    let bad_signature = sigil_core::bundle::pem_block("CERTIFICATE REQUEST", &tampered);
    let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let cases = [
        (None, csr_pem(key)?, Code::Unauthenticated, "", "no token"),
        (
            Some("forged-token"),
            csr_pem(key)?,
            Code::Unauthenticated,
            "",
            "forged token",
        ),
        (
            Some("other-audience"),
            csr_pem(key)?,
            Code::Unauthenticated,
            "audience",
            "audience",
        ),
        (
            Some("istio-token"),
            bad_signature,
            Code::InvalidArgument,
            "signature",
            "bad signature",
        ),
        (
            Some("istio-token"),
            csr_pem(&ed25519)?,
            Code::InvalidArgument,
            "unsupported key",
            "key",
        ),
    ];
    for (token, csr, code, reason, accepted) in cases {
        let answer = ca.client.create_certificate(request(token, csr, 0)).await;
        let refused = refused_with(answer, code, accepted)?;
        ensure!(refused.message().contains(reason), "{refused:?}");
    }
    Ok(())
}

/// The DER of a PEM CSR, relabelled so the certificate PEM reader takes it.
fn csr_as_cert_pem(csr: &str) -> String {
    csr.replace("CERTIFICATE REQUEST", "CERTIFICATE")
}
