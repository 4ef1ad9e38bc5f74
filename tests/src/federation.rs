//! Two federated trust domains on one machine, for end-to-end tests: each a real server with its
//! bundle endpoint on, and a real agent with an entry for the test's uid that federates with the
//! other domain.

use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};

use crate::{AgentProcess, ServerProcess, free_port};

/// Server settings for a federating domain: its bundle endpoint on `port`, a 1 s refresh hint so
/// peers follow quickly, and a 1 s lower bound on fetching others.
fn federating(port: u16) -> String {
    format!(
        "[ca]\nbundle_refresh_hint = \"1s\"\n[federation]\nbundle_endpoint_address = \"127.0.0.1:{port}\"\nmin_refresh = \"1s\"\n"
    )
}

/// A server for a trust domain, with its bundle endpoint on, and an agent under the node alias
/// `spiffe://<td>/node`, with one entry for this test's uid that federates with a peer domain.
#[derive(Debug)]
pub struct Domain {
    /// The agent.
    pub agent: AgentProcess,
    /// The server.
    pub server: ServerProcess,
    /// The bundle endpoint's port on 127.0.0.1.
    pub endpoint_port: u16,
    /// The server's first bundle, as `bundle show --format spiffe` printed it.
    pub bundle_json: PathBuf,
}

impl Domain {
    /// Starts `trust_domain`'s server and agent in `dir`; the entry names
    /// `spiffe://<trust_domain>/<workload>` and federates with `peer`; `server_config` (TOML
    /// tables) is added to the server's file.
    pub fn start(
        dir: &Path,
        trust_domain: &str,
        workload: &str,
        peer: &str,
        server_config: &str,
    ) -> anyhow::Result<Self> {
        let endpoint_port = free_port()?;
        let server = ServerProcess::start_in_domain(
            &dir.join(trust_domain),
            trust_domain,
            &(federating(endpoint_port) + server_config),
            None,
            &[],
        )?;
        ensure!(
            server.logs().contains("bundle endpoint listening"),
            "no bundle endpoint:\n{}",
            server.logs()
        );
        let bundle_json = dir.join(format!("{trust_domain}.bundle.json"));
        std::fs::write(
            &bundle_json,
            server.cli(&["bundle", "show", "--format", "spiffe"])?,
        )?;
        let bundle_pem = dir.join(format!("{trust_domain}.bundle.pem"));
        server.write_trust(&bundle_pem)?;
        let alias = format!("spiffe://{trust_domain}/node");
        let token = server.join_token(&alias)?;
        server.cli(&crate::entry_create(
            &format!("spiffe://{trust_domain}/{workload}"),
            &alias,
            &crate::this_uid_selector()?,
            &["--federates-with", peer],
        ))?;
        let agent = AgentProcess::start(
            &dir.join(format!("agent-{trust_domain}")),
            &server,
            &bundle_pem,
            Some(&token),
            "",
        )?;
        Ok(Domain {
            agent,
            server,
            endpoint_port,
            bundle_json,
        })
    }
}

/// Makes `from` federate with `to` (trust domain `to_domain`) through `to`'s bundle endpoint.
pub fn federate(from: &Domain, to: &Domain, to_domain: &str) -> anyhow::Result<String> {
    from.server.cli(&[
        "federation",
        "create",
        "--trust-domain",
        to_domain,
        "--bundle-endpoint-url",
        &format!("https://127.0.0.1:{}/", to.endpoint_port),
        "--profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        &format!("spiffe://{to_domain}/sigil/server"),
        "--trust-bundle",
        to.bundle_json.to_str().context("utf-8 path")?,
    ])
}
