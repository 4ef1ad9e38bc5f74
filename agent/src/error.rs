use std::path::PathBuf;

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file or a flag is wrong; start-up stops.
    #[error("configuration {}: {reason}", path.display())]
    Config {
        /// The file (or `<flags>`) the bad value came from.
        path: PathBuf,
        /// The key and what is wrong with it.
        reason: String,
    },
    /// A domain check failed (bad SPIFFE ID, certificate, bundle).
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
    /// The server refused a request; the message is the server's.
    #[error("the server refused {call}: {}", status.message())]
    Refused {
        /// The call, e.g. `AttestNode`.
        call: &'static str,
        /// The server's status.
        status: tonic::Status,
    },
    /// The server's answer lacked something it must carry.
    #[error("the server's {call} answer is incomplete: {what}")]
    BadAnswer {
        /// The call.
        call: &'static str,
        /// What was missing or wrong.
        what: String,
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
    /// An [`Error::Io`] with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The result type of the agent library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
