//! The HTTP/2 wire facts (RFC 9113) that the `:authority` rewriter ([`crate::authority`]) reads
//! and writes, with the frame and HPACK integer (RFC 7541 §5.1) encoders it uses. Public so the
//! fuzz targets and the attack tests build hostile input from the definitions the rewriter checks.

use bytes::BufMut;

pub use crate::hpack::encode_integer as hpack_integer;

/// The client connection preface every HTTP/2 connection starts with.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Every frame starts with 9 bytes: length (24 bits), type, flags, stream id.
pub const FRAME_HEADER_LEN: usize = 9;
/// The largest frame payload a client may send: SETTINGS_MAX_FRAME_SIZE, which the Workload API
/// server leaves at its default (RFC 9113 §4.2).
pub const MAX_FRAME: usize = 16_384;

/// Frame type HEADERS.
pub const HEADERS: u8 = 0x1;
/// Frame type SETTINGS.
pub const SETTINGS: u8 = 0x4;
/// Frame type GOAWAY.
pub const GOAWAY: u8 = 0x7;
/// Frame type CONTINUATION.
pub const CONTINUATION: u8 = 0x9;

/// Flag END_STREAM (HEADERS, DATA).
pub const END_STREAM: u8 = 0x1;
/// Flag END_HEADERS (HEADERS, CONTINUATION).
pub const END_HEADERS: u8 = 0x4;
/// Flag PADDED (HEADERS, DATA).
pub const PADDED: u8 = 0x8;
/// Flag PRIORITY (HEADERS).
pub const PRIORITY: u8 = 0x20;

/// Writes one frame to `out`. The payload must fit the 24-bit length field; every frame this
/// crate writes is bounded by [`MAX_FRAME`].
pub fn write_frame(out: &mut impl BufMut, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
    let length = payload.len();
    out.put_u8(((length >> 16) & 0xff) as u8);
    out.put_u8(((length >> 8) & 0xff) as u8);
    out.put_u8((length & 0xff) as u8);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream_id);
    out.put_slice(payload);
}

/// One frame, as bytes.
pub fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    write_frame(&mut out, kind, flags, stream_id, payload);
    out
}
