/// Everything that can go wrong setting up or calling the Workload API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket address is malformed.
    #[error("{0}")]
    Endpoint(String),
    /// A socket or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The Workload API answered with an error status.
    #[error("the Workload API refused {call}: {}", status.message())]
    Refused {
        /// The call, e.g. `FetchX509SVID`.
        call: &'static str,
        /// The status.
        status: tonic::Status,
    },
    /// The server could not be reached.
    #[error("cannot reach the Workload API at {socket}: {reason}")]
    Connect {
        /// The socket path.
        socket: String,
        /// What failed.
        reason: String,
    },
    /// A JWT-SVID failed validation.
    #[error("invalid JWT-SVID: {0}")]
    InvalidJwt(String),
    /// The process on the other end of a connection cannot be held, or is no longer the process
    /// that connected (it exited, its pid was reused, or it executed another program).
    #[error("cannot attest the caller (pid {pid}): {reason}")]
    Caller {
        /// The pid the caller connected with.
        pid: i32,
        /// What happened to it.
        reason: String,
    },
    /// The socket's directory, or one above it, is not safe to serve from: another user could
    /// replace the socket.
    #[error("refusing to serve the socket under {path}: {reason}")]
    SocketDirectory {
        /// The offending directory.
        path: std::path::PathBuf,
        /// Why it is unsafe, and what to do.
        reason: String,
    },
    /// An answer was malformed.
    #[error("malformed Workload API answer: {0}")]
    Malformed(String),
    /// A client broke an HTTP/2 or HPACK rule or went over a header bound on the Workload API
    /// socket: its connection is refused with a GOAWAY carrying `code` and `reason`.
    #[error("HTTP/2 {code}: {reason}")]
    Http2 {
        /// The error code the GOAWAY carries.
        code: crate::authority::Http2Code,
        /// What the client did wrong and, for a bound, the setting that raises it.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
