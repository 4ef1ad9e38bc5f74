//! Lets gRPC clients built on grpc C-core (py-spiffe, grpcio) and grpc-java reach the Workload API,
//! and bounds what any client's header blocks may cost the agent.
//!
//! Over a Unix socket those clients send the socket path, percent-encoded, as the HTTP/2
//! `:authority` (`tmp%2Fsigil%2Fapi.sock`). hyper's HTTP/2 server refuses such a request with
//! `RST_STREAM(PROTOCOL_ERROR)` before any gRPC code runs, because `%` is not valid in an
//! authority. On a Unix socket the authority means nothing, so [`HeaderRewriter`] sits between
//! the socket and the HTTP/2 server and rewrites every request's `:authority` to `localhost`.
//!
//! Only the client-to-server direction is touched, and only HEADERS (with their CONTINUATION
//! frames): the header block is decoded with the client's HPACK state and re-encoded as literals
//! without indexing, so the server's decoder needs no table state from us. Every other frame passes
//! through byte for byte.
//!
//! Because it decodes first, the rewriter is where header bounds hold: the dynamic table is at
//! most [`HEADER_TABLE_SIZE`] bytes, a header list (compressed, and decoded as RFC 9113
//! §6.5.2 counts it) at most [`HeaderLimits::max_header_list_size`], and decoding stops at the
//! first field over it. A connection that breaks a rule or a bound gets a GOAWAY naming why and is
//! closed; the HTTP/2 server sees its input end and flushes what it had queued first.

use bytes::BytesMut;

use crate::Error;
use crate::hpack::{self, ENTRY_OVERHEAD};

mod io;
pub use io::AuthorityRewrite;

/// Wraps a connection accepted on a Unix socket so that any gRPC client reaches the server behind
/// it (see the module docs), for servers that need no facts about the peer at accept: the Sigil
/// server's admin socket, which operators' Python and Go scripts use.
pub fn rewrite_authority<S>(stream: S, limits: HeaderLimits) -> AuthorityRewrite<S, ()> {
    AuthorityRewrite::new(stream, (), limits)
}

/// The largest HPACK dynamic table a client may make the agent keep, in bytes: the HTTP/2 default
/// of SETTINGS_HEADER_TABLE_SIZE, which the server advertises unchanged. A table size update above
/// it is a COMPRESSION_ERROR.
pub use crate::hpack::TABLE_SIZE as HEADER_TABLE_SIZE;
use crate::http2::{
    CONTINUATION, END_HEADERS, END_STREAM, FRAME_HEADER_LEN, HEADERS, MAX_FRAME, PADDED, PREFACE,
    PRIORITY, write_frame,
};

/// What `:authority` is rewritten to.
const AUTHORITY: &[u8] = b"localhost";

/// The default of [`HeaderLimits::max_header_list_size`]: 64 KiB.
pub const DEFAULT_MAX_HEADER_LIST_SIZE: usize = 64 * 1024;

/// The HTTP/2 error codes (RFC 9113 §7) a refused connection's GOAWAY carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http2Code {
    /// A framing rule was broken.
    ProtocolError = 0x1,
    /// A frame was larger than SETTINGS_MAX_FRAME_SIZE.
    FrameSizeError = 0x6,
    /// A header block could not be decoded, or changed the HPACK table beyond what we allow.
    CompressionError = 0x9,
    /// A header list went over the configured bound.
    EnhanceYourCalm = 0xb,
}

impl std::fmt::Display for Http2Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Http2Code::ProtocolError => "PROTOCOL_ERROR",
            Http2Code::FrameSizeError => "FRAME_SIZE_ERROR",
            Http2Code::CompressionError => "COMPRESSION_ERROR",
            Http2Code::EnhanceYourCalm => "ENHANCE_YOUR_CALM",
        })
    }
}

fn refuse(code: Http2Code, why: impl Into<String>) -> Error {
    Error::Http2 {
        code,
        reason: why.into(),
    }
}

fn protocol_error(why: &str) -> Error {
    refuse(Http2Code::ProtocolError, why)
}

/// The bounds on a client's header blocks (the agent's `[workload_api]` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderLimits {
    /// The largest header list a request may carry, counted as RFC 9113 §6.5.2 does (name +
    /// value + 32 bytes per field) after decoding, and also the largest compressed header block.
    /// The HTTP/2 server advertises it as SETTINGS_MAX_HEADER_LIST_SIZE. Default 64 KiB.
    pub max_header_list_size: usize,
}

impl Default for HeaderLimits {
    fn default() -> Self {
        HeaderLimits {
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
        }
    }
}

/// A header block being collected across CONTINUATION frames.
struct PendingHeaders {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// The IO-free core of the rewriter: client bytes in, the bytes the HTTP/2 server should read out.
///
/// Feed it the bytes of one client connection in order, in pieces of any size. It passes the
/// preface and every complete frame on, header blocks rewritten, and keeps an incomplete frame
/// until the rest arrives. Memory stays bounded whatever the input: at most one frame
/// (16 KiB), one header block and its re-encoding ([`HeaderLimits::max_header_list_size`] each)
/// and the HPACK table ([`HEADER_TABLE_SIZE`]) are held, on top of what the caller passes.
pub struct HeaderRewriter {
    limits: HeaderLimits,
    raw: BytesMut,
    preface_seen: bool,
    pending: Option<PendingHeaders>,
    decoder: hpack::Decoder,
    last_stream_id: u32,
    refused: bool,
}

impl std::fmt::Debug for HeaderRewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderRewriter")
            .field("limits", &self.limits)
            .field("last_stream_id", &self.last_stream_id)
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

impl HeaderRewriter {
    /// A rewriter for a new connection.
    pub fn new(limits: HeaderLimits) -> Self {
        HeaderRewriter {
            limits,
            raw: BytesMut::new(),
            preface_seen: false,
            pending: None,
            decoder: hpack::Decoder::new(),
            last_stream_id: 0,
            refused: false,
        }
    }

    /// Takes the next bytes the client sent and appends to `out` what the HTTP/2 server should
    /// read next.
    ///
    /// An error ([`Error::Http2`]) means the client broke a framing or HPACK rule or a bound, and
    /// the connection must end: `out` then holds what came before the offending frame, and every
    /// later call fails without looking at its input.
    pub fn feed(&mut self, input: &[u8], out: &mut BytesMut) -> Result<(), Error> {
        if self.refused {
            return Err(protocol_error(
                "the connection was already refused; nothing more is read from it",
            ));
        }
        self.raw.extend_from_slice(input);
        let result = self.process(out);
        if result.is_err() {
            self.refused = true;
            self.raw = BytesMut::new();
            self.pending = None;
        }
        result
    }

    /// The highest stream whose request headers were passed on, as a GOAWAY reports it.
    pub fn last_stream_id(&self) -> u32 {
        self.last_stream_id
    }

    fn process(&mut self, out: &mut BytesMut) -> Result<(), Error> {
        if !self.preface_seen {
            let seen = self.raw.len().min(PREFACE.len());
            if self.raw[..seen] != PREFACE[..seen] {
                return Err(protocol_error(
                    "the connection does not start with the HTTP/2 preface",
                ));
            }
            if seen < PREFACE.len() {
                return Ok(());
            }
            out.extend_from_slice(&self.raw.split_to(PREFACE.len()));
            self.preface_seen = true;
        }
        while self.raw.len() >= FRAME_HEADER_LEN {
            let length = (usize::from(self.raw[0]) << 16)
                | (usize::from(self.raw[1]) << 8)
                | usize::from(self.raw[2]);
            if length > MAX_FRAME {
                // Refused before any of it is buffered.
                return Err(refuse(
                    Http2Code::FrameSizeError,
                    format!(
                        "a {length}-byte frame is larger than this server's SETTINGS_MAX_FRAME_SIZE of {MAX_FRAME}"
                    ),
                ));
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
                HEADERS => {
                    let block = self.headers(stream_id, flags, payload)?;
                    self.end_or_hold(block, flags, out)?;
                }
                CONTINUATION => {
                    let block = self.continuation(stream_id, payload)?;
                    self.end_or_hold(block, flags, out)?;
                }
                _ if self.pending.is_some() => {
                    return Err(protocol_error("a frame interrupted a header block"));
                }
                _ => out.extend_from_slice(&frame),
            }
        }
        Ok(())
    }

    /// The header block a HEADERS frame starts, without its padding and priority fields.
    fn headers(&self, stream_id: u32, flags: u8, payload: &[u8]) -> Result<PendingHeaders, Error> {
        if self.pending.is_some() {
            return Err(protocol_error("a HEADERS frame interrupted a header block"));
        }
        if stream_id == 0 {
            return Err(protocol_error("a HEADERS frame on stream 0"));
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
        self.check_block_size(block_len)?;
        Ok(PendingHeaders {
            stream_id,
            flags,
            priority,
            block: body[..block_len].to_vec(),
        })
    }

    /// The pending header block with a CONTINUATION frame's fragment added.
    fn continuation(&mut self, stream_id: u32, payload: &[u8]) -> Result<PendingHeaders, Error> {
        let mut pending = self
            .pending
            .take()
            .filter(|p| p.stream_id == stream_id)
            .ok_or_else(|| protocol_error("CONTINUATION without a header block on its stream"))?;
        self.check_block_size(pending.block.len() + payload.len())?;
        pending.block.extend_from_slice(payload);
        Ok(pending)
    }

    /// Passes a header block on once a frame with END_HEADERS ends it; holds it for the next
    /// CONTINUATION otherwise.
    fn end_or_hold(
        &mut self,
        block: PendingHeaders,
        flags: u8,
        out: &mut BytesMut,
    ) -> Result<(), Error> {
        if flags & END_HEADERS != 0 {
            self.emit(block, out)
        } else {
            self.pending = Some(block);
            Ok(())
        }
    }
    fn check_block_size(&self, size: usize) -> Result<(), Error> {
        let max = self.limits.max_header_list_size;
        if size > max {
            return Err(refuse(
                Http2Code::EnhanceYourCalm,
                format!(
                    "a compressed header block of more than {max} bytes; workload_api.max_header_list_size bounds it"
                ),
            ));
        }
        Ok(())
    }

    /// Decodes a complete header block, replaces `:authority`, and writes it out as HEADERS
    /// (plus CONTINUATION frames if it no longer fits one frame). Decoding stops at the first
    /// field that takes the header list over its bound, so a block cannot expand beyond it.
    fn emit(&mut self, pending: PendingHeaders, out: &mut BytesMut) -> Result<(), Error> {
        let max = self.limits.max_header_list_size;
        let mut block = Vec::with_capacity(pending.block.len() + 16);
        let mut list_size = 0usize;
        self.decoder.decode(&pending.block, |name, value| {
            let value = if name == b":authority" {
                AUTHORITY
            } else {
                value
            };
            // Counted as the server will count what we pass on, so whatever passes here passes
            // there too.
            list_size += name.len() + value.len() + ENTRY_OVERHEAD;
            if list_size > max {
                return Err(refuse(
                    Http2Code::EnhanceYourCalm,
                    format!(
                        "a header list of more than {max} bytes (name + value + 32 per field); workload_api.max_header_list_size bounds it"
                    ),
                ));
            }
            hpack::encode_literal(&mut block, name, value);
            Ok(())
        })?;
        self.last_stream_id = self.last_stream_id.max(pending.stream_id);
        let priority = pending.priority.map(|p| p.to_vec()).unwrap_or_default();
        let priority_flag = if pending.priority.is_some() {
            PRIORITY
        } else {
            0
        };
        let mut chunks = block.chunks(MAX_FRAME - priority.len());
        let first = chunks.next().unwrap_or_default();
        let more = chunks.len() > 0;
        let mut payload = priority;
        payload.extend_from_slice(first);
        let end_headers = if more { 0 } else { END_HEADERS };
        let flags = (pending.flags & END_STREAM) | end_headers | priority_flag;
        write_frame(out, HEADERS, flags, pending.stream_id, &payload);
        while let Some(chunk) = chunks.next() {
            let end_headers = if chunks.len() == 0 { END_HEADERS } else { 0 };
            write_frame(out, CONTINUATION, end_headers, pending.stream_id, chunk);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
