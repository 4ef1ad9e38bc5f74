//! SPIFFE IDs, trust domains and selectors: the strings every API and configuration file names
//! identities and workloads with.

use sigil_core::id::{parse_member_id, parse_spiffe_id, parse_trust_domain};
use sigil_core::selector::Selector;

use crate::{example_org, text};

/// `parse_spiffe_id`, `parse_member_id` and `parse_trust_domain` on one string.
///
/// Holds: an accepted ID is exactly its canonical text and parses again to itself; its trust
/// domain is `[a-z0-9._-]+` and its path segments `[a-zA-Z0-9._-]+`, never empty, `.` or `..`;
/// `parse_member_id` accepts exactly the accepted IDs of its trust domain; an accepted trust
/// domain is the input without `spiffe://`, and its ID string parses as a SPIFFE ID.
pub fn spiffe_id(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let own = example_org();
    let member = parse_member_id("spiffe_id", input, &own);
    match parse_spiffe_id("spiffe_id", input) {
        Ok(id) => {
            assert_eq!(id.to_string(), input, "an accepted ID is not canonical");
            assert_eq!(
                parse_spiffe_id("spiffe_id", &id.to_string()).as_ref(),
                Ok(&id),
                "an accepted ID does not parse again to itself"
            );
            let td = id.trust_domain_name();
            assert!(
                !td.is_empty()
                    && td
                        .bytes()
                        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-')),
                "trust domain `{td}` has characters outside [a-z0-9._-]"
            );
            assert!(
                parse_trust_domain("trust_domain", td).is_ok(),
                "the trust domain of an accepted ID is refused on its own"
            );
            if let Some(path) = id.path().strip_prefix('/') {
                for segment in path.split('/') {
                    assert!(
                        !segment.is_empty()
                            && segment != "."
                            && segment != ".."
                            && segment
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
                        "path segment `{segment}` of an accepted ID is not allowed"
                    );
                }
            } else {
                assert!(id.path().is_empty(), "a path that does not start with `/`");
            }
            assert_eq!(
                member.is_ok(),
                id.is_member_of(&own),
                "parse_member_id disagrees with membership"
            );
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert!(
                member.is_err(),
                "parse_member_id accepts what parse_spiffe_id refuses"
            );
        }
    }
    if let Ok(td) = parse_trust_domain("trust_domain", input) {
        assert_eq!(
            td.as_str(),
            input.strip_prefix("spiffe://").unwrap_or(input),
            "an accepted trust domain is not the input"
        );
        let as_id = parse_spiffe_id("spiffe_id", &td.id_string())
            .unwrap_or_else(|e| panic!("the ID string of trust domain `{td}` is refused: {e}"));
        assert!(as_id.path().is_empty());
    }
}

/// `Selector::parse`.
///
/// Holds: an accepted selector prints as the input, passes `check`, parses again to itself, fits
/// the 1024-byte bound, and survives its JSON form (how the datastore and the APIs carry it).
pub fn selector(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let Ok(selector) = Selector::parse(input) else {
        return;
    };
    assert_eq!(
        selector.to_string(),
        input,
        "a selector does not print as parsed"
    );
    selector
        .check()
        .unwrap_or_else(|e| panic!("a parsed selector fails its own check: {e}"));
    assert_eq!(Selector::parse(input).as_ref(), Ok(&selector));
    assert!(
        input.len() <= 1024,
        "a selector over 1024 bytes was accepted"
    );
    let json = serde_json::to_string(&selector).expect("a selector serialises");
    let back: Selector = serde_json::from_str(&json).expect("a selector's JSON parses");
    assert_eq!(back, selector);
}
