//! Feature `tokio`: the sockets as tokio listeners (non-blocking by construction), an accept
//! loop with the race-free idle exit, and an HTTP/1 server for any tower service (an axum
//! `Router`) over several TCP and unix listeners at once.
//!
//! ```no_run
//! use small_services::activate::{Options, Sockets, tokio::serve_http};
//!
//! fn main() -> std::process::ExitCode {
//!     // Before the runtime starts its threads: this edits the environment.
//!     let sockets = Sockets::from_env_or_bind(["http=tcp://127.0.0.1:3000"]).expect("sockets");
//!     run(sockets)
//! }
//!
//! #[tokio::main]
//! async fn run(mut sockets: Sockets) -> std::process::ExitCode {
//!     let app = axum::Router::new().route("/", axum::routing::get(|| async { "Hello" }));
//!     let options = Options::from_env(&sockets);
//!     let listeners = sockets.take_tokio_listeners().expect("listeners");
//!     serve_http(listeners, app, options).await.expect("serve");
//!     std::process::ExitCode::SUCCESS
//! }
//! ```

use std::error::Error as StdError;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ::tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use ::tokio::signal::unix::{Signal, SignalKind, signal};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

use super::{Error, Key, Listener, Options, Sockets, Stopped, Tracked, Tracker};
use crate::notify;

/// A tokio stream listener: TCP or unix, always non-blocking.
#[derive(Debug)]
pub enum TokioListener {
    /// TCP.
    Tcp(TcpListener),
    /// `AF_UNIX` stream.
    Unix(UnixListener),
}

impl TokioListener {
    /// Sets `O_NONBLOCK`, then registers it with the current tokio runtime (so tokio's check
    /// for blocking sockets, a panic since tokio 1.44, can never fire). Needs a runtime.
    pub fn from_std(listener: Listener) -> io::Result<TokioListener> {
        listener.set_nonblocking(true)?;
        Ok(match listener {
            Listener::Tcp(l) => TokioListener::Tcp(TcpListener::from_std(l)?),
            Listener::Unix(l) => TokioListener::Unix(UnixListener::from_std(l)?),
        })
    }

    /// Polls for one connection; cancel-safe (nothing is accepted unless it returns `Ready`).
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<TokioStream>> {
        match self {
            TokioListener::Tcp(l) => l.poll_accept(cx).map_ok(|(s, _)| TokioStream::Tcp(s)),
            TokioListener::Unix(l) => l.poll_accept(cx).map_ok(|(s, _)| TokioStream::Unix(s)),
        }
    }

    /// Accepts one connection; cancel-safe.
    pub async fn accept(&self) -> io::Result<TokioStream> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }
}

/// An accepted tokio connection: TCP or unix.
#[derive(Debug)]
pub enum TokioStream {
    /// TCP.
    Tcp(TcpStream),
    /// `AF_UNIX` stream.
    Unix(UnixStream),
}

impl AsyncRead for TokioStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TokioStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            TokioStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TokioStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TokioStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            TokioStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TokioStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            TokioStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TokioStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            TokioStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TokioStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            TokioStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Sockets {
    /// The stream listener under `key` as a tokio listener (non-blocking). Needs a runtime.
    pub fn take_tokio_listener<'k>(
        &mut self,
        key: impl Into<Key<'k>>,
    ) -> Result<TokioListener, Error> {
        Ok(TokioListener::from_std(self.take_listener(key)?)?)
    }

    /// The UDP socket under `key` as a tokio socket (non-blocking). Needs a runtime.
    pub fn take_tokio_udp<'k>(
        &mut self,
        key: impl Into<Key<'k>>,
    ) -> Result<::tokio::net::UdpSocket, Error> {
        let udp = self.take_udp(key)?;
        udp.set_nonblocking(true)?;
        Ok(::tokio::net::UdpSocket::from_std(udp)?)
    }

    /// Every stream listener not yet taken, as tokio listeners (see
    /// [`Sockets::take_listeners`]). Needs a runtime.
    pub fn take_tokio_listeners(&mut self) -> Result<Vec<TokioListener>, Error> {
        self.take_listeners()?
            .into_iter()
            .map(|l| Ok(TokioListener::from_std(l)?))
            .collect()
    }
}

/// Accepts on several tokio listeners from one task, counts connections, stops on idle or
/// SIGTERM/SIGINT.
///
/// The idle decision and the accepts are made in the same `select!`, and accepting is
/// cancel-safe, so once it decides to stop nothing more is accepted: a client that connects
/// then waits in the launcher's copy of the socket for the next activation.
#[derive(Debug)]
pub struct TokioAcceptor {
    listeners: Vec<TokioListener>,
    tracker: Tracker,
    options: Options,
    sigterm: Signal,
    sigint: Signal,
    stopped: Option<Stopped>,
    ready_sent: bool,
}

impl TokioAcceptor {
    /// Catches SIGTERM and SIGINT (needs a runtime).
    pub fn new(listeners: Vec<TokioListener>, options: Options) -> io::Result<TokioAcceptor> {
        Ok(TokioAcceptor {
            listeners,
            tracker: Tracker::new(),
            options,
            sigterm: signal(SignalKind::terminate())?,
            sigint: signal(SignalKind::interrupt())?,
            stopped: None,
            ready_sent: false,
        })
    }

    /// The connection count.
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    fn stop(&mut self, why: Stopped) {
        if self.stopped.is_none() {
            super::announce_stop(&why, self.options.notify);
            self.stopped = Some(why);
            // Closes our copies only; the launcher's copies keep their queues.
            self.listeners.clear();
        }
    }

    /// The next connection, counted as open until dropped; `None` once it is time to stop.
    pub async fn accept(&mut self) -> Option<Tracked<TokioStream>> {
        if !self.ready_sent {
            self.ready_sent = true;
            if self.options.notify {
                notify::ready();
            }
        }
        loop {
            if self.stopped.is_some() {
                return None;
            }
            let wait = match self.options.idle_check(&self.tracker) {
                Ok(w) => w.unwrap_or(Duration::from_secs(86400 * 365)),
                Err(()) => {
                    self.stop(Stopped::Idle);
                    return None;
                }
            };
            let listeners = &self.listeners;
            let accepted = ::tokio::select! {
                biased;
                _ = self.sigterm.recv() => None,
                _ = self.sigint.recv() => None,
                r = poll_fn(|cx| accept_any(listeners, cx)) => Some(Some(r)),
                _ = ::tokio::time::sleep(wait) => Some(None),
            };
            match accepted {
                None => {
                    self.stop(Stopped::Signalled { drained: false });
                    return None;
                }
                Some(None) => continue,
                Some(Some(Ok(stream))) => return Some(Tracked::new(stream, self.tracker.track())),
                Some(Some(Err(e))) => {
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        log::warn!("accept: {e}; waiting");
                        ::tokio::time::sleep(Duration::from_millis(100)).await;
                    } else {
                        log::debug!("accept: {e}");
                    }
                }
            }
        }
    }

    /// Why it stopped (after [`TokioAcceptor::accept`] returned `None`); on a signal, waits up
    /// to [`Options::shutdown_grace`] for the tracked connections to close.
    pub async fn finish(mut self) -> Stopped {
        let why = self.stopped.unwrap_or(Stopped::Idle);
        self.stop(why);
        match why {
            Stopped::Idle => {
                if let Some(d) = self.options.test_stop_delay {
                    ::tokio::time::sleep(d).await;
                }
                Stopped::Idle
            }
            Stopped::Signalled { .. } => {
                let deadline = ::tokio::time::Instant::now() + self.options.shutdown_grace;
                while self.tracker.open() > 0 && ::tokio::time::Instant::now() < deadline {
                    ::tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Stopped::Signalled {
                    drained: self.tracker.open() == 0,
                }
            }
        }
    }
}

fn accept_any(listeners: &[TokioListener], cx: &mut Context<'_>) -> Poll<io::Result<TokioStream>> {
    for l in listeners {
        if let Poll::Ready(r) = l.poll_accept(cx) {
            return Poll::Ready(r);
        }
    }
    Poll::Pending
}

/// Serves HTTP/1 (keep-alive; no upgrades) with `service` (an axum `Router`, or any tower
/// service of `http::Request<hyper::body::Incoming>`) on every listener, TCP and unix mixed,
/// until idle or signalled (see [`TokioAcceptor`]).
///
/// Each connection counts as open (for the idle exit) until it is closed, keep-alive included.
/// A keep-alive connection without a byte for [`Options::http_keep_alive_timeout`] is closed
/// between requests; hyper's header read timeout (30 s) closes one that sends no complete
/// request headers. After SIGTERM/SIGINT every connection is closed after its current
/// response (idle ones at once), within [`Options::shutdown_grace`].
///
/// Returns why it stopped; exit with [`Stopped::exit_code`].
pub async fn serve_http<S, B>(
    listeners: Vec<TokioListener>,
    service: S,
    options: Options,
) -> io::Result<Stopped>
where
    S: tower_service::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let keep_alive = options.http_keep_alive_timeout;
    let mut acceptor = TokioAcceptor::new(listeners, options)?;
    let (shutdown, shutdown_rx) = ::tokio::sync::watch::channel(false);
    let service = TowerToHyperService::new(service);
    let epoch = Instant::now();
    while let Some(stream) = acceptor.accept().await {
        let last = Arc::new(AtomicU64::new(millis_since(epoch)));
        let io = Active {
            inner: stream,
            last: last.clone(),
            epoch,
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(io), service.clone());
        let mut shutdown_rx = shutdown_rx.clone();
        ::tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let mut closing = false;
            loop {
                let quiet_until = keep_alive
                    .map(|t| epoch + Duration::from_millis(last.load(Ordering::Relaxed)) + t);
                ::tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            log::debug!("connection: {e}");
                        }
                        return;
                    }
                    _ = shutdown_rx.changed(), if !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    _ = sleep_until_opt(quiet_until), if !closing && quiet_until.is_some() => {
                        if let Some(t) = keep_alive
                            && epoch.elapsed()
                                >= Duration::from_millis(last.load(Ordering::Relaxed)) + t
                        {
                            // Between requests this closes at once; with a request in
                            // progress, after its response.
                            conn.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                }
            }
        });
    }
    let _ = shutdown.send(true);
    Ok(acceptor.finish().await)
}

fn millis_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => ::tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// A connection that stamps the time of its last byte read or written.
struct Active<S> {
    inner: S,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl<S> Active<S> {
    fn stamp(&self) {
        self.last.store(millis_since(self.epoch), Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Active<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if r.is_ready() {
            this.stamp();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Active<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if r.is_ready() {
            this.stamp();
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if r.is_ready() {
            this.stamp();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
