//! Writes the seed corpus of every fuzz target into `fuzz/corpus/<target>/`:
//! `cargo run -p sigil-fuzz --example make-corpus` (add `-- --force` to rewrite existing seeds).
//!
//! Seeds are a handful of valid and invalid inputs per target. Text seeds are written out below;
//! certificates and CSRs are made here with rcgen (fresh keys each run, so `--force` changes
//! their bytes but not what they exercise); configuration seeds are the TOML examples of the
//! docs plus variants. Files that exist are left alone unless `--force`, and files this program
//! does not name (crash inputs added by hand, see docs/fuzzing.md) are never touched.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, PublicKeyData, SanType};
use sigil_core::bundle::{JwtAuthority, TrustBundle};
use sigil_core::id::{TrustDomain, parse_spiffe_id, parse_trust_domain};
use sigil_core::x509::{KeyType, leaf_params, root_ca_params};

mod http;

/// The corpus directory and how to write into it.
struct Corpus {
    root: PathBuf,
    force: bool,
    written: usize,
}

impl Corpus {
    /// Writes one seed (unless it exists and `--force` was not given).
    fn put(&mut self, target: &str, name: &str, data: impl AsRef<[u8]>) -> Result<()> {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(name);
        if self.force || !path.exists() {
            std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
            self.written += 1;
        }
        Ok(())
    }

    /// Writes text seeds.
    fn texts(&mut self, target: &str, seeds: &[(&str, &str)]) -> Result<()> {
        for (name, text) in seeds {
            self.put(target, name, text)?;
        }
        Ok(())
    }
}

fn td(name: &str) -> Result<TrustDomain> {
    Ok(parse_trust_domain("trust_domain", name)?)
}

/// The first ```toml block of a document in docs/.
fn doc_example(doc: &str) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(doc);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let start = text.find("```toml\n").context("no ```toml block")? + "```toml\n".len();
    let end = text[start..]
        .find("```")
        .context("unterminated ```toml block")?;
    Ok(text[start..start + end].to_string())
}

fn main() -> Result<()> {
    let mut corpus = Corpus {
        root: Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"),
        force: std::env::args().any(|a| a == "--force"),
        written: 0,
    };
    identities(&mut corpus)?;
    x509(&mut corpus)?;
    bundles(&mut corpus)?;
    jwts(&mut corpus)?;
    jwt_claims(&mut corpus)?;
    configs(&mut corpus)?;
    http::seeds(&mut corpus)?;
    println!(
        "wrote {} files under {}",
        corpus.written,
        corpus.root.display()
    );
    Ok(())
}

fn identities(corpus: &mut Corpus) -> Result<()> {
    let long_path = format!("spiffe://example.org/{}", "a/".repeat(1500) + "a");
    corpus.texts(
        "spiffe_id",
        &[
            ("workload", "spiffe://example.org/ns/prod/sa/web"),
            ("trust-domain-only", "spiffe://example.org"),
            ("agent", "spiffe://example.org/sigil/agent/join_token/abc"),
            ("other-domain", "spiffe://other.org/x"),
            ("bare-domain", "example.org"),
            ("upper-case-domain", "spiffe://Example.org/x"),
            ("empty-segment", "spiffe://example.org/a//b"),
            ("dot-dot", "spiffe://example.org/../x"),
            ("trailing-slash", "spiffe://example.org/a/"),
            ("http", "http://example.org/x"),
            ("percent", "spiffe://example.org/%41"),
            ("userinfo-port", "spiffe://user@example.org:8443/x"),
            ("empty", ""),
        ],
    )?;
    corpus.put("spiffe_id", "long-path", long_path)?;
    corpus.texts(
        "selector",
        &[
            ("uid", "unix:uid:1000"),
            ("pod-label", "k8s:pod-label:app:web"),
            ("path", "unix:path:/usr/bin/ü"),
            ("no-colon", "unix"),
            ("no-type", ":1000"),
            ("no-value", "unix:"),
            ("upper-type", "Unix:uid:1"),
            ("space", "unix: uid"),
            ("newline", "unix:uid:1\n"),
        ],
    )?;
    corpus.put("selector", "too-long", format!("unix:{}", "x".repeat(1020)))?;
    corpus.texts(
        "id_pattern",
        &[
            ("exact", "spiffe://example.org/ns/prod/sa/web"),
            ("domain", "spiffe://example.org"),
            ("one", "spiffe://example.org/ns/*/sa/web"),
            ("rest", "spiffe://example.org/ns/prod/**"),
            ("rest-in-middle", "spiffe://example.org/**/web"),
            ("mixed", "spiffe://example.org/ns/pro*"),
            ("dot", "spiffe://example.org/./*"),
            ("no-scheme", "example.org/*"),
        ],
    )?;
    let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    corpus.put(
        "cgroup",
        "v2-containerd",
        format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{id}.scope\n"),
    )?;
    corpus.put(
        "cgroup",
        "v1-docker",
        format!("12:memory:/docker/{id}\n11:cpu:/docker/{id}\n"),
    )?;
    corpus.put(
        "cgroup",
        "v1-crio",
        format!("4:pids:/kubepods/besteffort/pod1/crio-{id}\n"),
    )?;
    corpus.put(
        "cgroup",
        "v2-in-namespace",
        format!("0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice/crio-{id}.scope/init\n"),
    )?;
    corpus.put(
        "cgroup",
        "user-delegation",
        format!("0::/user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope\n"),
    )?;
    corpus.texts(
        "cgroup",
        &[
            ("host", "0::/user.slice/user-1000.slice/session-2.scope\n"),
            ("short-id", "0::/kubepods/pod1/cri-containerd-abc.scope\n"),
            ("no-path", "0:\n"),
        ],
    )?;
    Ok(())
}

fn csr_with(key: &KeyPair, sans: Vec<SanType>, ca: bool) -> Result<Vec<u8>> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    Ok(params.serialize_request(key)?.der().to_vec())
}

fn uri(text: &str) -> Result<SanType> {
    Ok(SanType::URI(text.to_string().try_into()?))
}

fn x509(corpus: &mut Corpus) -> Result<()> {
    let p256 = KeyType::EcP256.generate()?;
    let p384 = KeyType::EcP384.generate()?;
    let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let spiffe = csr_with(&p256, vec![uri("spiffe://example.org/web")?], false)?;
    corpus.put("csr", "p256-spiffe-id", &spiffe)?;
    corpus.put("csr", "p384-no-san", csr_with(&p384, vec![], false)?)?;
    corpus.put(
        "csr",
        "dns-san",
        csr_with(
            &p256,
            vec![SanType::DnsName("web.example.org".try_into()?)],
            false,
        )?,
    )?;
    corpus.put(
        "csr",
        "two-uris",
        csr_with(
            &p256,
            vec![
                uri("spiffe://example.org/a")?,
                uri("spiffe://example.org/b")?,
            ],
            false,
        )?,
    )?;
    corpus.put("csr", "ca-request", csr_with(&p256, vec![], true)?)?;
    corpus.put("csr", "ed25519", csr_with(&ed25519, vec![], false)?)?;
    corpus.put("csr", "truncated", &spiffe[..spiffe.len() / 2])?;
    let mut trailing = spiffe.clone();
    trailing.push(0);
    corpus.put("csr", "trailing-byte", trailing)?;
    let mut bad_signature = spiffe.clone();
    if let Some(last) = bad_signature.last_mut() {
        *last ^= 1;
    }
    corpus.put("csr", "bad-signature", bad_signature)?;

    corpus.texts(
        "csr_sans",
        &[
            ("spiffe-id", "uri spiffe://example.org/web"),
            ("nothing", ""),
            (
                "two-uris",
                "uri spiffe://example.org/a\nuri spiffe://example.org/b",
            ),
            ("dns", "dns web.example.org"),
            ("uri-and-ca", "uri spiffe://example.org/web\nca"),
            ("https-uri", "uri https://example.org/"),
            ("ip-email", "ip 10.0.0.1\nemail a@example.org"),
            ("usages", "ku\neku"),
            ("non-canonical", "uri spiffe://EXAMPLE.org/web"),
        ],
    )?;

    let now = SystemTime::now();
    let example = td("example.org")?;
    let ca_params = root_ca_params(&example, now, Duration::from_secs(86_400))?;
    let ca = ca_params.self_signed(&p256)?;
    let issuer = Issuer::new(ca_params, &p256);
    let id = parse_spiffe_id("spiffe_id", "spiffe://example.org/web")?;
    let leaf = leaf_params(
        &id,
        &["web.example.org".into()],
        now,
        now + Duration::from_secs(3600),
    )?
    .signed_by(&p384, &issuer)?;
    corpus.put("certificate", "leaf-svid", leaf.der())?;
    corpus.put("certificate", "ca", ca.der())?;
    let mut no_uri = CertificateParams::new(vec!["web.example.org".into()])?;
    no_uri.is_ca = IsCa::ExplicitNoCa;
    corpus.put("certificate", "no-uri", no_uri.self_signed(&p256)?.der())?;
    let ed_ca =
        root_ca_params(&example, now, Duration::from_secs(86_400))?.self_signed(&ed25519)?;
    corpus.put("certificate", "ed25519-ca", ed_ca.der())?;
    corpus.put("certificate", "truncated", &leaf.der()[..100])?;
    Ok(())
}

fn ca_der(trust_domain: &TrustDomain, key: &KeyPair) -> Result<Vec<u8>> {
    let params = root_ca_params(trust_domain, SystemTime::now(), Duration::from_secs(86_400))?;
    Ok(params.self_signed(key)?.der().to_vec())
}

fn bundles(corpus: &mut Corpus) -> Result<()> {
    let example = td("example.org")?;
    let ca_key = KeyType::EcP256.generate()?;
    let jwt_key = KeyType::EcP384.generate()?;
    let mut bundle = TrustBundle::new(example.clone());
    bundle.x509_authorities.push(ca_der(&example, &ca_key)?);
    bundle.jwt_authorities.push(JwtAuthority {
        key_id: "k1".into(),
        public_key: jwt_key.subject_public_key_info(),
        expires_at: 0,
    });
    bundle.sequence = 7;
    corpus.put("bundle_json", "ca-and-jwt-key", bundle.to_spiffe_json()?)?;

    // An X.509 authority with an Ed25519 key: `to_spiffe_json` cannot publish such a key.
    let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let ed_x5c = STANDARD.encode(ca_der(&example, &ed25519)?);
    corpus.put(
        "bundle_json",
        "ed25519-authority",
        format!(r#"{{"keys":[{{"use":"x509-svid","kty":"OKP","x5c":["{ed_x5c}"]}}]}}"#),
    )?;
    let bad = [
        ("empty", ""),
        ("unterminated", "{"),
        ("no-keys", r#"{"keys":[]}"#),
        (
            "short-coordinates",
            r#"{"keys":[{"use":"jwt-svid","kid":"k","kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#,
        ),
        (
            "x5c-not-base64",
            r#"{"keys":[{"use":"x509-svid","kty":"EC","x5c":["!!"]}]}"#,
        ),
        (
            "x5c-not-der",
            r#"{"keys":[{"use":"x509-svid","kty":"EC","x5c":["AAAA"]}]}"#,
        ),
        (
            "unknown-use",
            r#"{"keys":[{"use":"other","kty":"EC"}],"spiffe_sequence":1}"#,
        ),
        (
            "jwt-rsa",
            r#"{"keys":[{"use":"jwt-svid","kid":"r","kty":"RSA","n":"AQAB","e":"AQAB"}]}"#,
        ),
        (
            "negative-hint",
            r#"{"keys":[],"spiffe_refresh_hint":-1,"spiffe_sequence":18446744073709551615}"#,
        ),
    ];
    corpus.texts("bundle_json", &bad)?;

    // The federation refresher holds example.org at sequence 5 (see src/bundle.rs).
    bundle.sequence = 6;
    corpus.put("federation_bundle", "newer", bundle.to_spiffe_json()?)?;
    bundle.sequence = 4;
    corpus.put("federation_bundle", "rollback", bundle.to_spiffe_json()?)?;
    let mut foreign = TrustBundle::new(example.clone());
    foreign
        .x509_authorities
        .push(ca_der(&td("other.org")?, &ca_key)?);
    foreign.sequence = 9;
    corpus.put(
        "federation_bundle",
        "other-domain-ca",
        foreign.to_spiffe_json()?,
    )?;
    corpus.put(
        "federation_bundle",
        "ed25519-authority",
        format!(r#"{{"keys":[{{"use":"x509-svid","kty":"OKP","x5c":["{ed_x5c}"]}}],"spiffe_sequence":6}}"#),
    )?;
    corpus.texts(
        "federation_bundle",
        &[
            ("no-keys", r#"{"keys":[],"spiffe_sequence":6}"#),
            ("html", "<html><body>502 Bad Gateway</body></html>"),
        ],
    )?;
    Ok(())
}

/// `jwt_svid` seeds: compact tokens signed by a key no bundle holds.
fn jwts(corpus: &mut Corpus) -> Result<()> {
    // Tokens signed by a key no bundle holds: they reach every check before the signature.
    let key = KeyType::EcP256.generate()?;
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &key.serialize_der(),
        &ring::rand::SystemRandom::new(),
    )
    .map_err(|e| anyhow::anyhow!("ring cannot read the key: {e}"))?;
    let token = |header: &str, claims: &str| -> Result<String> {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature = pair
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot sign: {e}"))?;
        Ok(format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    };
    let claims = r#"{"sub":"spiffe://example.org/web","aud":["db"],"exp":2000000}"#;
    corpus.put(
        "jwt_svid",
        "es256-k1",
        token(r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#, claims)?,
    )?;
    corpus.put(
        "jwt_svid",
        "alg-none",
        token(r#"{"alg":"none","kid":"k1"}"#, claims)?,
    )?;
    corpus.put(
        "jwt_svid",
        "hs256",
        token(r#"{"alg":"HS256","kid":"k1"}"#, claims)?,
    )?;
    corpus.put(
        "jwt_svid",
        "unknown-kid",
        token(r#"{"alg":"ES256","kid":"k9"}"#, claims)?,
    )?;
    corpus.put(
        "jwt_svid",
        "other-domain",
        token(
            r#"{"alg":"ES384","kid":"k2"}"#,
            r#"{"sub":"spiffe://other.org/x","aud":"db","exp":2000000}"#,
        )?,
    )?;
    corpus.texts(
        "jwt_svid",
        &[
            ("two-parts", "a.b"),
            ("not-base64", "!!.!!.!!"),
            ("empty", ""),
        ],
    )?;
    Ok(())
}

/// `jwt_claims` seeds: a header line and a claims line, checked against a known bundle.
fn jwt_claims(corpus: &mut Corpus) -> Result<()> {
    let claims = r#"{"sub":"spiffe://example.org/web","aud":["db"],"exp":2000000}"#;
    let header = r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#;
    let lines = |h: &str, c: &str| format!("{h}\n{c}");
    // The good token's header with claims for `spiffe://example.org/web`, `aud` and `exp` as JSON.
    let web = |aud: &str, exp: &str| {
        let claims = format!(r#"{{"sub":"spiffe://example.org/web","aud":{aud},"exp":{exp}}}"#);
        lines(header, &claims)
    };
    let claim_cases = [
        ("good", lines(header, claims)),
        ("aud-string", web(r#""db""#, "2000000")),
        ("expired", web(r#""db""#, "999999")),
        ("wrong-audience", web(r#"["cache"]"#, "2000000")),
        ("exp-float", web(r#""db""#, "2e6")),
        ("exp-string", web(r#""db""#, r#""2000000""#)),
    ];
    let es384 = r#"{"alg":"ES384","kid":"k2"}"#;
    let other_cases = [
        ("no-sub", lines(header, r#"{"aud":"db","exp":2000000}"#)),
        ("alg-none", lines(r#"{"alg":"none","kid":"k1"}"#, claims)),
        (
            "es384-other-domain",
            lines(
                es384,
                r#"{"sub":"spiffe://other.org/x","aud":"db","exp":2000000}"#,
            ),
        ),
        ("k2-for-example-org", lines(es384, claims)),
        (
            "alg-key-mismatch",
            lines(r#"{"alg":"RS256","kid":"k1"}"#, claims),
        ),
    ];
    for (name, text) in claim_cases.into_iter().chain(other_cases) {
        corpus.put("jwt_claims", name, text)?;
    }
    Ok(())
}

fn configs(corpus: &mut Corpus) -> Result<()> {
    corpus.put(
        "server_config",
        "documented",
        doc_example("configuration.md")?,
    )?;
    corpus.texts(
        "server_config",
        &[
            ("minimal", "trust_domain = \"example.org\"\n"),
            ("empty", ""),
            ("kubernetes", "trust_domain = \"example.org\"\n[kubernetes]\ncluster = \"c1\"\nauto_identity = true\nistio_ca = true\nistio_max_validity = \"1h\"\nallowed_service_accounts = [\"sigil:sigil-agent\"]\n"),
            ("unknown-key", "trust_domain = \"example.org\"\nbogus = 1\n"),
            ("bad-ttl", "[ca]\nttl = \"0s\"\n"),
            ("ca-shorter-than-svids", "trust_domain = \"example.org\"\n[ca]\nttl = \"1d\"\ndefault_x509_svid_ttl = \"1d\"\n"),
            ("web-profile-without-files", "trust_domain = \"example.org\"\n[federation]\nbundle_endpoint_address = \"0.0.0.0:8443\"\nbundle_endpoint_profile = \"https_web\"\n"),
            ("relationship-own-domain", "trust_domain = \"example.org\"\n[[federation.relationships]]\ntrust_domain = \"example.org\"\nbundle_endpoint_url = \"https://a/\"\nprofile = \"https_web\"\n"),
            ("refresh-bounds", "trust_domain = \"example.org\"\n[federation]\nmin_refresh = \"2h\"\nmax_refresh = \"1h\"\n"),
            ("huge-ttl", "[ca]\nttl = \"99999999999999999999d\"\n"),
        ],
    )?;
    corpus.put("agent_config", "documented", doc_example("agent.md")?)?;
    corpus.texts(
        "agent_config",
        &[
            ("minimal", "trust_domain = \"example.org\"\n"),
            ("k8s", "trust_domain = \"example.org\"\nnode_attestor = \"k8s_psat\"\n[kubernetes]\nnode_name = \"n1\"\ncluster = \"c1\"\n[sds]\ndefault_svid_name = \"default\"\n"),
            ("batch-zero", "max_batch = 0\n"),
            ("both-bootstraps", "trust_bundle_path = \"b.pem\"\ninsecure_bootstrap = true\n"),
            ("bad-window", "batch_window = \"forever\"\n"),
        ],
    )?;
    corpus.put(
        "forwarder_config",
        "documented",
        doc_example("forwarder.md")?,
    )?;
    corpus.texts(
        "forwarder_config",
        &[
            ("one-inbound", "[[inbound]]\nlisten = \"0.0.0.0:15443\"\ntarget = \"127.0.0.1:8080\"\nallow = [\"spiffe://example.org/ns/*/sa/web\"]\n"),
            ("rest-in-middle", "[[inbound]]\nlisten = \"0.0.0.0:15443\"\ntarget = \"127.0.0.1:8080\"\nallow = [\"spiffe://example.org/**/web\"]\n"),
            ("http-rule-bad-method", "[[inbound]]\nlisten = \"0.0.0.0:1\"\ntarget = \"a:1\"\nhttp = true\n[[inbound.http_rules]]\naction = \"deny\"\nmethods = [\"GE T\"]\n"),
            ("duplicate-names", "[[outbound]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"a:1\"\nexpect = [\"spiffe://example.org\"]\n[[outbound]]\nname = \"a\"\nlisten = \"127.0.0.1:2\"\nupstream = \"a:1\"\nexpect = [\"spiffe://example.org\"]\n"),
            ("zero-connections", "[limits]\nmax_connections = 0\n"),
        ],
    )?;
    Ok(())
}
