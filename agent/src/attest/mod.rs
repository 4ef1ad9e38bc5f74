//! Workload attestation: what the agent can say about the process on the other end of its socket.
//!
//! Every attestor implements [`WorkloadAttestor`]; [`WorkloadAttestors`] holds the ones the
//! configuration turns on, in order, and is all the workload source asks. The attestors:
//!
//! - [`unix`]: from the socket's peer credentials and /proc (uid, gid, user, group, supplementary
//!   groups, executable path). Always on.
//! - [`k8s`]: from the caller's cgroup and a watch of the pods on this node (namespace, service
//!   account, pod, labels, container). On with `[kubernetes] workload_attestor`.
//!
//! A new attestor is one file with a type implementing [`WorkloadAttestor`], and one line in
//! [`WorkloadAttestors::from_config`].

pub mod k8s;
pub mod unix;

use std::path::Path;

use sigil_core::selector::Selector;
use sigil_workload_api::peer::PeerProcess;
use sigil_workload_api::source::Caller;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::AgentConfig;
use crate::{Error, Result};

/// Describes a caller of the Workload API with selectors.
#[tonic::async_trait]
pub trait WorkloadAttestor: std::fmt::Debug + Send + Sync + 'static {
    /// The selectors of `caller`, from its peer credentials (pid, uid, gid) and the process held
    /// since it connected; empty when this attestor has nothing to say about it. An error refuses
    /// the caller: no other attestor can make up for it.
    async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>>;
}

/// What an attestor may need to start: the configuration, the file it came from (named in
/// errors), and where to spawn the background tasks it needs, which end when `stopping` turns
/// true.
#[derive(Debug)]
pub struct Startup<'a> {
    /// The agent's configuration.
    pub config: &'a AgentConfig,
    /// Where the configuration came from.
    pub source: &'a Path,
    /// The agent's tasks, stopped and awaited at shutdown.
    pub tasks: &'a mut JoinSet<()>,
    /// Turns true when the agent stops.
    pub stopping: &'a watch::Receiver<bool>,
}

/// The enabled workload attestors, asked in order.
#[derive(Debug, Default)]
pub struct WorkloadAttestors {
    attestors: Vec<Box<dyn WorkloadAttestor>>,
}

impl WorkloadAttestors {
    /// The attestors the configuration turns on, with the background tasks they need (the pod
    /// watch) started.
    pub async fn from_config(mut startup: Startup<'_>) -> Result<Self> {
        let config = startup.config;
        let mut attestors = WorkloadAttestors::default().with(unix::UnixAttestor::new(
            config.passwd_path.clone(),
            config.group_path.clone(),
        ));
        if config.kubernetes.workload_attestor {
            attestors = attestors.with(k8s::K8sAttestor::start(&mut startup).await?);
        }
        Ok(attestors)
    }

    /// These attestors and `attestor` after them.
    pub fn with(mut self, attestor: impl WorkloadAttestor) -> Self {
        self.attestors.push(Box::new(attestor));
        self
    }

    /// The selectors of every attestor for `caller`, sorted and without repeats; the first error
    /// refuses the caller and the attestors after it are not asked.
    pub async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>> {
        let mut selectors = Vec::new();
        for attestor in &self.attestors {
            selectors.extend(attestor.attest(caller).await?);
        }
        selectors.sort();
        selectors.dedup();
        Ok(selectors)
    }
}

/// The file `name` of the caller's /proc entry, read through the process held since it
/// connected; a failed read (it has probably exited) refuses the caller with the message
/// `refusal` makes of the read's error.
fn read_proc(
    process: &PeerProcess,
    name: &str,
    refusal: impl FnOnce(&sigil_workload_api::Error) -> String,
) -> Result<String> {
    process
        .read(name)
        .map_err(|source| Error::CallerUnreadable {
            reason: refusal(&source),
            source,
        })
}

#[cfg(test)]
mod tests;
