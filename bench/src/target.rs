//! Targets the tunnels lead to (a verifying sink and an echo server), the payload and a cheap
//! position-dependent checksum.

use anyhow::Result;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Size of the reply the sink sends after EOF: byte count and checksum, little endian.
pub const SINK_REPLY: usize = 16;

/// A streaming checksum: four independent xor-multiply-rotate lanes over 32-byte blocks, so it
/// runs at many GB/s and still notices lost, duplicated, altered or reordered blocks.
#[derive(Debug, Clone)]
pub struct Checksum {
    lanes: [u64; 4],
    pending: [u8; 32],
    plen: usize,
    len: u64,
}

const K: u64 = 0x9E37_79B9_7F4A_7C15;

impl Default for Checksum {
    fn default() -> Self {
        Self {
            lanes: [1, 2, 3, 4],
            pending: [0; 32],
            plen: 0,
            len: 0,
        }
    }
}

impl Checksum {
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.plen > 0 {
            let take = (32 - self.plen).min(data.len());
            self.pending[self.plen..self.plen + take].copy_from_slice(&data[..take]);
            self.plen += take;
            data = &data[take..];
            if self.plen < 32 {
                return;
            }
            let block = self.pending;
            self.block(&block);
            self.plen = 0;
        }
        let mut chunks = data.chunks_exact(32);
        for c in &mut chunks {
            self.block(c);
        }
        let rem = chunks.remainder();
        self.pending[..rem.len()].copy_from_slice(rem);
        self.plen = rem.len();
    }

    #[inline(always)]
    fn block(&mut self, b: &[u8]) {
        for (i, lane) in self.lanes.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            *lane = (*lane ^ u64::from_le_bytes(w))
                .wrapping_mul(K)
                .rotate_left(31);
        }
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(&self) -> u64 {
        let mut h = self.len.wrapping_mul(K);
        for l in self.lanes {
            h = (h ^ l).wrapping_mul(K).rotate_left(27);
        }
        for &b in &self.pending[..self.plen] {
            h = (h ^ u64::from(b)).wrapping_mul(K);
        }
        h
    }
}

/// Pseudo-random payload shared by all senders (QUIC does not compress, but a constant pattern
/// would hide reordering from the checksum).
pub fn payload(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::Rng::fill(&mut rand::rng(), &mut v[..]);
    v
}

/// A sink: reads each connection to EOF, then answers [`SINK_REPLY`] bytes (count, checksum).
pub async fn sink_server() -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sum = Checksum::default();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => sum.update(&buf[..n]),
                        Err(_) => return,
                    }
                }
                let mut reply = [0u8; SINK_REPLY];
                reply[..8].copy_from_slice(&sum.len().to_le_bytes());
                reply[8..].copy_from_slice(&sum.finish().to_le_bytes());
                let _ = s.write_all(&reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok((addr, task))
}

/// An echo server: echoes everything, then half-closes when the client does.
pub async fn echo_server() -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_ignores_chunking_and_sees_reordering() {
        let data = payload(10_000);
        let mut a = Checksum::default();
        a.update(&data);
        let mut b = Checksum::default();
        for c in data.chunks(7) {
            b.update(c);
        }
        assert_eq!(a.finish(), b.finish());
        assert_eq!(a.len(), 10_000);
        let mut swapped = data.clone();
        swapped[..64].rotate_left(32);
        let mut c = Checksum::default();
        c.update(&swapped);
        assert_ne!(a.finish(), c.finish());
        let mut d = Checksum::default();
        d.update(&data[..9_999]);
        assert_ne!(a.finish(), d.finish());
    }
}
