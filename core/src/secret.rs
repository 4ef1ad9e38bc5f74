//! Private key bytes that never print and are wiped from memory when dropped.
//!
//! Workload keys pass through the agent's cache and the Workload API as PKCS#8 DER. As a plain
//! `Vec<u8>` they would appear whole in any `{:?}` of an SVID (a log line, a panic message) and
//! linger in freed memory; [`PrivateKey`] prints only its length and zeroes its buffer on drop.

use std::fmt;
use std::ops::Deref;

use zeroize::Zeroizing;

/// A PKCS#8 DER private key.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct PrivateKey(Zeroizing<Vec<u8>>);

impl PrivateKey {
    /// Takes ownership of the key bytes.
    pub fn new(der: Vec<u8>) -> Self {
        PrivateKey(Zeroizing::new(der))
    }

    /// The DER bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for PrivateKey {
    fn from(der: Vec<u8>) -> Self {
        PrivateKey::new(der)
    }
}

impl Deref for PrivateKey {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted, {} bytes>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let key = PrivateKey::new(vec![0x30, 0x81, 0x87, 0x02, 0x01]);
        let shown = format!("{key:?}");
        assert_eq!(shown, "PrivateKey(<redacted, 5 bytes>)");
        assert_eq!(key.as_bytes(), &[0x30, 0x81, 0x87, 0x02, 0x01]);
    }
}
