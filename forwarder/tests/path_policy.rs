//! The bypasses that once passed the forwarder's HTTP rules (issue 10, attack 5), decided through
//! the public API the way the HTTP handler decides them: method check, normalisation, rules.

use sigil_forwarder::path::{EscapedSlashes, normalize};
use sigil_forwarder::policy::{Action, HttpRule, check_http, check_method};

#[path = "support/bypasses.rs"]
mod bypasses;

use bypasses::BYPASSES;

/// The bypasses of a raw-prefix policy, decided on the normal form as the handler does.
#[test]
fn known_bypasses_are_decided_on_the_normal_form() {
    let rules = [
        ("* * /admin", Action::Deny),
        ("* DELETE /api", Action::Deny),
        ("* GET /api", Action::Allow),
    ]
    .map(|(text, action)| HttpRule::parse_flag("--http", action, text).expect("valid"));
    let decide = |method: &str, raw: &str| {
        check_method(method)?;
        let path = normalize(raw, EscapedSlashes::Reject).map_err(|e| e.to_string())?;
        check_http(&rules, None, method, &path)
    };
    for (method, raw) in BYPASSES {
        assert!(decide(method, raw).is_err(), "{method} {raw} passed");
    }
    for (method, raw) in [("GET", "/api"), ("GET", "/api/x"), ("GET", "//api/./x/")] {
        assert!(decide(method, raw).is_ok(), "{method} {raw} refused");
    }
}
