/// Everything that can go wrong in the Sigil server.
///
/// Each message says what was wrong and, where the user can act, what to do. [`Error::status`]
/// maps each variant to the gRPC status a client sees.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file or a flag is wrong; start-up stops.
    #[error("configuration {0}")]
    Config(#[from] sigil_core::config::ConfigError),
    /// A request field or input failed a domain check.
    #[error(transparent)]
    Invalid(#[from] sigil_core::Error),
    /// The caller is not allowed to do or obtain this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The caller could not be authenticated (bad token, missing certificate, ...).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// An identical thing exists already.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The datastore failed; the write, if any, did not happen.
    #[error("datastore: {}", with_cause(context, source.as_deref()))]
    Datastore {
        /// What Sigil was doing, or what is wrong with the stored data (empty for a failed query,
        /// whose error says it all).
        context: String,
        /// The database driver's error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The datastore cannot be reached (down, restarting, or no connection free within
    /// `[datastore] timeout`); nothing was written. Signing and sync go on from the server's
    /// mirrors meanwhile; admin calls and attestation need the datastore.
    #[error("datastore unavailable: {0} (retry when it is back)")]
    DatastoreUnavailable(String),
    /// The CA, a key or the server's TLS could not be created, loaded or used.
    #[error("CA: {}", with_cause(context, source.as_deref()))]
    Ca {
        /// What Sigil was doing, or what is wrong.
        context: String,
        /// The underlying error, when there is one (a certificate library's or TLS's).
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What Sigil was doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Stored data breaks a rule the server enforces (e.g. an ID in the reserved namespace); the
    /// message names the rows and how to remove them.
    #[error("stored data refused: {0}")]
    Integrity(String),
    /// The server cannot serve this now (e.g. shutting down); retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The server is at one of its admission limits (the message names it); retry after a
    /// backoff.
    #[error("busy: {0}")]
    Busy(String),
    /// A write clashed with another made at the same moment and nothing of it was written;
    /// sending it again is safe.
    #[error("aborted: {0}")]
    Aborted(String),
}

impl Error {
    /// An [`Error::Config`]: the value from the file (or `<flags>`) at `path` is wrong.
    pub fn config(path: &std::path::Path, reason: impl Into<String>) -> Self {
        Error::Config(sigil_core::config::ConfigError::invalid(path, reason))
    }

    /// An [`Error::Ca`] without an underlying error.
    pub fn ca(context: impl Into<String>) -> Self {
        Error::Ca {
            context: context.into(),
            source: None,
        }
    }

    /// An [`Error::Ca`] caused by `source`.
    pub fn ca_caused(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Ca {
            context: context.into(),
            source: Some(Box::new(source)),
        }
    }

    /// An [`Error::Datastore`] without an underlying error.
    pub fn datastore(context: impl Into<String>) -> Self {
        Error::Datastore {
            context: context.into(),
            source: None,
        }
    }

    /// An [`Error::Datastore`] caused by `source`.
    pub fn datastore_caused(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Datastore {
            context: context.into(),
            source: Some(Box::new(source)),
        }
    }

    /// An [`Error::Io`] with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The gRPC status for this error.
    pub fn status(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            Error::Invalid(_) | Error::Config(_) => tonic::Status::invalid_argument(message),
            Error::PermissionDenied(_) => tonic::Status::permission_denied(message),
            Error::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            Error::NotFound(_) => tonic::Status::not_found(message),
            Error::AlreadyExists(_) => tonic::Status::already_exists(message),
            Error::Aborted(_) => tonic::Status::aborted(message),
            Error::Busy(_) => tonic::Status::resource_exhausted(message),
            Error::Unavailable(_) | Error::DatastoreUnavailable(_) => {
                tonic::Status::unavailable(message)
            }
            Error::Datastore { .. } | Error::Ca { .. } | Error::Io { .. } | Error::Integrity(_) => {
                tonic::Status::internal(message)
            }
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        error.status()
    }
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        if is_unreachable(&error) {
            Error::DatastoreUnavailable(error.to_string())
        } else {
            Error::datastore_caused("", error)
        }
    }
}

/// Whether `error` says the database could not be reached rather than that a query failed: no
/// connection within the acquire timeout, a broken socket, or Postgres shutting down or refusing
/// connections (SQLSTATE classes 08, connection exception, and 57, operator intervention). Those
/// are worth a retry once the database is back; a failed query is not.
fn is_unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57")),
        _ => false,
    }
}

/// `context: cause`, or `context` alone: the cause stays a typed `source` for callers and for
/// `{:?}`, and is in the message too because the message is what a gRPC client and a log line see.
fn with_cause(context: &str, cause: Option<&(dyn std::error::Error + Send + Sync)>) -> String {
    match cause {
        Some(cause) if context.is_empty() => cause.to_string(),
        Some(cause) => format!("{context}: {cause}"),
        None => context.to_string(),
    }
}

/// The result type of the server library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
