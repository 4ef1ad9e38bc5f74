//! Which server each agent is connected to, seen from both ends: the agent process's established
//! TCP connections (its socket inodes in `/proc/<pid>/fd`, matched in `/proc/<pid>/net/tcp*`)
//! name the server's port, and that server's `sigil_server_agents_connected` gauge says a sync
//! stream is open on it. An agent counts as synced with a server only when both agree.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::Cluster;

/// The metric of open sync streams (one per agent) on a server.
const AGENTS_CONNECTED: &str = "sigil_server_agents_connected";

/// TCP state `ESTABLISHED` in `/proc/net/tcp`.
const ESTABLISHED: &str = "01";

impl Cluster {
    /// The index of the running server whose sync stream agent `agent` holds now, if any.
    pub fn synced_server(&self, agent: usize) -> anyhow::Result<Option<usize>> {
        let Some(pid) = self.agents[agent].pid() else {
            return Ok(None);
        };
        let ports = established_remote_ports(pid)?;
        for (index, server) in self.servers.iter().enumerate() {
            if !server.is_running() || !ports.contains(&port_of(&server.agent_api)?) {
                continue;
            }
            // The gauge counts agents; every agent with a connection here must be among them.
            let connected_here = self.agents_with_connection_to(index)?;
            let streams = crate::steps::metric(&server.health, AGENTS_CONNECTED).unwrap_or(0.0);
            if streams >= connected_here as f64 {
                return Ok(Some(index));
            }
        }
        Ok(None)
    }

    /// Like [`Cluster::synced_server`], failing when the agent holds no sync stream.
    pub fn connected_server(&self, agent: usize) -> anyhow::Result<usize> {
        self.synced_server(agent)?.with_context(|| {
            format!(
                "agent {agent} holds no sync stream on a running server; its log:\n{}",
                self.agents[agent].logs()
            )
        })
    }

    /// Waits until agent `agent` holds a sync stream on a running server other than `not`; that
    /// server and the moment it was seen.
    pub async fn wait_synced(
        &self,
        agent: usize,
        not: Option<usize>,
        timeout: Duration,
    ) -> anyhow::Result<(usize, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(server) = self.synced_server(agent)?
                && Some(server) != not
            {
                return Ok((server, Instant::now()));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "agent {agent} held no sync stream on a running server within {timeout:?}; its log:\n{}",
                tail(&self.agents[agent].logs(), 30)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every running agent holds a sync stream; when the last one did.
    pub async fn wait_all_synced(&self, timeout: Duration) -> anyhow::Result<Instant> {
        let mut last = Instant::now();
        for agent in 0..self.agents.len() {
            if self.agents[agent].pid().is_some() {
                last = last.max(self.wait_synced(agent, None, timeout).await?.1);
            }
        }
        Ok(last)
    }

    /// How many running agents have an established connection to server `server`.
    fn agents_with_connection_to(&self, server: usize) -> anyhow::Result<usize> {
        let port = port_of(&self.servers[server].agent_api)?;
        let mut count = 0;
        for agent in &self.agents {
            if let Some(pid) = agent.pid()
                && established_remote_ports(pid)?.contains(&port)
            {
                count += 1;
            }
        }
        Ok(count)
    }
}

/// The port of `host:port`.
fn port_of(address: &str) -> anyhow::Result<u16> {
    let (_, port) = address.rsplit_once(':').context("no port")?;
    Ok(port.parse()?)
}

/// The last `lines` lines of a log, for an error message.
pub(crate) fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The remote ports of the established TCP connections process `pid` holds.
fn established_remote_ports(pid: u32) -> anyhow::Result<BTreeSet<u16>> {
    let mut inodes = BTreeSet::new();
    // The process may exit meanwhile: no connections then.
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Ok(BTreeSet::new());
    };
    for fd in fds.filter_map(Result::ok) {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
        {
            inodes.insert(inode.to_string());
        }
    }
    let mut ports = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(inode)) =
                (fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if *state != ESTABLISHED || !inodes.contains(*inode) {
                continue;
            }
            if let Some(port) = remote.rsplit_once(':') {
                ports.insert(u16::from_str_radix(port.1, 16)?);
            }
        }
    }
    Ok(ports)
}
