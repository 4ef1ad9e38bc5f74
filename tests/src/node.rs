//! A whole node for end-to-end tests: a real server, and a real agent attested with a join token
//! under the node alias [`NODE_ALIAS`], with the entries a test registers in between.

use std::path::PathBuf;

use crate::{AgentProcess, ServerProcess};

/// The node alias the agent of a [`Node`] holds; entries parented to it reach that agent.
pub const NODE_ALIAS: &str = "spiffe://example.org/node";

/// A server and one agent, in a private directory.
#[derive(Debug)]
pub struct Node {
    /// The agent (dropped first: it talks to the server).
    pub agent: AgentProcess,
    /// The server.
    pub server: ServerProcess,
    /// The PEM bundle the agent bootstrapped from.
    pub bundle: PathBuf,
    /// The private directory (kept until the node is dropped).
    pub dir: tempfile::TempDir,
}

impl Node {
    /// Starts the server, lets `register` create entries (under [`NODE_ALIAS`]), then starts the
    /// agent with a join token for that alias.
    pub fn start(
        register: impl FnOnce(&ServerProcess) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        Self::start_with("", register)
    }

    /// Starts a node whose entries all select this process (`unix:uid:<its uid>`), so the test
    /// itself, and every process it starts, gets their SVIDs: one entry per (SPIFFE ID, extra
    /// `entry create` flags).
    pub fn for_this_uid(entries: &[(&str, &[&str])]) -> anyhow::Result<Self> {
        let selector = this_uid_selector()?;
        Self::start(|server| {
            for (spiffe_id, extra) in entries {
                Self::entry(server, spiffe_id, &selector, extra)?;
            }
            Ok(())
        })
    }

    /// Like [`Node::start`], with `server_config` appended to the server's configuration.
    pub fn start_with(
        server_config: &str,
        register: impl FnOnce(&ServerProcess) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let server = ServerProcess::start(&dir.path().join("server"), None, server_config)?;
        let token = server.join_token(NODE_ALIAS)?;
        register(&server)?;
        let bundle = dir.path().join("bundle.pem");
        server.write_trust(&bundle)?;
        let agent = AgentProcess::start(
            &dir.path().join("agent"),
            &server,
            &bundle,
            Some(&token),
            "",
        )?;
        Ok(Node {
            agent,
            server,
            bundle,
            dir,
        })
    }

    /// Registers `spiffe_id` under the node alias for `selector`, with extra `entry create` flags.
    pub fn entry(
        server: &ServerProcess,
        spiffe_id: &str,
        selector: &str,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        server.cli(&crate::entry_create(spiffe_id, NODE_ALIAS, selector, extra))?;
        Ok(())
    }
}

/// The selector of this process's uid, `unix:uid:<uid>`: what the agent's unix attestor sees
/// for the test and for every process it starts.
pub fn this_uid_selector() -> anyhow::Result<String> {
    Ok(format!("unix:uid:{}", crate::current_uid()?))
}
