//! Many agents on one server (issue 13): N simulated agents in this process against the real
//! `sigil-server`, each attested with its own join token, holding its own agent SVID, its own
//! mutual-TLS connection and `Sync` stream, and its own workload SVID that it renews at half-life.
//! Reports the server's resident memory per connected agent, its CPU while idle, an entry change
//! fanned out to all N agents (p50/p99/max until each agent has it), and a server restart with all
//! N reconnecting (time until every one is synced again, the new server's peak memory).
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/bench-agents --agents 10000
//! ```
//!
//! A simulated agent does what `sigil-agent` does on the agent API, without a Workload API: it
//! attests (retrying with jittered backoff when the server turns it away), follows its sync
//! stream applying pages together, resumes with digests of what it holds after a broken stream,
//! and backs off at most 5 s with jitter between attempts, as the real agent does.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use sigil_agent::node::{AgentIdentity, ServerConnection, attest_with_join_token, connect};
use sigil_agent::sync::{FIRST_RETRY, MAX_RETRY, with_jitter};
use sigil_core::bundle::TrustBundle;
use sigil_core::id::{TrustDomain, parse_spiffe_id};
use sigil_core::resume::{
    EntryDigests, bundle_digest, entry_bucket, federated_digest, tainted_digest,
};
use sigil_core::x509::{KeyType, csr_for};
use sigil_proto::admin::admin_api_client::AdminApiClient;
use sigil_proto::admin::{
    BatchCreateEntriesRequest, CreateJoinTokenRequest, EntryId, UpdateEntryRequest,
};
use sigil_proto::agent::{
    BatchSignX509SvidRequest, SyncRequest, SyncResponse, SyncResume, X509SvidRequest,
};
use sigil_proto::common;
use sigil_tests::bench::procfs::{cpu_time, status_kib, wait_for_quiet};
use sigil_tests::bench::report::percentile;
use sigil_tests::{NODE_ALIAS, ServerProcess, postgres};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// The entry every agent holds (parented to the node alias all of them attest under): the one
/// whose changes are timed on their way to all N.
const SHARED: &str = "spiffe://example.org/bench/shared";

#[derive(Debug, Parser)]
#[command(about = "N simulated agents on one real server: memory, idle CPU, fan-out, restart")]
struct Args {
    /// Which datastores to measure.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    datastores: Vec<String>,
    /// Simulated agents.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Entry changes timed on their way to every agent.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// TTL of each agent's workload SVID (renewed at half-life while the benchmark runs).
    #[arg(long, default_value = "600s", value_parser = sigil_tests::bench::parse_duration)]
    svid_ttl: Duration,
    /// How long the server's idle CPU is measured.
    #[arg(long, default_value = "10s", value_parser = sigil_tests::bench::parse_duration)]
    idle_window: Duration,
    /// How long any phase may take before the benchmark gives up.
    #[arg(long, default_value = "300s", value_parser = sigil_tests::bench::parse_duration)]
    patience: Duration,
}

/// What the simulated agents report to the benchmark.
#[derive(Debug)]
enum Event {
    /// Agent `agent` applied the first update of a new sync stream.
    Synced { agent: usize },
    /// Agent `agent` holds the shared entry as of `round`.
    Saw { agent: usize, round: usize },
    /// Agent `agent` received (or renewed) its workload SVID.
    Signed,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "| datastore | agents | all attested and synced s | server RSS before / with agents MiB | RssAnon with agents MiB | KiB per agent | idle CPU % of a core | fan-out p50 / p99 / max ms | restart: all resynced s | peak / steady RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for datastore in &args.datastores {
        let Some(database) = postgres::bench_datastore(datastore, "bench-agents").await? else {
            continue;
        };
        let dir = tempfile::tempdir()?;
        let mut server = ServerProcess::start(&dir.path().join("server"), database.url(), "")?;
        let row = run(&args, &mut server).await?;
        println!("| {datastore} | {row}");
    }
    Ok(())
}

/// One datastore's row of the table (after the datastore column).
async fn run(args: &Args, server: &mut ServerProcess) -> anyhow::Result<String> {
    let n = args.agents;
    let mut admin = sigil_server::api::admin::connect(&server.socket).await?;
    let tokens = join_tokens(&server.socket, n).await?;
    let shared_id = create_entries(&mut admin, &tokens, args.svid_ttl).await?;
    let trust = server.trust()?;
    let pid = server.pid().context("server pid")?;
    wait_for_quiet(Duration::from_secs(10)).await;
    let before = status_kib(pid, "VmRSS")?;

    let (events, mut received) = mpsc::unbounded_channel();
    let target = Arc::new(Target {
        address: server.agent_api.clone(),
        trust_domain: trust.trust_domain.clone(),
        roots: trust.roots.clone(),
    });
    let started = Instant::now();
    for (agent, (token, _)) in tokens.into_iter().enumerate() {
        let target = target.clone();
        let events = events.clone();
        tokio::spawn(async move { simulated_agent(agent, token, target, events).await });
    }
    let mut synced = HashSet::new();
    let mut signed = 0;
    let deadline = started + args.patience;
    while synced.len() < n || signed < n {
        match tokio::time::timeout_at(deadline.into(), received.recv()).await {
            Ok(Some(Event::Synced { agent })) => {
                synced.insert(agent);
            }
            Ok(Some(Event::Signed)) => signed += 1,
            Ok(Some(Event::Saw { .. })) => {}
            Ok(None) | Err(_) => anyhow::bail!(
                "after {:?} only {} of {n} agents synced and {signed} signed",
                args.patience,
                synced.len()
            ),
        }
    }
    let attested = started.elapsed();

    wait_for_quiet(Duration::from_secs(30)).await;
    let with_agents = status_kib(pid, "VmRSS")?;
    let anon = status_kib(pid, "RssAnon")?;
    let per_agent = with_agents.saturating_sub(before) as f64 / n as f64;
    let cpu_before = cpu_time(pid)?;
    tokio::time::sleep(args.idle_window).await;
    let idle = (cpu_time(pid)? - cpu_before).as_secs_f64() / args.idle_window.as_secs_f64();

    let mut fan_out = Vec::new();
    for round in 1..=args.rounds {
        let mut entry = admin
            .get_entry(EntryId {
                id: shared_id.clone(),
            })
            .await?
            .into_inner();
        entry.hint = format!("round-{round}");
        let changed = Instant::now();
        admin
            .update_entry(UpdateEntryRequest { entry: Some(entry) })
            .await?;
        let mut seen = HashSet::new();
        let deadline = Instant::now() + args.patience;
        while seen.len() < n {
            match tokio::time::timeout_at(deadline.into(), received.recv()).await {
                Ok(Some(Event::Saw { agent, round: r })) if r == round => {
                    if seen.insert(agent) {
                        fan_out.push(changed.elapsed());
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => anyhow::bail!(
                    "round {round}: only {} of {n} agents got the change",
                    seen.len()
                ),
            }
        }
    }
    fan_out.sort();

    server.stop()?;
    let restarted = Instant::now();
    server.restart_stopped()?;
    let pid = server.pid().context("server pid")?;
    let mut resynced = HashSet::new();
    let deadline = Instant::now() + args.patience;
    while resynced.len() < n {
        match tokio::time::timeout_at(deadline.into(), received.recv()).await {
            Ok(Some(Event::Synced { agent })) => {
                resynced.insert(agent);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => anyhow::bail!(
                "after the restart only {} of {n} agents synced again",
                resynced.len()
            ),
        }
    }
    let resync = restarted.elapsed();
    wait_for_quiet(Duration::from_secs(30)).await;
    let peak = status_kib(pid, "VmHWM")?;
    let steady = status_kib(pid, "VmRSS")?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok(format!(
        "{n} | {:.1} | {:.1} / {:.1} | {:.1} | {per_agent:.1} | {:.1} | {:.0} / {:.0} / {:.0} | {:.1} | {:.1} / {:.1} |",
        attested.as_secs_f64(),
        mib(before),
        mib(with_agents),
        mib(anon),
        idle * 100.0,
        ms(percentile(&fan_out, 0.5)),
        ms(percentile(&fan_out, 0.99)),
        ms(fan_out.last().copied().unwrap_or_default()),
        resync.as_secs_f64(),
        mib(peak),
        mib(steady),
    ))
}

/// `count` join tokens under the node alias, made by 8 concurrent admin callers; each with the
/// SPIFFE ID its agent will have.
async fn join_tokens(
    socket: &std::path::Path,
    count: usize,
) -> anyhow::Result<Vec<(String, String)>> {
    let callers = 8;
    let mut calls = Vec::new();
    for caller in 0..callers {
        let mut admin = sigil_server::api::admin::connect(socket).await?;
        let share = (caller..count).step_by(callers).count();
        calls.push(tokio::spawn(async move {
            let mut tokens = Vec::with_capacity(share);
            for _ in 0..share {
                let made = admin
                    .create_join_token(CreateJoinTokenRequest {
                        alias_spiffe_id: NODE_ALIAS.into(),
                        // Long enough for the slowest attestation storm.
                        ttl: 3600,
                    })
                    .await?
                    .into_inner();
                tokens.push((made.token, made.agent_spiffe_id));
            }
            anyhow::Ok(tokens)
        }));
    }
    let mut tokens = Vec::with_capacity(count);
    for call in calls {
        tokens.extend(call.await??);
    }
    Ok(tokens)
}

/// The shared entry under the node alias and one entry per agent, parented to that agent's
/// SPIFFE ID (its own workload); returns the shared entry's id.
async fn create_entries(
    admin: &mut AdminApiClient<Channel>,
    tokens: &[(String, String)],
    svid_ttl: Duration,
) -> anyhow::Result<String> {
    let ttl = i64::try_from(svid_ttl.as_secs()).unwrap_or(i64::MAX);
    let entry = |spiffe_id: String, parent_id: String, uid: usize| common::Entry {
        spiffe_id,
        parent_id,
        selectors: vec![common::Selector {
            r#type: "unix".into(),
            value: format!("uid:{uid}"),
        }],
        x509_svid_ttl: ttl,
        ..common::Entry::default()
    };
    let mut entries = vec![entry(SHARED.into(), NODE_ALIAS.into(), 1000)];
    entries.extend(tokens.iter().enumerate().map(|(n, (_, agent_id))| {
        entry(
            format!("spiffe://example.org/bench/agent-{n}"),
            agent_id.clone(),
            1001,
        )
    }));
    let mut shared_id = None;
    for batch in entries.chunks(1000) {
        let results = admin
            .batch_create_entries(BatchCreateEntriesRequest {
                entries: batch.to_vec(),
            })
            .await?
            .into_inner()
            .results;
        for result in results {
            anyhow::ensure!(result.code == 0, "creating an entry: {}", result.message);
            let created = result.entry.context("no entry in the result")?;
            if created.spiffe_id == SHARED {
                shared_id = Some(created.id);
            }
        }
    }
    shared_id.context("the shared entry was not created")
}

/// Where the simulated agents connect, and how they trust the server.
struct Target {
    address: String,
    trust_domain: TrustDomain,
    roots: Vec<Vec<u8>>,
}

/// The real agent's backoff: doubling from its first retry up to its cap, each wait jittered by
/// `sigil_agent::sync::with_jitter`, so agents turned away together do not come back together.
struct Backoff {
    step: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { step: FIRST_RETRY }
    }

    async fn wait(&mut self) {
        tokio::time::sleep(with_jitter(self.step)).await;
        self.step = (self.step * 2).min(MAX_RETRY);
    }

    fn reset(&mut self) {
        self.step = FIRST_RETRY;
    }
}

/// One simulated agent: attest, then follow the sync stream for good (reconnecting with resume),
/// with a task beside it that keeps its workload SVID signed.
async fn simulated_agent(
    agent: usize,
    token: String,
    target: Arc<Target>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut backoff = Backoff::new();
    let identity = loop {
        match attest(&target, &token).await {
            Ok(identity) => break identity,
            Err(_) => backoff.wait().await,
        }
    };
    let connection = match connect(
        &target.address,
        &target.trust_domain,
        &target.roots,
        Some(&identity),
    )
    .await
    {
        Ok(connection) => connection,
        Err(e) => {
            eprintln!("agent {agent}: {e}");
            return;
        }
    };
    let held = Arc::new(std::sync::Mutex::new(Held::default()));
    tokio::spawn(keep_signed(
        connection.clone(),
        held.clone(),
        events.clone(),
    ));
    backoff.reset();
    loop {
        let resume = held.lock().ok().and_then(|held| held.resume());
        // A stream that was established resets the backoff: the next attempt is quick.
        if follow(agent, &connection, resume, &held, &events)
            .await
            .is_ok()
        {
            backoff.reset();
        }
        backoff.wait().await;
    }
}

/// Attests with the join token over a connection without a client certificate.
async fn attest(target: &Target, token: &str) -> anyhow::Result<AgentIdentity> {
    let mut connection =
        connect(&target.address, &target.trust_domain, &target.roots, None).await?;
    Ok(attest_with_join_token(&mut connection, token).await?.0)
}

/// What a simulated agent holds from its sync stream.
#[derive(Default)]
struct Held {
    synced: bool,
    /// Entry id to (revision, SPIFFE ID, hint).
    entries: HashMap<String, (u64, String, String)>,
    bundle: Option<TrustBundle>,
    federated: Vec<TrustBundle>,
    tainted: Vec<String>,
}

impl Held {
    /// Digests of what is held, for a resumed stream (none before the first snapshot).
    fn resume(&self) -> Option<SyncResume> {
        if !self.synced {
            return None;
        }
        let entries = EntryDigests::of(
            self.entries
                .iter()
                .map(|(id, (revision, _, _))| (id.as_str(), *revision)),
        );
        Some(SyncResume {
            entry_buckets: entries.buckets().to_vec(),
            bundle_digest: bundle_digest(self.bundle.as_ref()),
            federated_digest: federated_digest(self.federated.iter()),
            tainted_digest: tainted_digest(self.tainted.iter().map(String::as_str)),
        })
    }

    /// Applies one update (its pages collected), as the agent's cache does.
    fn apply(&mut self, pages: Vec<SyncResponse>) -> anyhow::Result<()> {
        let Some(header) = pages.first() else {
            return Ok(());
        };
        if header.full_snapshot {
            self.entries.clear();
        }
        if header.resumed {
            let replaced: HashSet<usize> = header
                .replaced_buckets
                .iter()
                .filter_map(|bucket| usize::try_from(*bucket).ok())
                .collect();
            self.entries
                .retain(|id, _| !replaced.contains(&entry_bucket(id)));
        }
        if let Some(bundle) = &header.bundle {
            self.bundle = Some(TrustBundle::try_from(bundle)?);
        }
        if header.federated_bundles_set {
            self.federated = header
                .federated_bundles
                .iter()
                .map(TrustBundle::try_from)
                .collect::<Result<_, _>>()?;
        }
        if header.tainted_set {
            self.tainted.clone_from(&header.tainted_authority_ids);
        }
        for page in pages {
            for entry in page.entries {
                self.entries
                    .insert(entry.id, (entry.revision, entry.spiffe_id, entry.hint));
            }
            for id in page.removed_entry_ids {
                self.entries.remove(&id);
            }
        }
        self.synced = true;
        Ok(())
    }

    /// The round of the shared entry's last change (0 before any).
    fn shared_round(&self) -> usize {
        self.entries
            .values()
            .find(|(_, spiffe_id, _)| spiffe_id == SHARED)
            .and_then(|(_, _, hint)| hint.strip_prefix("round-"))
            .and_then(|round| round.parse().ok())
            .unwrap_or(0)
    }

    /// The agent's own entry (the one that is not shared): id and SPIFFE ID.
    fn own_entry(&self) -> Option<(String, String)> {
        self.entries
            .iter()
            .find(|(_, (_, spiffe_id, _))| spiffe_id != SHARED)
            .map(|(id, (_, spiffe_id, _))| (id.clone(), spiffe_id.clone()))
    }
}

/// Follows one sync stream until it breaks. `Ok` when it was established (its first update
/// applied) before it broke.
async fn follow(
    agent: usize,
    connection: &ServerConnection,
    resume: Option<SyncResume>,
    held: &std::sync::Mutex<Held>,
    events: &mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let mut stream = connection
        .client
        .clone()
        .sync(SyncRequest { resume })
        .await?
        .into_inner();
    let mut pages = Vec::new();
    let mut established = false;
    loop {
        let page = match stream.message().await {
            Ok(Some(page)) => page,
            Ok(None) | Err(_) if established => return Ok(()),
            Ok(None) => anyhow::bail!("the stream ended before its first update"),
            Err(e) => return Err(e.into()),
        };
        let more = page.more;
        pages.push(page);
        if more {
            continue;
        }
        let round = {
            let mut held = held
                .lock()
                .map_err(|_| anyhow::anyhow!("a poisoned lock"))?;
            held.apply(std::mem::take(&mut pages))?;
            held.shared_round()
        };
        if !established {
            established = true;
            let _ = events.send(Event::Synced { agent });
        }
        if round > 0 {
            let _ = events.send(Event::Saw { agent, round });
        }
    }
}

/// Signs the agent's own workload SVID once its entry has arrived, and again at half-life.
async fn keep_signed(
    connection: ServerConnection,
    held: Arc<std::sync::Mutex<Held>>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut backoff = Backoff::new();
    loop {
        let own = held.lock().ok().and_then(|held| held.own_entry());
        let Some((entry_id, spiffe_id)) = own else {
            backoff.wait().await;
            continue;
        };
        match sign(&connection, entry_id, &spiffe_id).await {
            Ok(expires_at) => {
                let _ = events.send(Event::Signed);
                backoff.reset();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let left = u64::try_from(expires_at).unwrap_or(0).saturating_sub(now);
                tokio::time::sleep(Duration::from_secs((left / 2).max(1))).await;
            }
            Err(_) => backoff.wait().await,
        }
    }
}

/// One `BatchSignX509Svid` call for a fresh key; the SVID's expiry (Unix seconds).
async fn sign(
    connection: &ServerConnection,
    entry_id: String,
    spiffe_id: &str,
) -> anyhow::Result<i64> {
    let key = KeyType::EcP256.generate()?;
    let id = parse_spiffe_id("entry.spiffe_id", spiffe_id)?;
    let csr = csr_for(&key, Some(&id))?;
    let results = connection
        .client
        .clone()
        .batch_sign_x509_svid(BatchSignX509SvidRequest {
            requests: vec![X509SvidRequest { entry_id, csr }],
        })
        .await?
        .into_inner()
        .results;
    let result = results.into_iter().next().context("no result")?;
    anyhow::ensure!(result.error_code == 0, "{}", result.error_message);
    Ok(result.svid.context("no SVID")?.expires_at)
}
