//! The resource-name bound of SDS requests, checked on the wire before a request is decoded.
//!
//! Decoding a protobuf message can cost far more memory than its bytes: 100 000 tiny
//! `initial_resource_versions` entries in a 4 MB request become some 30 MB of strings and hash
//! table, and refusing the request after decoding is too late. So the SDS service's request
//! bodies pass through [`BoundedBody`], which counts each gRPC message's repeated fields in place
//! (no allocation) and ends the body with `InvalidArgument` when one has more entries than the
//! bound, before tonic and prost decode the message.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use http_body::Frame;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// tonic's default limit on a decoded request message: a longer message is refused by tonic from
/// its length prefix alone, so it need not be held here to be counted.
const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// The length of a gRPC message prefix: a compression flag and a 32-bit length.
const PREFIX: usize = 5;

/// The repeated fields of `DiscoveryRequest` (FetchSecrets, StreamSecrets), by field number.
const SOTW_LISTS: &[(u64, &str)] = &[(3, "resource_names"), (7, "resource_locators")];
/// The repeated and map fields of `DeltaDiscoveryRequest`, by field number.
const DELTA_LISTS: &[(u64, &str)] = &[
    (3, "resource_names_subscribe"),
    (4, "resource_names_unsubscribe"),
    (5, "initial_resource_versions"),
    (8, "resource_locators_subscribe"),
    (9, "resource_locators_unsubscribe"),
];

/// The SDS service with every request body bounded (see the module documentation).
#[derive(Debug, Clone)]
pub struct BoundedRequests<S> {
    inner: S,
    max: usize,
}

impl<S> BoundedRequests<S> {
    pub(super) fn new(inner: S, max: usize) -> Self {
        BoundedRequests { inner, max }
    }
}

impl<S: NamedService> NamedService for BoundedRequests<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for BoundedRequests<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let lists = match request.uri().path().rsplit('/').next() {
            Some("DeltaSecrets") => DELTA_LISTS,
            _ => SOTW_LISTS,
        };
        let (parts, body) = request.into_parts();
        let body = Body::new(BoundedBody {
            inner: body,
            lists,
            max: self.max,
            pending: BytesMut::new(),
            checked: 0,
            unchecked: false,
        });
        self.inner.call(http::Request::from_parts(parts, body))
    }
}

/// A request body whose gRPC messages are passed on only once counted.
struct BoundedBody {
    inner: Body,
    lists: &'static [(u64, &'static str)],
    max: usize,
    /// Bytes received and not yet passed on; the first `checked` of them are counted.
    pending: BytesMut,
    checked: usize,
    /// Set after a message too long for tonic: it is refused there, so nothing more is counted.
    unchecked: bool,
}

impl BoundedBody {
    /// Counts every complete message in `pending`, moving `checked` past it.
    fn check(&mut self) -> Result<(), Status> {
        while !self.unchecked && self.pending.len() - self.checked >= PREFIX {
            let head = &self.pending[self.checked..];
            let length = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if length > MAX_MESSAGE {
                self.unchecked = true;
                break;
            }
            let Some(message) = head.get(PREFIX..PREFIX + length) else {
                break;
            };
            // A compressed message is refused by tonic (the server accepts none): not counted.
            if head[0] == 0
                && let Some((name, max)) = over_bound(message, self.lists, self.max)
            {
                return Err(Status::invalid_argument(format!(
                    "{name} has more than {max} entries; at most {max} are allowed (the agent's sds.max_resource_names)"
                )));
            }
            self.checked += PREFIX + length;
        }
        if self.unchecked {
            self.checked = self.pending.len();
        }
        Ok(())
    }
}

impl http_body::Body for BoundedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if this.checked > 0 {
                let ready = this.pending.split_to(this.checked).freeze();
                this.checked = 0;
                return Poll::Ready(Some(Ok(Frame::data(ready))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) => {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            this.pending.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                        if let Err(status) = this.check() {
                            this.pending = BytesMut::new();
                            return Poll::Ready(Some(Err(status)));
                        }
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Poll::Ready(Some(Err(status))) => return Poll::Ready(Some(Err(status))),
                Poll::Ready(None) if this.pending.is_empty() => return Poll::Ready(None),
                // The body ended inside a message: tonic reports the truncation.
                Poll::Ready(None) => {
                    let rest = this.pending.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The first of `lists` (top-level field numbers of a protobuf message) that occurs more than
/// `max` times in `message`, with `max`. A malformed message is left to prost to refuse.
fn over_bound(
    message: &[u8],
    lists: &[(u64, &'static str)],
    max: usize,
) -> Option<(&'static str, usize)> {
    let mut counts = [0usize; 8];
    let mut rest = message;
    while !rest.is_empty() {
        let key = varint(&mut rest)?;
        let (field, wire_type) = (key >> 3, key & 0x7);
        let skip = match wire_type {
            0 => varint(&mut rest).map(|_| 0)?,
            1 => 8,
            2 => usize::try_from(varint(&mut rest)?).ok()?,
            5 => 4,
            _ => return None,
        };
        rest = rest.get(skip..)?;
        if let Some(i) = lists.iter().position(|(number, _)| *number == field) {
            counts[i] += 1;
            if counts[i] > max {
                return Some((lists[i].1, max));
            }
        }
    }
    None
}

/// A protobuf varint taken off the front of `rest`.
fn varint(rest: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &byte) in rest.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *rest = &rest[i + 1..];
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
    use http_body_util::BodyExt;
    use prost::Message;

    use super::*;

    fn names(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("n{i}")).collect()
    }

    #[test]
    fn counts_each_list_of_an_encoded_request() {
        let request = DiscoveryRequest {
            version_info: "v".repeat(300),
            resource_names: names(3),
            ..DiscoveryRequest::default()
        }
        .encode_to_vec();
        assert_longest_list(&request, SOTW_LISTS, ("resource_names", 3));
        let delta = DeltaDiscoveryRequest {
            resource_names_subscribe: names(2),
            initial_resource_versions: names(5).into_iter().map(|n| (n, "v".into())).collect(),
            ..DeltaDiscoveryRequest::default()
        }
        .encode_to_vec();
        assert_longest_list(&delta, DELTA_LISTS, ("initial_resource_versions", 5));
        // Truncated or malformed: prost's to refuse.
        assert_eq!(over_bound(&delta[..delta.len() - 1], DELTA_LISTS, 5), None);
        assert_eq!(over_bound(&[0x0b], DELTA_LISTS, 0), None);
        assert_eq!(over_bound(&[0x1a, 0xff], DELTA_LISTS, 0), None);
    }

    /// `encoded` passes a bound of `len` and, at one less, is refused naming `list`.
    fn assert_longest_list(
        encoded: &[u8],
        lists: &[(u64, &'static str)],
        (list, len): (&str, usize),
    ) {
        assert_eq!(over_bound(encoded, lists, len), None);
        assert_eq!(over_bound(encoded, lists, len - 1), Some((list, len - 1)));
    }

    fn grpc_message(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    async fn through(
        lists: &'static [(u64, &'static str)],
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, Status> {
        let body = BoundedBody {
            inner: Body::new(http_body_util::Full::new(bytes::Bytes::from(bytes))),
            lists,
            max: 2,
            pending: BytesMut::new(),
            checked: 0,
            unchecked: false,
        };
        Ok(body.collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn messages_within_the_bound_pass_unchanged_and_others_end_the_body() {
        let asking_for = |count| {
            DiscoveryRequest {
                resource_names: names(count),
                ..DiscoveryRequest::default()
            }
            .encode_to_vec()
        };
        let within = asking_for(2);
        let mut two = grpc_message(&within);
        two.extend(grpc_message(&within));
        assert_eq!(through(SOTW_LISTS, two.clone()).await.expect("passes"), two);
        let over = asking_for(3);
        let mut then_over = grpc_message(&within);
        then_over.extend(grpc_message(&over));
        let status = through(SOTW_LISTS, then_over).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("at most 2")
                && status.message().contains("sds.max_resource_names"),
            "{status:?}"
        );
    }
}
