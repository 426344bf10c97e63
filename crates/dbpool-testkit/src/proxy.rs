//! A TCP fault proxy (tokio only) between a client under test and a real server.
//!
//! Lives here: [`FaultProxy`], listening on 127.0.0.1 and forwarding to one upstream address, with
//! a [`Mode`] that can be changed while it runs, and [`FaultProxy::cut_all`] to reset every live
//! connection. Must not live here: anything PostgreSQL-specific; this is plain TCP.
//!
//! Modes act on new connections and, chunk by chunk, on live ones:
//! - `Pass`: forward.
//! - `Refuse`: the listener is closed, so connecting is refused by the kernel (a real refusal,
//!   not an accept-and-close); live connections keep forwarding. Leaving Refuse binds the same
//!   port again.
//! - `BlackHole`: new connections are accepted and never answered; on live ones whatever arrives
//!   is swallowed, as in a network partition.
//! - `Delay(d)`: every chunk is forwarded `d` late.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::Arc,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, oneshot, watch},
    task::{JoinHandle, JoinSet},
    time::Instant,
};

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Not listening: connecting is refused.
    Refuse,
    /// Accept and never answer; swallow data on live connections.
    BlackHole,
    /// Forward every chunk this late.
    Delay(Duration),
}

enum Control {
    SetMode(Mode, oneshot::Sender<()>),
}

struct Shared {
    mode: watch::Sender<Mode>,
    cut: watch::Sender<u64>,
    live: watch::Sender<BTreeSet<u64>>,
    next_id: AtomicU64,
    /// Most connections alive at once since the last `reset_peak`.
    peak: AtomicU64,
}

/// A running fault proxy. Dropping it closes the listener and every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    control: mpsc::UnboundedSender<Control>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on a free 127.0.0.1 port, in `Pass` mode.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let (listener, addr) = loop {
            let port = crate::ports::free_port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if let Ok(listener) = bind(addr) {
                break (listener, addr);
            }
        };
        let shared = Arc::new(Shared {
            mode: watch::Sender::new(Mode::Pass),
            cut: watch::Sender::new(0),
            live: watch::Sender::new(BTreeSet::new()),
            next_id: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        });
        let (control, control_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(accept_loop(
            listener,
            addr,
            upstream,
            Arc::clone(&shared),
            control_rx,
        ));
        FaultProxy {
            addr,
            upstream,
            shared,
            control,
            task,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where traffic goes.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Switches the mode; when this returns, the listener is closed (Refuse) or bound again.
    pub async fn set_mode(&self, mode: Mode) {
        let (ack, done) = oneshot::channel();
        self.control
            .send(Control::SetMode(mode, ack))
            .expect("proxy task gone");
        done.await.expect("proxy task gone");
    }

    /// Number of live proxied connections.
    pub fn live_connections(&self) -> usize {
        self.shared.live.borrow().len()
    }

    /// Connections accepted since the proxy started (each client connect attempt that reached
    /// it, whether or not the upstream answered): a server-side count of connect attempts.
    pub fn accepted_total(&self) -> u64 {
        self.shared.next_id.load(Ordering::Relaxed)
    }

    /// Most connections alive at once since the last [`FaultProxy::reset_peak`] (or the start).
    pub fn peak_live(&self) -> u64 {
        self.shared.peak.load(Ordering::Relaxed)
    }

    /// Restarts the peak count from the connections alive now.
    pub fn reset_peak(&self) {
        let now = self.live_connections() as u64;
        self.shared.peak.store(now, Ordering::Relaxed);
    }

    /// Resets (RST) every live connection on both sides and waits until they are gone.
    pub async fn cut_all(&self) {
        let victims = self.shared.live.borrow().clone();
        self.shared.cut.send_modify(|generation| *generation += 1);
        let mut live = self.shared.live.subscribe();
        tokio::time::timeout(
            Duration::from_secs(5),
            live.wait_for(|now| victims.iter().all(|id| !now.contains(id))),
        )
        .await
        .expect("connections still open 5s after cut_all")
        .expect("proxy task gone");
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the JoinSet of connection tasks: aborting it aborts them all.
        self.task.abort();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

async fn accept(listener: &Option<TcpListener>) -> std::io::Result<TcpStream> {
    match listener {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let mut listener = Some(listener);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            message = control.recv() => match message {
                None => return,
                Some(Control::SetMode(mode, ack)) => {
                    shared.mode.send_replace(mode);
                    if mode == Mode::Refuse {
                        listener = None;
                    } else if listener.is_none() {
                        listener = Some(rebind(addr).await);
                    }
                    let _ = ack.send(());
                }
            },
            accepted = accept(&listener) => {
                if let Ok(client) = accepted {
                    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                    shared.live.send_modify(|live| { live.insert(id); });
                    let now_live = shared.live.borrow().len() as u64;
                    shared.peak.fetch_max(now_live, Ordering::Relaxed);
                    let shared = Arc::clone(&shared);
                    connections.spawn(async move {
                        handle(client, upstream, &shared).await;
                        shared.live.send_modify(|live| { live.remove(&id); });
                    });
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match bind(addr) {
            Ok(listener) => return listener,
            Err(e) if Instant::now() > deadline => panic!("proxy cannot bind {addr} again: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Serves one client connection until either side closes or a cut.
async fn handle(mut client: TcpStream, upstream: SocketAddr, shared: &Shared) {
    let mut cut = shared.cut.subscribe();
    cut.mark_unchanged();
    let mode = shared.mode.subscribe();

    if *mode.borrow() == Mode::BlackHole {
        let mut sink = [0u8; 4096];
        let was_cut = tokio::select! {
            _ = cut.changed() => true,
            _ = async { while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {} } => false,
        };
        if was_cut {
            let _ = client.set_zero_linger();
        }
        return;
    }

    let Ok(mut server) = TcpStream::connect(upstream).await else {
        // The upstream refused: pass that on as a reset.
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let was_cut = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        tokio::select! {
            _ = cut.changed() => true,
            _ = async {
                tokio::join!(
                    pump(&mut client_read, &mut server_write, &mode),
                    pump(&mut server_read, &mut client_write, &mode),
                )
            } => false,
        }
    };
    if was_cut {
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// Copies `from` to `to` chunk by chunk, applying the mode current at each chunk.
async fn pump<R, W>(from: &mut R, to: &mut W, mode: &watch::Receiver<Mode>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let current = *mode.borrow();
        match current {
            Mode::BlackHole => continue,
            Mode::Delay(d) => tokio::time::sleep(d).await,
            Mode::Pass | Mode::Refuse => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
