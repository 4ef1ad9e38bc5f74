//! Selectors: `type:value` facts about a workload or a node (`unix:uid:1000`, `k8s:ns:prod`).
//!
//! The type is the attestor that produces it; the value is opaque to Sigil and may itself contain
//! colons (`k8s:pod-label:app:web` has type `k8s` and value `pod-label:app:web`).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::untrusted::untrusted;
use crate::{Error, Result};

/// One selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Selector {
    /// The attestor namespace, e.g. `unix` or `k8s`: `[a-z0-9_]+`.
    pub kind: String,
    /// The attestor-specific value, e.g. `uid:1000`: non-empty printable text without whitespace
    /// at either end.
    pub value: String,
}

/// The longest selector Sigil accepts, in bytes.
const MAX_SELECTOR_LEN: usize = 1024;

impl Selector {
    /// Builds a selector from its two parts, checking both.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Result<Self> {
        let selector = Selector {
            kind: kind.into(),
            value: value.into(),
        };
        selector.check()?;
        Ok(selector)
    }

    /// Parses `type:value`.
    pub fn parse(text: &str) -> Result<Self> {
        let Some((kind, value)) = text.split_once(':') else {
            return Err(Error::field(
                "selector",
                format!(
                    "`{}` has no `:`; expected type:value, e.g. unix:uid:1000",
                    untrusted(text)
                ),
            ));
        };
        Selector::new(kind, value)
    }

    /// Checks both parts; used when a selector was built field by field (e.g. from a request).
    pub fn check(&self) -> Result<()> {
        let text = || untrusted(&format!("{}:{}", self.kind, self.value)).to_string();
        if self.kind.is_empty()
            || !self
                .kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(Error::field(
                "selector",
                format!(
                    "`{}` has type `{}`; a selector type is lower-case letters, digits and `_` (e.g. unix, k8s)",
                    text(),
                    untrusted(&self.kind)
                ),
            ));
        }
        if self.value.is_empty() {
            return Err(Error::field(
                "selector",
                format!(
                    "`{}` has an empty value; expected type:value, e.g. unix:uid:1000",
                    text()
                ),
            ));
        }
        if self.value.chars().any(char::is_control) || self.value.trim() != self.value {
            return Err(Error::field(
                "selector",
                format!(
                    "`{}` has control characters or surrounding whitespace in its value",
                    text()
                ),
            ));
        }
        if self.kind.len() + self.value.len() + 1 > MAX_SELECTOR_LEN {
            return Err(Error::field(
                "selector",
                format!("a selector is at most {MAX_SELECTOR_LEN} bytes"),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// True when every selector of `required` is in `present` (how an entry matches a workload or a
/// node alias matches an agent).
pub fn all_present(required: &[Selector], present: &[Selector]) -> bool {
    required.iter().all(|s| present.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_type_and_value_at_the_first_colon() {
        let s = Selector::parse("k8s:pod-label:app:web").expect("valid");
        assert_eq!(s.kind, "k8s");
        assert_eq!(s.value, "pod-label:app:web");
        assert_eq!(s.to_string(), "k8s:pod-label:app:web");
    }

    #[test]
    fn refuses_malformed_selectors_naming_the_field() {
        for bad in [
            "unix",
            ":1000",
            "unix:",
            "Unix:uid:1",
            "unix: uid",
            "unix:uid:1\n",
        ] {
            let err = Selector::parse(bad).unwrap_err();
            assert!(
                err.to_string().starts_with("invalid selector"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn subset_matching() {
        let a = Selector::parse("unix:uid:1").expect("valid");
        let b = Selector::parse("unix:gid:2").expect("valid");
        assert!(all_present(
            std::slice::from_ref(&a),
            &[a.clone(), b.clone()]
        ));
        assert!(!all_present(
            &[a.clone(), b.clone()],
            std::slice::from_ref(&a)
        ));
    }
}
