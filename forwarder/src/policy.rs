//! Who may talk to whom: SPIFFE ID patterns, peer policies and HTTP rules.
//!
//! One pattern syntax serves every place an identity is named (`--allow`, `--deny`,
//! `--expect-*`, HTTP rule principals):
//!
//! - `spiffe://example.org/ns/prod/sa/web`: exactly that ID;
//! - `spiffe://example.org`: every ID of the trust domain;
//! - `spiffe://example.org/ns/prod/*`: `*` stands for exactly one path segment;
//! - `spiffe://example.org/ns/prod/**`: `**`, as the last segment only, for one or more segments.

use std::fmt;

use sigil_core::id::{SpiffeId, TrustDomain, parse_spiffe_id, parse_trust_domain};

/// A set of SPIFFE IDs, written as an exact ID, a trust domain or a path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdPattern {
    /// One SPIFFE ID.
    Exact(SpiffeId),
    /// Every ID of a trust domain.
    TrustDomain(TrustDomain),
    /// IDs of a trust domain whose path matches segment by segment.
    Path {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// The path segments, `*` and `**` included.
        segments: Vec<Segment>,
    },
}

/// One segment of a path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// This segment exactly.
    Literal(String),
    /// Any one segment (`*`).
    One,
    /// One or more segments (`**`, last only).
    Rest,
}

impl IdPattern {
    /// Parses a pattern; `key` names the flag or configuration key in the error.
    pub fn parse(key: &str, text: &str) -> Result<Self, String> {
        let hint = "expected spiffe://<trust-domain>, spiffe://<trust-domain>/<path>, or a path pattern with `*` (one segment) or a final `**` (any depth)";
        let Some(rest) = text.strip_prefix("spiffe://") else {
            return Err(format!("`{text}` is not a SPIFFE ID pattern; {hint}"));
        };
        let (domain, path) = match rest.split_once('/') {
            Some((domain, path)) => (domain, Some(path)),
            None => (rest, None),
        };
        let trust_domain = parse_trust_domain("trust domain", domain)
            .map_err(|e| format!("`{text}` in {key}: {e}"))?;
        let Some(path) = path else {
            return Ok(IdPattern::TrustDomain(trust_domain));
        };
        if !path.contains('*') {
            return parse_spiffe_id("SPIFFE ID", text)
                .map(IdPattern::Exact)
                .map_err(|e| format!("`{text}` in {key}: {e}"));
        }
        let parts: Vec<&str> = path.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let segment = match *part {
                "*" => Segment::One,
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => {
                    return Err(format!(
                        "`{text}`: `**` may only be the last segment; use `*` for one segment in the middle"
                    ));
                }
                literal if literal.contains('*') => {
                    return Err(format!(
                        "`{text}`: `{literal}` mixes `*` with other characters; a wildcard stands for a whole segment"
                    ));
                }
                "" | "." | ".." => {
                    return Err(format!(
                        "`{text}` has an empty, `.` or `..` segment; {hint}"
                    ));
                }
                literal => {
                    if !literal
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                    {
                        return Err(format!(
                            "`{text}`: segment `{literal}` may only hold [a-zA-Z0-9._-]"
                        ));
                    }
                    Segment::Literal(literal.to_string())
                }
            };
            segments.push(segment);
        }
        Ok(IdPattern::Path {
            trust_domain,
            segments,
        })
    }

    /// True when `id` is in the set.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdPattern::Exact(exact) => exact == id,
            IdPattern::TrustDomain(td) => id.is_member_of(td),
            IdPattern::Path {
                trust_domain,
                segments,
            } => {
                if !id.is_member_of(trust_domain) {
                    return false;
                }
                let path = id.path().strip_prefix('/').unwrap_or(id.path());
                let parts: Vec<&str> = if path.is_empty() {
                    Vec::new()
                } else {
                    path.split('/').collect()
                };
                let mut i = 0;
                for segment in segments {
                    match segment {
                        Segment::Rest => return parts.len() > i,
                        Segment::One if i < parts.len() => i += 1,
                        Segment::Literal(literal) if parts.get(i) == Some(&literal.as_str()) => {
                            i += 1
                        }
                        _ => return false,
                    }
                }
                i == parts.len()
            }
        }
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdPattern::Exact(id) => write!(f, "{id}"),
            IdPattern::TrustDomain(td) => write!(f, "spiffe://{td}"),
            IdPattern::Path {
                trust_domain,
                segments,
            } => {
                write!(f, "spiffe://{trust_domain}")?;
                for segment in segments {
                    match segment {
                        Segment::Literal(literal) => write!(f, "/{literal}")?,
                        Segment::One => f.write_str("/*")?,
                        Segment::Rest => f.write_str("/**")?,
                    }
                }
                Ok(())
            }
        }
    }
}

/// Which authenticated peers a listener accepts: deny rules win over allow rules. With no allow
/// rule at all, peers of the forwarder's own trust domain are allowed (federated peers must be
/// allowed explicitly).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    /// Peers to accept.
    pub allow: Vec<IdPattern>,
    /// Peers to refuse, whatever `allow` says.
    pub deny: Vec<IdPattern>,
}

impl PeerPolicy {
    /// Checks `peer` for a forwarder whose own trust domain is `own`; on refusal, says which rule
    /// refused it.
    pub fn check(&self, peer: &SpiffeId, own: Option<&TrustDomain>) -> Result<(), String> {
        if let Some(rule) = self.deny.iter().find(|rule| rule.matches(peer)) {
            return Err(format!("deny {rule}"));
        }
        if self.allow.is_empty() {
            return match own {
                Some(td) if peer.is_member_of(td) => Ok(()),
                Some(td) => Err(format!(
                    "default policy: only spiffe://{td} is allowed without an allow rule"
                )),
                None => Err("default policy: no own SVID yet".into()),
            };
        }
        if self.allow.iter().any(|rule| rule.matches(peer)) {
            return Ok(());
        }
        Err(format!(
            "no allow rule matches (allow {})",
            self.allow
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// Whether an HTTP rule lets a request through or stops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let matching requests through (once no deny rule matched).
    Allow,
    /// Answer matching requests with 403.
    Deny,
}

/// An HTTP rule: principal x method x path prefix. An empty list matches anything (for
/// principals: unauthenticated callers too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRule {
    /// Allow or deny.
    pub action: Action,
    /// Caller identities; empty for any caller.
    pub principals: Vec<IdPattern>,
    /// Upper-case HTTP methods; empty for any method.
    pub methods: Vec<String>,
    /// Path prefixes; empty for any path.
    pub paths: Vec<String>,
}

impl HttpRule {
    /// Parses a rule written on the command line as `PRINCIPAL METHODS PATH`: e.g.
    /// `spiffe://example.org/web GET,HEAD /api`, with `*` for any in each field.
    pub fn parse_flag(key: &str, action: Action, text: &str) -> Result<Self, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [principal, methods, path] = fields.as_slice() else {
            return Err(format!(
                "`{text}` has {} fields; write `PRINCIPAL METHODS PATH-PREFIX`, e.g. `spiffe://example.org/web GET,POST /api` (`*` for any)",
                fields.len()
            ));
        };
        let principals = if *principal == "*" {
            Vec::new()
        } else {
            vec![IdPattern::parse(key, principal)?]
        };
        let methods = if *methods == "*" {
            Vec::new()
        } else {
            methods.split(',').map(str::to_string).collect()
        };
        let paths = if *path == "*" {
            Vec::new()
        } else {
            vec![path.to_string()]
        };
        HttpRule::new(action, principals, methods, paths)
    }

    /// A rule, with its methods and paths checked.
    pub fn new(
        action: Action,
        principals: Vec<IdPattern>,
        methods: Vec<String>,
        paths: Vec<String>,
    ) -> Result<Self, String> {
        let methods = methods
            .into_iter()
            .map(|method| {
                if !method.is_empty() && method.chars().all(|c| c.is_ascii_alphabetic()) {
                    Ok(method.to_ascii_uppercase())
                } else {
                    Err(format!(
                        "`{method}` is not an HTTP method; write e.g. GET or POST"
                    ))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(bad) = paths.iter().find(|p| !p.starts_with('/')) {
            return Err(format!(
                "path prefix `{bad}` must start with `/`, e.g. `/api`"
            ));
        }
        Ok(HttpRule {
            action,
            principals,
            methods,
            paths,
        })
    }

    fn matches(&self, peer: Option<&SpiffeId>, method: &str, path: &str) -> bool {
        let principal = self.principals.is_empty()
            || peer.is_some_and(|id| self.principals.iter().any(|p| p.matches(id)));
        let method = self.methods.is_empty() || self.methods.iter().any(|m| m == method);
        let path = self.paths.is_empty() || self.paths.iter().any(|p| path.starts_with(p.as_str()));
        principal && method && path
    }
}

impl fmt::Display for HttpRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let any = |list: Vec<String>| {
            if list.is_empty() {
                "*".to_string()
            } else {
                list.join(",")
            }
        };
        write!(
            f,
            "{} {} {} {}",
            match self.action {
                Action::Allow => "allow",
                Action::Deny => "deny",
            },
            any(self.principals.iter().map(ToString::to_string).collect()),
            any(self.methods.clone()),
            any(self.paths.clone())
        )
    }
}

/// Decides an HTTP request: deny rules first, then allow rules; when any allow rule exists and none
/// matches, the request is refused. On refusal, says why (the rule).
pub fn check_http(
    rules: &[HttpRule],
    peer: Option<&SpiffeId>,
    method: &str,
    path: &str,
) -> Result<(), String> {
    if let Some(rule) = rules
        .iter()
        .find(|r| r.action == Action::Deny && r.matches(peer, method, path))
    {
        return Err(format!("rule `{rule}`"));
    }
    let mut allows = rules
        .iter()
        .filter(|r| r.action == Action::Allow)
        .peekable();
    if allows.peek().is_none() {
        return Ok(());
    }
    if allows.any(|r| r.matches(peer, method, path)) {
        Ok(())
    } else {
        Err("no allow rule matches".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> SpiffeId {
        SpiffeId::new(text).expect("valid test ID")
    }

    fn pattern(text: &str) -> IdPattern {
        IdPattern::parse("test", text).expect("valid test pattern")
    }

    #[test]
    fn patterns_match_as_documented() {
        let web = id("spiffe://example.org/ns/prod/sa/web");
        assert!(pattern("spiffe://example.org/ns/prod/sa/web").matches(&web));
        assert!(pattern("spiffe://example.org").matches(&web));
        assert!(!pattern("spiffe://other.org").matches(&web));
        assert!(pattern("spiffe://example.org/ns/prod/sa/*").matches(&web));
        assert!(!pattern("spiffe://example.org/ns/prod/*").matches(&web));
        assert!(pattern("spiffe://example.org/ns/prod/**").matches(&web));
        assert!(pattern("spiffe://example.org/ns/*/sa/web").matches(&web));
        assert!(!pattern("spiffe://example.org/ns/dev/**").matches(&web));
        assert!(!pattern("spiffe://other.org/ns/prod/**").matches(&web));
        // `**` needs at least one segment.
        assert!(
            !pattern("spiffe://example.org/ns/prod/**")
                .matches(&id("spiffe://example.org/ns/prod"))
        );
        assert_eq!(
            pattern("spiffe://example.org/ns/*/sa/**").to_string(),
            "spiffe://example.org/ns/*/sa/**"
        );
    }

    #[test]
    fn bad_patterns_say_what_is_wrong() {
        for (bad, says) in [
            ("example.org", "not a SPIFFE ID pattern"),
            ("spiffe://Example.org", "lower case"),
            ("spiffe://example.org/**/web", "last segment"),
            ("spiffe://example.org/we*", "whole segment"),
            ("spiffe://example.org//*", "empty"),
            ("spiffe://example.org/a b/*", "may only hold"),
        ] {
            let err = IdPattern::parse("--allow", bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn deny_wins_and_default_is_own_domain() {
        let td = TrustDomain::new("example.org").expect("valid");
        let policy = PeerPolicy {
            allow: vec![pattern("spiffe://example.org/ns/prod/**")],
            deny: vec![pattern("spiffe://example.org/ns/prod/sa/legacy")],
        };
        assert!(
            policy
                .check(&id("spiffe://example.org/ns/prod/sa/web"), Some(&td))
                .is_ok()
        );
        let err = policy
            .check(&id("spiffe://example.org/ns/prod/sa/legacy"), Some(&td))
            .expect_err("denied");
        assert!(
            err.contains("deny spiffe://example.org/ns/prod/sa/legacy"),
            "{err}"
        );
        assert!(
            policy
                .check(&id("spiffe://example.org/ns/dev/sa/web"), Some(&td))
                .is_err()
        );

        let default = PeerPolicy::default();
        assert!(
            default
                .check(&id("spiffe://example.org/x"), Some(&td))
                .is_ok()
        );
        assert!(
            default
                .check(&id("spiffe://other.org/x"), Some(&td))
                .is_err()
        );
    }

    #[test]
    fn http_rules_deny_first_then_allow() {
        let web = id("spiffe://example.org/web");
        let rules = vec![
            HttpRule::parse_flag("--http-deny", Action::Deny, "* * /admin").expect("valid"),
            HttpRule::parse_flag(
                "--http-allow",
                Action::Allow,
                "spiffe://example.org/web GET,post /",
            )
            .expect("valid"),
        ];
        assert!(check_http(&rules, Some(&web), "GET", "/api").is_ok());
        assert!(check_http(&rules, Some(&web), "POST", "/api").is_ok());
        assert!(check_http(&rules, Some(&web), "DELETE", "/api").is_err());
        assert!(check_http(&rules, Some(&web), "GET", "/admin/x").is_err());
        assert!(check_http(&rules, None, "GET", "/api").is_err());
        assert!(check_http(&[], None, "GET", "/").is_ok());
        assert!(HttpRule::parse_flag("--http-allow", Action::Allow, "GET /").is_err());
        assert!(HttpRule::parse_flag("--http-allow", Action::Allow, "* GET api").is_err());
    }
}
