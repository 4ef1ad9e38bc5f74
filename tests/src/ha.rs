//! The high-availability harness: a [`Cluster`] of several real `sigil-server`s on one
//! [`PrivatePostgres`], agents that each know every server, and a [`Watcher`] per agent, a
//! workload fetching its SVIDs continuously. The fault-matrix suite (`tests/tests/ha_e2e.rs`)
//! and `bench-ha` break the cluster in turn and ask it afterwards what was lost
//! ([`check`]): failed or invalid answers, entries, issuance records.
//!
//! Every workload holds two identities: a *fast* one with 20 s X509-SVIDs, so rotation happens
//! during every fault, and a *steady* one that lives long enough (5 min) to outlast the longest
//! outage, so "the workload was served" stays checkable while no server can sign.

pub mod check;
pub mod postgres;
pub mod topology;
pub mod watch;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

pub use check::{Excuse, Excused};
pub use postgres::PrivatePostgres;
pub use watch::{Answer, Failure, Watcher};

use crate::{AgentProcess, ServerProcess};

/// The trust domain of every cluster.
pub const TRUST_DOMAIN: &str = "example.org";

/// The lifetime of the fast identities (and the servers' default).
pub const FAST_TTL: &str = "20s";

/// The lifetime of the steady identities: longer than twice the longest outage, since an SVID
/// is renewed at about half its life.
const STEADY_TTL: &str = "300s";

/// What every server of a cluster is configured with beyond the harness's defaults.
const SERVER_CONFIG: &str = "[ca]\ndefault_x509_svid_ttl = \"20s\"\n";

/// A running cluster. Fields drop in order: workloads, then agents, then servers, then Postgres.
#[derive(Debug)]
pub struct Cluster {
    /// One workload per agent, same index.
    pub watchers: Vec<Watcher>,
    /// The agents, each configured with every server's address.
    pub agents: Vec<AgentProcess>,
    /// The servers, all on [`Cluster::postgres`].
    pub servers: Vec<ServerProcess>,
    /// The one database.
    pub postgres: PrivatePostgres,
    /// Every entry the cluster and its tests created; none may be lost.
    pub entries: Vec<String>,
    /// The PEM bundle the agents bootstrapped from.
    pub bundle: PathBuf,
    /// The selector of this process (`unix:uid:<uid>`): every entry selects the test itself.
    pub selector: String,
    /// The private directory.
    pub dir: tempfile::TempDir,
}

/// The node alias agent `agent` is attested under.
pub fn node_alias(agent: usize) -> String {
    format!("spiffe://{TRUST_DOMAIN}/node/{agent}")
}

/// The fast identity (20 s SVIDs) of agent `agent`'s workload.
pub fn fast_id(agent: usize) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ha/{agent}/fast")
}

/// The steady identity (5 min SVIDs) of agent `agent`'s workload.
pub fn steady_id(agent: usize) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ha/{agent}/steady")
}

impl Cluster {
    /// Starts Postgres, `servers` servers on it and `agents` agents with their workloads; waits
    /// until every workload holds both its identities. `None` (after a printed notice) when
    /// Postgres cannot run here and this is not CI.
    pub async fn start(test: &str, servers: usize, agents: usize) -> anyhow::Result<Option<Self>> {
        let Some(postgres) = PrivatePostgres::start(test)? else {
            return Ok(None);
        };
        let dir = tempfile::Builder::new().prefix("sigil-ha").tempdir()?;
        let url = postgres.url();
        let mut running = Vec::new();
        for index in 0..servers {
            let data_dir = dir.path().join(format!("server-{index}"));
            running.push(ServerProcess::start(&data_dir, Some(&url), SERVER_CONFIG)?);
        }
        let mut cluster = Cluster {
            watchers: Vec::new(),
            agents: Vec::new(),
            servers: running,
            postgres,
            entries: Vec::new(),
            bundle: dir.path().join("bundle.pem"),
            selector: crate::this_uid_selector()?,
            dir,
        };
        let published = cluster
            .wait_bundle_complete(Duration::from_secs(15))
            .await?;
        eprintln!("every server's CA in every server's bundle after {published:?}");
        cluster.servers[servers - 1].write_trust(&cluster.bundle)?;
        for agent in 0..agents {
            cluster.start_agent(agent)?;
        }
        for agent in 0..agents {
            cluster.wait_served(agent, Duration::from_secs(30)).await?;
        }
        Ok(Some(cluster))
    }

    /// Registers agent `agent`'s identities (on different servers, so cross-server sync is used
    /// from the start), and starts the agent and its workload.
    fn start_agent(&mut self, agent: usize) -> anyhow::Result<()> {
        let alias = node_alias(agent);
        let n = self.servers.len();
        let token = self.servers[agent % n].join_token(&alias)?;
        for (id, ttl, server) in [
            (fast_id(agent), FAST_TTL, agent % n),
            (steady_id(agent), STEADY_TTL, (agent + 1) % n),
        ] {
            let extra = ["--x509-svid-ttl", ttl];
            let entry = self.servers[server].create_entry(&id, &alias, &self.selector, &extra)?;
            self.entries.push(entry);
        }
        let process = AgentProcess::start_with_servers(
            &self.dir.path().join(format!("agent-{agent}")),
            TRUST_DOMAIN,
            &self.server_addresses(),
            &self.bundle,
            Some(&token),
            "",
        )?;
        self.watchers
            .push(Watcher::start(process.endpoint(), TRUST_DOMAIN)?);
        self.agents.push(process);
        Ok(())
    }

    /// The agent API addresses of all servers, in index order.
    pub fn server_addresses(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.agent_api.clone()).collect()
    }

    /// Waits until every server's bundle holds one CA per server; how long that took.
    async fn wait_bundle_complete(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let mut counts = Vec::new();
            for server in &self.servers {
                counts.push(server.trust()?.roots.len());
            }
            if counts.iter().all(|&c| c >= self.servers.len()) {
                return Ok(started.elapsed());
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "after {timeout:?} the servers' bundles hold {counts:?} roots, expected {} each",
                self.servers.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until agent `agent`'s workload is served both its identities, valid.
    pub async fn wait_served(&self, agent: usize, timeout: Duration) -> anyhow::Result<Instant> {
        let (fast, steady) = (fast_id(agent), steady_id(agent));
        let watcher = &self.watchers[agent];
        let mark = watcher.mark();
        watcher
            .wait_for(mark, timeout, |a| {
                a.failure.is_none() && a.ids.contains(&fast) && a.ids.contains(&steady)
            })
            .await
            .with_context(|| {
                format!(
                    "the workload of agent {agent} was not served {fast} and {steady} within {timeout:?}; last answers: {:?}\nagent log:\n{}",
                    last_answers(watcher, mark),
                    self.agents[agent].logs()
                )
            })
    }

    /// Creates `spiffe://<td>/ha/<agent>/<name>` for agent `agent`'s workload on server `server`
    /// (kept among the entries that must not be lost); its SPIFFE ID.
    pub fn create_entry_on(
        &mut self,
        server: usize,
        agent: usize,
        name: &str,
    ) -> anyhow::Result<String> {
        let id = format!("spiffe://{TRUST_DOMAIN}/ha/{agent}/{name}");
        let alias = node_alias(agent);
        let extra = ["--x509-svid-ttl", FAST_TTL];
        let entry = self.servers[server].create_entry(&id, &alias, &self.selector, &extra)?;
        self.entries.push(entry);
        Ok(id)
    }

    /// Waits until agent `agent`'s workload is served `spiffe_id` in an answer after `mark`.
    pub async fn wait_delivered(
        &self,
        agent: usize,
        spiffe_id: &str,
        mark: usize,
        timeout: Duration,
    ) -> anyhow::Result<Instant> {
        let watcher = &self.watchers[agent];
        watcher
            .wait_for(mark, timeout, |a| {
                a.failure.is_none() && a.ids.iter().any(|id| id == spiffe_id)
            })
            .await
            .with_context(|| {
                format!(
                    "{spiffe_id} did not reach the workload of agent {agent} within {timeout:?}; last answers: {:?}",
                    last_answers(watcher, mark)
                )
            })
    }

    /// The first running server: where admin commands go.
    pub fn any_running_server(&self) -> anyhow::Result<&ServerProcess> {
        self.servers
            .iter()
            .find(|s| s.is_running())
            .context("no server is running")
    }

    /// Marks in every workload's answers, for [`Cluster::check_answers`].
    pub fn marks(&self) -> Vec<usize> {
        self.watchers.iter().map(Watcher::mark).collect()
    }

    /// Restarts every server that is not running, in parallel (so they come back at one moment,
    /// as after an outage); when the last of them was running again.
    pub fn restart_stopped_servers(&mut self) -> anyhow::Result<Instant> {
        std::thread::scope(|scope| {
            let restarts: Vec<_> = self
                .servers
                .iter_mut()
                .filter(|s| !s.is_running())
                .map(|s| scope.spawn(move || s.restart_stopped()))
                .collect();
            for restart in restarts {
                restart
                    .join()
                    .map_err(|_| anyhow::anyhow!("a server restart panicked"))??;
            }
            Ok(Instant::now())
        })
    }
}

/// The last few answers after `mark`, for an error message.
fn last_answers(watcher: &Watcher, mark: usize) -> Vec<String> {
    let answers = watcher.since(mark);
    answers
        .iter()
        .rev()
        .take(3)
        .map(|a| match &a.failure {
            Some(failure) => failure.to_string(),
            None => format!("served {:?}", a.ids),
        })
        .collect()
}
