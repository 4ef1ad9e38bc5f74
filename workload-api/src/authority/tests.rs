use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::hpack::encode_literal;
use crate::http2::{GOAWAY, frame};

fn run_with(limits: HeaderLimits, input: &[u8]) -> (BytesMut, Result<(), Error>) {
    let mut out = BytesMut::new();
    let result = HeaderRewriter::new(limits).feed(input, &mut out);
    (out, result)
}

fn run(input: &[u8]) -> Result<Vec<u8>, Error> {
    let (out, result) = run_with(HeaderLimits::default(), input);
    result.map(|()| out.to_vec())
}

fn code(result: Result<(), Error>) -> Http2Code {
    match result {
        Err(Error::Http2 { code, .. }) => code,
        other => panic!("not an HTTP/2 refusal: {other:?}"),
    }
}

fn block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        encode_literal(&mut out, name.as_bytes(), value.as_bytes());
    }
    out
}

/// The header block of the frames after the preface, joined across CONTINUATION frames, decoded
/// by another implementation.
fn decoded_headers(output: &[u8]) -> Vec<(String, String)> {
    let mut rest = &output[PREFACE.len()..];
    let mut joined = Vec::new();
    while rest.len() >= FRAME_HEADER_LEN {
        let length = (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        assert!(
            length <= MAX_FRAME,
            "frames we write fit the server's frame size"
        );
        if matches!(rest[3], HEADERS | CONTINUATION) {
            joined.extend_from_slice(&rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + length]);
        }
        rest = &rest[FRAME_HEADER_LEN + length..];
    }
    loona_hpack::Decoder::new()
        .decode(&joined)
        .expect("decodable")
        .into_iter()
        .map(|(n, v)| {
            (
                String::from_utf8(n).expect("utf8"),
                String::from_utf8(v).expect("utf8"),
            )
        })
        .collect()
}

/// The HPACK bomb: one ~4 KB header added to the table, then one-byte references to it filling
/// a 64 KiB header block (a HEADERS frame and three CONTINUATION frames).
fn bomb() -> Vec<u8> {
    let mut block = vec![0x40, 0x01, b'x', 0x7f];
    // A 4000-byte value: 127 in the prefix, 3873 in two continuation bytes.
    block.extend_from_slice(&[0xa1, 0x1e]);
    block.extend(std::iter::repeat_n(b'a', 4000));
    block.resize(4 * MAX_FRAME, 0xbe);
    let mut input = PREFACE.to_vec();
    let mut chunks = block.chunks(MAX_FRAME).enumerate().peekable();
    while let Some((i, chunk)) = chunks.next() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        input.extend(frame(kind, flags, 1, chunk));
    }
    input
}

#[test]
fn rewrites_the_authority_and_keeps_the_rest() {
    let headers = block(&[
        (":method", "POST"),
        (":authority", "tmp%2Fsigil%2Fapi.sock"),
        ("workload.spiffe.io", "true"),
    ]);
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &headers));
    let settings = frame(0x4, 0, 0, &[]);
    input.extend(&settings);
    let output = run(&input).expect("processed");
    assert_eq!(&output[..PREFACE.len()], PREFACE);
    assert_eq!(output[PREFACE.len() + 4], END_HEADERS | END_STREAM);
    let decoded = decoded_headers(&output);
    assert!(
        decoded.contains(&(":authority".into(), "localhost".into())),
        "{decoded:?}"
    );
    assert!(
        decoded.contains(&("workload.spiffe.io".into(), "true".into())),
        "{decoded:?}"
    );
    assert!(output.ends_with(&settings), "other frames pass through");
}

#[test]
fn joins_continuations_and_drops_padding() {
    let headers = block(&[
        (":authority", "a%2Fb"),
        (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
    ]);
    let (head, tail) = headers.split_at(5);
    let mut padded = vec![3u8];
    padded.extend_from_slice(head);
    padded.extend_from_slice(&[0, 0, 0]);
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, PADDED, 3, &padded));
    input.extend(frame(CONTINUATION, END_HEADERS, 3, tail));
    let output = run(&input).expect("processed");
    let decoded = decoded_headers(&output);
    assert_eq!(decoded[0], (":authority".into(), "localhost".into()));
    assert_eq!(decoded[1].1, "/SpiffeWorkloadAPI/FetchX509SVID");
}

#[test]
fn a_large_list_within_the_bound_is_split_into_frames_the_server_accepts() {
    let big = "v".repeat(20_000);
    let headers = block(&[(":authority", "x"), ("big-1", &big), ("big-2", &big)]);
    let mut input = PREFACE.to_vec();
    for (i, chunk) in headers.chunks(MAX_FRAME).enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let last = (i + 1) * MAX_FRAME >= headers.len();
        input.extend(frame(kind, if last { END_HEADERS } else { 0 }, 5, chunk));
    }
    let output = run(&input).expect("processed");
    let decoded = decoded_headers(&output);
    assert_eq!(decoded.len(), 3);
    assert_eq!(decoded[2], ("big-2".into(), big));
}

#[test]
fn any_split_of_the_input_gives_the_same_output() {
    let mut input = PREFACE.to_vec();
    input.extend(frame(
        HEADERS,
        END_HEADERS,
        1,
        &block(&[(":authority", "a%2Fb"), (":path", "/x")]),
    ));
    input.extend(frame(0x0, 0x1, 1, b"body"));
    let whole = run(&input).expect("processed");
    let mut rewriter = HeaderRewriter::new(HeaderLimits::default());
    let mut out = BytesMut::new();
    for byte in &input {
        rewriter
            .feed(std::slice::from_ref(byte), &mut out)
            .expect("processed");
    }
    assert_eq!(out.to_vec(), whole);
    assert_eq!(rewriter.last_stream_id(), 1);
}

#[test]
fn the_hpack_bomb_is_refused_while_it_is_decoded() {
    let (out, result) = run_with(HeaderLimits::default(), &bomb());
    assert_eq!(code(result), Http2Code::EnhanceYourCalm);
    assert_eq!(&out[..], PREFACE, "nothing of the bomb reaches the server");
    // A smaller bound holds too: the table entry alone is over it.
    let small = HeaderLimits {
        max_header_list_size: 1024,
    };
    let (_, result) = run_with(small, &bomb());
    match result {
        Err(Error::Http2 { code, reason }) => {
            assert_eq!(code, Http2Code::EnhanceYourCalm);
            assert!(
                reason.contains("1024") && reason.contains("max_header_list_size"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn table_size_updates_beyond_the_advertised_size_are_compression_errors() {
    let mut input = PREFACE.to_vec();
    // A size update to 2^26, then a field.
    input.extend(frame(
        HEADERS,
        END_HEADERS,
        1,
        &[0x3f, 0xe1, 0xff, 0xff, 0x1f, 0x82],
    ));
    assert_eq!(
        code(run_with(HeaderLimits::default(), &input).1),
        Http2Code::CompressionError
    );
}

#[test]
fn oversized_frames_and_blocks_are_refused_before_they_are_buffered() {
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(&[0x01, 0x00, 0x00, HEADERS, END_HEADERS, 0, 0, 0, 1]);
    assert_eq!(
        code(run_with(HeaderLimits::default(), &input).1),
        Http2Code::FrameSizeError
    );
    let small = HeaderLimits {
        max_header_list_size: 100,
    };
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, 0, 1, &[0x82; 80]));
    input.extend(frame(CONTINUATION, 0, 1, &[0x82; 80]));
    assert_eq!(code(run_with(small, &input).1), Http2Code::EnhanceYourCalm);
}

#[test]
fn a_refused_connection_stays_refused() {
    let mut rewriter = HeaderRewriter::new(HeaderLimits::default());
    let mut out = BytesMut::new();
    assert!(rewriter.feed(b"GET / HTTP/1.1\r\n", &mut out).is_err());
    assert!(rewriter.feed(PREFACE, &mut out).is_err());
    assert!(out.is_empty());
}

#[test]
fn refuses_interleaved_and_garbage_input() {
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, 0, 1, &block(&[(":method", "GET")])));
    input.extend(frame(0x0, 0, 1, b"data"));
    assert_eq!(code(run(&input).map(drop)), Http2Code::ProtocolError);
    assert!(run(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_err());
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff]));
    assert_eq!(code(run(&input).map(drop)), Http2Code::CompressionError);
    let mut input = PREFACE.to_vec();
    input.extend(frame(
        HEADERS,
        END_HEADERS,
        0,
        &block(&[(":method", "GET")]),
    ));
    assert_eq!(code(run(&input).map(drop)), Http2Code::ProtocolError);
}

#[test]
fn random_frames_never_panic() {
    let mut next = crate::xorshift(0x5eed_0004_u64);
    let valid = {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &block(&[(":authority", "a%2Fb"), (":path", "/x")]),
        ));
        input
    };
    for _ in 0..5000 {
        let mut input = if next().is_multiple_of(2) {
            valid.clone()
        } else {
            PREFACE.to_vec()
        };
        let extra = (next() % 64) as usize;
        for _ in 0..extra {
            input.push((next() & 0xff) as u8);
        }
        if next().is_multiple_of(3) && input.len() > PREFACE.len() {
            let at = PREFACE.len() + (next() as usize % (input.len() - PREFACE.len()));
            input[at] ^= (next() & 0xff) as u8 | 1;
        }
        let _ = run(&input);
    }
}

#[tokio::test]
async fn a_refused_connection_gets_a_goaway_after_the_servers_frames() {
    let (mut client, socket) = tokio::io::duplex(256 * 1024);
    let mut connection = AuthorityRewrite::new(socket, (), HeaderLimits::default());
    client.write_all(&bomb()).await.expect("sent");
    // The server side reads the preface, then the end of its input.
    let mut seen = Vec::new();
    connection.read_to_end(&mut seen).await.expect("read");
    assert_eq!(seen, PREFACE);
    // What the server still writes goes out whole, then the GOAWAY.
    let settings = frame(0x4, 0, 0, &[]);
    connection.write_all(&settings).await.expect("written");
    connection.shutdown().await.expect("shut down");
    let mut received = Vec::new();
    client.read_to_end(&mut received).await.expect("read");
    assert!(received.starts_with(&settings));
    let goaway = &received[settings.len()..];
    assert_eq!(goaway[3], GOAWAY);
    assert_eq!(
        &goaway[13..17],
        &(Http2Code::EnhanceYourCalm as u32).to_be_bytes()
    );
    let debug = String::from_utf8_lossy(&goaway[17..]);
    assert!(debug.contains("max_header_list_size"), "{debug}");
}
