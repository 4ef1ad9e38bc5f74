//! End to end: the real `sigil-server` binary, driven by its CLI, attested and asked for SVIDs
//! over the agent API, with the results checked by the `spiffe` crate and by `openssl verify`.
//! The same flow runs on SQLite and on Postgres.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use prost::Message;
use rcgen::KeyPair;
use sigil_agent::node::{AgentIdentity, ServerConnection, attest_with_join_token, renew};
use sigil_core::bundle::TrustBundle;
use sigil_core::id::SpiffeId;
use sigil_core::resume::{
    EntryDigests, bundle_digest, entry_bucket, federated_digest, tainted_digest,
};
use sigil_core::x509::{KeyType, check_leaf_profile, csr_for};
use sigil_proto::agent::{
    BatchSignX509SvidRequest, SignJwtSvidRequest, SyncRequest, SyncResponse, SyncResume,
    X509SvidRequest,
};
use sigil_tests::steps::{ServerTrust, refused, refused_because, refused_with};
use sigil_tests::{ServerProcess, entry_create, postgres};
use tonic::{Code, Streaming};

/// The entry every signing in the scenario is for.
const WEB: &str = "spiffe://example.org/web";

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

/// What the operator registered: a join token with a node alias, and two entries, one under that
/// alias (web) and one under another node's (db).
struct Registration {
    token: String,
    /// The agent ID the token attests as.
    agent_id: String,
    web_entry: String,
    elsewhere_entry: String,
}

/// The scenario as it goes: the server and the registrations, how a client trusts the server
/// (the PEM also written for openssl), and the attested agent's identity and first bundle.
struct Scenario<'a> {
    server: ServerProcess,
    registration: Registration,
    trust: ServerTrust,
    bundle_path: PathBuf,
    scratch: &'a Path,
    agent: AgentIdentity,
    bundle: TrustBundle,
}

async fn exercise(server: ServerProcess, scratch: &Path) -> anyhow::Result<()> {
    let registration = register_and_refuse_bad_entries(&server)?;
    // The agent trusts the server through the PEM bundle the CLI prints.
    let bundle_path = scratch.join("bundle.pem");
    let trust = server.write_trust(&bundle_path)?;
    let (agent, bundle) = attest_once_with_the_join_token(&server, &trust, &registration).await?;
    let mut s = Scenario {
        server,
        registration,
        trust,
        bundle_path,
        scratch,
        agent,
        bundle,
    };
    let mut connection = s.trust.connect(&s.server, Some(&s.agent)).await?;
    let stream = the_sync_stream_follows_new_entries(&s, &mut connection).await?;
    let workload = a_signing_batch_is_judged_item_by_item(&s, &mut connection).await?;
    let jwt = jwt_svids_are_signed_with_a_published_key(&s, &mut connection).await?;
    an_oversized_message_is_refused(&s, &mut connection).await?;

    // The agent renews its own SVID.
    let renewed = renew(&mut connection).await?;
    ensure!(
        renewed.spiffe_id == s.agent.spiffe_id,
        "renewed agent keeps its ID"
    );
    drop(stream);
    a_restart_keeps_the_ca_entries_agents_and_records(&mut s, &workload, &renewed, &jwt).await?;
    the_renewed_agent_works_until_banned(&s, &renewed).await?;
    s.server.stop()?;
    Ok(())
}

/// An operator makes a join token (with a node alias) and two entries; bad entries are refused
/// with a message naming the field, and nothing is written.
fn register_and_refuse_bad_entries(server: &ServerProcess) -> anyhow::Result<Registration> {
    let token = server.cli_json(&[
        "token",
        "generate",
        "--spiffe-id",
        "spiffe://example.org/node/one",
        "--ttl",
        "10m",
    ])?;
    let registration = Registration {
        token: token["token"].as_str().context("token")?.to_string(),
        agent_id: token["agent_spiffe_id"]
            .as_str()
            .context("agent id")?
            .to_string(),
        web_entry: server.create_entry(
            WEB,
            "spiffe://example.org/node/one",
            "unix:uid:1000",
            &["--dns", "web.example.org", "--x509-svid-ttl", "1h"],
        )?,
        elsewhere_entry: server.create_entry(
            "spiffe://example.org/db",
            "spiffe://example.org/node/two",
            "unix:uid:1001",
            &[],
        )?,
    };
    let bad_entries: [(&str, &str, &[&str]); 3] = [
        (
            "spiffe://other.org/x",
            "unix:uid:1",
            &["spiffe_id", "other.org"],
        ),
        (
            "spiffe://example.org/web",
            "unix:uid:1000",
            &["already exists"],
        ),
        ("spiffe://example.org/x", "Unix:uid:1", &["selector"]),
    ];
    // Each names the field it fails on.
    for (spiffe_id, selector, reasons) in bad_entries {
        let err = server.cli_error(&entry_create(
            spiffe_id,
            "spiffe://example.org/node/one",
            selector,
            &[],
        ))?;
        ensure!(reasons.iter().all(|reason| err.contains(reason)), "{err}");
    }
    ensure!(entry_count(server)? == 3, "alias + 2 entries");
    Ok(registration)
}

/// The join token attests the agent as its alias, with the CLI's bundle and published JWT keys;
/// it works once, an unknown one not at all, and calls other than attestation need the agent SVID.
async fn attest_once_with_the_join_token(
    server: &ServerProcess,
    trust: &ServerTrust,
    registration: &Registration,
) -> anyhow::Result<(AgentIdentity, TrustBundle)> {
    let mut anonymous = trust.connect(server, None).await?;
    let (agent, bundle) = attest_with_join_token(&mut anonymous, &registration.token).await?;
    let expected_agent = &registration.agent_id;
    ensure!(
        agent.spiffe_id.to_string() == *expected_agent,
        "agent id {} != {expected_agent}",
        agent.spiffe_id
    );
    ensure!(
        bundle.x509_authorities == trust.roots,
        "the attestation bundle is the CLI's bundle"
    );
    ensure!(!bundle.jwt_authorities.is_empty(), "JWT keys are published");

    // Once, even across a restart (checked again after it).
    let reuse = attest_with_join_token(&mut anonymous, &registration.token).await;
    refused_because(reuse, "already used", "reused token accepted")?;
    let unknown = attest_with_join_token(&mut anonymous, "not-a-token").await;
    refused_because(unknown, "unknown join token", "unknown token accepted")?;

    let denied = anonymous.client.sync(SyncRequest::default()).await;
    refused_with(denied, Code::Unauthenticated, "anonymous sync")?;
    Ok((agent, bundle))
}

/// The sync stream: a snapshot with the one entry the agent may use, then a change as soon as an
/// operator creates another. Returns the stream, still open.
async fn the_sync_stream_follows_new_entries(
    s: &Scenario<'_>,
    connection: &mut ServerConnection,
) -> anyhow::Result<Streaming<SyncResponse>> {
    let mut stream = connection
        .client
        .sync(SyncRequest::default())
        .await?
        .into_inner();
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
    let api = s.server.cli_json(&entry_create(
        "spiffe://example.org/api",
        &s.registration.agent_id,
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
    let mut held = snapshot.entries.clone();
    held.extend(change.entries.iter().cloned());
    let bundle = TrustBundle::try_from(snapshot.bundle.as_ref().context("bundle")?)?;
    a_reopened_stream_sends_only_what_differs(connection, &held, &bundle).await?;
    Ok(stream)
}

/// A second stream opened with the digests of what the agent holds moves almost nothing when
/// nothing changed, and only the stale bucket's entries when one entry's revision is off.
async fn a_reopened_stream_sends_only_what_differs(
    connection: &mut ServerConnection,
    held: &[sigil_proto::common::Entry],
    bundle: &TrustBundle,
) -> anyhow::Result<()> {
    let resume = |entries: &[sigil_proto::common::Entry]| SyncResume {
        entry_buckets: EntryDigests::of(entries.iter().map(|e| (e.id.as_str(), e.revision)))
            .buckets()
            .to_vec(),
        bundle_digest: bundle_digest(Some(bundle)),
        federated_digest: federated_digest([]),
        tainted_digest: tainted_digest([]),
    };
    let request = SyncRequest {
        resume: Some(resume(held)),
    };
    let request_bytes = request.encoded_len();
    let mut stream = connection.client.sync(request).await?.into_inner();
    let first = stream.message().await?.context("no first message")?;
    ensure!(
        first.resumed && !first.full_snapshot && !first.more,
        "resumed: {first:?}"
    );
    ensure!(
        first.entries.is_empty() && first.replaced_buckets.is_empty() && first.bundle.is_none(),
        "nothing differs, nothing sent: {first:?}"
    );
    let moved = request_bytes + first.encoded_len();
    ensure!(
        moved < 1024,
        "a resume with nothing changed moved {moved} bytes"
    );
    drop(stream);

    let mut stale = held.to_vec();
    stale[0].revision += 1;
    let mut stream = connection
        .client
        .sync(SyncRequest {
            resume: Some(resume(&stale)),
        })
        .await?
        .into_inner();
    let first = stream.message().await?.context("no first message")?;
    let bucket = u32::try_from(entry_bucket(&held[0].id))?;
    ensure!(
        first.resumed && first.replaced_buckets == [bucket],
        "one bucket replaced: {first:?}"
    );
    ensure!(
        first.entries.iter().any(|e| e.id == held[0].id),
        "the stale entry is sent again: {first:?}"
    );
    Ok(())
}

/// Signing: one good CSR and three bad ones in one batch; each item succeeds or fails alone. The
/// good one's SVID passes every check and honours the entry's 1 h TTL.
async fn a_signing_batch_is_judged_item_by_item(
    s: &Scenario<'_>,
    connection: &mut ServerConnection,
) -> anyhow::Result<Workload> {
    let web_id = &s.registration.web_entry;
    let key = KeyType::EcP256.generate()?;
    let good_csr = csr_for(&key, Some(&SpiffeId::new(WEB)?))?;
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
                    entry_id: s.registration.elsewhere_entry.clone(),
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
    check_svid(&workload, WEB, &s.bundle_path, s.scratch)?;
    let leaf = x509_parser::parse_x509_certificate(&workload.chain[0])
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .1;
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    ensure!(
        (3600..=3700).contains(&lifetime),
        "entry TTL 1h honoured (with back-dating): {lifetime}s"
    );
    Ok(workload)
}

/// JWT-SVIDs are signed with a key published in the bundle, and only for an audience. Returns the
/// token signed.
async fn jwt_svids_are_signed_with_a_published_key(
    s: &Scenario<'_>,
    connection: &mut ServerConnection,
) -> anyhow::Result<String> {
    let sign_jwt = |audience: Vec<String>| SignJwtSvidRequest {
        entry_id: s.registration.web_entry.clone(),
        audience,
    };
    let jwt = connection
        .client
        .sign_jwt_svid(sign_jwt(vec!["db".into()]))
        .await?
        .into_inner();
    ensure!(jwt.spiffe_id == WEB, "jwt subject");
    let header = jwt.token.split('.').next().context("jwt header")?;
    let header: serde_json::Value = serde_json::from_slice(&base64url(header)?)?;
    ensure!(header["alg"] == "ES256", "{header}");
    ensure!(
        s.bundle
            .jwt_authorities
            .iter()
            .any(|k| header["kid"] == k.key_id.as_str()),
        "kid is in the bundle"
    );
    let no_audience = connection.client.sign_jwt_svid(sign_jwt(vec![])).await;
    refused_with(no_audience, Code::InvalidArgument, "JWT without audience")?;
    Ok(jwt.token)
}

/// An oversized message is refused and the server keeps serving.
async fn an_oversized_message_is_refused(
    s: &Scenario<'_>,
    connection: &mut ServerConnection,
) -> anyhow::Result<()> {
    let huge = connection
        .client
        .batch_sign_x509_svid(BatchSignX509SvidRequest {
            requests: vec![X509SvidRequest {
                entry_id: s.registration.web_entry.clone(),
                csr: vec![0x30; 5 * 1024 * 1024],
            }],
        })
        .await;
    let huge = refused(huge, "oversized message accepted")?;
    ensure!(huge.code() != Code::Ok, "{huge:?}");
    Ok(())
}

/// A clean restart keeps the CA, entries, agents (with the renewed SVID), the record of every SVID
/// signed, and the join token used.
async fn a_restart_keeps_the_ca_entries_agents_and_records(
    s: &mut Scenario<'_>,
    workload: &Workload,
    renewed: &AgentIdentity,
    jwt: &str,
) -> anyhow::Result<()> {
    let renewed_serial = hex_serial(&renewed.chain[0])?;
    let serials_before = vec![
        hex_serial(&workload.chain[0])?,
        renewed_serial.clone(),
        hex_serial(&s.agent.chain[0])?,
    ];
    s.server.restart()?;
    let server = &s.server;
    ensure!(
        server.cli(&["bundle", "show"])? == s.trust.pem,
        "the CA survives a restart"
    );
    ensure!(entry_count(server)? == 4, "entries survive");
    let agents = server.cli_json(&["agent", "list"])?;
    ensure!(
        agents["agents"][0]["spiffe_id"] == s.registration.agent_id.as_str(),
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
        .filter_map(|svid| svid["serial"].as_str())
        .collect();
    for serial in &serials_before {
        ensure!(
            recorded.contains(&serial.as_str()),
            "SVID {serial} is in the issuance record after restart: {recorded:?}"
        );
    }
    ensure!(
        recorded.contains(&jwt_id(jwt)?.as_str()),
        "the JWT-SVID is recorded"
    );
    let shown = server.cli_json(&["svid", "show", "--serial", &serials_before[0]])?;
    ensure!(
        shown["svids"][0]["spiffe_id"] == WEB
            && shown["svids"][0]["entry_id"] == s.registration.web_entry.as_str(),
        "{shown}"
    );
    let mut anonymous = s.trust.connect(server, None).await?;
    let reuse = attest_with_join_token(&mut anonymous, &s.registration.token).await;
    refused_because(reuse, "already used", "token reused after restart")
}

/// The attested agent keeps working after the restart, with its renewed SVID; banned, then
/// evicted, it loses access at once.
async fn the_renewed_agent_works_until_banned(
    s: &Scenario<'_>,
    renewed: &AgentIdentity,
) -> anyhow::Result<()> {
    let (server, agent_id) = (&s.server, s.registration.agent_id.as_str());
    let mut connection = s.trust.connect(server, Some(renewed)).await?;
    let web_entry = &s.registration.web_entry;
    let web_spiffe_id = SpiffeId::new(WEB)?;
    let again = sign(&mut connection, web_entry, &web_spiffe_id).await?;
    check_svid(&again, WEB, &s.bundle_path, s.scratch)?;
    for (command, refusal) in [("ban", "banned"), ("evict", "not attested")] {
        server.cli(&["agent", command, "--spiffe-id", agent_id])?;
        let signed = sign(&mut connection, web_entry, &web_spiffe_id).await;
        let accepted = format!("the agent signed after `agent {command}`");
        refused_because(signed, refusal, &accepted)?;
    }
    ensure!(
        server.cli_json(&["agent", "list"])?["agents"]
            .as_array()
            .map(Vec::len)
            == Some(0),
        "evicted"
    );
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
    bundle_path: &Path,
    scratch: &Path,
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
