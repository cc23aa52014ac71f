//! TCP listener with a cap on open connections, an idle timeout and a header deadline per
//! connection.
//!
//! The origin relies on 300 s read/write/idle timeouts. Here:
//! * at most `max_connections` are open at once: beyond that, new connections wait in the
//!   kernel backlog until one closes;
//! * a connection that has not moved a byte for `idle` is closed (a keep-alive connection waiting
//!   for its next request follows only this rule);
//! * a new connection's first request must have its headers complete within `header_timeout`
//!   of the connection opening (a client that connects and sends nothing holds a slot that
//!   long, not `idle`); later requests within `header_timeout` of their first byte, or the
//!   connection is closed: a client that drips one byte at a time no longer keeps a connection
//!   alive by resetting the idle timer. (The body has its own deadline,
//!   `server::middleware::read_body`.)
//!
//! Why not hyper's `header_read_timeout`: hyper starts that timer as soon as it waits for the
//! next request, so it also closes idle keep-alive connections after the same time
//! (hyperium/hyper#3828), and `axum::serve` installs no timer for it anyway. Here the I/O wrapper
//! starts the header clock at the first byte read while no request is being served, and the
//! server's outermost middleware tells the connection when hyper has handed it a request (its
//! headers are complete), through the `ConnHandle` it gets as connect info. No HTTP is parsed here.
//!
//! TCP_NODELAY is set on each connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Connections closed by the listener's own deadlines.
#[derive(Default)]
pub struct ConnCounters {
    pub idle_closed: AtomicU64,
    pub header_timeouts: AtomicU64,
}

/// What the metrics read of a listener: its deadline counters and how many connections are open.
pub struct Connections {
    pub counters: Arc<ConnCounters>,
    /// Free connection slots.
    pub free: Arc<Semaphore>,
    pub max: usize,
}

impl Connections {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max.saturating_sub(self.free.available_permits())
    }
}

pub struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    max_connections: usize,
    idle: Duration,
    header_timeout: Duration,
    counters: Arc<ConnCounters>,
}

impl BoundedListener {
    pub fn new(
        inner: TcpListener,
        max_connections: usize,
        idle: Duration,
        header_timeout: Duration,
    ) -> Self {
        let max_connections = max_connections.max(1);
        BoundedListener {
            inner,
            permits: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            idle,
            header_timeout,
            counters: Arc::default(),
        }
    }

    /// Free connection slots (the semaphore); `max_connections` minus this is the number open.
    pub fn open_connections(&self) -> Arc<Semaphore> {
        self.permits.clone()
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    pub fn counters(&self) -> Arc<ConnCounters> {
        self.counters.clone()
    }

    /// The counters and free slots, for the metrics.
    pub fn connections(&self) -> Connections {
        Connections {
            counters: self.counters(),
            free: self.open_connections(),
            max: self.max_connections(),
        }
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = BoundedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed, so acquiring cannot fail; fall back to no permit.
        let permit = self.permits.clone().acquire_owned().await.ok();
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        if let Err(e) = io.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        // A new connection's first request is due like any other: a client that connects and
        // sends nothing holds its slot for `header_timeout`, not for the idle timeout.
        let now = Instant::now();
        let first_due = now + self.header_timeout;
        let deadline = Box::pin(tokio::time::sleep_until(first_due.min(now + self.idle)));
        (
            BoundedIo {
                io,
                _permit: permit,
                idle: self.idle,
                header_timeout: self.header_timeout,
                last_active: now,
                deadline,
                header_due: Some((first_due, 0)),
                conn: ConnHandle::default(),
                counters: self.counters.clone(),
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[derive(Default)]
struct ConnShared {
    /// A request of this connection is being served (its headers are complete).
    in_request: AtomicBool,
    /// Requests handed to the service so far.
    dispatched: AtomicU64,
}

/// Shared by a connection's I/O and the requests served on it. The server gets it as connect
/// info (`Router::into_make_service_with_connect_info::<ConnHandle>`).
#[derive(Clone, Default)]
pub struct ConnHandle(Arc<ConnShared>);

impl ConnHandle {
    /// A request reached the service: its headers are complete, so the header clock stops.
    /// The request counts as served until the guard is dropped.
    pub fn request_started(&self) -> RequestGuard {
        self.0.dispatched.fetch_add(1, Ordering::AcqRel);
        self.0.in_request.store(true, Ordering::Release);
        RequestGuard(self.clone())
    }

    fn dispatched(&self) -> u64 {
        self.0.dispatched.load(Ordering::Acquire)
    }

    fn in_request(&self) -> bool {
        self.0.in_request.load(Ordering::Acquire)
    }
}

pub struct RequestGuard(ConnHandle);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        (self.0).0.in_request.store(false, Ordering::Release);
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, BoundedListener>>
    for ConnHandle
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, BoundedListener>) -> Self {
        stream.io().conn.clone()
    }
}

pub struct BoundedIo {
    io: TcpStream,
    _permit: Option<OwnedSemaphorePermit>,
    idle: Duration,
    header_timeout: Duration,
    last_active: Instant,
    /// Fires at the earliest deadline (idle or header); re-armed lazily when it fires.
    deadline: Pin<Box<Sleep>>,
    /// The headers of the request being received are due then; armed when
    /// `conn.dispatched()` had the value kept here (a later dispatch makes it stale).
    header_due: Option<(Instant, u64)>,
    conn: ConnHandle,
    counters: Arc<ConnCounters>,
}

impl BoundedIo {
    pub fn handle(&self) -> ConnHandle {
        self.conn.clone()
    }

    /// Record activity. The timer is only re-armed when it fires, to keep the I/O path cheap.
    fn touch(&mut self) -> Instant {
        self.last_active = Instant::now();
        self.last_active
    }

    /// Bytes arrived: if no request is being served and none is being timed, they are the start
    /// of a request, and its headers are due `header_timeout` from now.
    fn bytes_read(&mut self, now: Instant) {
        let dispatched = self.conn.dispatched();
        if self.header_due.is_some_and(|(_, d)| d != dispatched) {
            self.header_due = None; // that request reached the service
        }
        if self.header_due.is_none() && !self.conn.in_request() {
            let due = now + self.header_timeout;
            self.header_due = Some((due, dispatched));
            if due < self.deadline.deadline() {
                self.deadline.as_mut().reset(due);
            }
        }
    }

    fn check_deadlines(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            match self.deadline.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    let now = Instant::now();
                    if self
                        .header_due
                        .is_some_and(|(_, d)| d != self.conn.dispatched())
                    {
                        self.header_due = None;
                    }
                    if let Some((due, _)) = self.header_due {
                        if due <= now {
                            self.counters
                                .header_timeouts
                                .fetch_add(1, Ordering::Relaxed);
                            return Poll::Ready(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "request header timeout",
                            ));
                        }
                    }
                    let idle_due = self.last_active + self.idle;
                    if idle_due <= now {
                        self.counters.idle_closed.fetch_add(1, Ordering::Relaxed);
                        return Poll::Ready(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "connection idle timeout",
                        ));
                    }
                    let next = self
                        .header_due
                        .map_or(idle_due, |(due, _)| due.min(idle_due));
                    self.deadline.as_mut().reset(next);
                }
            }
        }
    }
}

impl AsyncRead for BoundedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                let now = this.touch();
                if r.is_ok() && buf.filled().len() > before {
                    this.bytes_read(now);
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.check_deadlines(cx).map(Err),
        }
    }
}

impl AsyncWrite for BoundedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.touch();
                Poll::Ready(r)
            }
            Poll::Pending => this.check_deadlines(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.touch();
                Poll::Ready(r)
            }
            Poll::Pending => this.check_deadlines(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn caps_connections_and_closes_idle_ones() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut l =
            BoundedListener::new(tcp, 1, Duration::from_millis(200), Duration::from_secs(60));
        let sem = l.open_connections();
        let mut c1 = TcpStream::connect(addr).await.unwrap();
        let (mut s1, _) = l.accept().await;
        assert_eq!(sem.available_permits(), 0);
        // A second connection is not accepted while the first is open.
        let _c2 = TcpStream::connect(addr).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(100), l.accept())
            .await
            .is_err());
        // Traffic keeps the first alive; silence closes it with TimedOut.
        c1.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s1.read_exact(&mut b).await.unwrap();
        let err = s1.read(&mut b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(s1);
        // Its slot is free again: the waiting connection is accepted.
        let accepted = tokio::time::timeout(Duration::from_secs(2), l.accept()).await;
        assert!(accepted.is_ok());
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_at_the_header_deadline() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut l =
            BoundedListener::new(tcp, 4, Duration::from_secs(30), Duration::from_millis(300));
        let counters = l.counters();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (mut s, _) = l.accept().await;
        let started = Instant::now();
        let mut b = [0u8; 16];
        let got = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("closed before the idle timeout");
        assert!(got.is_err(), "{got:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(counters.header_timeouts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn header_deadline_runs_from_the_first_byte_until_the_request_is_served() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut l =
            BoundedListener::new(tcp, 4, Duration::from_secs(30), Duration::from_millis(300));
        let counters = l.counters();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let (mut s, _) = l.accept().await;
        let conn = s.handle();
        let mut b = [0u8; 16];
        // The first request's headers are due `header_timeout` after the connection opened.
        c.write_all(b"a").await.unwrap();
        s.read_exact(&mut b[..1]).await.unwrap();
        drop(conn.request_started()); // headers complete, request served
                                      // A request is served (its headers arrived in time), then the connection idles for
                                      // longer than the header deadline: still open.
        c.write_all(b"a").await.unwrap();
        s.read_exact(&mut b[..1]).await.unwrap();
        drop(conn.request_started()); // headers complete, request served
        assert!(
            tokio::time::timeout(Duration::from_millis(500), s.read(&mut b))
                .await
                .is_err()
        );
        // Bytes during a request (its body) do not start the header clock.
        let serving = conn.request_started();
        for _ in 0..5 {
            c.write_all(b"b").await.unwrap();
            s.read_exact(&mut b[..1]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(serving);
        // The next request drips: cut off 300 ms after its first byte although bytes keep
        // coming.
        let start = tokio::time::Instant::now();
        let err = loop {
            c.write_all(b"c").await.unwrap();
            match s.read(&mut b).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => break e,
            }
            assert!(start.elapsed() < Duration::from_secs(2), "never cut off");
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert_eq!(counters.header_timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(counters.idle_closed.load(Ordering::Relaxed), 0);
    }
}
