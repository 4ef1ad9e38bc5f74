//! A bounded HPACK (RFC 7541) decoder for the header blocks Workload API clients send, and the
//! literal encoding the `:authority` rewriter passes them on in.
//!
//! Why not loona-hpack's decoder: it decodes a whole block before the caller can object, so a
//! block that references one large table entry thousands of times is expanded in full, and it
//! accepts a dynamic table size update to any size. This decoder hands each field to a callback
//! that can stop it at once, refuses table size updates above [`TABLE_SIZE`] (what our HTTP/2
//! server allows, RFC 9113 §6.5.2) or after the first field of a block (RFC 7541 §4.2), and keeps
//! at most [`TABLE_SIZE`] bytes of table. Only Huffman decoding is borrowed from loona-hpack.

use std::borrow::Cow;
use std::collections::VecDeque;

use loona_hpack::huffman::HuffmanDecoder;

use crate::Error;
use crate::authority::Http2Code;

/// The largest dynamic table a client may make us keep: the HTTP/2 default of
/// SETTINGS_HEADER_TABLE_SIZE, which the Workload API server never raises.
pub const TABLE_SIZE: usize = 4096;

/// What one table entry costs on top of its name and value (RFC 7541 §4.1); RFC 9113 §6.5.2
/// counts header list sizes the same way.
pub(crate) const ENTRY_OVERHEAD: usize = 32;

/// The static table (RFC 7541 Appendix A); index 1 is the first entry.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

fn compression_error(why: impl Into<String>) -> Error {
    Error::Http2 {
        code: Http2Code::CompressionError,
        reason: why.into(),
    }
}

/// One connection's HPACK decoding state: the dynamic table and its current size limit.
pub(crate) struct Decoder {
    /// Newest first, as HPACK indexes it.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
    /// Made on the first Huffman-coded string: building its lookup table is not free.
    huffman: Option<HuffmanDecoder>,
}

impl Decoder {
    pub(crate) fn new() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: TABLE_SIZE,
            huffman: None,
        }
    }

    /// Decodes one complete header block, handing every field to `field` in order; stops at the
    /// first error, `field`'s own included, so a refused field is the last one decoded.
    pub(crate) fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut rest = block;
        let mut fields_seen = false;
        while let Some(&first) = rest.first() {
            if first & 0x80 != 0 {
                let (index, used) = integer(rest, 7)?;
                rest = &rest[used..];
                let (name, value) = self.entry(index)?;
                field(name, value)?;
                fields_seen = true;
            } else if first & 0xe0 == 0x20 {
                if fields_seen {
                    return Err(compression_error(
                        "a dynamic table size update came after a header field; it must open the header block (RFC 7541 §4.2)",
                    ));
                }
                let (size, used) = integer(rest, 5)?;
                rest = &rest[used..];
                self.resize(size)?;
            } else {
                // Literals: with incremental indexing (01), never indexed (0001), without indexing
                // (0000); the name is a table index or, with index 0, a string of its own.
                let indexed = first & 0xc0 == 0x40;
                let (index, used) = integer(rest, if indexed { 6 } else { 4 })?;
                rest = &rest[used..];
                let name: Cow<'_, [u8]> = if index == 0 {
                    let (name, used) = self.string(rest)?;
                    rest = &rest[used..];
                    name
                } else {
                    Cow::Owned(self.entry(index)?.0.to_vec())
                };
                let (value, used) = self.string(rest)?;
                rest = &rest[used..];
                field(&name, &value)?;
                fields_seen = true;
                if indexed {
                    self.insert(name.into_owned(), value.into_owned());
                }
            }
        }
        Ok(())
    }

    /// The field at `index` of the static table followed by the dynamic one (RFC 7541 §2.3.3).
    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), Error> {
        if let Some((name, value)) = index.checked_sub(1).and_then(|i| STATIC.get(i)) {
            return Ok((name.as_bytes(), value.as_bytes()));
        }
        index
            .checked_sub(STATIC.len() + 1)
            .and_then(|i| self.table.get(i))
            .map(|(name, value)| (name.as_slice(), value.as_slice()))
            .ok_or_else(|| {
                compression_error(format!(
                    "header field index {index} is not in the table (it holds {} entries)",
                    STATIC.len() + self.table.len()
                ))
            })
    }

    fn resize(&mut self, size: usize) -> Result<(), Error> {
        if size > TABLE_SIZE {
            return Err(compression_error(format!(
                "a dynamic table size update asked for {size} bytes; this server allows at most {TABLE_SIZE} (its SETTINGS_HEADER_TABLE_SIZE)"
            )));
        }
        self.max_size = size;
        self.evict_to(size);
        Ok(())
    }

    fn evict_to(&mut self, size: usize) {
        while self.size > size {
            let Some((name, value)) = self.table.pop_back() else {
                break;
            };
            self.size -= name.len() + value.len() + ENTRY_OVERHEAD;
        }
    }

    /// Adds a field to the table, evicting the oldest; one larger than the whole table empties it
    /// and is not kept (RFC 7541 §4.4).
    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let cost = name.len() + value.len() + ENTRY_OVERHEAD;
        if cost > self.max_size {
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - cost);
        self.size += cost;
        self.table.push_front((name, value));
    }

    /// A string literal (RFC 7541 §5.2) and the bytes it took.
    fn string<'b>(&mut self, buf: &'b [u8]) -> Result<(Cow<'b, [u8]>, usize), Error> {
        let huffman = buf.first().is_some_and(|b| b & 0x80 != 0);
        let (length, used) = integer(buf, 7)?;
        let raw = used
            .checked_add(length)
            .and_then(|end| buf.get(used..end))
            .ok_or_else(|| {
                compression_error(format!(
                    "a {length}-byte string runs past the end of the header block"
                ))
            })?;
        if !huffman {
            return Ok((Cow::Borrowed(raw), used + length));
        }
        let decoded = self
            .huffman
            .get_or_insert_with(HuffmanDecoder::new)
            .decode(raw)
            .map_err(|e| compression_error(format!("bad Huffman-coded string: {e}")))?;
        Ok((Cow::Owned(decoded), used + length))
    }
}

/// An integer with a `prefix_bits`-bit prefix (RFC 7541 §5.1) and the bytes it took. More than 5
/// continuation bytes (values of 2^35 and up) are refused: nothing real needs them, and a size
/// update's value must stay readable so its refusal can say what was asked for.
fn integer(buf: &[u8], prefix_bits: u32) -> Result<(usize, usize), Error> {
    let max = (1u64 << prefix_bits) - 1;
    let Some(&first) = buf.first() else {
        return Err(compression_error("the header block ends inside an integer"));
    };
    let mut value = u64::from(first) & max;
    if value < max {
        return Ok((value as usize, 1));
    }
    for (i, &byte) in buf[1..].iter().enumerate() {
        if i == 5 {
            return Err(compression_error(
                "an integer in the header block is longer than 5 continuation bytes",
            ));
        }
        value += u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let value = usize::try_from(value).map_err(|_| {
                compression_error(format!(
                    "the integer {value} in the header block is too large"
                ))
            })?;
            return Ok((value, i + 2));
        }
    }
    Err(compression_error("the header block ends inside an integer"))
}

/// An integer with a `prefix_bits`-bit prefix, `first` holding the representation's high bits.
pub fn encode_integer(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        // Below `max`, so it fits the prefix bits of one byte.
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
/// coded: it leaves the receiver's dynamic table untouched, so the HTTP/2 server needs no table
/// state from us.
pub(crate) fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_integer(out, 0x00, 7, name.len());
    out.extend_from_slice(name);
    encode_integer(out, 0x00, 7, value.len());
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(decoder: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, Error> {
        let mut fields = Vec::new();
        decoder.decode(block, |name, value| {
            fields.push((
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            ));
            Ok(())
        })?;
        Ok(fields)
    }

    fn code(result: Result<Vec<(String, String)>, Error>) -> Http2Code {
        match result {
            Err(Error::Http2 { code, .. }) => code,
            other => panic!("not an HTTP/2 error: {other:?}"),
        }
    }

    #[test]
    fn reads_what_another_encoder_wrote_across_blocks() {
        // loona-hpack's encoder indexes what it sends, so the second block refers to the table
        // the first one built.
        let mut encoder = loona_hpack::Encoder::new();
        let mut decoder = Decoder::new();
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b"workload.spiffe.io", b"true"),
        ];
        for _ in 0..2 {
            let block = encoder.encode(headers.iter().copied());
            let fields = decode_all(&mut decoder, &block).expect("decodes");
            assert_eq!(fields[1].1, "/SpiffeWorkloadAPI/FetchX509SVID");
            assert_eq!(fields[2], ("workload.spiffe.io".into(), "true".into()));
        }
    }

    #[test]
    fn decodes_the_rfc_huffman_example() {
        // RFC 7541 C.4.1: the first request of the Huffman-coded examples.
        let block = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ];
        let mut decoder = Decoder::new();
        let fields = decode_all(&mut decoder, &block).expect("decodes");
        assert_eq!(fields[3], (":authority".into(), "www.example.com".into()));
        // It was indexed: index 62 is now that field.
        let again = decode_all(&mut decoder, &[0xbe]).expect("decodes");
        assert_eq!(again[0].1, "www.example.com");
    }

    #[test]
    fn the_callback_stops_decoding_at_once() {
        let mut block = Vec::new();
        encode_literal(&mut block, b"a", b"1");
        block.extend(std::iter::repeat_n(0x82, 10_000));
        let mut seen = 0;
        let result = Decoder::new().decode(&block, |_, _| {
            seen += 1;
            if seen == 3 {
                Err(compression_error("enough"))
            } else {
                Ok(())
            }
        });
        assert!(result.is_err());
        assert_eq!(seen, 3, "no field after the refused one is decoded");
    }

    #[test]
    fn table_size_updates_are_bounded_and_only_open_a_block() {
        // 0x3f 0xe1 0x1f: a size update to 4096 (allowed); 0x3f 0xe2 0x1f: to 4097 (refused).
        assert!(decode_all(&mut Decoder::new(), &[0x3f, 0xe1, 0x1f, 0x82]).is_ok());
        assert_eq!(
            code(decode_all(&mut Decoder::new(), &[0x3f, 0xe2, 0x1f, 0x82])),
            Http2Code::CompressionError
        );
        assert_eq!(
            code(decode_all(&mut Decoder::new(), &[0x82, 0x20])),
            Http2Code::CompressionError
        );
    }

    #[test]
    fn the_table_never_holds_more_than_its_size() {
        let mut decoder = Decoder::new();
        for round in 0..20u8 {
            let mut block = vec![0x40, 0x01, b'n'];
            encode_integer(&mut block, 0, 7, 1000);
            block.extend(std::iter::repeat_n(round, 1000));
            decode_all(&mut decoder, &block).expect("decodes");
            assert!(decoder.size <= TABLE_SIZE, "{}", decoder.size);
        }
        assert_eq!(
            decoder.table.len(),
            3,
            "three 1033-byte entries fit 4096, four do not"
        );
        // A field larger than the table empties it (RFC 7541 §4.4).
        let mut block = vec![0x40, 0x01, b'n'];
        encode_integer(&mut block, 0, 7, 5000);
        block.extend(std::iter::repeat_n(b'x', 5000));
        decode_all(&mut decoder, &block).expect("decodes");
        assert!(decoder.table.is_empty());
        assert_eq!(
            code(decode_all(&mut decoder, &[0xbe])),
            Http2Code::CompressionError
        );
    }

    #[test]
    fn malformed_blocks_are_compression_errors() {
        for block in [
            &[0x80][..],             // index 0
            &[0xff, 0xff, 0xff][..], // integer runs out
            &[0xff, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01][..],
            &[0x00, 0x05, b'a'][..],       // string runs out
            &[0x00, 0x81, 0xff, 0x00][..], // bad Huffman padding
            &[0x7f, 0x00, 0x00, 0x00][..], // index past the table
            &[0x40, 0x01, b'a', 0x85][..], // Huffman value runs out
        ] {
            assert_eq!(
                code(decode_all(&mut Decoder::new(), block)),
                Http2Code::CompressionError,
                "{block:?}"
            );
        }
    }
}
