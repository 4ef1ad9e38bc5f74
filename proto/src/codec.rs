//! The protobuf codec every generated service and client uses: prost's, with small starting
//! buffers.
//!
//! tonic gives each streaming call an encode buffer (and each streamed response a decode buffer)
//! of 8 KiB up front, kept as long as the stream is open. A server with 10 000 agents each holding
//! a sync stream, or an agent with 1 000 workloads each following their SVIDs, spends most of that
//! on messages of a few hundred bytes. These buffers start at 1 KiB and grow as a message needs
//! (a 1 MiB sync page grows them like any other), so the only change is what an idle stream holds.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
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
