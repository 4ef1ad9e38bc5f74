use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Status};

/// Everything that can go wrong in the agent.
///
/// Below the gRPC edges (the Workload API and SDS handlers, which call
/// [`crate::workload::AgentSource`]) every function returns this enum; the edge turns it into the
/// status a client sees with [`Error::status`] (or `Status::from`), and nowhere else.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file or a flag is wrong; start-up stops.
    #[error("configuration {0}")]
    Config(#[from] sigil_core::config::ConfigError),
    /// A domain check failed (bad SPIFFE ID, certificate, bundle), or a key or CSR could not be
    /// made.
    #[error(transparent)]
    Invalid(#[from] sigil_core::Error),
    /// The server could not be reached or its TLS identity was not the expected one.
    #[error("cannot connect to the server at {address}: {reason}")]
    Connect {
        /// The server address.
        address: String,
        /// What failed.
        reason: String,
    },
    /// A call to the server failed: the server refused it, or the transport did. A workload
    /// that asked for it gets the server's status as it is.
    #[error("the server refused {call}: {}", status.message())]
    Refused {
        /// The call, e.g. `AttestNode`.
        call: &'static str,
        /// The server's (or the transport's) status.
        #[source]
        status: Status,
    },
    /// The server's answer lacked something it must carry.
    #[error("the server's {call} answer is incomplete: {what}")]
    BadAnswer {
        /// The call.
        call: &'static str,
        /// What was missing or wrong.
        what: String,
    },
    /// The server sent an X509-SVID the agent cannot read (the leaf does not parse).
    #[error("the server sent an unreadable SVID: {0}")]
    UnreadableSvid(#[source] sigil_core::Error),
    /// The server sent an X509-SVID without any certificate.
    #[error("the server sent an empty chain")]
    EmptyChain,
    /// The server cannot give a workload what it asked for now (it is away or failing); the
    /// workload should retry, and meanwhile gets what the agent has cached.
    #[error("cannot get {what} from the server now: {}", status.message())]
    ServerUnavailable {
        /// What was asked for, e.g. `an SVID`.
        what: &'static str,
        /// The status of the failed call.
        #[source]
        status: Status,
    },
    /// A workload asked before the first entries arrived from the server.
    #[error("the agent has not received its entries from the server yet; retry shortly")]
    NotSynced,
    /// A workload asked before the agent had a trust bundle.
    #[error("the agent has no trust bundle yet; retry shortly")]
    NoBundle,
    /// The server did not sign an SVID within the agent's deadline.
    #[error("timed out waiting for the server to sign an SVID")]
    SigningTimedOut,
    /// The agent is shutting down and no longer signs.
    #[error("the agent is stopping")]
    Stopping,
    /// One signing failure handed to every request that waited for the same entry.
    #[error(transparent)]
    Shared(Arc<Error>),
    /// A workload cannot be attested: what /proc says about it contradicts what it connected as.
    #[error("{0}")]
    CallerRefused(String),
    /// A workload cannot be attested: its /proc entry cannot be read (it has probably exited).
    #[error("{reason}")]
    CallerUnreadable {
        /// Which process and what could not be read, as the workload is told.
        reason: String,
        /// The failed read.
        #[source]
        source: sigil_workload_api::Error,
    },
    /// A workload cannot be attested: something about it makes no valid selector.
    #[error("cannot describe the caller: {0}")]
    CallerUndescribable(#[source] sigil_core::Error),
    /// The process that connected is no longer the one on the other end: it exited, its pid was
    /// reused, or it executed another program. What was read about it cannot be trusted.
    #[error("{0}")]
    CallerChanged(#[source] sigil_workload_api::Error),
    /// A workload's container is not (yet) in any pod the watch has delivered for this node.
    #[error(
        "container {container} of process {pid} is not in any pod on node {node} after waiting {waited:?}; if the pod just started, retry"
    )]
    PodNotFound {
        /// The container ID from the process's cgroup.
        container: String,
        /// The caller's pid.
        pid: i32,
        /// This agent's node.
        node: String,
        /// How long the attestor waited for the pod watch.
        waited: Duration,
    },
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the agent was doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The agent cannot start with what it has (no token and no stored identity, ...).
    #[error("{0}")]
    Startup(String),
    /// The Workload API failed.
    #[error(transparent)]
    WorkloadApi(#[from] sigil_workload_api::Error),
}

impl Error {
    /// An [`Error::Config`]: the value from the file (or `<flags>`) at `path` is wrong.
    pub fn config(path: &std::path::Path, reason: impl Into<String>) -> Self {
        Error::Config(sigil_core::config::ConfigError::invalid(path, reason))
    }

    /// An [`Error::Io`] with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Wraps the status of a failed server `call` as [`Error::Refused`].
    pub(crate) fn refused(call: &'static str) -> impl Fn(Status) -> Self {
        move |status| Error::Refused { call, status }
    }

    /// A failed server call as "the server cannot give `what` now"; other errors unchanged.
    pub(crate) fn server_away(self, what: &'static str) -> Self {
        match self {
            Error::Refused { status, .. } => Error::ServerUnavailable { what, status },
            other => other,
        }
    }

    /// The gRPC code a workload gets for this error.
    pub fn code(&self) -> Code {
        match self {
            Error::Refused { status, .. } => status.code(),
            Error::Shared(error) => error.code(),
            Error::CallerRefused(_)
            | Error::CallerUnreadable { .. }
            | Error::CallerUndescribable(_)
            | Error::CallerChanged(_) => Code::PermissionDenied,
            Error::ServerUnavailable { .. }
            | Error::NotSynced
            | Error::NoBundle
            | Error::SigningTimedOut
            | Error::Stopping
            | Error::PodNotFound { .. }
            | Error::Connect { .. } => Code::Unavailable,
            Error::Config(_)
            | Error::Invalid(_)
            | Error::BadAnswer { .. }
            | Error::UnreadableSvid(_)
            | Error::EmptyChain
            | Error::Io { .. }
            | Error::Startup(_)
            | Error::WorkloadApi(_) => Code::Internal,
        }
    }

    /// The status a Workload API or SDS client gets for this error: the server's own status for
    /// a call the server refused, else [`Error::code`] with this error's message.
    pub fn status(&self) -> Status {
        match self {
            Error::Refused { status, .. } => status.clone(),
            Error::Shared(error) => error.status(),
            other => Status::new(other.code(), other.to_string()),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Refused { status, .. } => status,
            other => other.status(),
        }
    }
}

/// The result type of the agent library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
