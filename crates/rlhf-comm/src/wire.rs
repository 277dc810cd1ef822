//! Frames on a ring link and the two ends of a link: [`Tx`] (to the next rank, write only) and
//! [`Rx`] (from the previous rank, read only). Every read and write is bounded by the group's
//! timeout, so a silent peer becomes [`CommError::Timeout`], and a closed one
//! [`CommError::Closed`], naming the peer.
//!
//! A frame is a 24-byte little-endian header, `tag u8, op u8, 0u16, aux u32, a u64, b u64`,
//! followed for `DATA` by `a` payload bytes:
//!
//! | tag | aux | a | b |
//! | --- | --- | --- | --- |
//! | `OP` (start of an operation) | root (broadcast) | sequence number | length |
//! | `DATA` (one chunk) | 0 | payload bytes | 0 |
//! | `PIECE` (all-gather: a rank's piece follows as DATA) | owner rank | bytes | 0 |
//! | `ABORT` (the sender's operation failed) | rank at fault | reason code | 0 |

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::error::{reason_text, CommError, Op};

pub(crate) const HDR: usize = 24;
pub(crate) const TAG_OP: u8 = 1;
pub(crate) const TAG_DATA: u8 = 2;
pub(crate) const TAG_PIECE: u8 = 3;
pub(crate) const TAG_ABORT: u8 = 4;

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub tag: u8,
    pub op: u8,
    pub aux: u32,
    pub a: u64,
    pub b: u64,
}

impl Header {
    pub fn new(tag: u8, op: Op, aux: u32, a: u64, b: u64) -> Self {
        Header {
            tag,
            op: op.code(),
            aux,
            a,
            b,
        }
    }

    fn encode(&self) -> [u8; HDR] {
        let mut h = [0u8; HDR];
        h[0] = self.tag;
        h[1] = self.op;
        h[4..8].copy_from_slice(&self.aux.to_le_bytes());
        h[8..16].copy_from_slice(&self.a.to_le_bytes());
        h[16..24].copy_from_slice(&self.b.to_le_bytes());
        h
    }

    fn decode(h: &[u8; HDR]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(b)
        };
        Header {
            tag: h[0],
            op: h[1],
            aux: u32_at(4),
            a: u64_at(8),
            b: u64_at(16),
        }
    }
}

/// What an operation's I/O needs to build its errors.
pub(crate) struct Ctx<'a> {
    pub op: Op,
    pub timeout: Duration,
    pub peers: &'a [SocketAddr],
}

impl Ctx<'_> {
    fn io_error(&self, peer: usize, e: io::Error) -> CommError {
        let addr = self.peers[peer];
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => CommError::Closed {
                op: self.op,
                peer,
                addr,
            },
            _ => CommError::Io {
                op: self.op,
                peer,
                addr,
                source: e,
            },
        }
    }

    fn timed_out(&self, peer: usize) -> CommError {
        CommError::Timeout {
            op: self.op,
            peer,
            addr: self.peers[peer],
            timeout: self.timeout,
        }
    }

    pub fn protocol(&self, peer: usize, detail: String) -> CommError {
        CommError::Protocol {
            op: self.op,
            peer,
            addr: self.peers[peer],
            detail,
        }
    }

    pub fn mismatch(&self, peer: usize, detail: String) -> CommError {
        CommError::Mismatch {
            op: self.op,
            peer,
            addr: self.peers[peer],
            detail,
        }
    }
}

/// The sending end of the link to the next rank.
///
/// Writes are tracked byte by byte (`write` is cancel-safe, `write_all` is not), so when an
/// operation is abandoned half-way through a frame [`Tx::abort`] can finish that frame and then
/// send an `ABORT` the next rank will parse correctly.
pub(crate) struct Tx {
    pub stream: TcpStream,
    pub peer: usize,
    hdr: [u8; HDR],
    hdr_left: usize,
    payload_left: usize,
}

impl Tx {
    pub fn new(stream: TcpStream, peer: usize) -> Self {
        Tx {
            stream,
            peer,
            hdr: [0; HDR],
            hdr_left: 0,
            payload_left: 0,
        }
    }

    async fn write_some(&mut self, ctx: &Ctx<'_>, buf: &[u8]) -> Result<usize, CommError> {
        match timeout(ctx.timeout, self.stream.write(buf)).await {
            Err(_) => Err(ctx.timed_out(self.peer)),
            Ok(Err(e)) => Err(ctx.io_error(self.peer, e)),
            Ok(Ok(0)) => Err(ctx.io_error(self.peer, io::ErrorKind::WriteZero.into())),
            Ok(Ok(n)) => Ok(n),
        }
    }

    /// Writes one frame: `hdr`, then `payload`.
    pub async fn frame(
        &mut self,
        ctx: &Ctx<'_>,
        hdr: Header,
        payload: &[u8],
    ) -> Result<(), CommError> {
        self.hdr = hdr.encode();
        self.hdr_left = HDR;
        self.payload_left = payload.len();
        self.finish_header(ctx).await?;
        while self.payload_left > 0 {
            let off = payload.len() - self.payload_left;
            let n = self.write_some(ctx, &payload[off..]).await?;
            self.payload_left -= n;
        }
        Ok(())
    }

    async fn finish_header(&mut self, ctx: &Ctx<'_>) -> Result<(), CommError> {
        while self.hdr_left > 0 {
            let hdr = self.hdr;
            let n = self.write_some(ctx, &hdr[HDR - self.hdr_left..]).await?;
            self.hdr_left -= n;
        }
        Ok(())
    }

    /// Sends `payload` as DATA frames of at most `chunk` bytes.
    pub async fn data(
        &mut self,
        ctx: &Ctx<'_>,
        payload: &[u8],
        chunk: usize,
    ) -> Result<(), CommError> {
        for c in payload.chunks(chunk) {
            let hdr = Header::new(TAG_DATA, ctx.op, 0, c.len() as u64, 0);
            self.frame(ctx, hdr, c).await?;
        }
        Ok(())
    }

    /// Completes a frame left half-written by an abandoned operation (its payload as zeros: the
    /// receiver discards it) and sends `ABORT` naming `origin`.
    pub async fn abort(
        &mut self,
        ctx: &Ctx<'_>,
        origin: usize,
        code: u32,
    ) -> Result<(), CommError> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        self.finish_header(ctx).await?;
        while self.payload_left > 0 {
            let len = self.payload_left.min(ZEROS.len());
            let n = self.write_some(ctx, &ZEROS[..len]).await?;
            self.payload_left -= n;
        }
        let hdr = Header::new(TAG_ABORT, ctx.op, origin as u32, u64::from(code), 0);
        self.frame(ctx, hdr, &[]).await
    }
}

/// The receiving end of the link from the previous rank.
pub(crate) struct Rx {
    pub stream: TcpStream,
    pub peer: usize,
}

impl Rx {
    async fn read_exact(&mut self, ctx: &Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
        match timeout(ctx.timeout, self.stream.read_exact(buf)).await {
            Err(_) => Err(ctx.timed_out(self.peer)),
            Ok(Err(e)) => Err(ctx.io_error(self.peer, e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Reads the next header; an `ABORT` becomes [`CommError::PeerFailed`].
    pub async fn header(&mut self, ctx: &Ctx<'_>) -> Result<Header, CommError> {
        let mut h = [0u8; HDR];
        self.read_exact(ctx, &mut h).await?;
        let hdr = Header::decode(&h);
        if hdr.tag == TAG_ABORT {
            let origin = hdr.aux as usize;
            if origin >= ctx.peers.len() {
                return Err(ctx.protocol(self.peer, format!("abort names rank {origin}")));
            }
            return Err(CommError::PeerFailed {
                op: ctx.op,
                peer: origin,
                addr: ctx.peers[origin],
                reason: reason_text(hdr.a as u32),
                via: self.peer,
            });
        }
        if Op::from_code(hdr.op) != Some(ctx.op) {
            let theirs =
                Op::from_code(hdr.op).map_or_else(|| format!("op {}", hdr.op), |o| o.to_string());
            return Err(ctx.mismatch(self.peer, format!("it is in {theirs}")));
        }
        Ok(hdr)
    }

    /// Reads one DATA frame of exactly `buf.len()` bytes into `buf`.
    async fn data_frame(&mut self, ctx: &Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
        let hdr = self.header(ctx).await?;
        if hdr.tag != TAG_DATA || hdr.a != buf.len() as u64 {
            return Err(ctx.protocol(
                self.peer,
                format!(
                    "expected a data frame of {} bytes, got tag {} with {} bytes",
                    buf.len(),
                    hdr.tag,
                    hdr.a
                ),
            ));
        }
        self.read_exact(ctx, buf).await
    }

    /// Receives `buf.len()` bytes sent by [`Tx::data`] with the same `chunk`.
    pub async fn data(
        &mut self,
        ctx: &Ctx<'_>,
        buf: &mut [u8],
        chunk: usize,
    ) -> Result<(), CommError> {
        for c in buf.chunks_mut(chunk) {
            self.data_frame(ctx, c).await?;
        }
        Ok(())
    }

    /// Receives `dst.len()` floats sent by [`Tx::data`] and adds them into `dst` as
    /// `dst[i] = received[i] + dst[i]`: the earlier ranks' partial sum comes first, which is
    /// what fixes the summation order (see the crate docs). `scratch` holds one chunk.
    pub async fn reduce(
        &mut self,
        ctx: &Ctx<'_>,
        dst: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<(), CommError> {
        for d in dst.chunks_mut(scratch.len()) {
            let s = &mut scratch[..d.len()];
            self.data_frame(ctx, bytemuck::cast_slice_mut(s)).await?;
            for (d, s) in d.iter_mut().zip(s.iter()) {
                *d = *s + *d;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header::new(TAG_PIECE, Op::AllGather, 7, u64::MAX - 3, 42);
        assert_eq!(Header::decode(&h.encode()), h);
    }
}
