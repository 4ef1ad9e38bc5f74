//! Workload attestation: what the agent can say about the process on the other end of its socket.
//!
//! - [`unix`]: from the socket's peer credentials and /proc (uid, gid, user, group, supplementary
//!   groups, executable path).
//! - [`k8s`]: from the caller's cgroup and a watch of the pods on this node (namespace, service
//!   account, pod, labels, container).

pub mod k8s;
pub mod unix;
