//! The protobuf codecs of the generated services and clients: prost's with small starting
//! buffers ([`LeanCodec`]), and for the Workload API's streams one that sends responses encoded
//! beforehand ([`SharedCodec`]).
//!
//! tonic gives each streaming call an encode buffer (and each streamed response a decode buffer)
//! of 8 KiB up front, kept as long as the stream is open. A server with 10 000 agents each holding
//! a sync stream, or an agent with 1 000 workloads each following their SVIDs, spends most of that
//! on messages of a few hundred bytes. These buffers start at 1 KiB and grow as a message needs
//! (a 1 MiB sync page grows them like any other), so the only change is what an idle stream holds.

use std::marker::PhantomData;

use bytes::{BufMut, Bytes};
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The starting size of each stream's encode and decode buffer.
const START_BUFFER: usize = 1024;

/// How much encoded data a stream gathers before it hands it to HTTP/2 (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost's codec with 1 KiB starting buffers (named in `build.rs` as the codec of every
/// generated service and client).
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(START_BUFFER, YIELD_THRESHOLD)
}

/// A protobuf message encoded once, to be sent by any number of streams: an agent with many
/// streams of one workload identity encodes that identity's response once per change, and each
/// stream holds these shared bytes instead of a message of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded(Bytes);

impl Encoded {
    /// Encodes `message`.
    pub fn new(message: &impl Message) -> Self {
        Encoded(Bytes::from(message.encode_to_vec()))
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The codec of a service whose responses are [`Encoded`] beforehand and whose requests are the
/// protobuf messages `U` (named in `build.rs` for the Workload API's streams).
#[derive(Debug, Clone)]
pub struct SharedCodec<U>(PhantomData<U>);

impl<U> Default for SharedCodec<U> {
    fn default() -> Self {
        SharedCodec(PhantomData)
    }
}

impl<U> Codec for SharedCodec<U>
where
    U: Message + Default + Send + 'static,
{
    type Encode = Encoded;
    type Decode = U;
    type Encoder = SharedEncoder;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SharedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}

/// Copies [`Encoded`] bytes into the stream's frame: the only work per stream.
#[derive(Debug)]
pub struct SharedEncoder;

impl Encoder for SharedEncoder {
    type Item = Encoded;
    type Error = Status;

    fn encode(&mut self, item: Encoded, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(item.as_bytes());
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_bytes_decode_as_the_message() {
        let message = crate::workload::X509BundlesResponse {
            crl: vec![b"crl".to_vec()],
            bundles: [("spiffe://example.org".to_owned(), b"der".to_vec())].into(),
        };
        let encoded = Encoded::new(&message);
        let decoded = crate::workload::X509BundlesResponse::decode(encoded.as_bytes())
            .expect("the bytes are the message");
        assert_eq!(decoded, message);
    }
}
