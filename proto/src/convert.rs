//! Conversions between the domain types of `sigil-core` and their protobuf messages, shared by
//! the server, the agent and the CLI so each shape is translated in one place.

use sigil_core::bundle::{JwtAuthority, TrustBundle};
use sigil_core::id::parse_trust_domain;
use sigil_core::selector::Selector;

use crate::common;

/// A JWT authority has the same three fields in the domain and on the wire: the list `$keys`
/// copied, key by key, into `$to` (either way).
macro_rules! copy_jwt_authorities {
    ($keys:expr => $($to:ident)::+) => {
        $keys
            .iter()
            .map(|key| $($to)::+ {
                key_id: key.key_id.clone(),
                public_key: key.public_key.clone(),
                expires_at: key.expires_at,
            })
            .collect()
    };
}

impl From<&TrustBundle> for common::Bundle {
    fn from(bundle: &TrustBundle) -> Self {
        common::Bundle {
            trust_domain: bundle.trust_domain.to_string(),
            x509_authorities: bundle.x509_authorities.clone(),
            jwt_authorities: copy_jwt_authorities!(bundle.jwt_authorities => common::JwtAuthority),
            sequence: bundle.sequence,
            refresh_hint_seconds: bundle.refresh_hint_seconds,
        }
    }
}

impl TryFrom<&common::Bundle> for TrustBundle {
    type Error = sigil_core::Error;

    fn try_from(bundle: &common::Bundle) -> Result<Self, Self::Error> {
        Ok(TrustBundle {
            trust_domain: parse_trust_domain("bundle.trust_domain", &bundle.trust_domain)?,
            x509_authorities: bundle.x509_authorities.clone(),
            jwt_authorities: copy_jwt_authorities!(bundle.jwt_authorities => JwtAuthority),
            sequence: bundle.sequence,
            refresh_hint_seconds: bundle.refresh_hint_seconds,
        })
    }
}

impl From<&Selector> for common::Selector {
    fn from(selector: &Selector) -> Self {
        common::Selector {
            r#type: selector.kind.clone(),
            value: selector.value.clone(),
        }
    }
}

/// Unchecked: a selector from the wire must still pass [`Selector::check`] (entry validation
/// does that).
impl From<common::Selector> for Selector {
    fn from(selector: common::Selector) -> Self {
        Selector {
            kind: selector.r#type,
            value: selector.value,
        }
    }
}
