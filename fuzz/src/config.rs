//! Configuration files (server, agent, forwarder), the SPIFFE ID patterns of forwarder rules, and
//! the cgroup file the Kubernetes workload attestor reads.

use std::path::Path;

use sigil_agent::attest::k8s::pod_container;
use sigil_agent::config::AgentConfig;
use sigil_core::id::{SpiffeId, parse_spiffe_id};
use sigil_forwarder::config::ForwarderConfig;
use sigil_forwarder::policy::{IdPattern, Segment};
use sigil_server::config::ServerConfig;

use crate::{example_org, text};

/// The file name errors name.
const SOURCE: &str = "fuzz.toml";

/// `ServerConfig::from_toml`, then what start-up does with a parsed file that needs no I/O:
/// `validate`, the trust domain, the paths, and each static federation relationship.
///
/// Holds: nothing panics.
pub fn server_config(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let Ok(config) = ServerConfig::from_toml(input) else {
        return;
    };
    let source = Path::new(SOURCE);
    let _ = config.validate(source);
    let _ = config.admin_socket_path();
    let _ = config.datastore_url();
    let Ok(own) = config.trust_domain(source) else {
        return;
    };
    for relationship in &config.federation.relationships {
        let input = relationship.input();
        let _ = input.validate(&own, 0);
    }
}

/// The agent's file as `AgentConfig::from_file` reads it (`toml::from_str`), then `validate`
/// and the trust domain.
///
/// Holds: nothing panics.
pub fn agent_config(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let Ok(config) = toml::from_str::<AgentConfig>(input) else {
        return;
    };
    let source = Path::new(SOURCE);
    let _ = config.validate(source);
    let _ = config.trust_domain(source);
}

/// `ForwarderConfig::from_toml`.
///
/// Holds: every SPIFFE ID pattern of an accepted file prints as text that parses back to it
/// (errors and `/metrics` show patterns so), and matches an ID made from it.
pub fn forwarder_config(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let Ok(config) = ForwarderConfig::from_toml(input, Path::new(SOURCE)) else {
        return;
    };
    let patterns = config
        .inbound
        .iter()
        .flat_map(|inbound| {
            let rules = inbound.http_rules.iter().flat_map(|r| r.principals.iter());
            inbound
                .policy
                .allow
                .iter()
                .chain(&inbound.policy.deny)
                .chain(rules)
        })
        .chain(config.outbound.iter().flat_map(|o| o.expect.iter()));
    for pattern in patterns {
        assert_pattern(pattern);
    }
}

/// `IdPattern::parse` (every `--allow`, `--deny`, `--expect` and rule principal).
///
/// Holds: see [`forwarder_config`].
pub fn id_pattern(data: &[u8]) {
    let Some(input) = text(data) else { return };
    if let Ok(pattern) = IdPattern::parse("pattern", input) {
        assert_pattern(&pattern);
    }
}

fn assert_pattern(pattern: &IdPattern) {
    let printed = pattern.to_string();
    assert_eq!(
        IdPattern::parse("pattern", &printed).as_ref(),
        Ok(pattern),
        "pattern `{printed}` does not parse back to itself"
    );
    let example = example_of(pattern);
    assert!(
        pattern.matches(&example),
        "pattern `{printed}` does not match {example}"
    );
    if !matches!(pattern, IdPattern::TrustDomain(_)) {
        let other = parse_spiffe_id("id", &format!("spiffe://{}/x", other_domain(pattern)))
            .expect("an ID of another domain");
        assert!(!pattern.matches(&other), "`{printed}` matches {other}");
    }
}

/// An ID the pattern must match: wildcards filled with `x`.
fn example_of(pattern: &IdPattern) -> SpiffeId {
    let text = match pattern {
        IdPattern::Exact(id) => id.to_string(),
        IdPattern::TrustDomain(td) => format!("spiffe://{td}/x"),
        IdPattern::Path {
            trust_domain,
            segments,
        } => {
            let mut text = format!("spiffe://{trust_domain}");
            for segment in segments {
                text.push('/');
                text.push_str(match segment {
                    Segment::Literal(literal) => literal,
                    Segment::One => "x",
                    Segment::Rest => "x/y",
                });
            }
            text
        }
    };
    parse_spiffe_id("id", &text).unwrap_or_else(|e| panic!("`{text}` from {pattern}: {e}"))
}

/// A trust domain other than the pattern's.
fn other_domain(pattern: &IdPattern) -> String {
    let own = match pattern {
        IdPattern::Exact(id) => id.trust_domain_name().to_string(),
        IdPattern::TrustDomain(td)
        | IdPattern::Path {
            trust_domain: td, ..
        } => td.to_string(),
    };
    if own == example_org().as_str() {
        "other.org".into()
    } else {
        example_org().to_string()
    }
}

/// `pod_container` on a `/proc/<pid>/cgroup` file (a workload can name sub-cgroups it may
/// create).
///
/// Holds: a container ID is 64 hex digits and, like the pod UID, appears in the input; a line
/// that yields a pod yields the same pod with anything appended below the container's cgroup (a
/// container may create cgroups inside its own).
pub fn cgroup(data: &[u8]) {
    let Some(input) = text(data) else { return };
    if let Some(found) = pod_container(input) {
        let id = &found.container_id;
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(
            input.contains(id.as_str()),
            "container ID {id} is not in the input"
        );
        let uid = &found.pod_uid;
        assert!(
            input.contains(uid.as_str()) || input.contains(&uid.replace('-', "_")),
            "pod UID {uid} is not in the input"
        );
        if let Some(line) = input.lines().find(|line| pod_container(line).is_some()) {
            let nested = format!("{line}/nested");
            assert_eq!(
                pod_container(&nested).as_ref(),
                pod_container(line).as_ref()
            );
        }
    }
}
