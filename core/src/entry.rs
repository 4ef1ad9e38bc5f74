//! Registration entries: which workloads (selectors), under which parent (an agent or a node
//! alias), get which SPIFFE ID, and how their SVIDs are shaped.

use crate::id::{SpiffeId, TrustDomain, check_not_reserved, parse_member_id, parse_trust_domain};
use crate::selector::Selector;
use crate::{Error, Result};

/// The longest lifetime an entry may ask for, for either kind of SVID: 1 year. Longer-lived
/// identities defeat the point of short-lived SVIDs.
pub const MAX_SVID_TTL_SECONDS: i64 = 365 * 24 * 3600;

/// A registration entry as Sigil stores and serves it; every field has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Server-assigned identifier.
    pub id: String,
    /// The identity workloads matching this entry receive.
    pub spiffe_id: SpiffeId,
    /// The agent, or node alias, whose workloads may receive it.
    pub parent_id: SpiffeId,
    /// Sorted and without duplicates; never empty.
    pub selectors: Vec<Selector>,
    /// X509-SVID lifetime in seconds; 0 means the server's default.
    pub x509_svid_ttl: i64,
    /// JWT-SVID lifetime in seconds; 0 means the server's default.
    pub jwt_svid_ttl: i64,
    /// DNS SANs added to the X509-SVID.
    pub dns_names: Vec<String>,
    /// Foreign trust domains whose bundles this entry's workloads receive.
    pub federates_with: Vec<TrustDomain>,
    /// The workload may use the admin API.
    pub admin: bool,
    /// The workload is a downstream CA.
    pub downstream: bool,
    /// A free-form hint handed to workloads that hold several SVIDs.
    pub hint: String,
    /// Unix seconds after which the entry no longer applies; 0 means never.
    pub expires_at: i64,
    /// Unix seconds when the entry was created.
    pub created_at: i64,
    /// The change-feed revision that last wrote the entry.
    pub revision: u64,
}

/// An entry as a user wrote it, before any check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryInput {
    /// See [`Entry::spiffe_id`].
    pub spiffe_id: String,
    /// See [`Entry::parent_id`].
    pub parent_id: String,
    /// See [`Entry::selectors`]; unchecked.
    pub selectors: Vec<Selector>,
    /// See [`Entry::x509_svid_ttl`].
    pub x509_svid_ttl: i64,
    /// See [`Entry::jwt_svid_ttl`].
    pub jwt_svid_ttl: i64,
    /// See [`Entry::dns_names`].
    pub dns_names: Vec<String>,
    /// See [`Entry::federates_with`].
    pub federates_with: Vec<String>,
    /// See [`Entry::admin`].
    pub admin: bool,
    /// See [`Entry::downstream`].
    pub downstream: bool,
    /// See [`Entry::hint`].
    pub hint: String,
    /// See [`Entry::expires_at`].
    pub expires_at: i64,
}

impl EntryInput {
    /// Checks every field against the rules of `trust_domain`'s CA and returns the entry with the
    /// given server-assigned `id`. The error names the first field that is wrong.
    pub fn validate(self, trust_domain: &TrustDomain, id: String, now: i64) -> Result<Entry> {
        let spiffe_id = parse_member_id("spiffe_id", &self.spiffe_id, trust_domain)?;
        check_not_reserved("spiffe_id", &spiffe_id, trust_domain)?;
        let parent_id = parse_member_id("parent_id", &self.parent_id, trust_domain)?;
        if spiffe_id == parent_id {
            return Err(Error::field(
                "parent_id",
                "an entry cannot be its own parent; use the agent's ID or a node alias",
            ));
        }
        if self.selectors.is_empty() {
            return Err(Error::field(
                "selectors",
                "at least one selector is required (e.g. unix:uid:1000)",
            ));
        }
        let mut selectors = self.selectors;
        for selector in &selectors {
            selector.check()?;
        }
        selectors.sort();
        selectors.dedup();

        for (field, ttl) in [
            ("x509_svid_ttl", self.x509_svid_ttl),
            ("jwt_svid_ttl", self.jwt_svid_ttl),
        ] {
            if !(0..=MAX_SVID_TTL_SECONDS).contains(&ttl) {
                return Err(Error::field(
                    field,
                    format!(
                        "{ttl}s is out of range; use 0 (server default) up to {MAX_SVID_TTL_SECONDS}s"
                    ),
                ));
            }
        }
        let mut dns_names = self.dns_names;
        for name in &dns_names {
            check_dns_name(name)?;
        }
        dns_names.dedup();

        let mut federates_with = Vec::with_capacity(self.federates_with.len());
        for name in &self.federates_with {
            let td = parse_trust_domain("federates_with", name)?;
            if &td == trust_domain {
                return Err(Error::field(
                    "federates_with",
                    format!("`{name}` is this server's own trust domain; list only foreign ones"),
                ));
            }
            if !federates_with.contains(&td) {
                federates_with.push(td);
            }
        }
        if self.hint.len() > 1024 || self.hint.chars().any(char::is_control) {
            return Err(Error::field(
                "hint",
                "a hint is at most 1024 bytes of printable text",
            ));
        }
        if self.expires_at < 0 {
            return Err(Error::field(
                "expires_at",
                "must be Unix seconds in the future, or 0 for never",
            ));
        }
        if self.expires_at != 0 && self.expires_at <= now {
            return Err(Error::field(
                "expires_at",
                format!("{} is already in the past", self.expires_at),
            ));
        }
        Ok(Entry {
            id,
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: self.x509_svid_ttl,
            jwt_svid_ttl: self.jwt_svid_ttl,
            dns_names,
            federates_with,
            admin: self.admin,
            downstream: self.downstream,
            hint: self.hint,
            expires_at: self.expires_at,
            created_at: now,
            revision: 0,
        })
    }
}

impl Entry {
    /// True when the entry has an expiry and it has passed at `now` (Unix seconds).
    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at != 0 && self.expires_at <= now
    }
}

/// Checks a DNS name for an X509-SVID SAN: labels of letters, digits and `-`, at most 63 bytes
/// each and 253 in all, optionally starting with a `*.` wildcard.
pub fn check_dns_name(name: &str) -> Result<()> {
    let bare = name.strip_prefix("*.").unwrap_or(name);
    let valid = !bare.is_empty()
        && name.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(Error::field(
            "dns_names",
            format!(
                "`{name}` is not a DNS name (letters, digits, `-` and `.`, optionally `*.` first)"
            ),
        ))
    }
}

/// Whether two SAN DNS names can name the same host: equal (ignoring case), or one is a `*.`
/// wildcard covering the other's first label.
pub fn dns_names_overlap(a: &str, b: &str) -> bool {
    let covers = |pattern: &str, name: &str| {
        pattern.strip_prefix("*.").is_some_and(|suffix| {
            name.split_once('.')
                .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(suffix))
        })
    };
    a.eq_ignore_ascii_case(b) || covers(a, b) || covers(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::parse_trust_domain;

    fn td() -> TrustDomain {
        parse_trust_domain("trust_domain", "example.org").expect("valid")
    }

    fn input() -> EntryInput {
        EntryInput {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/sigil/agent/join_token/abc".into(),
            selectors: vec![
                Selector::parse("unix:uid:1000").expect("valid"),
                Selector::parse("k8s:ns:prod").expect("valid"),
                Selector::parse("unix:uid:1000").expect("valid"),
            ],
            ..EntryInput::default()
        }
    }

    #[test]
    fn valid_entry_has_sorted_unique_selectors() {
        let entry = input().validate(&td(), "e1".into(), 100).expect("valid");
        let selectors: Vec<String> = entry.selectors.iter().map(ToString::to_string).collect();
        assert_eq!(selectors, ["k8s:ns:prod", "unix:uid:1000"]);
        assert_eq!(entry.created_at, 100);
    }

    fn refused(mutate: impl FnOnce(&mut EntryInput), field: &str) {
        let mut raw = input();
        mutate(&mut raw);
        let err = raw.validate(&td(), "e1".into(), 100).unwrap_err();
        assert!(
            err.to_string().contains(field),
            "expected `{field}` in: {err}"
        );
    }

    #[test]
    fn dns_names_overlap_exactly_or_by_wildcard() {
        assert!(dns_names_overlap("sigil.svc", "SIGIL.svc"));
        assert!(dns_names_overlap("*.sigil.svc", "server.sigil.svc"));
        assert!(dns_names_overlap("server.sigil.svc", "*.sigil.svc"));
        assert!(dns_names_overlap("*.sigil.svc", "*.sigil.svc"));
        assert!(!dns_names_overlap("*.sigil.svc", "a.b.sigil.svc"));
        assert!(!dns_names_overlap("web.svc", "sigil.svc"));
    }

    #[test]
    fn each_bad_field_is_named() {
        refused(
            |e| e.spiffe_id = "spiffe://example.org/a//b".into(),
            "spiffe_id",
        );
        refused(
            |e| e.spiffe_id = "spiffe://other.org/web".into(),
            "spiffe_id",
        );
        refused(|e| e.parent_id = "not-an-id".into(), "parent_id");
        for reserved in [
            "spiffe://example.org/sigil/server",
            "spiffe://example.org/sigil/agent/join_token/abc",
            "spiffe://example.org/sigil/anything",
        ] {
            refused(|e| e.spiffe_id = reserved.into(), "reserved namespace");
        }
        refused(|e| e.selectors.clear(), "selectors");
        refused(
            |e| {
                e.selectors.push(Selector {
                    kind: "unix".into(),
                    value: String::new(),
                })
            },
            "selector",
        );
        refused(|e| e.x509_svid_ttl = -1, "x509_svid_ttl");
        refused(|e| e.dns_names.push("bad_name".into()), "dns_names");
        refused(
            |e| e.federates_with.push("example.org".into()),
            "federates_with",
        );
        refused(|e| e.expires_at = 50, "expires_at");
    }

    #[test]
    fn dns_names() {
        for good in ["web", "web.prod.svc", "*.example.org", "a-b.c"] {
            assert!(check_dns_name(good).is_ok(), "{good}");
        }
        for bad in ["", "*.", "-a.b", "a..b", "a_b", "*"] {
            assert!(check_dns_name(bad).is_err(), "{bad}");
        }
    }
}
