//! Connection handling: accept loops, STRICT / PERMISSIVE / DISABLE on the first bytes, TLS
//! termination and origination, byte counting, and the connect, handshake and idle timeouts.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rustls_pki_types::ServerName;
use sigil_core::id::SpiffeId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{Inbound, Limits, Mode, Outbound};
use crate::http::HttpProxy;
use crate::metrics::{BytesLabels, ConnectionLabels, ListenerLabels, Metrics};

/// The first bytes of a TLS connection: a handshake record (0x16) of TLS 1.x (0x03).
const CLIENT_HELLO: [u8; 2] = [0x16, 0x03];

/// What every connection shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) limits: Limits,
    /// One permit per open connection, over all listeners.
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// An inbound listener, ready to serve.
pub(crate) struct InboundListener {
    pub(crate) spec: Inbound,
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) http: Option<Arc<HttpProxy>>,
}

/// An outbound listener, ready to serve.
pub(crate) struct OutboundListener {
    pub(crate) spec: Outbound,
    pub(crate) connector: TlsConnector,
    pub(crate) server_name: ServerName<'static>,
}

/// A listener of either direction, as the accept loop sees it.
pub(crate) enum Side {
    /// mTLS (or plaintext) in, to the local application.
    Inbound(Arc<InboundListener>),
    /// Plaintext in from the local application, mTLS out.
    Outbound(Arc<OutboundListener>),
}

impl Side {
    /// The listener's name in logs and metrics.
    fn name(&self) -> &str {
        match self {
            Side::Inbound(inbound) => &inbound.spec.name,
            Side::Outbound(outbound) => &outbound.spec.name,
        }
    }
}

/// Accepts until shutdown; each connection runs in its own task holding a permit. Each direction
/// spawns its own handler: one future for both would be as large as the larger (the inbound one,
/// with TLS accept and HTTP) in every connection's task.
pub(crate) async fn serve(listener: TcpListener, side: Side, shared: Arc<Shared>) {
    while let Some((tcp, remote, permit)) = accept(&listener, side.name(), &shared).await {
        let open = Open::new(&shared.metrics, side.name(), permit);
        let shared = shared.clone();
        match &side {
            Side::Inbound(l) => tokio::spawn(handle_inbound(tcp, remote, l.clone(), shared, open)),
            Side::Outbound(l) => {
                tokio::spawn(handle_outbound(tcp, remote, l.clone(), shared, open))
            }
        };
    }
}

/// The next connection with a permit, or `None` at shutdown. Connections over the limit are
/// closed at once and counted.
async fn accept(
    listener: &TcpListener,
    name: &str,
    shared: &Shared,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return None,
        };
        let (tcp, remote) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: pause briefly instead of spinning.
                tracing::warn!(listener = name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match shared.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                // Small writes (handshakes, request/response) should not wait for Nagle.
                let _ = tcp.set_nodelay(true);
                return Some((tcp, remote, permit));
            }
            Err(_) => {
                tracing::warn!(
                    listener = name,
                    %remote,
                    "refused a connection: {} connections are open, the maximum",
                    shared.limits.max_connections
                );
                shared.metrics.refuse(name, "max_connections");
            }
        }
    }
}

/// An open connection: its permit and its place in the active gauge.
struct Open {
    gauge: prometheus_client::metrics::gauge::Gauge,
    _permit: OwnedSemaphorePermit,
}

impl Open {
    fn new(metrics: &Metrics, listener: &str, permit: OwnedSemaphorePermit) -> Self {
        let gauge = metrics
            .active_connections
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .clone();
        gauge.inc();
        Open {
            gauge,
            _permit: permit,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

async fn handle_inbound(
    mut tcp: TcpStream,
    remote: SocketAddr,
    inbound: Arc<InboundListener>,
    shared: Arc<Shared>,
    _open: Open,
) {
    let (inbound, shared) = (&*inbound, &*shared);
    let name = inbound.spec.name.as_str();
    if inbound.spec.mode == Mode::Disable {
        forward(Prefixed::new(Vec::new(), tcp), None, inbound, shared).await;
        return;
    }
    let started = Instant::now();
    let deadline = started + shared.limits.handshake_timeout;
    let prefix = match tokio::time::timeout_at(deadline, read_prefix(&mut tcp)).await {
        Ok(Ok(prefix)) => prefix,
        Ok(Err(e)) => {
            tracing::debug!(listener = name, %remote, "closed before sending anything: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!(listener = name, %remote, "refused a client that sent nothing within the handshake timeout");
            shared.metrics.refuse(name, "handshake_timeout");
            return;
        }
    };
    let is_tls = prefix == CLIENT_HELLO;
    let stream = Prefixed::new(prefix, tcp);
    if !is_tls {
        if inbound.spec.mode == Mode::Strict {
            tracing::warn!(listener = name, %remote, "refused a plaintext client: the listener is in strict mode (mTLS only)");
            shared.metrics.refuse(name, "plaintext");
        } else {
            tracing::debug!(listener = name, %remote, "plaintext client passes (permissive), unauthenticated");
            forward(stream, None, inbound, shared).await;
        }
        return;
    }
    let tls = match tokio::time::timeout_at(deadline, inbound.acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            shared.metrics.handshake(name, false, 0.0);
            // Certificate refusals were counted and logged by the verifier already.
            if !is_certificate_error(&e) {
                tracing::info!(listener = name, %remote, "TLS handshake failed: {e}");
                shared.metrics.refuse(name, "handshake_failed");
            }
            return;
        }
        Err(_) => {
            shared.metrics.handshake(name, false, 0.0);
            tracing::warn!(listener = name, %remote, "refused a client that did not finish its TLS handshake within {:?}", shared.limits.handshake_timeout);
            shared.metrics.refuse(name, "handshake_timeout");
            return;
        }
    };
    shared
        .metrics
        .handshake(name, true, started.elapsed().as_secs_f64());
    // The verifier accepted exactly this certificate, so it is an SVID with one ID.
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| sigil_core::x509::check_leaf_profile(leaf).ok());
    tracing::debug!(listener = name, %remote, peer = ?peer.as_ref().map(ToString::to_string), "mTLS peer accepted");
    forward(tls, peer, inbound, shared).await;
}

/// Hands an accepted (and, with `peer`, authenticated) stream to the target: as HTTP in HTTP
/// mode, as bytes otherwise.
async fn forward<S>(stream: S, peer: Option<SpiffeId>, inbound: &InboundListener, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let name = inbound.spec.name.as_str();
    shared
        .metrics
        .connections
        .get_or_create(&ConnectionLabels {
            listener: name.to_string(),
            security: if peer.is_some() { "mtls" } else { "plaintext" },
        })
        .inc();
    let activity = Arc::new(Activity::new());
    let stream = metered(stream, shared, name, &activity);
    if let Some(proxy) = &inbound.http {
        tokio::select! {
            () = crate::http::serve(stream, peer, proxy.clone(), shared.shutdown.clone()) => {}
            () = activity.idle(shared.limits.idle_timeout) => {
                tracing::debug!(listener = name, "closing an idle HTTP connection");
            }
        }
        return;
    }
    let Some(target) = connect(&inbound.spec.target, name, shared).await else {
        return;
    };
    pipe(stream, target, name, shared, &activity).await;
}

async fn handle_outbound(
    tcp: TcpStream,
    remote: SocketAddr,
    outbound: Arc<OutboundListener>,
    shared: Arc<Shared>,
    _open: Open,
) {
    let (outbound, shared) = (&*outbound, &*shared);
    let name = outbound.spec.name.as_str();
    let Some(upstream) = connect(&outbound.spec.upstream, name, shared).await else {
        return;
    };
    let started = Instant::now();
    let handshake = outbound
        .connector
        .connect(outbound.server_name.clone(), upstream);
    let tls = match tokio::time::timeout(shared.limits.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            shared.metrics.handshake(name, false, 0.0);
            if !is_certificate_error(&e) {
                tracing::warn!(listener = name, %remote, upstream = %outbound.spec.upstream, "TLS handshake with the upstream failed: {e}");
                shared.metrics.refuse(name, "handshake_failed");
            }
            return;
        }
        Err(_) => {
            shared.metrics.handshake(name, false, 0.0);
            tracing::warn!(listener = name, upstream = %outbound.spec.upstream, "the upstream did not finish the TLS handshake within {:?}", shared.limits.handshake_timeout);
            shared.metrics.refuse(name, "handshake_timeout");
            return;
        }
    };
    shared
        .metrics
        .handshake(name, true, started.elapsed().as_secs_f64());
    shared
        .metrics
        .connections
        .get_or_create(&ConnectionLabels {
            listener: name.to_string(),
            security: "mtls",
        })
        .inc();
    let activity = Arc::new(Activity::new());
    let client = metered(tcp, shared, name, &activity);
    pipe(client, tls, name, shared, &activity).await;
}

/// Connects to `address` within the connect timeout; logs and counts a failure.
async fn connect(address: &str, name: &str, shared: &Shared) -> Option<TcpStream> {
    match tokio::time::timeout(shared.limits.connect_timeout, TcpStream::connect(address)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Some(tcp)
        }
        Ok(Err(e)) => {
            tracing::warn!(listener = name, "cannot connect to {address}: {e}");
            shared.metrics.refuse(name, "connect_failed");
            None
        }
        Err(_) => {
            tracing::warn!(
                listener = name,
                "connecting to {address} took longer than {:?}",
                shared.limits.connect_timeout
            );
            shared.metrics.refuse(name, "connect_failed");
            None
        }
    }
}

/// Copy buffer per direction once data flows: several TLS records, so bulk transfers move in
/// fewer, larger reads and writes (one 16 KiB record per call was the bottleneck measured by
/// `bench-forwarder`).
const COPY_BUFFER: usize = 64 * 1024;
/// What an idle connection holds while it waits for its first bytes, per direction: the large
/// copy buffers are allocated only once something arrives.
const FIRST_READ: usize = 2 * 1024;

/// Copies both ways until both sides are done, or nothing moved for the idle timeout.
async fn pipe<A, B>(
    mut client: Metered<A>,
    mut upstream: B,
    name: &str,
    shared: &Shared,
    activity: &Arc<Activity>,
) where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let copy = async {
        // The first bytes, whichever side sends them, go through a small buffer; both reads are
        // cancel-safe, so the side that loses the race keeps its data for the copy below.
        let mut from_client = [0u8; FIRST_READ];
        let mut from_upstream = [0u8; FIRST_READ];
        let first = tokio::select! {
            read = client.read(&mut from_client) => match read {
                Ok(0) => Ok(()),
                Ok(n) => upstream.write_all(&from_client[..n]).await,
                Err(e) => Err(e),
            },
            read = upstream.read(&mut from_upstream) => match read {
                Ok(0) => Ok(()),
                Ok(n) => client.write_all(&from_upstream[..n]).await,
                Err(e) => Err(e),
            },
        };
        first?;
        tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut upstream,
            COPY_BUFFER,
            COPY_BUFFER,
        )
        .await
        .map(|_| ())
    };
    tokio::select! {
        result = copy => {
            if let Err(e) = result {
                tracing::debug!(listener = name, "connection ended: {e}");
            }
        }
        () = activity.idle(shared.limits.idle_timeout) => {
            tracing::debug!(listener = name, "closing a connection idle for {:?}", shared.limits.idle_timeout);
        }
    }
}

/// Reads the first byte, and the second when the first may start a TLS record.
async fn read_prefix(tcp: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut prefix = vec![tcp.read_u8().await?];
    if prefix[0] == CLIENT_HELLO[0] {
        prefix.push(tcp.read_u8().await?);
    }
    Ok(prefix)
}

fn is_certificate_error(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)))
}

/// When a connection last moved a byte, for the idle timeout.
#[derive(Debug)]
struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.origin + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Wraps the accepted side of a connection: what it reads is `received`, what it writes `sent`.
fn metered<S>(inner: S, shared: &Shared, listener: &str, activity: &Arc<Activity>) -> Metered<S> {
    let counter = |direction| {
        shared
            .metrics
            .bytes
            .get_or_create(&BytesLabels {
                listener: listener.to_string(),
                direction,
            })
            .clone()
    };
    Metered {
        inner,
        received: counter("received"),
        sent: counter("sent"),
        activity: activity.clone(),
    }
}

/// A stream that counts the bytes through it and records activity either way (an HTTP response
/// streaming to a silent caller is not idle).
#[derive(Debug)]
pub(crate) struct Metered<S> {
    inner: S,
    received: Counter,
    sent: Counter,
    activity: Arc<Activity>,
}

impl<S> Metered<S> {
    fn wrote(&self, result: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = result
            && *n > 0
        {
            self.sent.inc_by(*n as u64);
            self.activity.touch();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            this.received.inc_by(read as u64);
            this.activity.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&result);
        result
    }

    sigil_core::pass_writes_to!(inner: is_write_vectored, poll_flush, poll_shutdown);
}

/// A stream that first replays the bytes already read from it (to tell TLS from plaintext).
#[derive(Debug)]
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    replayed: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            replayed: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.prefix.len() {
            let rest = &this.prefix[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    sigil_core::pass_writes_to!(
        inner: poll_write,
        poll_write_vectored,
        is_write_vectored,
        poll_flush,
        poll_shutdown,
    );
}
