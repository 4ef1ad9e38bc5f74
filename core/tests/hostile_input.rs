//! Hostile input for every parser in the shared domain: random bytes and mutations of valid
//! inputs must give an error or a value, never a panic. A fixed-seed generator keeps the run
//! deterministic; each case below tries a few thousand inputs.

use sigil_core::bundle::TrustBundle;
use sigil_core::id::{parse_spiffe_id, parse_trust_domain};
use sigil_core::selector::Selector;
use sigil_core::x509::{KeyType, certificate_facts, check_csr, check_csr_key, check_leaf_profile};

#[path = "support/random.rs"]
mod random;

use random::Random;

/// What the parsers of bytes are fed.
trait Bytes {
    /// Up to `max` random bytes.
    fn bytes(&mut self, max: usize) -> Vec<u8>;
    /// `input` with a few bytes changed, inserted, removed or the end cut off.
    fn mutate_bytes(&mut self, input: &[u8]) -> Vec<u8>;
}

impl Bytes for Random {
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| (self.next() & 0xff) as u8).collect()
    }

    fn mutate_bytes(&mut self, input: &[u8]) -> Vec<u8> {
        self.mutate(input.to_vec(), |random| (random.next() & 0xff) as u8)
    }
}

const ROUNDS: usize = 3000;

#[test]
fn text_parsers_never_panic() {
    let mut random = Random(0x5eed_0001);
    let seeds = [
        "spiffe://example.org/ns/prod/sa/web",
        "k8s:pod-label:app:web",
        "example.org",
        "unix:uid:1000",
    ];
    for _ in 0..ROUNDS {
        let seed = seeds[random.below(seeds.len())].as_bytes();
        let input = if random.below(2) == 0 {
            random.mutate_bytes(seed)
        } else {
            random.bytes(64)
        };
        let text = String::from_utf8_lossy(&input);
        let _ = parse_spiffe_id("spiffe_id", &text);
        let _ = parse_trust_domain("trust_domain", &text);
        let _ = Selector::parse(&text);
    }
}

#[test]
fn der_parsers_never_panic() {
    let mut random = Random(0x5eed_0002);
    let key = KeyType::EcP256.generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/web".try_into().expect("uri"),
    )];
    let csr = params.serialize_request(&key).expect("csr").der().to_vec();
    let cert = params.self_signed(&key).expect("cert").der().to_vec();
    for _ in 0..ROUNDS {
        let input = match random.below(3) {
            0 => random.mutate_bytes(&csr),
            1 => random.mutate_bytes(&cert),
            _ => random.bytes(512),
        };
        let _ = check_csr(&input);
        let _ = check_csr_key(&input);
        let _ = certificate_facts(&input);
        let _ = check_leaf_profile(&input);
    }
}

#[test]
fn bundle_json_never_panics() {
    let mut random = Random(0x5eed_0003);
    let td = parse_trust_domain("trust_domain", "example.org").expect("td");
    let valid = r#"{"keys":[{"use":"jwt-svid","kty":"EC","kid":"k","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}],"spiffe_sequence":1}"#;
    for _ in 0..ROUNDS {
        let input = if random.below(2) == 0 {
            random.mutate_bytes(valid.as_bytes())
        } else {
            random.bytes(256)
        };
        let _ = TrustBundle::from_spiffe_json(td.clone(), &String::from_utf8_lossy(&input));
    }
}
