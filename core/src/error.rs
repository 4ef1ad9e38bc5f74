use std::fmt;

/// Everything that can go wrong in Sigil's shared domain.
///
/// Each message says which input was wrong and why, so it can be shown to an operator as is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A field did not parse or broke a rule; `field` names it as the user wrote it.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// The field or flag, e.g. `spiffe_id` or `selector`.
        field: &'static str,
        /// What was wrong and, where useful, what is expected.
        reason: String,
    },
    /// A certificate signing request was malformed, badly signed or asked for something not allowed.
    #[error("invalid CSR: {0}")]
    InvalidCsr(String),
    /// A certificate or chain could not be parsed or does not meet the X509-SVID profile.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// A SPIFFE bundle document could not be parsed or has an invalid key.
    #[error("invalid SPIFFE bundle: {0}")]
    InvalidBundle(String),
    /// Generating or using a key or certificate failed.
    #[error("crypto failure: {0}")]
    Crypto(String),
}

impl Error {
    /// An [`Error::InvalidField`] for `field` with a reason.
    pub fn field(field: &'static str, reason: impl fmt::Display) -> Self {
        Error::InvalidField {
            field,
            reason: reason.to_string(),
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
