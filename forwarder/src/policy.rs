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
use sigil_core::untrusted::untrusted;

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
            join_patterns(&self.allow, ", ")
        ))
    }
}

/// `patterns` written out one after the other with `separator` between them, for a refusal's
/// message.
pub(crate) fn join_patterns(patterns: &[IdPattern], separator: &str) -> String {
    patterns
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(separator)
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

/// An HTTP rule: principal x method x path. An empty list matches anything (for principals:
/// unauthenticated callers too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRule {
    /// Allow or deny.
    pub action: Action,
    /// Caller identities; empty for any caller.
    pub principals: Vec<IdPattern>,
    /// HTTP methods, matched exactly (the standard ones in upper case); empty for any method.
    pub methods: Vec<String>,
    /// Paths, matched on the normalised request path; empty for any path.
    pub paths: Vec<PathMatch>,
}

/// The standard methods (RFC 9110 section 9, and PATCH from RFC 5789). Methods are
/// case-sensitive, so `delete` is not `DELETE`; but applications that compare them without case
/// would run `delete` as `DELETE` past a rule for `DELETE`, so requests with such a method are
/// refused (see [`check_method`]) and rules may write them in any case.
const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// The standard method `method` names in another case, if it does.
fn standard_in_any_case(method: &str) -> Option<&'static str> {
    STANDARD_METHODS
        .iter()
        .copied()
        .find(|standard| standard.eq_ignore_ascii_case(method))
}

/// RFC 9110 section 5.6.2 `tchar`.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// Refuses a request method that spells a standard method in another case (`delete`, `Get`): the
/// rules compare methods exactly, the application may not. hyper has already refused methods
/// that are not RFC 9110 tokens.
pub fn check_method(method: &str) -> Result<(), String> {
    match standard_in_any_case(method) {
        Some(standard) if standard != method => Err(format!(
            "method `{}` is `{standard}` in another case; methods are case-sensitive (RFC 9110 section 9.1): send `{standard}`",
            untrusted(method)
        )),
        _ => Ok(()),
    }
}

/// The path part of an HTTP rule, matched against the normalised request path (see
/// [`crate::path`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// This path and everything below it, at segment boundaries: `/api` matches `/api`, `/api/`
    /// and `/api/items` (and `/api?q`, the query not being part of the path), not
    /// `/api-internal`.
    Segments(String),
    /// A raw prefix of the normalised path, written with a trailing `*`: `/api*` matches
    /// `/api-internal` too.
    Prefix(String),
}

impl PathMatch {
    /// Parses a rule path: it starts with `/`, is in normal form (rules are compared with
    /// normalised paths, so `/a/../b` could never match as written), and may end with `*`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (path, prefix) = match text.strip_suffix('*') {
            Some(path) => (path, true),
            None => (text, false),
        };
        if !path.starts_with('/') {
            return Err(format!(
                "path `{}` must start with `/`, e.g. `/api` (or `/api*` for a raw prefix)",
                untrusted(text)
            ));
        }
        // Kept escaped separators stay escapes, so a rule may name `%2F` for listeners that keep
        // them.
        let normal = crate::path::normalize(path, crate::path::EscapedSlashes::Keep)
            .map_err(|e| e.to_string())?;
        if normal != path {
            return Err(format!(
                "path `{}` is not in normal form; write `{}{}` (rules match normalised request paths: dot segments removed, slashes merged, escapes of letters, digits and `-._~` decoded, other escapes in upper case)",
                untrusted(text),
                untrusted(&normal),
                if prefix { "*" } else { "" }
            ));
        }
        Ok(if prefix {
            PathMatch::Prefix(normal)
        } else {
            PathMatch::Segments(normal)
        })
    }

    /// True when the normalised request path `path` is matched.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatch::Segments(rule) => path.strip_prefix(rule.as_str()).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('/') || rule.ends_with('/')
            }),
        }
    }
}

impl fmt::Display for PathMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathMatch::Segments(path) => f.write_str(path),
            PathMatch::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

impl HttpRule {
    /// Parses a rule written on the command line as `PRINCIPAL METHODS PATH`: e.g.
    /// `spiffe://example.org/web GET,HEAD /api`, with `*` for any in each field.
    pub fn parse_flag(key: &str, action: Action, text: &str) -> Result<Self, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [principal, methods, path] = fields.as_slice() else {
            return Err(format!(
                "`{text}` has {} fields; write `PRINCIPAL METHODS PATH`, e.g. `spiffe://example.org/web GET,POST /api` (`*` for any)",
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

    /// A rule, with its methods and paths checked: methods must be RFC 9110 tokens (standard
    /// ones are upper-cased), paths must be in normal form.
    pub fn new(
        action: Action,
        principals: Vec<IdPattern>,
        methods: Vec<String>,
        paths: Vec<String>,
    ) -> Result<Self, String> {
        let methods = methods
            .into_iter()
            .map(|method| {
                if method.is_empty() || !method.chars().all(is_tchar) {
                    return Err(format!(
                        "`{method}` is not an HTTP method (an RFC 9110 token); write e.g. GET or POST"
                    ));
                }
                Ok(standard_in_any_case(&method).map_or(method, str::to_string))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let paths = paths
            .iter()
            .map(|path| PathMatch::parse(path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HttpRule {
            action,
            principals,
            methods,
            paths,
        })
    }

    /// `path` is the normalised request path.
    fn matches(&self, peer: Option<&SpiffeId>, method: &str, path: &str) -> bool {
        let principal = self.principals.is_empty()
            || peer.is_some_and(|id| self.principals.iter().any(|p| p.matches(id)));
        let method = self.methods.is_empty() || self.methods.iter().any(|m| m == method);
        let path = self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path));
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
            any(self.paths.iter().map(ToString::to_string).collect())
        )
    }
}

/// Decides an HTTP request with the normalised path `path` (see [`crate::path::normalize`]): deny
/// rules first, then allow rules; when any allow rule exists and none matches, the request is
/// refused. On refusal, says why (the rule).
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
mod tests;
