//! The forwarder's one error type.

use std::path::PathBuf;

/// Everything that can stop the forwarder from starting or keep it from its identity, and the
/// reason a request path is refused.
///
/// Each message names what was wrong (the file and key, the flag, the address) and what to do, so
/// it can be shown to an operator as is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value (in a TOML file, or a flag) is invalid.
    #[error("{source_name}: `{key}`: {reason}")]
    Config {
        /// The file path, or `<flags>`.
        source_name: String,
        /// The key (`inbound[0].allow[1]`) or flag (`--allow`).
        key: String,
        /// What was wrong and what is expected.
        reason: String,
    },
    /// The configuration file could not be read.
    #[error("cannot read the forwarder configuration {}: {source}", path.display())]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML, does not have the expected shape, or holds a
    /// value that is wrong.
    #[error("{}: {reason}", path.display())]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message: it names the line, column and key.
        reason: String,
    },
    /// A listener could not bind its address.
    #[error("cannot listen on {address} for {what}: {source}; is another process using the port?")]
    Bind {
        /// The address.
        address: String,
        /// Which listener (or the health endpoint).
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The Workload API could not be reached or refused the forwarder.
    #[error(transparent)]
    WorkloadApi(#[from] sigil_workload_api::Error),
    /// The Workload API answered with an SVID or bundle the forwarder cannot use.
    #[error("unusable identity from the Workload API: {0}")]
    Identity(String),
    /// A request path that [`crate::path::normalize`] refuses (answered with 400).
    #[error("request path `{path}` refused: {reason}")]
    RequestPath {
        /// The path as received, truncated and escaped.
        path: String,
        /// What is wrong with it and what to send instead.
        reason: String,
    },
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Config`].
    pub(crate) fn config(
        source_name: &str,
        key: impl Into<String>,
        reason: impl std::fmt::Display,
    ) -> Self {
        Error::Config {
            source_name: source_name.to_string(),
            key: key.into(),
            reason: reason.to_string(),
        }
    }
}
