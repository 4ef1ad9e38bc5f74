//! The bodies of Sigil's fuzz targets, one function per parser that reads outside input.
//!
//! Each function takes the raw bytes libFuzzer (or a corpus file) hands it, runs the parser, and
//! checks what must hold of whatever the parser accepts: a parsed SPIFFE ID is canonical, a
//! bundle that parses serialises and parses back to itself, a validated JWT-SVID has the
//! subject, audience and expiry it claims, and so on. A broken property is a panic, which
//! libFuzzer reports as a crash and the corpus replay (`tests/replay.rs`) as a failed test.
//!
//! The libFuzzer targets in `libfuzzer/fuzz_targets/` are one line each over [`TARGETS`]'
//! functions, so the same code runs under the fuzzer and as a plain test over `corpus/<target>/`.

mod bundle;
mod config;
mod http;
mod identity;
mod jwt;
mod x509;

pub use bundle::{bundle_json, federation_bundle};
pub use config::{agent_config, cgroup, forwarder_config, id_pattern, server_config};
pub use http::{authority_rewriter, path_normalize};
pub use identity::{selector, spiffe_id};
pub use jwt::{jwt_claims, jwt_svid};
pub use x509::{certificate, csr, csr_sans};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target by name: the name of its `[[bin]]` and of its corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("spiffe_id", spiffe_id),
    ("selector", selector),
    ("csr", csr),
    ("csr_sans", csr_sans),
    ("certificate", certificate),
    ("bundle_json", bundle_json),
    ("federation_bundle", federation_bundle),
    ("jwt_svid", jwt_svid),
    ("jwt_claims", jwt_claims),
    ("server_config", server_config),
    ("agent_config", agent_config),
    ("forwarder_config", forwarder_config),
    ("id_pattern", id_pattern),
    ("cgroup", cgroup),
    ("path_normalize", path_normalize),
    ("authority_rewriter", authority_rewriter),
];

/// The input as text. Every text parser here takes `&str` and its callers refuse non-UTF-8
/// bytes before it, so such input tells nothing about the parser.
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// The trust domain every target that needs one works in.
fn example_org() -> sigil_core::id::TrustDomain {
    sigil_core::id::parse_trust_domain("trust_domain", "example.org")
        .expect("example.org is a trust domain")
}
