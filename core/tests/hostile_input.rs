//! Hostile input for every parser in the shared domain: random bytes and mutations of valid
//! inputs must give an error or a value, never a panic. A fixed-seed generator keeps the run
//! deterministic; each case below tries a few thousand inputs.

use sigil_core::bundle::TrustBundle;
use sigil_core::id::{parse_spiffe_id, parse_trust_domain};
use sigil_core::selector::Selector;
use sigil_core::x509::{KeyType, certificate_facts, check_csr, check_csr_key, check_leaf_profile};

/// xorshift64*: small, fast, and the same on every run.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| (self.next() & 0xff) as u8).collect()
    }

    /// `input` with a few bytes flipped, inserted, removed or the end cut off.
    fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..=self.below(4) {
            match self.below(4) {
                0 if !out.is_empty() => {
                    let at = self.below(out.len());
                    out[at] ^= (self.next() & 0xff) as u8 | 1;
                }
                1 => {
                    let at = self.below(out.len() + 1);
                    out.insert(at, (self.next() & 0xff) as u8);
                }
                2 if !out.is_empty() => {
                    let at = self.below(out.len());
                    out.remove(at);
                }
                _ => {
                    let keep = self.below(out.len() + 1);
                    out.truncate(keep);
                }
            }
        }
        out
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
            random.mutate(seed)
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
            0 => random.mutate(&csr),
            1 => random.mutate(&cert),
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
            random.mutate(valid.as_bytes())
        } else {
            random.bytes(256)
        };
        let _ = TrustBundle::from_spiffe_json(td.clone(), &String::from_utf8_lossy(&input));
    }
}
