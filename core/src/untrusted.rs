//! Strings that came from outside, made safe to put in a log line, an error or a status message.
//!
//! A peer controls the length and the bytes of every name it sends (an attestor name, a resource
//! name, a path, a header). Echoed whole, a 1 MB name becomes a 1 MB log line and a 1 MB gRPC
//! status; echoed raw, a newline forges a log line and an escape sequence rewrites a terminal.
//! [`Untrusted`] is the one way such a string reaches text a person or a program reads: at most
//! [`MAX_SHOWN`] characters, control and non-ASCII characters escaped as Rust escapes them, and a
//! note of how much was cut.

use std::fmt;

/// How many characters of an outside string are shown before the rest is cut.
pub const MAX_SHOWN: usize = 128;

/// An outside string shown truncated and escaped; build it with [`untrusted`].
#[derive(Clone, Copy)]
pub struct Untrusted<'a>(&'a str);

/// Wraps `value` so that its `Display` (and `Debug`) is truncated to [`MAX_SHOWN`] characters and
/// escaped.
pub fn untrusted(value: &str) -> Untrusted<'_> {
    Untrusted(value)
}

/// Like [`untrusted`] for bytes that need not be UTF-8 (shown lossily).
pub fn untrusted_bytes(value: &[u8]) -> String {
    untrusted(&String::from_utf8_lossy(value)).to_string()
}

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shown, (index, c)) in self.0.char_indices().enumerate() {
            if shown == MAX_SHOWN {
                return write!(f, "...({} more bytes)", self.0.len() - index);
            }
            if c == ' ' || (c.is_ascii_graphic() && c != '\\' && c != '"') {
                f.write_str(c.encode_utf8(&mut [0; 4]))?;
            } else {
                write!(f, "{}", c.escape_default())?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_printable_strings_are_unchanged() {
        assert_eq!(untrusted("join_token").to_string(), "join_token");
        assert_eq!(untrusted("a b/c:d").to_string(), "a b/c:d");
    }

    #[test]
    fn control_characters_and_quotes_are_escaped() {
        assert_eq!(
            untrusted("x\ny\u{1b}[2J\"\\").to_string(),
            "x\\ny\\u{1b}[2J\\\"\\\\"
        );
        assert_eq!(untrusted("é").to_string(), "\\u{e9}");
    }

    #[test]
    fn long_strings_are_cut_with_the_remaining_length() {
        let long = "a".repeat(1_000_000);
        let shown = untrusted(&long).to_string();
        assert!(shown.len() < MAX_SHOWN + 40, "{}", shown.len());
        assert!(shown.ends_with(&format!("...({} more bytes)", 1_000_000 - MAX_SHOWN)));
    }

    #[test]
    fn invalid_utf8_is_shown_lossily() {
        assert_eq!(untrusted_bytes(b"ok\xff"), "ok\\u{fffd}");
    }
}
