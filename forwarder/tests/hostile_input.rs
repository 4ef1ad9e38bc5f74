//! Hostile input for the forwarder's parsers: SPIFFE ID patterns, HTTP rule flags and the TOML
//! configuration. Random text and mutations of valid inputs must give an error or a value, never
//! a panic; whatever parses must behave (a pattern prints back to itself and matches IDs without
//! panicking). A fixed-seed generator keeps the run deterministic.

use std::path::Path;

use sigil_core::id::SpiffeId;
use sigil_forwarder::config::ForwarderConfig;
use sigil_forwarder::policy::{Action, HttpRule, IdPattern, check_http};

#[path = "../../core/tests/support/random.rs"]
mod random;

use random::Random;

/// `input` with a few characters replaced, inserted, removed or the end cut off; the alphabet
/// leans to the characters the parsers care about.
fn mutate(random: &mut Random, input: &str) -> String {
    const ALPHABET: &[char] = &[
        '/', '*', ':', '.', '-', '_', ' ', ',', '"', '=', '[', ']', '\n', 'a', 'Z', '0', 'é', '\0',
    ];
    let chars = input.chars().collect();
    random
        .mutate(chars, |random| ALPHABET[random.below(ALPHABET.len())])
        .into_iter()
        .collect()
}

const ROUNDS: usize = 3000;

#[test]
fn id_patterns_never_panic_and_print_back() {
    let seeds = [
        "spiffe://example.org",
        "spiffe://example.org/ns/prod/sa/web",
        "spiffe://example.org/ns/*/sa/**",
        "spiffe://a.b-c_d/x/*",
    ];
    let ids = [
        SpiffeId::new("spiffe://example.org/ns/prod/sa/web").expect("valid"),
        SpiffeId::new("spiffe://example.org/x").expect("valid"),
        SpiffeId::new("spiffe://a.b-c_d/x/y/z").expect("valid"),
    ];
    let mut random = Random(0x5eed_f0a4_0001);
    for round in 0..ROUNDS {
        let input = mutate(&mut random, seeds[round % seeds.len()]);
        if let Ok(pattern) = IdPattern::parse("--allow", &input) {
            let printed = pattern.to_string();
            assert_eq!(
                IdPattern::parse("--allow", &printed).as_ref(),
                Ok(&pattern),
                "{input:?} printed as {printed:?}"
            );
            for id in &ids {
                let _ = pattern.matches(id);
            }
        }
    }
}

#[test]
fn http_rule_flags_never_panic() {
    let seeds = [
        "spiffe://example.org/web GET,POST /api",
        "* * /",
        "spiffe://example.org/** DELETE /admin",
    ];
    let mut random = Random(0x5eed_f0a4_0002);
    for round in 0..ROUNDS {
        let input = mutate(&mut random, seeds[round % seeds.len()]);
        if let Ok(rule) = HttpRule::parse_flag("--http-allow", Action::Allow, &input) {
            let _ = check_http(&[rule], None, "GET", "/api/x");
        }
    }
}

#[test]
fn configuration_files_never_panic() {
    let seed = r#"socket = "unix:///tmp/api.sock"
mode = "strict"
[limits]
handshake_timeout = "2s"
max_connections = 10
[[inbound]]
listen = "0.0.0.0:15443"
target = "127.0.0.1:8080"
allow = ["spiffe://example.org/ns/*"]
http = true
[[inbound.http_rules]]
action = "deny"
paths = ["/admin"]
[[outbound]]
listen = "127.0.0.1:9000"
upstream = "db:5432"
expect = ["spiffe://example.org/db"]
"#;
    let mut random = Random(0x5eed_f0a4_0003);
    let path = Path::new("forward.toml");
    for _ in 0..ROUNDS {
        let input = mutate(&mut random, seed);
        if let Err(e) = ForwarderConfig::from_toml(&input, path) {
            // Every refusal names the file.
            assert!(e.to_string().contains("forward.toml"), "{e}");
        }
    }
}
