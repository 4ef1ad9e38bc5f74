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
        !pattern("spiffe://example.org/ns/prod/**").matches(&id("spiffe://example.org/ns/prod"))
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

#[test]
fn rule_paths_match_at_segment_boundaries() {
    let api = PathMatch::parse("/api").expect("valid");
    for path in ["/api", "/api/", "/api/items", "/api/a/b"] {
        assert!(api.matches(path), "{path}");
    }
    for path in ["/api-internal", "/apix", "/", "/ap", "/v1/api"] {
        assert!(!api.matches(path), "{path}");
    }
    let below = PathMatch::parse("/api/").expect("valid");
    assert!(below.matches("/api/items") && below.matches("/api/"));
    assert!(!below.matches("/api"));
    let prefix = PathMatch::parse("/api*").expect("valid");
    assert!(prefix.matches("/api-internal") && prefix.matches("/api/x"));
    assert_eq!(prefix.to_string(), "/api*");
    assert!(PathMatch::parse("/").expect("valid").matches("/anything"));
}

#[test]
fn rule_paths_and_methods_must_be_in_normal_form() {
    for (bad, says) in [
        ("api", "must start with `/`"),
        ("/api/../admin", "write `/admin`"),
        ("//admin", "write `/admin`"),
        ("/%61dmin", "write `/admin`"),
        ("/a%3bb*", "write `/a%3Bb*`"),
        ("/a%zz", "malformed percent-escape"),
    ] {
        let err = PathMatch::parse(bad).expect_err(bad);
        assert!(err.contains(says), "{bad}: {err}");
    }
    let rule = HttpRule::parse_flag("--http-deny", Action::Deny, "* delete,Patch,PURGE /api")
        .expect("valid");
    assert_eq!(rule.methods, ["DELETE", "PATCH", "PURGE"]);
    let err =
        HttpRule::parse_flag("--http-deny", Action::Deny, "* GE(T /api").expect_err("not a token");
    assert!(err.contains("RFC 9110 token"), "{err}");
}

#[test]
fn standard_methods_in_another_case_are_refused() {
    for method in ["GET", "DELETE", "PURGE", "purge", "M-SEARCH"] {
        assert!(check_method(method).is_ok(), "{method}");
    }
    for (method, standard) in [("delete", "DELETE"), ("Get", "GET"), ("pAtCh", "PATCH")] {
        let err = check_method(method).expect_err(method);
        assert!(err.contains(&format!("send `{standard}`")), "{err}");
    }
}
