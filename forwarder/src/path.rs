//! Request path normalisation: the one form of a path that HTTP rules see and the application
//! receives, so that what was checked is what is forwarded.
//!
//! Two spellings of one resource must not be two paths to a rule: `/%61dmin`, `//admin`,
//! `/./admin` and `/api/../admin` all name `/admin` to most applications. [`normalize`] turns a
//! path into its one form, as Envoy's `normalize_path` + `merge_slashes` +
//! `path_with_escaped_slashes_action` do:
//!
//! 1. every percent-escape is checked (two hex digits); escapes of unreserved characters
//!    (`A-Z a-z 0-9 - . _ ~`, RFC 3986 section 2.3) are decoded, every other escape is kept with
//!    upper-case hex digits (section 6.2.2.1);
//! 2. the escaped separators `%2F` and `%5C` and a raw `\` are refused ([`EscapedSlashes::Reject`],
//!    the default: applications disagree on whether they separate segments) or kept as the
//!    escapes `%2F` and `%5C` ([`EscapedSlashes::Keep`]);
//! 3. any other byte that may not stand raw in a path (controls, space, `"`, `<`, `{`, non-ASCII,
//!    ...) is percent-encoded;
//! 4. a dot segment with parameters (`..;x`, `.;`) is refused: servlet containers strip the
//!    parameters and resolve it as `..`;
//! 5. consecutive slashes are merged and the dot segments `.` and `..` are removed (RFC 3986
//!    section 5.2.4; `..` above the root stays at the root).
//!
//! The result starts with `/`, holds only RFC 3986 `pchar`s, `/` and upper-case escapes of
//! reserved or non-ASCII bytes, contains no empty, `.` or `..` segment (so no `//`, `/./` or
//! `/../`), and normalising it again changes nothing. The function is pure (no IO), so a fuzz
//! target can call it on anything.

use sigil_core::untrusted::untrusted;

use crate::{Error, Result};

/// What to do with an escaped path separator (`%2F`, `%5C`) or a raw backslash in a request path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EscapedSlashes {
    /// Answer the request with 400 (the default): an application that decodes `%2F` to `/`, or
    /// treats `\` as `/`, would see other segments than the rules did.
    #[default]
    Reject,
    /// Keep them as escapes (`%2F`, `%5C`; a raw `\` is forwarded as `%5C`): rules see one
    /// segment, and so must the application.
    Keep,
}

impl std::str::FromStr for EscapedSlashes {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "reject" => Ok(EscapedSlashes::Reject),
            "keep" => Ok(EscapedSlashes::Keep),
            other => Err(format!(
                "`{}` is not an escaped-slashes action; use reject (the default) or keep",
                untrusted(other)
            )),
        }
    }
}

/// The normal form of `path` (the path of a request target, without its query), or why it is
/// refused: a path that does not start with `/`, a malformed percent-escape, an escaped
/// separator under [`EscapedSlashes::Reject`], or a dot segment with parameters.
pub fn normalize(path: &str, escaped_slashes: EscapedSlashes) -> Result<String> {
    if !path.starts_with('/') {
        return Err(refused(
            path,
            "the path must start with `/` (origin-form, e.g. `/api/items`)",
        ));
    }
    let canonical = canonical_bytes(path, escaped_slashes)?;
    // Servlet containers strip path parameters before resolving dot segments, so to them
    // `/api/..;/admin` is `/admin`; no rule could see that, and no real path needs it.
    if canonical
        .split('/')
        .any(|segment| matches!(segment.split_once(';'), Some(("." | "..", _))))
    {
        return Err(refused(
            path,
            "a dot segment with parameters (`.;` or `..;`) is refused, since some applications resolve it as `.` or `..`; send the path without them",
        ));
    }
    Ok(remove_dot_segments(&canonical))
}

/// Steps 1 to 3: every byte either stays (an RFC 3986 `pchar` or `/`), is decoded (an escaped
/// unreserved character), or becomes an upper-case escape.
fn canonical_bytes(path: &str, escaped_slashes: EscapedSlashes) -> Result<String> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte == b'%' {
            let decoded = bytes
                .get(i + 1..i + 3)
                .and_then(|hex| Some(hex_value(hex[0])? << 4 | hex_value(hex[1])?))
                .ok_or_else(|| {
                    refused(
                        path,
                        &format!(
                            "malformed percent-escape at byte {i}; `%` must be followed by two hex digits (write a literal `%` as `%25`)"
                        ),
                    )
                })?;
            if is_unreserved(decoded) {
                out.push(char::from(decoded));
            } else {
                separator(path, decoded, escaped_slashes)?;
                push_escape(&mut out, decoded);
            }
            i += 3;
            continue;
        }
        if byte == b'\\' {
            separator(path, byte, escaped_slashes)?;
            push_escape(&mut out, byte);
        } else if byte == b'/' || is_pchar(byte) {
            out.push(char::from(byte));
        } else {
            push_escape(&mut out, byte);
        }
        i += 1;
    }
    Ok(out)
}

/// Refuses `byte` (from an escape or a raw `\`) when it is a separator and the listener rejects
/// escaped separators.
fn separator(path: &str, byte: u8, escaped_slashes: EscapedSlashes) -> Result<()> {
    if matches!(byte, b'/' | b'\\') && escaped_slashes == EscapedSlashes::Reject {
        return Err(refused(
            path,
            "an escaped `/` (`%2F`) or a backslash (`\\` or `%5C`) is refused, since applications disagree on whether it separates segments; send `/` itself, or set `escaped_slashes = \"keep\"` on the listener",
        ));
    }
    Ok(())
}

/// Step 5: merges slashes and removes `.` and `..` segments. `path` starts with `/`, so the
/// result does too; a trailing slash (or a final `.` or `..`, which name a directory) is kept.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    out
}

fn refused(path: &str, reason: &str) -> Error {
    Error::RequestPath {
        path: untrusted(path).to_string(),
        reason: reason.to_string(),
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|value| u8::try_from(value).ok())
}

/// RFC 3986 section 2.3.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 section 3.3 `pchar` without `pct-encoded`: unreserved, sub-delims, `:` and `@`.
fn is_pchar(byte: u8) -> bool {
    is_unreserved(byte)
        || matches!(
            byte,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

fn push_escape(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0xF)]));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(path: &str) -> String {
        normalize(path, EscapedSlashes::Reject).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn the_normal_form_of_each_case() {
        for (input, normal) in [
            ("/", "/"),
            ("/api/items", "/api/items"),
            ("/%61dmin", "/admin"),
            ("/%41%44MIN", "/ADMIN"),
            ("//admin", "/admin"),
            ("///admin//x///", "/admin/x/"),
            ("/./admin", "/admin"),
            ("/api/../admin", "/admin"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/.%2E/admin", "/admin"),
            ("/%2e/admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/..", "/"),
            ("/.", "/"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/./b/../../c", "/c"),
            ("/a/..b/.c/...", "/a/..b/.c/..."),
            ("/%7e%5f%2d%2E", "/~_-."),
            ("/a%3bb", "/a%3Bb"),
            ("/a%3Fb%23c", "/a%3Fb%23c"),
            ("/a%25b", "/a%25b"),
            ("/a%2561", "/a%2561"),
            ("/a b\"c<d>", "/a%20b%22c%3Cd%3E"),
            ("/{x}|^`[y]", "/%7Bx%7D%7C%5E%60%5By%5D"),
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/a;b=c,d:e@f!$&'()*+", "/a;b=c,d:e@f!$&'()*+"),
            ("/a%00b\n", "/a%00b%0A"),
        ] {
            assert_eq!(norm(input), normal, "{input}");
        }
    }

    #[test]
    fn escaped_separators_are_refused_unless_kept() {
        for input in [
            "/a%2Fb",
            "/a%2fb",
            "/a%5Cb",
            "/a%5cb",
            "/a\\b",
            "/..%2F..%2Fadmin",
        ] {
            let err = normalize(input, EscapedSlashes::Reject)
                .expect_err(input)
                .to_string();
            assert!(err.contains("escaped_slashes"), "{input}: {err}");
        }
        for (input, kept) in [
            ("/a%2fb", "/a%2Fb"),
            ("/a%5cb", "/a%5Cb"),
            ("/a\\b", "/a%5Cb"),
            ("/..%2F..%2Fadmin", "/..%2F..%2Fadmin"),
        ] {
            assert_eq!(
                normalize(input, EscapedSlashes::Keep).expect(input),
                kept,
                "{input}"
            );
        }
    }

    #[test]
    fn malformed_paths_say_what_is_wrong() {
        for (input, says) in [
            ("/a%", "malformed percent-escape at byte 2"),
            ("/a%4", "malformed percent-escape"),
            ("/a%zz", "malformed percent-escape"),
            ("/a%+1", "malformed percent-escape"),
            ("*", "must start with `/`"),
            ("", "must start with `/`"),
            ("example.org:443", "must start with `/`"),
            ("/api/..;/admin", "`..;`"),
            ("/api/%2e%2e;x/admin", "`..;`"),
            ("/api/.;/admin", "`..;`"),
        ] {
            let err = normalize(input, EscapedSlashes::Keep)
                .expect_err(input)
                .to_string();
            assert!(err.contains(says), "{input}: {err}");
        }
        let long = format!("/{}", "\n".repeat(1000));
        let err = normalize(&format!("{long}%"), EscapedSlashes::Keep)
            .expect_err("malformed")
            .to_string();
        assert!(err.len() < 800, "the path in the error is truncated: {err}");
        assert!(!err.contains('\n'), "and escaped: {err}");
    }

    /// Every input of the table above and some adversarial ones: the normal form is a fixed point
    /// and never holds an empty, `.` or `..` segment.
    #[test]
    fn normalising_twice_changes_nothing_and_leaves_no_dot_or_empty_segment() {
        let inputs = [
            "/",
            "//",
            "/./",
            "/../",
            "/.../",
            "/%2e",
            "/%2e%2e",
            "/.%2e/",
            "/a/%2e%2E/%2e/b",
            "/a//b//",
            "/a/.//..//b",
            "/%2F",
            "/\\",
            "/%5c..%5c",
            "/%",
            "/%%2e%2e",
            "/%252e%252e",
            "/a/b/c/../../../../..",
            "/caf\u{e9}/../x",
            "/%C3%A9",
            "/%c3%a9",
            "/a%2e%2e/b",
            "/.%2E./x",
            "/%2e%2e%2f",
            "/a?b",
            "/a#b",
        ];
        for mode in [EscapedSlashes::Reject, EscapedSlashes::Keep] {
            for input in inputs {
                let Ok(once) = normalize(input, mode) else {
                    continue;
                };
                assert_eq!(normalize(&once, mode).expect(&once), once, "{input}");
                assert!(once.starts_with('/'), "{input}: {once}");
                for bad in ["//", "/./", "/../"] {
                    assert!(!once.contains(bad), "{input}: {once}");
                }
                assert!(
                    !once.ends_with("/.") && !once.ends_with("/.."),
                    "{input}: {once}"
                );
                assert!(
                    once.bytes().all(|b| b == b'/' || b == b'%' || is_pchar(b)),
                    "{input}: {once}"
                );
            }
        }
    }
}
