//! Lets gRPC clients built on grpc C-core (py-spiffe, grpcio) and grpc-java reach the Workload API.
//!
//! Over a Unix socket those clients send the socket path, percent-encoded, as the HTTP/2
//! `:authority` (`tmp%2Fsigil%2Fapi.sock`). hyper's HTTP/2 server refuses such a request with
//! `RST_STREAM(PROTOCOL_ERROR)` before any gRPC code runs, because `%` is not valid in an
//! authority. On a Unix socket the authority means nothing, so this adapter sits between the socket
//! and the HTTP/2 server and rewrites every request's `:authority` to `localhost`.
//!
//! Only the client-to-server direction is touched, and only HEADERS (with their CONTINUATION
//! frames): the header block is decoded with the client's HPACK state and re-encoded as literals
//! without indexing, so the server's decoder needs no table state from us. Every other frame passes
//! through byte for byte.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface every HTTP/2 connection starts with.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload a peer may send without a SETTINGS change (RFC 9113 §4.2).
const MAX_FRAME: usize = 16_384;
/// The largest header block accepted across CONTINUATION frames.
const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// A header block being collected across CONTINUATION frames.
struct PendingHeaders {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// A connection whose incoming HTTP/2 requests get `:authority: localhost`.
pub(crate) struct AuthorityRewrite<S> {
    inner: S,
    raw: BytesMut,
    ready: BytesMut,
    preface_seen: bool,
    pending: Option<PendingHeaders>,
    decoder: loona_hpack::Decoder<'static>,
}

impl<S> std::fmt::Debug for AuthorityRewrite<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityRewrite").finish_non_exhaustive()
    }
}

impl<S> AuthorityRewrite<S> {
    /// Wraps a freshly accepted connection.
    pub(crate) fn new(inner: S) -> Self {
        AuthorityRewrite {
            inner,
            raw: BytesMut::with_capacity(16 * 1024),
            ready: BytesMut::with_capacity(16 * 1024),
            preface_seen: false,
            pending: None,
            decoder: loona_hpack::Decoder::new(),
        }
    }

    /// Moves every complete unit (the preface, whole frames) from `raw` to `ready`, rewriting
    /// header blocks on the way.
    fn process(&mut self) -> io::Result<()> {
        if !self.preface_seen {
            if self.raw.len() < PREFACE.len() {
                return Ok(());
            }
            if &self.raw[..PREFACE.len()] != PREFACE {
                return Err(protocol_error(
                    "the connection does not start with the HTTP/2 preface",
                ));
            }
            let preface = self.raw.split_to(PREFACE.len());
            self.ready.extend_from_slice(&preface);
            self.preface_seen = true;
        }
        while self.raw.len() >= FRAME_HEADER_LEN {
            let length = (usize::from(self.raw[0]) << 16)
                | (usize::from(self.raw[1]) << 8)
                | usize::from(self.raw[2]);
            if length > MAX_HEADER_BLOCK {
                // Larger than any frame the HTTP/2 server accepts: refuse before buffering it.
                return Err(protocol_error("frame larger than the server accepts"));
            }
            if self.raw.len() < FRAME_HEADER_LEN + length {
                return Ok(());
            }
            let kind = self.raw[3];
            let flags = self.raw[4];
            let stream_id =
                u32::from_be_bytes([self.raw[5], self.raw[6], self.raw[7], self.raw[8]])
                    & 0x7fff_ffff;
            let frame = self.raw.split_to(FRAME_HEADER_LEN + length);
            let payload = &frame[FRAME_HEADER_LEN..];
            match kind {
                HEADERS => self.headers(stream_id, flags, payload)?,
                CONTINUATION => self.continuation(stream_id, flags, payload)?,
                _ if self.pending.is_some() => {
                    return Err(protocol_error("a frame interrupted a header block"));
                }
                _ => self.ready.extend_from_slice(&frame),
            }
        }
        Ok(())
    }

    fn headers(&mut self, stream_id: u32, flags: u8, payload: &[u8]) -> io::Result<()> {
        if self.pending.is_some() {
            return Err(protocol_error("a HEADERS frame interrupted a header block"));
        }
        let mut body = payload;
        let mut padding = 0;
        if flags & PADDED != 0 {
            let (&pad, rest) = body
                .split_first()
                .ok_or_else(|| protocol_error("padded HEADERS without a pad length"))?;
            padding = usize::from(pad);
            body = rest;
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            let fields: [u8; 5] = body
                .get(..5)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| protocol_error("HEADERS priority fields are short"))?;
            priority = Some(fields);
            body = &body[5..];
        }
        let block_len = body
            .len()
            .checked_sub(padding)
            .ok_or_else(|| protocol_error("HEADERS padding exceeds the frame"))?;
        let pending = PendingHeaders {
            stream_id,
            flags,
            priority,
            block: body[..block_len].to_vec(),
        };
        if flags & END_HEADERS != 0 {
            self.emit(pending)
        } else {
            self.pending = Some(pending);
            Ok(())
        }
    }

    fn continuation(&mut self, stream_id: u32, flags: u8, payload: &[u8]) -> io::Result<()> {
        let mut pending = self
            .pending
            .take()
            .filter(|p| p.stream_id == stream_id)
            .ok_or_else(|| protocol_error("CONTINUATION without a header block on its stream"))?;
        if pending.block.len() + payload.len() > MAX_HEADER_BLOCK {
            return Err(protocol_error("header block too large"));
        }
        pending.block.extend_from_slice(payload);
        if flags & END_HEADERS != 0 {
            self.emit(pending)
        } else {
            self.pending = Some(pending);
            Ok(())
        }
    }

    /// Decodes a complete header block, replaces `:authority`, and writes it out as HEADERS
    /// (plus CONTINUATION frames if it no longer fits one frame).
    fn emit(&mut self, pending: PendingHeaders) -> io::Result<()> {
        let headers = self
            .decoder
            .decode(&pending.block)
            .map_err(|e| protocol_error(&format!("undecodable header block: {e}")))?;
        let mut block = Vec::with_capacity(pending.block.len() + 16);
        for (name, value) in &headers {
            let value: &[u8] = if name.as_slice() == b":authority" {
                b"localhost"
            } else {
                value
            };
            encode_literal(&mut block, name, value);
        }
        let mut first = true;
        let mut chunks = block.chunks(MAX_FRAME - 5).peekable();
        if chunks.peek().is_none() {
            // An empty block still needs its HEADERS frame.
            self.write_frame(
                HEADERS,
                (pending.flags & END_STREAM) | END_HEADERS | priority_flag(&pending),
                pending.stream_id,
                &priority_prefix(&pending),
            );
            return Ok(());
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let end_headers = if last { END_HEADERS } else { 0 };
            if first {
                let mut payload = priority_prefix(&pending);
                payload.extend_from_slice(chunk);
                let flags = (pending.flags & END_STREAM) | end_headers | priority_flag(&pending);
                self.write_frame(HEADERS, flags, pending.stream_id, &payload);
                first = false;
            } else {
                self.write_frame(CONTINUATION, end_headers, pending.stream_id, chunk);
            }
        }
        Ok(())
    }

    fn write_frame(&mut self, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        let length = payload.len();
        // Lengths are bounded by MAX_FRAME, so they fit the 24-bit field.
        self.ready.put_u8(((length >> 16) & 0xff) as u8);
        self.ready.put_u8(((length >> 8) & 0xff) as u8);
        self.ready.put_u8((length & 0xff) as u8);
        self.ready.put_u8(kind);
        self.ready.put_u8(flags);
        self.ready.put_u32(stream_id);
        self.ready.extend_from_slice(payload);
    }
}

fn priority_flag(pending: &PendingHeaders) -> u8 {
    if pending.priority.is_some() {
        PRIORITY
    } else {
        0
    }
}

fn priority_prefix(pending: &PendingHeaders) -> Vec<u8> {
    pending.priority.map(|p| p.to_vec()).unwrap_or_default()
}

fn protocol_error(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 protocol error: {why}"),
    )
}

/// HPACK integer with an `prefix_bits`-bit prefix (RFC 7541 §5.1), `first` holding the high bits.
fn encode_integer(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A "literal header field without indexing, new name" (RFC 7541 §6.2.2), strings not Huffman
/// coded: it leaves the receiver's dynamic table untouched.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_integer(out, 0x00, 7, name.len());
    out.extend_from_slice(name);
    encode_integer(out, 0x00, 7, value.len());
    out.extend_from_slice(value);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityRewrite<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut chunk_buf) {
                Poll::Ready(Ok(())) => {
                    let filled = chunk_buf.filled();
                    if filled.is_empty() {
                        // End of stream: hand over whatever is left unparsed, then EOF.
                        let rest = this.raw.split();
                        if rest.is_empty() {
                            return Poll::Ready(Ok(()));
                        }
                        this.ready.extend_from_slice(&rest);
                        continue;
                    }
                    this.raw.extend_from_slice(filled);
                    if let Err(e) = this.process() {
                        // The stream cannot be followed any further: the connection ends here.
                        tracing::debug!(error = %e, "closing a Workload API connection");
                        this.ready.clear();
                        return Poll::Ready(Err(e));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityRewrite<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for AuthorityRewrite<tokio::net::UnixStream> {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![
            (payload.len() >> 16) as u8,
            (payload.len() >> 8) as u8,
            payload.len() as u8,
            kind,
            flags,
        ];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn run(input: &[u8]) -> io::Result<Vec<u8>> {
        let mut rewrite = AuthorityRewrite::new(tokio::io::empty());
        rewrite.raw.extend_from_slice(input);
        rewrite.process()?;
        Ok(rewrite.ready.to_vec())
    }

    fn block(headers: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in headers {
            encode_literal(&mut out, name.as_bytes(), value.as_bytes());
        }
        out
    }

    fn decoded_headers(output: &[u8]) -> Vec<(String, String)> {
        let mut decoder = loona_hpack::Decoder::new();
        let payload = &output[PREFACE.len() + FRAME_HEADER_LEN..];
        decoder
            .decode(payload)
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
        let decoded = decoded_headers(&output[..output.len() - settings.len()]);
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
    fn random_frames_never_panic() {
        // xorshift with a fixed seed: deterministic hostile input.
        let mut state = 0x5eed_0004_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
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
            let mut input = if next() % 2 == 0 {
                valid.clone()
            } else {
                PREFACE.to_vec()
            };
            let extra = (next() % 64) as usize;
            for _ in 0..extra {
                input.push((next() & 0xff) as u8);
            }
            if next() % 3 == 0 && input.len() > PREFACE.len() {
                let at = PREFACE.len() + (next() as usize % (input.len() - PREFACE.len()));
                input[at] ^= (next() & 0xff) as u8 | 1;
            }
            let _ = run(&input);
        }
    }

    #[test]
    fn refuses_interleaved_and_garbage_input() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block(&[(":method", "GET")])));
        input.extend(frame(0x0, 0, 1, b"data"));
        assert!(run(&input).is_err());
        assert!(run(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_err());
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff]));
        assert!(run(&input).is_err());
    }
}
