//! TCP listener with a cap on open connections and an idle timeout per connection.
//!
//! The origin relies on 300 s read/write/idle timeouts. Here a connection that has not moved a
//! byte for `idle` is closed, and at most `max_connections` are open at once: beyond that,
//! new connections wait in the kernel backlog until one closes. TCP_NODELAY is set on each.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

pub struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    idle: Duration,
}

impl BoundedListener {
    pub fn new(inner: TcpListener, max_connections: usize, idle: Duration) -> Self {
        BoundedListener {
            inner,
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
            idle,
        }
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> Arc<Semaphore> {
        self.permits.clone()
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
        let deadline = Box::pin(tokio::time::sleep(self.idle));
        (
            BoundedIo {
                io,
                _permit: permit,
                idle: self.idle,
                last_active: Instant::now(),
                deadline,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

pub struct BoundedIo {
    io: TcpStream,
    _permit: Option<OwnedSemaphorePermit>,
    idle: Duration,
    last_active: Instant,
    deadline: Pin<Box<Sleep>>,
}

impl BoundedIo {
    /// Record activity. The timer is only re-armed when it fires, to keep the I/O path cheap.
    fn touch(&mut self) {
        self.last_active = Instant::now();
    }

    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            match self.deadline.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    let due = self.last_active + self.idle;
                    if due <= Instant::now() {
                        return Poll::Ready(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "connection idle timeout",
                        ));
                    }
                    self.deadline.as_mut().reset(due);
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
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.touch();
                Poll::Ready(r)
            }
            Poll::Pending => this.check_idle(cx).map(Err),
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
            Poll::Pending => this.check_idle(cx).map(Err),
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
            Poll::Pending => this.check_idle(cx).map(Err),
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
        let mut l = BoundedListener::new(tcp, 1, Duration::from_millis(200));
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
}
