//! What HTTP-level clients send: the request paths the forwarder's HTTP rules judge, and the
//! HTTP/2 header blocks any local process sends the Workload API socket, where the `:authority`
//! rewriter decodes them before the HTTP/2 server does.

use bytes::BytesMut;
use sigil_forwarder::path::{EscapedSlashes, normalize};
use sigil_workload_api::authority::{HeaderLimits, HeaderRewriter};
use sigil_workload_api::http2::{
    CONTINUATION, END_HEADERS, HEADERS, MAX_FRAME, PADDED, PREFACE, PRIORITY,
};

use crate::text;

/// `sigil_forwarder::path::normalize` under both escaped-slash actions.
///
/// Holds: a normalised path starts with `/`, is ASCII, has no `.` or `..` segment and no empty
/// one but a trailing slash (so no `//`, `/./`, `/../`, nor a trailing `/.` or `/..`), and
/// normalising it again changes nothing;
/// a path accepted under `reject` is accepted under `keep` with the same result.
pub fn path_normalize(data: &[u8]) {
    let Some(path) = text(data) else { return };
    let rejecting = normalize(path, EscapedSlashes::Reject);
    let keeping = normalize(path, EscapedSlashes::Keep);
    for (mode, result) in [
        (EscapedSlashes::Reject, &rejecting),
        (EscapedSlashes::Keep, &keeping),
    ] {
        let Ok(normal) = result else { continue };
        assert!(
            normal.starts_with('/'),
            "{path:?} -> {normal:?}: no leading `/`"
        );
        assert!(normal.is_ascii(), "{path:?} -> {normal:?}: not ASCII");
        // A trailing slash is a last, empty segment: `/api/` is not `/api` (RFC 3986 keeps it,
        // e.g. `/a/b/..` is `/a/`), so only the segments before the last must be non-empty.
        let segments: Vec<&str> = normal[1..].split('/').collect();
        for (i, segment) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            assert!(
                !matches!(*segment, "." | "..") && (last || !segment.is_empty()),
                "{path:?} -> {normal:?}: has an empty, `.` or `..` segment"
            );
        }
        assert_eq!(
            normalize(normal, mode).as_deref().ok(),
            Some(normal.as_str()),
            "{path:?} -> {normal:?}: normalising again changes it ({mode:?})"
        );
    }
    if let Ok(normal) = &rejecting {
        assert_eq!(
            keeping.as_ref().ok(),
            Some(normal),
            "{path:?}: `keep` disagrees with `reject`"
        );
    }
}

/// The header list bound the target runs with: small, so the fuzzer reaches it.
const LIMIT: usize = 4096;

/// The `:authority` rewriter (`HeaderRewriter::feed`) on one client connection.
///
/// The first byte steers: its low 7 bits are the size of the pieces the rest is fed in (0: all
/// at once), its top bit set means the rest is fed as is, clear that the connection preface is
/// put before it.
///
/// Holds: feeding in pieces gives the same bytes and the same outcome as feeding at once; the
/// output is bounded (a header block expands to at most the header list bound); it is the
/// preface and then whole frames of at most 16 KiB, whose header blocks decode with another
/// HPACK implementation (loona-hpack) from an empty table, keep under the bound, and carry
/// `:authority` only as `localhost`.
pub fn authority_rewriter(data: &[u8]) {
    let Some((&steer, rest)) = data.split_first() else {
        return;
    };
    let mut input = Vec::with_capacity(PREFACE.len() + rest.len());
    if steer & 0x80 == 0 {
        input.extend_from_slice(PREFACE);
    }
    input.extend_from_slice(rest);
    let limits = HeaderLimits {
        max_header_list_size: LIMIT,
    };

    let mut whole = BytesMut::new();
    let whole_result = HeaderRewriter::new(limits).feed(&input, &mut whole);

    let piece = usize::from(steer & 0x7f);
    if piece > 0 {
        let mut rewriter = HeaderRewriter::new(limits);
        let mut pieces = BytesMut::new();
        let mut pieces_ok = true;
        for chunk in input.chunks(piece) {
            if rewriter.feed(chunk, &mut pieces).is_err() {
                pieces_ok = false;
                assert!(
                    rewriter.feed(b"", &mut pieces).is_err(),
                    "a refused connection was read again"
                );
                break;
            }
        }
        assert_eq!(pieces_ok, whole_result.is_ok(), "pieces change the outcome");
        assert!(pieces == whole, "pieces change the output");
    }

    let frames_in = input.len() / 9 + 1;
    assert!(
        whole.len() <= input.len() + frames_in * (LIMIT + 64),
        "{} bytes out of {} in",
        whole.len(),
        input.len()
    );
    check_output(&whole);
}

/// The output is the preface and whole frames; header blocks decode on their own.
fn check_output(out: &[u8]) {
    if out.is_empty() {
        return;
    }
    let mut rest = out
        .strip_prefix(PREFACE)
        .expect("output that does not start with the preface");
    let mut block = Vec::new();
    while !rest.is_empty() {
        assert!(rest.len() >= 9, "a partial frame header in the output");
        let length = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        assert!(
            length <= MAX_FRAME,
            "a frame of {length} bytes in the output"
        );
        assert!(rest.len() >= 9 + length, "a partial frame in the output");
        let mut payload = &rest[9..9 + length];
        rest = &rest[9 + length..];
        if kind == HEADERS {
            if flags & PADDED != 0 {
                let (&pad, body) = payload.split_first().expect("a padded frame's pad length");
                let end = body
                    .len()
                    .checked_sub(usize::from(pad))
                    .expect("padding longer than its frame in the output");
                payload = &body[..end];
            }
            if flags & PRIORITY != 0 {
                payload = payload.get(5..).expect("a priority longer than its frame");
            }
        }
        if matches!(kind, HEADERS | CONTINUATION) {
            block.extend_from_slice(payload);
            if flags & END_HEADERS != 0 {
                check_block(&block);
                block.clear();
            }
        }
    }
}

fn check_block(block: &[u8]) {
    let fields = loona_hpack::Decoder::new()
        .decode(block)
        .unwrap_or_else(|e| panic!("a rewritten header block does not decode: {e:?}"));
    let size: usize = fields.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
    assert!(size <= LIMIT, "a header list of {size} bytes was passed on");
    for (name, value) in &fields {
        if name == b":authority" {
            assert_eq!(value, b"localhost", "`:authority` was not rewritten");
        }
    }
}
