//! The UDP socket every postern process binds for quinn: large buffers, GSO/GRO probed, and a
//! writability poller per connection.

use crate::runtime::port_owner::{explain_bind_error, Proto};
use quinn::udp::UdpSocketState;
use quinn::UdpPoller;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Maps an IPv4-mapped IPv6 address to plain IPv4, so addresses compare equal whichever family
/// the socket that saw them uses.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Socket buffer size asked for on every postern UDP socket (the kernel may cap it).
pub const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Binds a UDP socket prepared for quinn (non-blocking, large buffers, GSO/GRO probed).
pub fn bind_udp(addr: SocketAddr) -> io::Result<(Arc<tokio::net::UdpSocket>, UdpSocketState)> {
    let std =
        std::net::UdpSocket::bind(addr).map_err(|e| explain_bind_error(Proto::Udp, addr, e))?;
    prepare(std)
}

/// [`bind_udp`] with `SO_REUSEPORT` set before the bind, so several sockets of this process can
/// share one address and port and the kernel spreads incoming datagrams over them by 4-tuple
/// hash (the relay's forwarding group). Every member, the first included, must be bound this
/// way; the caller checks first that no one else holds the port, since any process of the same
/// user could otherwise join the group.
pub fn bind_udp_reuseport(
    addr: SocketAddr,
) -> io::Result<(Arc<tokio::net::UdpSocket>, UdpSocketState)> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    set_reuseport(&socket)?;
    socket
        .bind(&addr.into())
        .map_err(|e| explain_bind_error(Proto::Udp, addr, e))?;
    prepare(socket.into())
}

#[cfg(unix)]
fn set_reuseport(socket: &socket2::Socket) -> io::Result<()> {
    Ok(rustix::net::sockopt::set_socket_reuseport(socket, true)?)
}

#[cfg(not(unix))]
fn set_reuseport(_: &socket2::Socket) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SO_REUSEPORT is not available on this system (use forward-threads = 1)",
    ))
}

fn prepare(std: std::net::UdpSocket) -> io::Result<(Arc<tokio::net::UdpSocket>, UdpSocketState)> {
    let state = UdpSocketState::new((&std).into())?;
    // Larger buffers absorb bursts at high rates; failure only costs throughput.
    let _ = state.set_recv_buffer_size((&std).into(), SOCKET_BUFFER);
    let _ = state.set_send_buffer_size((&std).into(), SOCKET_BUFFER);
    force_buffers(&std, &state);
    std.set_nonblocking(true)?;
    let io = tokio::net::UdpSocket::from_std(std)?;
    Ok((Arc::new(io), state))
}

/// The kernel caps `SO_RCVBUF`/`SO_SNDBUF` at `net.core.rmem_max`/`wmem_max` (often 208 KiB, or
/// a few MiB): too little for a burst at several Gbit/s, and datagrams that do not fit are
/// dropped by the kernel, out of sight of any counter of ours, and cost the sender a loss
/// recovery. A process with `CAP_NET_ADMIN` (a root service) may go past the cap with
/// `SO_RCVBUFFORCE`; others keep the capped size, and the README gives the sysctl to raise it.
#[cfg(target_os = "linux")]
fn force_buffers(std: &std::net::UdpSocket, state: &UdpSocketState) {
    // Linux reports twice the size asked for (bookkeeping overhead); compare with that.
    if state
        .recv_buffer_size(std.into())
        .is_ok_and(|n| n < 2 * SOCKET_BUFFER)
    {
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(std, SOCKET_BUFFER);
    }
    if state
        .send_buffer_size(std.into())
        .is_ok_and(|n| n < 2 * SOCKET_BUFFER)
    {
        let _ = rustix::net::sockopt::set_socket_send_buffer_size_force(std, SOCKET_BUFFER);
    }
    let got = state.recv_buffer_size(std.into()).unwrap_or(0) / 2;
    if got < SOCKET_BUFFER {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            tracing::info!(
                kib = got / 1024,
                wanted_kib = SOCKET_BUFFER / 1024,
                "UDP receive buffer capped by net.core.rmem_max; at several Gbit/s the kernel may drop datagrams (raise it: sysctl -w net.core.rmem_max={} net.core.wmem_max={})",
                2 * SOCKET_BUFFER,
                2 * SOCKET_BUFFER
            );
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn force_buffers(_: &std::net::UdpSocket, _: &UdpSocketState) {}

/// The pending writability wait a [`Poller`] keeps between polls.
pub type WritableFut = Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>;

/// Waits for the socket to become writable; one per quinn connection, so each needs its own
/// future (tokio's `poll_send_ready` keeps only the last waker).
pub struct Poller {
    io: Arc<tokio::net::UdpSocket>,
    fut: Option<WritableFut>,
}

impl Poller {
    pub fn new(io: Arc<tokio::net::UdpSocket>) -> Self {
        Self { io, fut: None }
    }
}

impl fmt::Debug for Poller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Poller").finish_non_exhaustive()
    }
}

impl UdpPoller for Poller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let fut = this.fut.get_or_insert_with(|| {
            let io = this.io.clone();
            Box::pin(async move { io.writable().await })
        });
        let res = fut.as_mut().poll(cx);
        if res.is_ready() {
            this.fut = None;
        }
        res
    }
}
