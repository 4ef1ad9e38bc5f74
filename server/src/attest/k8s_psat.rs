//! Kubernetes projected ServiceAccount token (PSAT) node attestation.
//!
//! The agent sends the token kubelet projected into its pod (audience `sigil-server` by default)
//! and its cluster's name. The server checks the token with the TokenReview API (audience
//! included), checks the agent's ServiceAccount against the cluster's allow list, looks up the
//! pod the token is bound to and its node, and names the agent after the node's UID:
//! `spiffe://<td>/sigil/agent/k8s_psat/<cluster>/<node-uid>`. The same node always gets the same
//! agent ID, so an agent may attest again with a fresh token whenever it needs to.

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use serde::Deserialize;
use sigil_core::id::{TrustDomain, agent_id};
use sigil_core::selector::Selector;
use sigil_core::untrusted::untrusted;

use super::{AttestedNode, NodeAttestor};

use crate::k8s::review;
use crate::{Error, Result};

/// The attestor's name on the wire and in agent IDs.
const NAME: &str = "k8s_psat";

/// The largest payload accepted, in bytes.
const MAX_PAYLOAD: usize = 16 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    cluster: String,
    token: String,
}

/// Checks PSATs of one cluster.
pub struct PsatAttestor {
    client: kube::Client,
    trust_domain: TrustDomain,
    cluster: String,
    audience: String,
    allowed: Vec<String>,
}

impl PsatAttestor {
    /// An attestor for `cluster`, accepting tokens for `audience` from the ServiceAccounts in
    /// `allowed` (written `namespace:name`).
    pub fn new(
        client: kube::Client,
        trust_domain: TrustDomain,
        cluster: String,
        audience: String,
        allowed: Vec<String>,
    ) -> Self {
        PsatAttestor {
            client,
            trust_domain,
            cluster,
            audience,
            allowed,
        }
    }

    async fn check(&self, payload: &[u8]) -> Result<AttestedNode> {
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::Unauthenticated(format!(
                "the PSAT payload is over {MAX_PAYLOAD} bytes"
            )));
        }
        let payload: Payload = serde_json::from_slice(payload).map_err(|e| {
            Error::Unauthenticated(format!(
                "the PSAT payload is not {{\"cluster\", \"token\"}} JSON: {}",
                untrusted(&e.to_string())
            ))
        })?;
        if payload.cluster != self.cluster {
            return Err(Error::Unauthenticated(format!(
                "cluster `{}` is not configured on this server (it knows `{}`)",
                untrusted(&payload.cluster),
                self.cluster
            )));
        }
        let reviewed = review(&self.client, payload.token, &self.audience).await?;
        let (namespace, account) = (
            reviewed.namespace.as_str(),
            reviewed.service_account.as_str(),
        );
        if !self
            .allowed
            .iter()
            .any(|a| a == &format!("{namespace}:{account}"))
        {
            return Err(Error::PermissionDenied(format!(
                "ServiceAccount {namespace}/{account} may not attest agents in cluster {}; add `{namespace}:{account}` to kubernetes.allowed_service_accounts",
                self.cluster
            )));
        }
        let first = |key: &str| reviewed.extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (
            first("authentication.kubernetes.io/pod-name"),
            first("authentication.kubernetes.io/pod-uid"),
        ) else {
            return Err(Error::Unauthenticated(
                "the token is not bound to a pod; mount a projected ServiceAccount token".into(),
            ));
        };
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(&pod_name)
            .await
            .map_err(|e| {
                Error::Unavailable(format!("cannot look up pod {namespace}/{pod_name}: {e}"))
            })?
            .ok_or_else(|| {
                Error::Unauthenticated(format!("the token's pod {namespace}/{pod_name} is gone"))
            })?;
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(Error::Unauthenticated(format!(
                "pod {namespace}/{pod_name} was replaced since the token was issued"
            )));
        }
        let node_name = pod.spec.and_then(|s| s.node_name).ok_or_else(|| {
            Error::Unauthenticated(format!(
                "pod {namespace}/{pod_name} is not scheduled on a node"
            ))
        })?;
        let node = Api::<Node>::all(self.client.clone())
            .get_opt(&node_name)
            .await
            .map_err(|e| Error::Unavailable(format!("cannot look up node {node_name}: {e}")))?
            .ok_or_else(|| Error::Unauthenticated(format!("node {node_name} is gone")))?;
        let node_uid = node.metadata.uid.clone().unwrap_or_default();
        let mut selectors = Vec::new();
        let mut add = |value: String| -> Result<()> {
            selectors.push(Selector::new(NAME, value)?);
            Ok(())
        };
        add(format!("cluster:{}", self.cluster))?;
        add(format!("agent_ns:{namespace}"))?;
        add(format!("agent_sa:{account}"))?;
        add(format!("agent_pod_name:{pod_name}"))?;
        add(format!("agent_node_name:{node_name}"))?;
        add(format!("agent_node_uid:{node_uid}"))?;
        for (key, value) in node.metadata.labels.unwrap_or_default() {
            add(format!("agent_node_label:{key}:{value}"))?;
        }
        Ok(AttestedNode {
            agent_id: agent_id(&self.trust_domain, NAME, &[&self.cluster, &node_uid])?,
            selectors,
        })
    }
}

impl NodeAttestor for PsatAttestor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn attest<'a>(&'a self, payload: &'a [u8]) -> BoxFuture<'a, Result<AttestedNode>> {
        self.check(payload).boxed()
    }
}

/// The node name in an agent's PSAT selectors, if it has one.
pub fn agent_node_name(selectors: &[Selector]) -> Option<&str> {
    selectors
        .iter()
        .filter(|s| s.kind == NAME)
        .find_map(|s| s.value.strip_prefix("agent_node_name:"))
}
