//! The HTTP server: poem's route tree served on hyper, with the connection limits that poem's
//! own `Server` lacks.
//!
//! poem's `Server` gives hyper no timer (so hyper's header-read timeout never applies), has no
//! connection cap, and retries a failed `accept` at once (a spin at the file-descriptor limit).
//! This loop keeps poem's endpoint and request types and adds:
//!
//! - **A connection cap** (`server.max_connections`). At the cap, the connection just
//!   accepted waits for a permit and nothing more is accepted, so new connections wait in the
//!   kernel's accept queue (refused by the kernel once that is full). Meanwhile every idle
//!   connection (no request in flight, none being received: an unused keep-alive connection,
//!   a client that connected and sent nothing) is closed, so idle clients cannot keep active
//!   ones out; connections with a request in progress are not touched.
//! - **A header-read timeout** (`server.header_read_timeout_ms`): a request's line and headers
//!   must arrive within this after its first byte.
//! - **An idle timeout** (`server.idle_timeout_s`): a connection with no request in flight and
//!   no bytes moving is closed after this (a keep-alive connection nobody uses, a client that
//!   connects and sends nothing, a client that stops reading its response).
//! - **No spin on `accept` errors**: out of file descriptors (or memory), the loop logs at most
//!   once a second and waits 100 ms before the next `accept`.
//!
//! The request body's own read timeout lives where bodies are read (`http::body`), since only
//! the route knows when it wants the body.
//!
//! Each connection's deadlines are kept in `Deadlines`, updated by the socket wrapper
//! (`Watched`) on the first byte of a request and by the service around each request; one
//! sleeping future per connection enforces them. No lock is shared between connections.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use poem::http::uri::Scheme;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Endpoint, EndpointExt, Request};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The connection limits (`[server]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// From a request's first byte to its last header byte.
    pub header_read_timeout: Duration,
    /// No request in flight and no bytes moving.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 512,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Serves `ep` on `listener` until `shutdown` resolves; then stops accepting, lets requests in
/// flight finish (keep-alive connections close after their current response) for up to
/// `grace`, and drops whatever is left.
pub async fn serve<E>(
    listener: TcpListener,
    ep: E,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> io::Result<()>
where
    E: Endpoint + 'static,
{
    let ep: Arc<dyn DynEndpoint> = Arc::new(ep.map_to_response());
    let local = listener.local_addr()?;
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let tracker = TaskTracker::new();
    let graceful = CancellationToken::new();
    let abort = CancellationToken::new();
    let mut last_accept_warning: Option<Instant> = None;
    tokio::pin!(shutdown);
    // Bumped when a connection waits for a permit: idle connections then close, so that
    // keep-alive connections nobody uses do not keep new clients out.
    let (reclaim, _) = tokio::sync::watch::channel(0u64);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    if is_resource_error(&e) {
                        let now = Instant::now();
                        if last_accept_warning
                            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
                        {
                            last_accept_warning = Some(now);
                            tracing::warn!(error = %e, "accept failed for lack of resources; retrying in 100 ms (raise LimitNOFILE or lower server.max_connections)");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    // Other errors (a connection reset before it was accepted) concern one
                    // connection only.
                    continue;
                }
            },
        };
        // At the cap: idle connections are asked to close, and this one (the only one held
        // beyond the cap) waits for a permit; nothing more is accepted meanwhile, so the
        // kernel's accept queue holds the rest.
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                reclaim.send_modify(|g| *g = g.wrapping_add(1));
                tokio::select! {
                    () = &mut shutdown => break,
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_closed) => break,
                    },
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            ep: ep.clone(),
            local,
            peer,
            limits,
            graceful: graceful.clone(),
            abort: abort.clone(),
            reclaim: reclaim.subscribe(),
        };
        tracker.spawn(async move {
            conn.serve(stream).await;
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    graceful.cancel();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            connections = tracker.len(),
            "connections still open after the shutdown timeout; closing them"
        );
        abort.cancel();
        tracker.wait().await;
    }
    Ok(())
}

/// `accept` errors that concern the process (file descriptors, memory), not one connection.
fn is_resource_error(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 (Linux).
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12)) || e.kind() == io::ErrorKind::OutOfMemory
}

/// The endpoint, type-erased so that one copy serves every connection.
trait DynEndpoint: Send + Sync {
    fn respond(&self, req: Request) -> Pin<Box<dyn Future<Output = poem::Response> + Send + '_>>;
}

impl<E: Endpoint<Output = poem::Response>> DynEndpoint for E {
    fn respond(&self, req: Request) -> Pin<Box<dyn Future<Output = poem::Response> + Send + '_>> {
        Box::pin(self.get_response(req))
    }
}

struct Connection {
    ep: Arc<dyn DynEndpoint>,
    local: SocketAddr,
    peer: SocketAddr,
    limits: ConnectionLimits,
    graceful: CancellationToken,
    abort: CancellationToken,
    /// Changes when the server is at its cap and a new connection waits.
    reclaim: tokio::sync::watch::Receiver<u64>,
}

impl Connection {
    async fn serve(mut self, stream: TcpStream) {
        let deadlines = Arc::new(Deadlines::new(self.limits));
        let io = TokioIo::new(Watched {
            inner: stream,
            deadlines: deadlines.clone(),
        });
        let service = {
            let (ep, deadlines) = (self.ep.clone(), deadlines.clone());
            let local = LocalAddr(poem::Addr::SocketAddr(self.local));
            let remote = RemoteAddr(poem::Addr::SocketAddr(self.peer));
            hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let in_flight = InFlight::begin(deadlines.clone());
                let ep = ep.clone();
                let req = Request::from((req, local.clone(), remote.clone(), Scheme::HTTP));
                async move {
                    let resp = ep.respond(req).await;
                    drop(in_flight);
                    Ok::<_, Infallible>(hyper::Response::from(resp))
                }
            })
        };
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let conn = builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(conn);
        let expired = deadlines.expired();
        tokio::pin!(expired);
        let mut reclaim_open = true;
        loop {
            tokio::select! {
                _ = conn.as_mut() => return,
                why = &mut expired => {
                    tracing::debug!(peer = %self.peer, reason = why, "closing connection");
                    return;
                }
                () = self.abort.cancelled() => return,
                () = self.graceful.cancelled() => break,
                r = self.reclaim.changed(), if reclaim_open => {
                    if r.is_err() {
                        reclaim_open = false;
                    } else if deadlines.is_idle() {
                        tracing::debug!(peer = %self.peer, "closing an idle connection: at the connection cap");
                        return;
                    }
                }
            }
        }
        // Shutting down: finish the request in flight, then close (still bounded by the
        // deadlines and by the shutdown timeout).
        conn.as_mut().graceful_shutdown();
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = &mut expired => {}
            () = self.abort.cancelled() => {}
        }
    }
}

/// One connection's clock: requests in flight, and when the connection last went idle or
/// began receiving a request head.
struct Deadlines {
    limits: ConnectionLimits,
    state: Mutex<DeadlineState>,
    /// Woken when the deadline may have moved earlier, or a request began or ended.
    changed: Notify,
}

struct DeadlineState {
    in_flight: u32,
    /// The first byte of a request head arrived at (no request in flight).
    head_started: Option<Instant>,
    /// No request in flight since, and no bytes moved since.
    idle_since: Instant,
}

impl Deadlines {
    fn new(limits: ConnectionLimits) -> Deadlines {
        Deadlines {
            limits,
            state: Mutex::new(DeadlineState {
                in_flight: 0,
                head_started: None,
                idle_since: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DeadlineState> {
        // Plain data with no invariant a panic could break.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The time the connection is closed at, and why; `None` while a request is in flight.
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        let s = self.lock();
        if s.in_flight > 0 {
            return None;
        }
        Some(match s.head_started {
            Some(t) => (t + self.limits.header_read_timeout, "header read timeout"),
            None => (s.idle_since + self.limits.idle_timeout, "idle timeout"),
        })
    }

    /// No request in flight and none being received.
    fn is_idle(&self) -> bool {
        let s = self.lock();
        s.in_flight == 0 && s.head_started.is_none()
    }

    /// Bytes arrived.
    fn on_read(&self) {
        let mut s = self.lock();
        if s.in_flight == 0 && s.head_started.is_none() {
            s.head_started = Some(Instant::now());
            drop(s);
            // The deadline may have moved earlier.
            self.changed.notify_one();
        }
    }

    /// Bytes left (a response being written keeps an idle connection alive).
    fn on_write(&self) {
        let mut s = self.lock();
        if s.in_flight == 0 && s.head_started.is_none() {
            s.idle_since = Instant::now();
        }
    }

    /// Resolves when the connection's deadline passes, with the reason.
    async fn expired(&self) -> &'static str {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.deadline() {
                None => changed.await,
                Some((at, why)) => {
                    if Instant::now() >= at {
                        return why;
                    }
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
            }
        }
    }
}

/// A request in flight on a connection: no connection deadline runs meanwhile (the routes
/// bound their own work: body read timeout, actor call timeout).
struct InFlight(Arc<Deadlines>);

impl InFlight {
    fn begin(d: Arc<Deadlines>) -> InFlight {
        {
            let mut s = d.lock();
            s.in_flight += 1;
            s.head_started = None;
        }
        d.changed.notify_one();
        InFlight(d)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut s = self.0.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                s.idle_since = Instant::now();
            }
        }
        self.0.changed.notify_one();
    }
}

/// The socket, reporting reads and writes to the connection's `Deadlines`.
struct Watched {
    inner: TcpStream,
    deadlines: Arc<Deadlines>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.deadlines.on_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.deadlines.on_write();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.deadlines.on_write();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_expires_on_the_idle_timeout() {
        let d = Deadlines::new(limits());
        let t0 = Instant::now();
        assert_eq!(d.expired().await, "idle timeout");
        assert_eq!(Instant::now() - t0, Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_head_moves_the_deadline_earlier() {
        let d = Arc::new(Deadlines::new(limits()));
        let t0 = Instant::now();
        let watcher = tokio::spawn({
            let d = d.clone();
            async move { d.expired().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        d.on_read();
        assert_eq!(watcher.await.unwrap(), "header read timeout");
        assert_eq!(Instant::now() - t0, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn no_deadline_runs_while_a_request_is_in_flight() {
        let d = Arc::new(Deadlines::new(limits()));
        d.on_read();
        let t0 = Instant::now();
        let req = InFlight::begin(d.clone());
        let watcher = tokio::spawn({
            let d = d.clone();
            async move { d.expired().await }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!watcher.is_finished());
        drop(req);
        // Idle from the end of the request: 60 s + 10 s.
        assert_eq!(watcher.await.unwrap(), "idle timeout");
        assert_eq!(Instant::now() - t0, Duration::from_secs(70));
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_written_keep_an_idle_connection_alive() {
        let d = Arc::new(Deadlines::new(limits()));
        let t0 = Instant::now();
        let watcher = tokio::spawn({
            let d = d.clone();
            async move { d.expired().await }
        });
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            d.on_write();
        }
        assert_eq!(watcher.await.unwrap(), "idle timeout");
        assert_eq!(Instant::now() - t0, Duration::from_secs(40));
    }

    #[test]
    fn out_of_descriptors_is_a_resource_error() {
        assert!(is_resource_error(&io::Error::from_raw_os_error(24)));
        assert!(!is_resource_error(&io::Error::from(
            io::ErrorKind::ConnectionReset
        )));
    }
}
