//! Stream wrappers' plumbing: the `AsyncWrite` methods a wrapper passes to the stream it wraps.

/// Implements the named `tokio::io::AsyncWrite` methods of a wrapper by passing each to the
/// stream in its field `$inner` (which must be `Unpin`), inside the wrapper's `impl AsyncWrite`:
///
/// ```ignore
/// impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
///     sigil_core::pass_writes_to!(inner: poll_write, poll_write_vectored, is_write_vectored,
///         poll_flush, poll_shutdown);
/// }
/// ```
///
/// A wrapper that does something of its own on a write or a shutdown (counting bytes, sending a
/// last frame) writes that method itself and names the rest here, so what it adds stands out.
#[macro_export]
macro_rules! pass_writes_to {
    ($inner:ident: $($method:ident),+ $(,)?) => {
        $($crate::pass_writes_to!(@ $inner, $method);)+
    };
    (@ $inner:ident, poll_write) => {
        fn poll_write(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            buf: &[u8],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.$inner).poll_write(cx, buf)
        }
    };
    (@ $inner:ident, poll_write_vectored) => {
        fn poll_write_vectored(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            bufs: &[::std::io::IoSlice<'_>],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.$inner).poll_write_vectored(cx, bufs)
        }
    };
    (@ $inner:ident, is_write_vectored) => {
        fn is_write_vectored(&self) -> bool {
            self.$inner.is_write_vectored()
        }
    };
    // poll_flush and poll_shutdown: both take only the context.
    (@ $inner:ident, $method:ident) => {
        fn $method(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut self.$inner).$method(cx)
        }
    };
}
