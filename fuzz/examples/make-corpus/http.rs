//! Seeds of the HTTP-level targets: request paths, and HTTP/2 client connections built frame by
//! frame (HPACK written by hand, so the seeds hold exactly the encodings they are named after).

use anyhow::Result;

use sigil_workload_api::http2::{frame, hpack_integer as hpack_int};

use crate::Corpus;

/// A literal field with incremental indexing and a new name (it enters the dynamic table).
fn hpack_indexed_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x40);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

fn request_block(authority: &str) -> Vec<u8> {
    let mut block = Vec::new();
    block.push(0x83); // :method POST
    block.push(0x86); // :scheme http
    hpack_indexed_literal(&mut block, ":path", "/SpiffeWorkloadAPI/FetchX509SVID");
    hpack_indexed_literal(&mut block, ":authority", authority);
    hpack_indexed_literal(&mut block, "content-type", "application/grpc");
    hpack_indexed_literal(&mut block, "workload.spiffe.io", "true");
    block
}

/// Seeds of `path_normalize` and `authority_rewriter`.
pub(crate) fn seeds(corpus: &mut Corpus) -> Result<()> {
    corpus.texts(
        "path_normalize",
        &[
            ("plain", "/api/items"),
            ("root", "/"),
            ("escaped-unreserved", "/%61dmin/%7Euser"),
            ("double-slash", "//admin"),
            ("dot", "/./admin"),
            ("dot-dot", "/api/../admin"),
            ("above-root", "/a/b/../../../.."),
            ("dot-dot-to-trailing-slash", "/api/.a/b/../.."),
            ("escaped-dots", "/%2e%2e/admin"),
            ("escaped-slash", "/api%2F..%2fadmin"),
            ("backslash", "/api\\..\\admin"),
            ("dot-dot-parameter", "/api/..;x/admin"),
            ("bad-escape", "/%zz/%4"),
            ("relative", "api/items"),
            ("non-ascii", "/caf\u{e9}/\u{1F600}"),
            ("space-and-quote", "/a b/\"c\"/<x>"),
        ],
    )?;

    // The first byte steers the target: low 7 bits the piece size (0: all at once), top bit set:
    // no preface is put in front (see src/http.rs).
    let settings = frame(0x4, 0, 0, &[]);
    let with = |steer: u8, frames: &[Vec<u8>]| -> Vec<u8> {
        let mut out = vec![steer];
        for f in frames {
            out.extend_from_slice(f);
        }
        out
    };
    let request = frame(0x1, 0x4 | 0x1, 1, &request_block("tmp%2Fsigil%2Fapi.sock"));
    corpus.put(
        "authority_rewriter",
        "request",
        with(0, &[settings.clone(), request.clone()]),
    )?;
    corpus.put(
        "authority_rewriter",
        "request-in-pieces",
        with(7, &[settings.clone(), request.clone()]),
    )?;
    // The same request again, its four literals now referenced from the dynamic table
    // (62 is the newest entry: workload.spiffe.io; 65 the oldest: :path).
    let again = frame(0x1, 0x4 | 0x1, 3, &[0x83, 0x86, 0xc1, 0xc0, 0xbf, 0xbe]);
    corpus.put(
        "authority_rewriter",
        "indexed-again",
        with(0, &[settings.clone(), request.clone(), again]),
    )?;

    let block = request_block("localhost");
    let (first, rest) = block.split_at(block.len() / 2);
    corpus.put(
        "authority_rewriter",
        "continuation",
        with(
            3,
            &[
                settings.clone(),
                frame(0x1, 0x1, 1, first),
                frame(0x9, 0x4, 1, rest),
            ],
        ),
    )?;
    let mut padded = vec![4u8];
    padded.extend_from_slice(&[0x80, 0, 0, 0, 16]); // priority: exclusive on stream 0
    padded.extend_from_slice(&block);
    padded.extend_from_slice(&[0; 4]);
    corpus.put(
        "authority_rewriter",
        "padded-priority",
        with(0, &[frame(0x1, 0x4 | 0x8 | 0x20, 1, &padded)]),
    )?;

    // One header of 1 KB into the table, then one-byte references to it: the decompression bomb.
    let mut bomb = Vec::new();
    hpack_indexed_literal(&mut bomb, "x", &"a".repeat(1000));
    bomb.extend(std::iter::repeat_n(0xbe, 2000));
    corpus.put(
        "authority_rewriter",
        "bomb",
        with(0, &[frame(0x1, 0x4, 1, &bomb)]),
    )?;
    let mut resize = Vec::new();
    hpack_int(&mut resize, 0x20, 5, 1 << 20);
    resize.push(0x83);
    corpus.put(
        "authority_rewriter",
        "table-size-update",
        with(0, &[frame(0x1, 0x4, 1, &resize)]),
    )?;
    corpus.put(
        "authority_rewriter",
        "data-and-ping",
        with(
            0,
            &[
                settings.clone(),
                request,
                frame(0x0, 0x1, 1, b"grpc"),
                frame(0x6, 0, 0, &[0; 8]),
            ],
        ),
    )?;
    let mut oversized = with(0, &[]);
    oversized.extend_from_slice(&[0x00, 0x40, 0x01, 0x0, 0x0, 0, 0, 0, 1]);
    corpus.put("authority_rewriter", "frame-too-large", oversized)?;
    corpus.put(
        "authority_rewriter",
        "no-preface",
        b"\x80GET / HTTP/1.1\r\nHost: x\r\n\r\n".as_slice(),
    )?;
    Ok(())
}
