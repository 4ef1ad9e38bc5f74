//! The async side of the rewriter: a connection wrapper that feeds a [`HeaderRewriter`] from the
//! socket, and on a refusal ends the HTTP/2 server's input and writes the GOAWAY.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{HeaderLimits, HeaderRewriter, Http2Code};
use crate::Error;
use crate::http2::{GOAWAY, write_frame};

/// A GOAWAY frame (RFC 9113 §6.8) with `reason` as its debug data.
fn goaway_frame(last_stream_id: u32, code: Http2Code, reason: &str) -> BytesMut {
    let mut payload = Vec::with_capacity(8 + reason.len());
    payload.extend_from_slice(&last_stream_id.to_be_bytes());
    payload.extend_from_slice(&(code as u32).to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    let mut frame = BytesMut::new();
    write_frame(&mut frame, GOAWAY, 0, 0, &payload);
    frame
}

/// A connection whose incoming HTTP/2 requests get `:authority: localhost`, and that is refused
/// with a GOAWAY when its client breaks a rule or a bound. It carries `info` (for the Workload
/// API: the caller's process, held at accept; for the server's admin socket: nothing) as tonic's
/// connect info, so that one wrapper, not two, sits between the socket and the HTTP/2 server.
///
/// On a refusal the HTTP/2 server is handed what came before the offending frame and then the end
/// of its input; it flushes its queued frames and shuts the connection down, and the GOAWAY goes
/// out at that shutdown, after the server's last whole frame.
pub struct AuthorityRewrite<S, I> {
    inner: S,
    info: I,
    rewriter: HeaderRewriter,
    ready: BytesMut,
    /// The GOAWAY still to be written, once the connection is refused.
    goaway: Option<BytesMut>,
}

impl<S, I> std::fmt::Debug for AuthorityRewrite<S, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityRewrite")
            .field("rewriter", &self.rewriter)
            .finish_non_exhaustive()
    }
}

impl<S, I> AuthorityRewrite<S, I> {
    /// Wraps a freshly accepted connection, whose connect info is `info`.
    pub(crate) fn new(inner: S, info: I, limits: HeaderLimits) -> Self {
        AuthorityRewrite {
            inner,
            info,
            rewriter: HeaderRewriter::new(limits),
            ready: BytesMut::new(),
            goaway: None,
        }
    }
}

impl<S: AsyncRead + Unpin, I: Unpin> AsyncRead for AuthorityRewrite<S, I> {
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
            if this.goaway.is_some() {
                // Refused: the server reads the end of its input.
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut chunk_buf) {
                Poll::Ready(Ok(())) => {
                    let filled = chunk_buf.filled();
                    if filled.is_empty() {
                        // End of stream; an incomplete frame left behind is of no use to anyone.
                        return Poll::Ready(Ok(()));
                    }
                    if let Err(e) = this.rewriter.feed(filled, &mut this.ready) {
                        tracing::warn!(error = %e, "refused a Workload API connection");
                        if let Error::Http2 { code, reason } = &e {
                            this.goaway =
                                Some(goaway_frame(this.rewriter.last_stream_id(), *code, reason));
                        }
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin, I: Unpin> AsyncWrite for AuthorityRewrite<S, I> {
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // The server has flushed its last whole frame: the GOAWAY goes after it.
        while let Some(goaway) = this.goaway.as_mut().filter(|g| !g.is_empty()) {
            match Pin::new(&mut this.inner).poll_write(cx, goaway) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => goaway.clear(),
                Poll::Ready(Ok(n)) => goaway.advance(n),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    sigil_core::pass_writes_to!(
        inner: poll_write,
        poll_write_vectored,
        is_write_vectored,
        poll_flush,
    );
}

impl<S, I> tonic::transport::server::Connected for AuthorityRewrite<S, I>
where
    I: Clone + Send + Sync + 'static,
{
    type ConnectInfo = I;

    fn connect_info(&self) -> I {
        self.info.clone()
    }
}
