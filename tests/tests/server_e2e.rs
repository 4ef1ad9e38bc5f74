//! End to end: the real `sigil-server` binary, driven by its CLI, attested and asked for SVIDs
//! over the agent API, with the results checked by the `spiffe` crate and by `openssl verify`.
//! The same flow runs on SQLite and on Postgres.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use rcgen::KeyPair;
use sigil_agent::node::{attest_with_join_token, connect, renew};
use sigil_core::id::{SpiffeId, parse_trust_domain};
use sigil_core::x509::{KeyType, check_leaf_profile, csr_for};
use sigil_proto::agent::{
    BatchSignX509SvidRequest, SignJwtSvidRequest, SyncRequest, X509SvidRequest,
};
use sigil_tests::{ServerProcess, entry_create, pem_certificates, postgres};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_end_to_end_on_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(&dir.path().join("server"), None, "")?;
    exercise(server, dir.path()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_end_to_end_on_postgres() -> anyhow::Result<()> {
    let Some(database) = postgres::fresh_database("server_end_to_end_on_postgres").await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(&dir.path().join("server"), Some(&database.url), "")?;
    exercise(server, dir.path()).await
}

struct Workload {
    key: KeyPair,
    chain: Vec<Vec<u8>>,
}

async fn exercise(mut server: ServerProcess, scratch: &std::path::Path) -> anyhow::Result<()> {
    let trust_domain = parse_trust_domain("trust_domain", &server.trust_domain)?;

    // An operator makes a join token (with a node alias) and two entries under the alias.
    let token = server.cli_json(&[
        "token",
        "generate",
        "--spiffe-id",
        "spiffe://example.org/node/one",
        "--ttl",
        "10m",
    ])?;
    let token_text = token["token"].as_str().context("token")?.to_string();
    let expected_agent = token["agent_spiffe_id"]
        .as_str()
        .context("agent id")?
        .to_string();
    let web_id = server.create_entry(
        "spiffe://example.org/web",
        "spiffe://example.org/node/one",
        "unix:uid:1000",
        &["--dns", "web.example.org", "--x509-svid-ttl", "1h"],
    )?;
    let elsewhere_id = server.create_entry(
        "spiffe://example.org/db",
        "spiffe://example.org/node/two",
        "unix:uid:1001",
        &[],
    )?;

    // Bad entries are refused with a message naming the field, and nothing is written.
    let err = server.cli_error(&entry_create(
        "spiffe://other.org/x",
        "spiffe://example.org/node/one",
        "unix:uid:1",
        &[],
    ))?;
    ensure!(
        err.contains("spiffe_id") && err.contains("other.org"),
        "{err}"
    );
    let err = server.cli_error(&entry_create(
        "spiffe://example.org/web",
        "spiffe://example.org/node/one",
        "unix:uid:1000",
        &[],
    ))?;
    ensure!(err.contains("already exists"), "{err}");
    let err = server.cli_error(&entry_create(
        "spiffe://example.org/x",
        "spiffe://example.org/node/one",
        "Unix:uid:1",
        &[],
    ))?;
    ensure!(err.contains("selector"), "{err}");
    ensure!(entry_count(&server)? == 3, "alias + 2 entries");

    // The agent trusts the server through the PEM bundle the CLI prints.
    let bundle_pem = server.cli(&["bundle", "show"])?;
    let roots = pem_certificates(&bundle_pem)?;
    let bundle_path = scratch.join("bundle.pem");
    std::fs::write(&bundle_path, &bundle_pem)?;

    let mut anonymous = connect(&server.agent_api, &trust_domain, &roots, None).await?;
    let (agent, bundle) = attest_with_join_token(&mut anonymous, &token_text).await?;
    ensure!(
        agent.spiffe_id.to_string() == expected_agent,
        "agent id {} != {expected_agent}",
        agent.spiffe_id
    );
    ensure!(
        bundle.x509_authorities == roots,
        "the attestation bundle is the CLI's bundle"
    );
    ensure!(!bundle.jwt_authorities.is_empty(), "JWT keys are published");

    // A join token works once, even across a restart (checked again below).
    let reuse = attest_with_join_token(&mut anonymous, &token_text)
        .await
        .err()
        .context("reused token accepted")?;
    ensure!(reuse.to_string().contains("already used"), "{reuse}");
    let unknown = attest_with_join_token(&mut anonymous, "not-a-token")
        .await
        .err()
        .context("unknown token accepted")?;
    ensure!(
        unknown.to_string().contains("unknown join token"),
        "{unknown}"
    );

    // Calls other than attestation need the agent SVID.
    let denied = anonymous
        .client
        .sync(SyncRequest {})
        .await
        .err()
        .context("anonymous sync")?;
    ensure!(denied.code() == Code::Unauthenticated, "{denied:?}");

    let mut connection = connect(&server.agent_api, &trust_domain, &roots, Some(&agent)).await?;

    // The sync stream: a snapshot with the one entry the agent may use, then a change as soon as an
    // operator creates another.
    let mut stream = connection.client.sync(SyncRequest {}).await?.into_inner();
    let snapshot = stream.message().await?.context("no snapshot")?;
    ensure!(snapshot.full_snapshot, "first message is the snapshot");
    let ids: Vec<&str> = snapshot
        .entries
        .iter()
        .map(|e| e.spiffe_id.as_str())
        .collect();
    ensure!(
        ids == ["spiffe://example.org/web"],
        "snapshot entries {ids:?}"
    );
    ensure!(snapshot.bundle.is_some(), "the snapshot carries the bundle");
    let created_at = Instant::now();
    let api = server.cli_json(&entry_create(
        "spiffe://example.org/api",
        &expected_agent,
        "unix:uid:2000",
        &[],
    ))?;
    let change = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await??
        .context("stream ended")?;
    let delivery = created_at.elapsed();
    ensure!(
        !change.full_snapshot && change.entries.len() == 1,
        "one new entry: {change:?}"
    );
    ensure!(
        change.entries[0].id == api["entries"][0]["id"].as_str().unwrap_or_default(),
        "it is the new entry"
    );
    eprintln!("entry create (CLI process included) to sync delivery: {delivery:?}");

    // Signing: one good CSR and three bad ones in one batch; each item succeeds or fails alone.
    let web_spiffe_id = SpiffeId::new("spiffe://example.org/web")?;
    let key = KeyType::EcP256.generate()?;
    let good_csr = csr_for(&key, Some(&web_spiffe_id))?;
    let wrong_id_csr = csr_for(
        &KeyType::EcP256.generate()?,
        Some(&SpiffeId::new("spiffe://example.org/admin")?),
    )?;
    let mut tampered = good_csr.clone();
    let last = tampered.len() - 3;
    tampered[last] ^= 0x55;
    let response = connection
        .client
        .batch_sign_x509_svid(BatchSignX509SvidRequest {
            requests: vec![
                X509SvidRequest {
                    entry_id: web_id.clone(),
                    csr: good_csr.clone(),
                },
                X509SvidRequest {
                    entry_id: elsewhere_id.clone(),
                    csr: csr_for(&KeyType::EcP256.generate()?, None)?,
                },
                X509SvidRequest {
                    entry_id: web_id.clone(),
                    csr: wrong_id_csr,
                },
                X509SvidRequest {
                    entry_id: web_id.clone(),
                    csr: tampered,
                },
            ],
        })
        .await?
        .into_inner();
    let codes: Vec<i32> = response.results.iter().map(|r| r.error_code).collect();
    ensure!(
        codes
            == [
                0,
                Code::PermissionDenied as i32,
                Code::PermissionDenied as i32,
                Code::InvalidArgument as i32
            ],
        "codes {codes:?}: {:?}",
        response
            .results
            .iter()
            .map(|r| &r.error_message)
            .collect::<Vec<_>>()
    );
    let svid = response.results[0].svid.clone().context("signed SVID")?;
    let workload = Workload {
        key,
        chain: svid.cert_chain.clone(),
    };
    check_svid(&workload, "spiffe://example.org/web", &bundle_path, scratch)?;
    let leaf = x509_parser::parse_x509_certificate(&workload.chain[0])
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .1;
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    ensure!(
        (3600..=3700).contains(&lifetime),
        "entry TTL 1h honoured (with back-dating): {lifetime}s"
    );

    // JWT-SVIDs are signed with a key published in the bundle.
    let jwt = connection
        .client
        .sign_jwt_svid(SignJwtSvidRequest {
            entry_id: web_id.clone(),
            audience: vec!["db".into()],
        })
        .await?
        .into_inner();
    ensure!(jwt.spiffe_id == "spiffe://example.org/web", "jwt subject");
    let header = jwt.token.split('.').next().context("jwt header")?;
    let header: serde_json::Value = serde_json::from_slice(&base64url(header)?)?;
    ensure!(header["alg"] == "ES256", "{header}");
    ensure!(
        bundle
            .jwt_authorities
            .iter()
            .any(|k| header["kid"] == k.key_id.as_str()),
        "kid is in the bundle"
    );
    let no_audience = connection
        .client
        .sign_jwt_svid(SignJwtSvidRequest {
            entry_id: web_id.clone(),
            audience: vec![],
        })
        .await
        .err()
        .context("JWT without audience")?;
    ensure!(
        no_audience.code() == Code::InvalidArgument,
        "{no_audience:?}"
    );

    // An oversized message is refused and the server keeps serving.
    let huge = connection
        .client
        .batch_sign_x509_svid(BatchSignX509SvidRequest {
            requests: vec![X509SvidRequest {
                entry_id: web_id.clone(),
                csr: vec![0x30; 5 * 1024 * 1024],
            }],
        })
        .await
        .err()
        .context("oversized message accepted")?;
    ensure!(huge.code() != Code::Ok, "{huge:?}");

    // The agent renews its own SVID.
    let renewed = renew(&mut connection).await?;
    ensure!(
        renewed.spiffe_id == agent.spiffe_id,
        "renewed agent keeps its ID"
    );
    let renewed_serial = hex_serial(&renewed.chain[0])?;

    // A clean restart keeps the CA, entries, agents and the record of every SVID signed.
    let serials_before = vec![
        hex_serial(&workload.chain[0])?,
        renewed_serial.clone(),
        hex_serial(&agent.chain[0])?,
    ];
    drop(stream);
    server.restart()?;
    ensure!(
        server.cli(&["bundle", "show"])? == bundle_pem,
        "the CA survives a restart"
    );
    ensure!(entry_count(&server)? == 4, "entries survive");
    let agents = server.cli_json(&["agent", "list"])?;
    ensure!(
        agents["agents"][0]["spiffe_id"] == expected_agent.as_str(),
        "agent survives: {agents}"
    );
    ensure!(
        agents["agents"][0]["svid_serial"] == renewed_serial.as_str(),
        "agent record has the renewed SVID"
    );
    let recorded = server.cli_json(&["svid", "list"])?;
    let recorded: Vec<&str> = recorded["svids"]
        .as_array()
        .context("svids")?
        .iter()
        .filter_map(|s| s["serial"].as_str())
        .collect();
    for serial in &serials_before {
        ensure!(
            recorded.contains(&serial.as_str()),
            "SVID {serial} is in the issuance record after restart: {recorded:?}"
        );
    }
    ensure!(
        recorded.contains(&jwt_id(&jwt.token)?.as_str()),
        "the JWT-SVID is recorded"
    );
    let shown = server.cli_json(&["svid", "show", "--serial", &serials_before[0]])?;
    ensure!(
        shown["svids"][0]["spiffe_id"] == "spiffe://example.org/web"
            && shown["svids"][0]["entry_id"] == web_id.as_str(),
        "{shown}"
    );
    let mut anonymous = connect(&server.agent_api, &trust_domain, &roots, None).await?;
    let reuse = attest_with_join_token(&mut anonymous, &token_text)
        .await
        .err()
        .context("token reused after restart")?;
    ensure!(reuse.to_string().contains("already used"), "{reuse}");

    // The attested agent keeps working after the restart, with its renewed SVID.
    let mut connection = connect(&server.agent_api, &trust_domain, &roots, Some(&renewed)).await?;
    let again = sign(&mut connection, &web_id, &web_spiffe_id).await?;
    check_svid(&again, "spiffe://example.org/web", &bundle_path, scratch)?;

    // Banned, then evicted: the agent loses access at once.
    server.cli(&["agent", "ban", "--spiffe-id", &expected_agent])?;
    let banned = sign(&mut connection, &web_id, &web_spiffe_id)
        .await
        .err()
        .context("banned agent signed")?;
    ensure!(banned.to_string().contains("banned"), "{banned}");
    server.cli(&["agent", "evict", "--spiffe-id", &expected_agent])?;
    let evicted = sign(&mut connection, &web_id, &web_spiffe_id)
        .await
        .err()
        .context("evicted agent signed")?;
    ensure!(evicted.to_string().contains("not attested"), "{evicted}");
    ensure!(
        server.cli_json(&["agent", "list"])?["agents"]
            .as_array()
            .map(Vec::len)
            == Some(0),
        "evicted"
    );

    server.stop()?;
    Ok(())
}

/// How many entries `entry list` shows.
fn entry_count(server: &ServerProcess) -> anyhow::Result<usize> {
    Ok(server.cli_json(&["entry", "list"])?["entries"]
        .as_array()
        .map_or(0, Vec::len))
}

async fn sign(
    connection: &mut sigil_agent::node::ServerConnection,
    entry_id: &str,
    id: &SpiffeId,
) -> anyhow::Result<Workload> {
    let key = KeyType::EcP256.generate()?;
    let response = connection
        .client
        .batch_sign_x509_svid(BatchSignX509SvidRequest {
            requests: vec![X509SvidRequest {
                entry_id: entry_id.into(),
                csr: csr_for(&key, Some(id))?,
            }],
        })
        .await?
        .into_inner();
    let result = response.results.into_iter().next().context("one result")?;
    ensure!(
        result.error_code == 0,
        "signing refused: {}",
        result.error_message
    );
    Ok(Workload {
        key,
        chain: result.svid.context("svid")?.cert_chain,
    })
}

/// Checks an SVID with the `spiffe` crate, the SPIFFE profile, and `openssl verify`.
fn check_svid(
    workload: &Workload,
    expected: &str,
    bundle_path: &std::path::Path,
    scratch: &std::path::Path,
) -> anyhow::Result<()> {
    let chain: Vec<u8> = workload.chain.concat();
    let parsed = spiffe::X509Svid::parse_from_der(&chain, &workload.key.serialize_der())
        .map_err(|e| anyhow::anyhow!("the spiffe crate refuses the SVID: {e}"))?;
    ensure!(
        parsed.spiffe_id().to_string() == expected,
        "spiffe crate sees {}",
        parsed.spiffe_id()
    );
    ensure!(
        check_leaf_profile(&workload.chain[0])?.to_string() == expected,
        "profile"
    );
    let leaf_path = scratch.join("svid.pem");
    std::fs::write(
        &leaf_path,
        sigil_core::bundle::pem_block("CERTIFICATE", &workload.chain[0]),
    )?;
    sigil_tests::tools::openssl_verify(bundle_path, None, &leaf_path, &["-purpose", "sslclient"])
}

fn hex_serial(der: &[u8]) -> anyhow::Result<String> {
    Ok(sigil_core::x509::certificate_facts(der)?.serial)
}

fn base64url(text: &str) -> anyhow::Result<Vec<u8>> {
    use base64_decode::decode;
    decode(text)
}

fn jwt_id(token: &str) -> anyhow::Result<String> {
    let claims = token.split('.').nth(1).context("claims")?;
    let claims: serde_json::Value = serde_json::from_slice(&base64url(claims)?)?;
    Ok(claims["jti"].as_str().context("jti")?.to_string())
}

/// A base64url decoder, so the test does not trust the server's own encoder to read its output.
mod base64_decode {
    pub(super) fn decode(text: &str) -> anyhow::Result<Vec<u8>> {
        let mut bits = 0u32;
        let mut count = 0;
        let mut out = Vec::new();
        for c in text.bytes() {
            let value = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'-' => 62,
                b'_' => 63,
                _ => anyhow::bail!("not base64url: {c}"),
            };
            bits = (bits << 6) | u32::from(value);
            count += 6;
            if count >= 8 {
                count -= 8;
                out.push(((bits >> count) & 0xff) as u8);
            }
        }
        Ok(out)
    }
}

#[test]
fn a_bad_configuration_stops_start_up_naming_file_key_and_reason() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for (text, expected) in [
        (
            "trust_domain = \"example.org\"\nlisten = \"0.0.0.0:1\"\n",
            "unknown field `listen`",
        ),
        (
            "trust_domain = \"example.org\"\n[ca]\ndefault_x509_svid_ttl = \"soon\"\n",
            "`soon` is not a duration",
        ),
        ("trust_domain = \"Not A Domain\"\n", "trust_domain"),
        ("data_dir = \"x\"\n", "trust_domain is required"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text)?;
        let output = std::process::Command::new(sigil_tests::binary("sigil-server")?)
            .args(["run", "--config"])
            .arg(&path)
            .current_dir(dir.path())
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(!output.status.success(), "started with {text:?}");
        ensure!(
            stderr.contains(&path.display().to_string()) && stderr.contains(expected),
            "for {text:?}: {stderr}"
        );
    }
    Ok(())
}
