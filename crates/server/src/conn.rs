//! Connections of the REST and gRPC ports: a cap on how many are open, a bound on
//! how long a request's headers may take, and an idle timeout.
//!
//! Each port accepts at most `max_connections` at once: past that it stops accepting
//! (the kernel's backlog holds the rest) instead of holding a socket per client.
//! A connection on which nothing was read or written for `idle_timeout`, with no
//! request in flight, is closed. HTTP/1 headers must arrive within
//! `header_read_timeout` (hyper's timer, which also runs while a keep-alive
//! connection waits for its next request); a REST body may stall no longer than
//! that between frames and take no longer than `body_read_timeout` in all. HTTP/2
//! advertises a stream limit.
//!
//! A port with TLS ([`crate::tls`]) does the handshake in the connection's own
//! task, bounded by `header_read_timeout`, so a client that stalls its handshake
//! cannot hold the accept loop; the connection holds its slot from accept on, so
//! the cap counts connections mid-handshake as well. The gRPC port also takes
//! in-process connections ([`Io::Local`]): the REST task gateway's hop to the
//! orchestrator, which needs neither a socket nor the port's TLS.

use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::Router;
use futures::{Stream, StreamExt};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tower::ServiceExt;

/// Limits of one listening port; the defaults are the serve flags' defaults.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once on the port.
    pub max_connections: usize,
    /// Time an HTTP/1 client has to send a request's headers, and the longest
    /// stall while a request body is read (either protocol).
    pub header_read_timeout: Duration,
    /// Time a REST request body may take in all, however steadily it trickles.
    pub body_read_timeout: Duration,
    /// A connection with no request in flight and no bytes either way for this long
    /// is closed.
    pub idle_timeout: Duration,
    /// Streams one HTTP/2 connection may have open (REST over h2 and gRPC).
    pub http2_max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(120),
            http2_max_concurrent_streams: 128,
        }
    }
}

impl Limits {
    /// HTTP/2 keepalive pings: often enough that a live peer's connection is never
    /// idle for the idle timeout (a ping and its answer are traffic).
    pub fn ping_interval(&self) -> Duration {
        (self.idle_timeout / 3).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }
}

// === Activity ===

/// What the idle timer of one connection looks at.
struct Activity {
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last byte read or written.
    last: AtomicU64,
    /// Requests being answered (REST; gRPC connections rely on keepalive pings).
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// Counts a request on its connection while it is answered.
struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    fn new(a: Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestGuard(a)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// === Conn ===

/// An accepted socket that holds its port's connection permit and closes itself
/// when idle.
pub struct Conn<T> {
    io: T,
    /// The port's connection slot; in-process connections hold none.
    _permit: Option<OwnedSemaphorePermit>,
    activity: Arc<Activity>,
    timer: Pin<Box<Sleep>>,
    idle: Duration,
}

impl<T> Conn<T> {
    fn new(io: T, permit: Option<OwnedSemaphorePermit>, activity: Arc<Activity>, idle: Duration) -> Self {
        Conn {
            io,
            _permit: permit,
            activity,
            timer: Box::pin(tokio::time::sleep(idle)),
            idle,
        }
    }

    /// Ready with an error once the connection has been idle for the timeout; the
    /// timer is re-armed from the last activity otherwise.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let busy = self.activity.in_flight.load(Ordering::Relaxed) > 0;
            let since = now.saturating_duration_since(self.activity.last());
            if !busy && since >= self.idle {
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "connection idle"));
            }
            let next = if busy {
                now + self.idle
            } else {
                self.activity.last() + self.idle
            };
            self.timer.as_mut().reset(next);
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Conn<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut me.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    me.activity.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => match me.poll_idle(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Conn<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

// === Io ===

/// The byte stream under a connection: plain TCP, TLS over TCP, or in-process.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Local(DuplexStream),
}

impl Io {
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Io::Plain(s) => Some(s),
            Io::Tls(s) => Some(s.get_ref().0),
            Io::Local(_) => None,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Io::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Io::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Io::Local($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, data))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
            Io::Local(s) => s.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Conn<Io> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let tcp = self.io.tcp();
        tonic::transport::server::TcpConnectInfo {
            local_addr: tcp.and_then(|s| s.local_addr().ok()),
            remote_addr: tcp.and_then(|s| s.peer_addr().ok()),
        }
    }
}

// === Accepting ===

/// Waits for a free connection slot, then for a connection: at the cap the port
/// stops accepting.
async fn accept(listener: &TcpListener, slots: &Arc<Semaphore>) -> (TcpStream, OwnedSemaphorePermit) {
    let permit = slots
        .clone()
        .acquire_owned()
        .await
        .expect("the connection semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Nagle's algorithm would hold small frames back ~40 ms behind
                // delayed ACKs.
                let _ = stream.set_nodelay(true);
                return (stream, permit);
            }
            // Out of file descriptors, or a connection reset before it was
            // accepted: wait a moment rather than spin.
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The TLS handshake, when the port has TLS, within `timeout`. A failed one (a
/// plain-text client, an untrusted or missing client certificate, a stall) ends
/// that connection only.
async fn handshake(stream: TcpStream, tls: Option<&TlsAcceptor>, timeout: Duration) -> Option<Io> {
    let Some(tls) = tls else {
        return Some(Io::Plain(stream));
    };
    let peer = stream.peer_addr().ok();
    match tokio::time::timeout(timeout, tls.accept(stream)).await {
        Ok(Ok(s)) => Some(Io::Tls(Box::new(s))),
        Ok(Err(e)) => {
            tracing::debug!(?peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(?peer, "TLS handshake timed out");
            None
        }
    }
}

/// Handshakes finished but not yet taken by the gRPC server.
const HANDSHAKE_QUEUE: usize = 64;

/// The gRPC port's connections, for tonic's `serve_with_incoming_shutdown`: those
/// accepted on `listener` (after the TLS handshake, with `tls`), and in-process
/// ones sent on `local`. Accepting stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    local: mpsc::Receiver<DuplexStream>,
) -> impl Stream<Item = Result<Conn<Io>, Infallible>> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (tx, rx) = mpsc::channel::<Conn<Io>>(HANDSHAKE_QUEUE);
    tokio::spawn(async move {
        loop {
            let (stream, permit) = tokio::select! {
                accepted = accept(&listener, &slots) => accepted,
                () = tx.closed() => return,
            };
            let tx = tx.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                if let Some(io) = handshake(stream, tls.as_ref(), limits.header_read_timeout).await {
                    let conn = Conn::new(io, Some(permit), Activity::new(), limits.idle_timeout);
                    let _ = tx.send(conn).await;
                }
            });
        }
    });
    let local = tokio_stream::wrappers::ReceiverStream::new(local)
        .map(move |d| Conn::new(Io::Local(d), None, Activity::new(), limits.idle_timeout));
    futures::stream::select(tokio_stream::wrappers::ReceiverStream::new(rx), local)
        .map(Ok)
        .boxed()
}

/// Serves the REST router (or the metrics router) until `shutdown`, then lets open
/// connections finish.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .keep_alive_interval(limits.ping_interval());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    // A request body that stalls for the header-read timeout fails its request: the
    // request counts as in flight, which keeps the idle timer off its connection.
    // And one that trickles in slowly fails at the body deadline.
    let router = router
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            limits.header_read_timeout,
        ))
        .layer(tower_http::timeout::RequestBodyDeadlineLayer::new(
            limits.body_read_timeout,
        ));
    tokio::pin!(shutdown);
    loop {
        let (stream, permit) = tokio::select! {
            accepted = accept(&listener, &slots) => accepted,
            () = &mut shutdown => break,
        };
        let watcher = graceful.watcher();
        let router = router.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            // The peer address, for the audit log (as tonic gives it to gRPC requests).
            let peer = stream.peer_addr().ok();
            let Some(io) = handshake(stream, tls.as_ref(), limits.header_read_timeout).await else {
                return;
            };
            let activity = Activity::new();
            let io = TokioIo::new(Conn::new(io, Some(permit), activity.clone(), limits.idle_timeout));
            let service = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let guard = RequestGuard::new(activity.clone());
                let router = router.clone();
                let mut req = req.map(axum::body::Body::new);
                if let Some(peer) = peer {
                    req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                }
                async move {
                    let resp = router.oneshot(req).await;
                    drop(guard);
                    resp
                }
            });
            let conn = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
            // A client that resets or times out ends its own connection only.
            let _ = watcher.watch(conn.into_owned()).await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_come_well_inside_the_idle_timeout() {
        for (idle, ping) in [(120, 30), (9, 3), (2, 1), (600, 30)] {
            let l = Limits {
                idle_timeout: Duration::from_secs(idle),
                ..Limits::default()
            };
            assert_eq!(l.ping_interval(), Duration::from_secs(ping), "idle {idle}");
        }
    }
}
