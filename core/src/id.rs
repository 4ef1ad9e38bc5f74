//! SPIFFE IDs and trust domains.
//!
//! The types are the `spiffe` crate's; this module adds what Sigil insists on beyond the spec
//! parser (lower-case trust domains as written, membership of our own trust domain) and the IDs
//! of Sigil's own components.

pub use spiffe::{SpiffeId, TrustDomain};

use crate::untrusted::untrusted;
use crate::{Error, Result};

/// The path namespace of a trust domain that belongs to Sigil's own components: the server
/// (`/sigil/server`) and the agents (`/sigil/agent/...`). The agent API trusts a client
/// certificate under `/sigil/agent/` as an agent, and agents trust `/sigil/server` as their
/// server, so nothing an operator or a workload can create may fall in it.
pub const RESERVED_PATH: &str = "/sigil";

/// Parses a SPIFFE ID, naming `field` in the error. The ID must be written in canonical form:
/// `spiffe://` then a lower-case trust domain of `[a-z0-9._-]` and path segments of
/// `[a-zA-Z0-9._-]`, with no empty, `.` or `..` segments.
pub fn parse_spiffe_id(field: &'static str, value: &str) -> Result<SpiffeId> {
    let id = SpiffeId::new(value).map_err(|e| {
        Error::field(
            field,
            format!(
                "`{}` is not a SPIFFE ID ({e}); expected spiffe://<trust-domain>/<path>",
                untrusted(value)
            ),
        )
    })?;
    if id.to_string() != value {
        return Err(write_it_as(
            field,
            value,
            "is not in canonical form",
            &id.to_string(),
        ));
    }
    Ok(id)
}

/// Parses a SPIFFE ID that must belong to `trust_domain`.
pub fn parse_member_id(
    field: &'static str,
    value: &str,
    trust_domain: &TrustDomain,
) -> Result<SpiffeId> {
    let id = parse_spiffe_id(field, value)?;
    if !id.is_member_of(trust_domain) {
        return Err(Error::field(
            field,
            format!(
                "`{}` belongs to trust domain `{}`, but this server is the CA of `{trust_domain}`",
                untrusted(value),
                untrusted(id.trust_domain_name())
            ),
        ));
    }
    Ok(id)
}

/// Parses a trust domain name (`example.org`, or `spiffe://example.org`), naming `field` in the error.
pub fn parse_trust_domain(field: &'static str, value: &str) -> Result<TrustDomain> {
    let td = TrustDomain::new(value).map_err(|e| {
        Error::field(
            field,
            format!(
                "`{}` is not a trust domain name ({e}); expected e.g. `example.org`",
                untrusted(value)
            ),
        )
    })?;
    let canonical = value.strip_prefix("spiffe://").unwrap_or(value);
    if td.as_str() != canonical {
        return Err(write_it_as(field, value, "must be lower case", td.as_str()));
    }
    Ok(td)
}

/// The refusal of a `value` that names something valid in another spelling than its own.
fn write_it_as(field: &'static str, value: &str, problem: &str, canonical: &str) -> Error {
    Error::field(
        field,
        format!(
            "`{}` {problem}; write it as `{}`",
            untrusted(value),
            untrusted(canonical)
        ),
    )
}

/// The SPIFFE ID the server presents to agents: `spiffe://<td>/sigil/server`.
pub fn server_id(trust_domain: &TrustDomain) -> SpiffeId {
    member(trust_domain, &["sigil", "server"])
}

/// The SPIFFE ID of an agent attested by `attestor` with the attestor-specific `parts`:
/// `spiffe://<td>/sigil/agent/<attestor>/<parts...>`.
pub fn agent_id(trust_domain: &TrustDomain, attestor: &str, parts: &[&str]) -> Result<SpiffeId> {
    let mut segments = vec!["sigil", "agent", attestor];
    segments.extend_from_slice(parts);
    SpiffeId::from_segments(trust_domain.clone(), &segments)
        .map_err(|e| Error::field("agent_id", format!("cannot form an agent ID: {e}")))
}

/// True when `id` names an agent (`/sigil/agent/...`) of `trust_domain`.
pub fn is_agent_id(id: &SpiffeId, trust_domain: &TrustDomain) -> bool {
    id.is_member_of(trust_domain) && id.path().starts_with("/sigil/agent/")
}

/// True when `id` falls in `trust_domain`'s reserved namespace ([`RESERVED_PATH`]): the
/// server's ID, an agent's ID, or anything else under `/sigil/`.
pub fn is_reserved(id: &SpiffeId, trust_domain: &TrustDomain) -> bool {
    let path = id.path();
    id.is_member_of(trust_domain)
        && path
            .strip_prefix(RESERVED_PATH)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Refuses `id` when it falls in `trust_domain`'s reserved namespace, naming `field`.
pub fn check_not_reserved(
    field: &'static str,
    id: &SpiffeId,
    trust_domain: &TrustDomain,
) -> Result<()> {
    if is_reserved(id, trust_domain) {
        return Err(Error::field(
            field,
            format!(
                "`{}` is in the reserved namespace `spiffe://{trust_domain}{RESERVED_PATH}/`, which belongs to Sigil's server and agents; choose a path outside it",
                untrusted(&id.to_string())
            ),
        ));
    }
    Ok(())
}

fn member(trust_domain: &TrustDomain, segments: &[&str]) -> SpiffeId {
    SpiffeId::from_segments(trust_domain.clone(), segments)
        .expect("constant path segments of Sigil's own IDs are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        parse_trust_domain("trust_domain", "example.org").expect("valid")
    }

    #[test]
    fn well_known_ids() {
        assert_eq!(
            server_id(&td()).to_string(),
            "spiffe://example.org/sigil/server"
        );
        let agent = agent_id(&td(), "join_token", &["abc"]).expect("valid");
        assert_eq!(
            agent.to_string(),
            "spiffe://example.org/sigil/agent/join_token/abc"
        );
        assert!(is_agent_id(&agent, &td()));
        assert!(!is_agent_id(&server_id(&td()), &td()));
    }

    #[test]
    fn the_sigil_namespace_is_reserved() {
        let reserved =
            |text: &str| is_reserved(&parse_spiffe_id("id", text).expect("valid"), &td());
        assert!(reserved("spiffe://example.org/sigil"));
        assert!(reserved("spiffe://example.org/sigil/server"));
        assert!(reserved("spiffe://example.org/sigil/agent/join_token/abc"));
        assert!(reserved("spiffe://example.org/sigil/anything/else"));
        assert!(!reserved("spiffe://example.org/sigilx"));
        assert!(!reserved("spiffe://example.org/web/sigil"));
        assert!(!reserved("spiffe://example.org/Sigil/server"));
        // Another domain's server ID is that domain's business (federation names it).
        assert!(!reserved("spiffe://other.org/sigil/server"));
        let err = check_not_reserved("spiffe_id", &server_id(&td()), &td()).unwrap_err();
        assert!(err.to_string().contains("reserved namespace"), "{err}");
    }

    #[test]
    fn refuses_foreign_and_malformed_ids() {
        let err = parse_member_id("spiffe_id", "spiffe://other.org/web", &td()).unwrap_err();
        assert!(err.to_string().contains("spiffe_id"), "{err}");
        assert!(err.to_string().contains("other.org"), "{err}");
        for bad in [
            "",
            "http://example.org/x",
            "spiffe://example.org/a//b",
            "spiffe://example.org/../x",
            "spiffe://Example.org/x",
            "spiffe://example.org/a/",
        ] {
            assert!(
                parse_spiffe_id("spiffe_id", bad).is_err(),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn trust_domain_must_be_canonical() {
        assert!(parse_trust_domain("trust_domain", "Example.org").is_err());
        assert!(parse_trust_domain("trust_domain", "exa mple.org").is_err());
        assert_eq!(
            parse_trust_domain("trust_domain", "spiffe://example.org")
                .expect("ok")
                .as_str(),
            "example.org"
        );
    }
}
