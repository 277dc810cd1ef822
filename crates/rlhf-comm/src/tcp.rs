//! [`TcpGroup`]: the collectives over a TCP ring on tokio.
//!
//! Rank `i` connects to rank `i+1` and accepts rank `i-1` (modulo `world`), so every rank has
//! one outgoing link it only writes to and one incoming link it only reads from; with `world`
//! 2 that is one connection per direction. The algorithms are the bandwidth-optimal ring ones:
//!
//! - all-reduce: reduce-scatter then all-gather, `world - 1` steps each, every step sending one
//!   segment ([`crate::ring_segment`]) while receiving another, in frames of at most
//!   [`GroupConfig::chunk_bytes`] that are reduced as they arrive;
//! - broadcast: a pipeline from the root along the ring, each rank forwarding a chunk as soon as
//!   it has it;
//! - all-gather: `world - 1` steps, each forwarding the piece received in the step before;
//! - barrier: an all-gather of empty pieces (a rank's piece can only arrive after it entered).
//!
//! Every operation starts with an `OP` frame (kind, sequence number, root, length) that the
//! receiving rank checks against its own call, so ranks that disagree get
//! [`CommError::Mismatch`] instead of misread data.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{sleep_until, timeout, timeout_at, Instant};

use crate::auth::{self, CollectiveKey, NONCE, TAG};
use crate::error::{CommError, Op};
use crate::wire::{Ctx, Header, Rx, Tx, TAG_OP, TAG_PIECE};
use crate::{ring_segment, scatter_chunk, Collective, ReduceOp};

const MAGIC: &[u8; 8] = b"RLHFCOMM";
/// Version 2: the handshake authenticates both sides with the run's [`CollectiveKey`].
const VERSION: u32 = 2;
/// A connection that does not finish its handshake this long after it was accepted is dropped.
/// Handshakes run concurrently, so this bounds only the sockets a stranger can hold open, not
/// the wait of the rank that is really expected.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes open at once on one listener. A new connection beyond this drops the oldest
/// unfinished one: bounded file descriptors, and a genuine rank, which finishes in one round
/// trip, is only lost to a flood of more than this many connections within that round trip.
const MAX_PENDING_HANDSHAKES: usize = 64;
/// Pause between connection attempts while the next rank is not listening yet.
const RETRY: Duration = Duration::from_millis(50);
/// How long a failing rank spends telling the next rank about the failure.
const ABORT_GRACE: Duration = Duration::from_secs(2);
/// Largest all-gather piece accepted from a peer (a garbled length must not allocate terabytes).
const MAX_PIECE_BYTES: u64 = 1 << 40;

/// Settings of one group; every rank of the group must use the same `key`, `group_id`, `world`
/// and `chunk_bytes` (checked in the handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// The run's shared secret; a connection that cannot prove it is dropped unanswered. No
    /// default: [`CollectiveKey::from_run_token`].
    pub key: CollectiveKey,
    /// Identifies the group; a connection carrying another id is refused. No default.
    pub group_id: u64,
    /// This process's rank, `0..world`. No default.
    pub rank: usize,
    /// Number of ranks. No default.
    pub world: usize,
    /// Longest time without progress before an operation fails: the whole rendezvous must
    /// finish within it, and during an operation every chunk must move within it (so a long
    /// transfer that keeps moving is never cut off). Default 60 s.
    pub timeout: Duration,
    /// Largest frame on the wire, in bytes, a multiple of 4 in `4..=1 GiB`: the unit of
    /// pipelining (a broadcast forwards, an all-reduce reduces, one chunk at a time). Default
    /// 4 MiB, large enough that per-frame costs vanish and small enough to pipeline.
    pub chunk_bytes: usize,
}

impl GroupConfig {
    /// A config with the default timeout (60 s) and chunk size (4 MiB).
    pub fn new(key: CollectiveKey, group_id: u64, rank: usize, world: usize) -> Self {
        GroupConfig {
            key,
            group_id,
            rank,
            world,
            timeout: Duration::from_secs(60),
            chunk_bytes: 4 << 20,
        }
    }

    fn validate(&self, peers: &[SocketAddr]) -> Result<(), CommError> {
        let bad = |detail: String| Err(CommError::bad_setting(detail));
        CommError::check_rank(self.rank, self.world)?;
        if peers.len() != self.world {
            return bad(format!(
                "{} peer addresses for a world of {}; pass one per rank, indexed by rank",
                peers.len(),
                self.world
            ));
        }
        if self.world > u32::MAX as usize {
            return bad(format!("world {} exceeds {}", self.world, u32::MAX));
        }
        if self.chunk_bytes < 4 || self.chunk_bytes % 4 != 0 || self.chunk_bytes > 1 << 30 {
            return bad(format!(
                "chunk_bytes {} must be a multiple of 4 in 4..=1073741824",
                self.chunk_bytes
            ));
        }
        if self.timeout.is_zero() {
            return bad("timeout must be positive".to_string());
        }
        Ok(())
    }
}

/// Binds a listener for [`TcpGroup::connect`]; its address is what the other ranks must be given.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, CommError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| CommError::Bind { addr, source })
}

/// Binds `world` listeners on `127.0.0.1:0` (for tests and single-machine groups) and returns
/// them with their addresses, index = rank.
pub async fn bind_local(world: usize) -> Result<(Vec<TcpListener>, Vec<SocketAddr>), CommError> {
    let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mut listeners = Vec::with_capacity(world);
    let mut addrs = Vec::with_capacity(world);
    for _ in 0..world {
        let l = bind(any).await?;
        addrs.push(
            l.local_addr()
                .map_err(|source| CommError::Bind { addr: any, source })?,
        );
        listeners.push(l);
    }
    Ok((listeners, addrs))
}

/// One rank's membership in a group connected as a TCP ring. See the module docs.
pub struct TcpGroup {
    cfg: GroupConfig,
    peers: Vec<SocketAddr>,
    /// To rank `rank + 1`; `None` when `world` is 1.
    tx: Option<Tx>,
    /// From rank `rank - 1`; `None` when `world` is 1.
    rx: Option<Rx>,
    /// Operations started so far; carried in every `OP` frame to catch ranks out of step.
    seq: u64,
    /// The first error, once one happened.
    poisoned: Option<String>,
    /// One chunk of received floats for all-reduce, allocated on first use.
    scratch: Vec<f32>,
}

impl std::fmt::Debug for TcpGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpGroup")
            .field("cfg", &self.cfg)
            .field("peers", &self.peers)
            .field("seq", &self.seq)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl TcpGroup {
    /// Forms the group: connects to the next rank and accepts the previous one on `listener`
    /// (bound with [`bind`] at `peers[cfg.rank]`), both within `cfg.timeout`. Both sides of
    /// every connection prove `cfg.key` (HMAC-SHA256 over both sides' random challenges);
    /// connections that do not are dropped unanswered. Authenticated connections that carry
    /// another group id, world, chunk size or an unexpected rank are refused with a reason (the
    /// connecting side gets [`CommError::Refused`]). Waiting goes on after either.
    pub async fn connect(
        cfg: GroupConfig,
        listener: TcpListener,
        peers: Vec<SocketAddr>,
    ) -> Result<TcpGroup, CommError> {
        cfg.validate(&peers)?;
        let mut group = TcpGroup {
            cfg,
            peers,
            tx: None,
            rx: None,
            seq: 0,
            poisoned: None,
            scratch: Vec::new(),
        };
        let (rank, world) = (group.cfg.rank, group.cfg.world);
        if world == 1 {
            return Ok(group);
        }
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        let deadline = Instant::now() + group.cfg.timeout;
        let (out, inc) = tokio::try_join!(
            connect_next(&group.cfg, &group.peers, next, deadline),
            accept_prev(&group.cfg, &group.peers, &listener, prev, deadline),
        )?;
        for (s, peer) in [(&out, next), (&inc, prev)] {
            // Small frames (headers, aborts) must not wait for Nagle's algorithm.
            s.set_nodelay(true).map_err(|source| CommError::Io {
                op: Op::Rendezvous,
                peer,
                addr: group.peers[peer],
                source,
            })?;
        }
        group.tx = Some(Tx::new(out, next));
        group.rx = Some(Rx {
            stream: inc,
            peer: prev,
        });
        tracing::debug!(
            group = group.cfg.group_id,
            rank,
            world,
            "rlhf-comm group formed"
        );
        Ok(group)
    }

    /// The group's settings.
    pub fn config(&self) -> &GroupConfig {
        &self.cfg
    }

    /// Every rank's address, index = rank.
    pub fn peers(&self) -> &[SocketAddr] {
        &self.peers
    }

    /// Checks the group is usable and numbers the next operation.
    fn start(&mut self, op: Op) -> Result<u64, CommError> {
        if let Some(first) = &self.poisoned {
            return Err(CommError::Poisoned {
                op,
                first: first.clone(),
            });
        }
        self.seq += 1;
        Ok(self.seq)
    }

    /// Passes a result through; on a failure poisons the group and tells the next rank who is
    /// at fault, so that ranks further along the ring name it too.
    async fn finish<T>(&mut self, op: Op, r: Result<T, CommError>) -> Result<T, CommError> {
        let e = match r {
            Ok(v) => return Ok(v),
            Err(e @ CommError::InvalidArgument { .. }) => return Err(e),
            Err(e) => e,
        };
        tracing::warn!(rank = self.cfg.rank, %op, error = %e, "rlhf-comm operation failed; the group is now unusable");
        self.poisoned = Some(e.to_string());
        if let (Some(tx), Some(origin)) = (self.tx.as_mut(), e.peer()) {
            // The rank at fault needs no telling (and may be dead or stalled, which would only
            // delay this error).
            if origin != tx.peer {
                let grace = self.cfg.timeout.min(ABORT_GRACE);
                let ctx = Ctx {
                    op,
                    timeout: grace,
                    peers: &self.peers,
                };
                // Best effort: the error to return is `e` whatever happens here.
                let _ = timeout(grace, tx.abort(&ctx, origin, e.abort_code())).await;
            }
            let _ = tx.stream.shutdown().await;
        }
        Err(e)
    }

    fn invalid_root(&self, op: Op, root: usize) -> Result<(), CommError> {
        if root >= self.cfg.world {
            return Err(CommError::InvalidArgument {
                op,
                detail: format!("root {root} is not a rank of a group of {}", self.cfg.world),
            });
        }
        Ok(())
    }

    async fn broadcast_inner(
        &mut self,
        seq: u64,
        root: usize,
        buf: &mut [u8],
    ) -> Result<(), CommError> {
        self.invalid_root(Op::Broadcast, root)?;
        let TcpGroup {
            cfg, peers, tx, rx, ..
        } = self;
        let (Some(tx), Some(rx)) = (tx.as_mut(), rx.as_mut()) else {
            return Ok(());
        };
        let (n, chunk) = (cfg.world, cfg.chunk_bytes);
        let ctx = Ctx {
            op: Op::Broadcast,
            timeout: cfg.timeout,
            peers,
        };
        let hdr = Header::new(TAG_OP, Op::Broadcast, root as u32, seq, buf.len() as u64);
        // Distance from the root along the ring: 0 sends, n-1 only receives, others forward.
        let d = (cfg.rank + n - root) % n;
        if d == 0 {
            tx.frame(&ctx, hdr, &[]).await?;
            return tx.data(&ctx, buf, chunk).await;
        }
        let theirs = rx.header(&ctx).await?;
        check_op(&ctx, rx.peer, &hdr, &theirs, "bytes")?;
        if d == n - 1 {
            return rx.data(&ctx, buf, chunk).await;
        }
        tx.frame(&ctx, hdr, &[]).await?;
        // Chunks go from the reader to the writer as they land; the channel carries disjoint
        // borrows of `buf`, so forwarding overlaps receiving without copies.
        let (chunks_tx, mut chunks_rx) = tokio::sync::mpsc::unbounded_channel::<&mut [u8]>();
        let recv = async {
            for c in buf.chunks_mut(chunk) {
                rx.data(&ctx, c, chunk).await?;
                // The writer only stops early on an error, which ends the join anyway.
                let _ = chunks_tx.send(c);
            }
            drop(chunks_tx);
            Ok(())
        };
        let send = async {
            while let Some(c) = chunks_rx.recv().await {
                tx.data(&ctx, c, chunk).await?;
            }
            Ok::<(), CommError>(())
        };
        tokio::try_join!(recv, send)?;
        Ok(())
    }

    /// All-reduce (`Op::AllReduce`) or reduce-scatter (`Op::ReduceScatter`) over the ring.
    /// The reduce half: in step `s` rank `r` sends segment `r-s-shift` and adds segment
    /// `r-s-shift-1` into its own copy, so each segment accumulates the ranks in ring order.
    /// All-reduce cuts [`ring_segment`]s with shift 0 (segment `k` starts at rank `k` and is
    /// complete at rank `k-1`), then runs the all-gather half; reduce-scatter cuts
    /// [`scatter_chunk`]s with shift 1, so rank `r` ends with chunk `r` complete.
    async fn ring_inner(
        &mut self,
        kind: Op,
        seq: u64,
        buf: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let TcpGroup {
            cfg,
            peers,
            tx,
            rx,
            scratch,
            ..
        } = self;
        let (Some(tx), Some(rx)) = (tx.as_mut(), rx.as_mut()) else {
            return Ok(()); // world 1: the sum and the mean of one buffer are the buffer
        };
        let (n, r, chunk) = (cfg.world, cfg.rank, cfg.chunk_bytes);
        let len = buf.len();
        let ctx = Ctx {
            op: kind,
            timeout: cfg.timeout,
            peers,
        };
        let hdr = Header::new(TAG_OP, kind, 0, seq, len as u64);
        let ((), theirs) = tokio::try_join!(tx.frame(&ctx, hdr, &[]), rx.header(&ctx))?;
        check_op(&ctx, rx.peer, &hdr, &theirs, "floats")?;
        if scratch.is_empty() {
            scratch.resize(chunk / 4, 0.0);
        }
        let scatter = kind == Op::ReduceScatter;
        let segment: fn(usize, usize, usize) -> Range<usize> =
            if scatter { scatter_chunk } else { ring_segment };
        let shift = usize::from(scatter);
        for s in 0..n - 1 {
            let (send, recv) = split(
                buf,
                segment(len, n, (r + 2 * n - s - shift) % n),
                segment(len, n, (r + 2 * n - s - shift - 1) % n),
            );
            tokio::try_join!(
                tx.data(&ctx, bytemuck::cast_slice(send), chunk),
                rx.reduce(&ctx, recv, scratch),
            )?;
        }
        let done = if scatter {
            scatter_chunk(len, n, r)
        } else {
            // All-gather: rank r starts with the finished segment r+1 and passes segments on;
            // they are copied, never re-added, which keeps every rank's result bit-identical.
            for s in 0..n - 1 {
                let (send, recv) = split(
                    buf,
                    ring_segment(len, n, (r + 1 + n - s) % n),
                    ring_segment(len, n, (r + n - s) % n),
                );
                tokio::try_join!(
                    tx.data(&ctx, bytemuck::cast_slice(send), chunk),
                    rx.data(&ctx, bytemuck::cast_slice_mut(recv), chunk),
                )?;
            }
            0..len
        };
        if op == ReduceOp::Mean {
            let w = n as f32;
            for x in &mut buf[done] {
                *x /= w;
            }
        }
        Ok(())
    }

    async fn all_gather_inner(
        &mut self,
        op: Op,
        seq: u64,
        local: &[f32],
    ) -> Result<Vec<Vec<f32>>, CommError> {
        let TcpGroup {
            cfg, peers, tx, rx, ..
        } = self;
        let (n, r, chunk) = (cfg.world, cfg.rank, cfg.chunk_bytes);
        let mut pieces = vec![Vec::new(); n];
        pieces[r] = local.to_vec();
        let (Some(tx), Some(rx)) = (tx.as_mut(), rx.as_mut()) else {
            return Ok(pieces);
        };
        let ctx = Ctx {
            op,
            timeout: cfg.timeout,
            peers,
        };
        // Lengths may differ between ranks, so the OP frame's length is not compared.
        let hdr = Header::new(TAG_OP, op, 0, seq, 0);
        let ((), theirs) = tokio::try_join!(tx.frame(&ctx, hdr, &[]), rx.header(&ctx))?;
        check_op(&ctx, rx.peer, &hdr, &theirs, "floats")?;
        for s in 0..n - 1 {
            let (send_k, recv_k) = ((r + n - s) % n, (r + 2 * n - s - 1) % n);
            let piece: &[u8] = bytemuck::cast_slice(&pieces[send_k]);
            let send = async {
                let hdr = Header::new(TAG_PIECE, op, send_k as u32, piece.len() as u64, 0);
                tx.frame(&ctx, hdr, &[]).await?;
                tx.data(&ctx, piece, chunk).await
            };
            let recv = async {
                let h = rx.header(&ctx).await?;
                if h.tag != TAG_PIECE
                    || h.aux as usize != recv_k
                    || h.a % 4 != 0
                    || h.a > MAX_PIECE_BYTES
                {
                    return Err(ctx.protocol(
                        rx.peer,
                        format!(
                            "expected rank {recv_k}'s piece, got tag {} for rank {} with {} bytes",
                            h.tag, h.aux, h.a
                        ),
                    ));
                }
                let mut v = vec![0f32; (h.a / 4) as usize];
                rx.data(&ctx, bytemuck::cast_slice_mut(&mut v), chunk)
                    .await?;
                Ok(v)
            };
            let ((), v) = tokio::try_join!(send, recv)?;
            pieces[recv_k] = v;
        }
        Ok(pieces)
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.cfg.rank
    }

    fn world(&self) -> usize {
        self.cfg.world
    }

    async fn broadcast(&mut self, root: usize, buf: &mut [u8]) -> Result<(), CommError> {
        let seq = self.start(Op::Broadcast)?;
        let r = self.broadcast_inner(seq, root, buf).await;
        self.finish(Op::Broadcast, r).await
    }

    async fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let seq = self.start(Op::AllReduce)?;
        let r = self.ring_inner(Op::AllReduce, seq, buf, op).await;
        self.finish(Op::AllReduce, r).await
    }

    async fn reduce_scatter(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let seq = self.start(Op::ReduceScatter)?;
        let r = self.ring_inner(Op::ReduceScatter, seq, buf, op).await;
        self.finish(Op::ReduceScatter, r).await
    }

    async fn all_gather(&mut self, local: &[f32]) -> Result<Vec<Vec<f32>>, CommError> {
        let seq = self.start(Op::AllGather)?;
        let r = self.all_gather_inner(Op::AllGather, seq, local).await;
        self.finish(Op::AllGather, r).await
    }

    async fn barrier(&mut self) -> Result<(), CommError> {
        let seq = self.start(Op::Barrier)?;
        let r = self.all_gather_inner(Op::Barrier, seq, &[]).await.map(drop);
        self.finish(Op::Barrier, r).await
    }
}

/// Compares the previous rank's `OP` frame with this rank's call.
fn check_op(
    ctx: &Ctx<'_>,
    peer: usize,
    ours: &Header,
    theirs: &Header,
    unit: &str,
) -> Result<(), CommError> {
    if theirs.tag != TAG_OP {
        return Err(ctx.protocol(
            peer,
            format!(
                "expected the start of {}, got frame tag {}",
                ctx.op, theirs.tag
            ),
        ));
    }
    if theirs.a != ours.a {
        return Err(ctx.mismatch(
            peer,
            format!("it is at operation #{}, this rank at #{}", theirs.a, ours.a),
        ));
    }
    if theirs.aux != ours.aux {
        return Err(ctx.mismatch(
            peer,
            format!("root {} there, root {} here", theirs.aux, ours.aux),
        ));
    }
    if theirs.b != ours.b {
        return Err(ctx.mismatch(
            peer,
            format!("{} {unit} there, {} {unit} here", theirs.b, ours.b),
        ));
    }
    Ok(())
}

/// Borrows two disjoint ranges of `buf`, the first shared and the second mutable.
fn split(buf: &mut [f32], send: Range<usize>, recv: Range<usize>) -> (&[f32], &mut [f32]) {
    if send.end <= recv.start {
        let (lo, hi) = buf.split_at_mut(recv.start);
        (&lo[send], &mut hi[..recv.len()])
    } else {
        let (lo, hi) = buf.split_at_mut(send.start);
        (&hi[..send.len()], &mut lo[recv])
    }
}

/// The connector's opening: magic, protocol version, its challenge.
const OPENING: usize = 8 + 4 + NONCE;
/// The connector's settings, sent only after the acceptor proved the key: rank, world,
/// chunk_bytes (u32 each) and the group id (u64), little-endian.
const FIELDS: usize = 20;

fn fields(cfg: &GroupConfig) -> [u8; FIELDS] {
    let mut f = [0u8; FIELDS];
    f[0..4].copy_from_slice(&(cfg.rank as u32).to_le_bytes());
    f[4..8].copy_from_slice(&(cfg.world as u32).to_le_bytes());
    f[8..12].copy_from_slice(&(cfg.chunk_bytes as u32).to_le_bytes());
    f[12..20].copy_from_slice(&cfg.group_id.to_le_bytes());
    f
}

/// Why an authenticated connecting rank's settings are not acceptable to this one (`None`:
/// accept). Only a peer that proved the run's key gets here, so the reason may name the group.
fn refusal(f: &[u8], cfg: &GroupConfig, prev: usize) -> Option<String> {
    let u32_at = |i: usize| u32::from_le_bytes([f[i], f[i + 1], f[i + 2], f[i + 3]]);
    let mut group = [0u8; 8];
    group.copy_from_slice(&f[12..20]);
    let group = u64::from_le_bytes(group);
    let (rank, world, chunk) = (u32_at(0), u32_at(4), u32_at(8));
    if group != cfg.group_id {
        return Some(format!(
            "group id mismatch: the connecting rank is in group {group}, rank {} is in group {}",
            cfg.rank, cfg.group_id
        ));
    }
    if world as usize != cfg.world {
        return Some(format!("world mismatch: {world} there, {} here", cfg.world));
    }
    if chunk as usize != cfg.chunk_bytes {
        return Some(format!(
            "chunk_bytes mismatch: {chunk} there, {} here",
            cfg.chunk_bytes
        ));
    }
    if rank as usize != prev {
        return Some(format!(
            "rank {rank} connected, but rank {} accepts only rank {prev} (its ring predecessor)",
            cfg.rank
        ));
    }
    None
}

enum Handshake {
    Refused(String),
    Io(io::Error),
}

/// The connecting side: sends a challenge, checks the acceptor's tag over both challenges, then
/// sends its settings with its own tag and reads the verdict
/// (`[status u8, 0, 0, 0, reason_len u32, reason]`).
async fn handshake(s: &mut TcpStream, cfg: &GroupConfig) -> Result<(), Handshake> {
    let nc = auth::nonce().map_err(Handshake::Io)?;
    let mut opening = [0u8; OPENING];
    opening[..8].copy_from_slice(MAGIC);
    opening[8..12].copy_from_slice(&VERSION.to_le_bytes());
    opening[12..].copy_from_slice(&nc);
    s.write_all(&opening).await.map_err(Handshake::Io)?;
    let mut answer = [0u8; NONCE + TAG];
    s.read_exact(&mut answer).await.map_err(Handshake::Io)?;
    let mut na = [0u8; NONCE];
    na.copy_from_slice(&answer[..NONCE]);
    if !cfg.key.check_acceptor(&nc, &na, &answer[NONCE..]) {
        return Err(Handshake::Refused(
            "it did not prove this run's collective key: the process listening there belongs \
             to another run or is not an rlhf worker; check the group's addresses"
                .to_string(),
        ));
    }
    let f = fields(cfg);
    let mut msg = [0u8; FIELDS + TAG];
    msg[..FIELDS].copy_from_slice(&f);
    msg[FIELDS..].copy_from_slice(&cfg.key.connector_tag(&nc, &na, &f));
    s.write_all(&msg).await.map_err(Handshake::Io)?;
    let mut reply = [0u8; 8];
    s.read_exact(&mut reply).await.map_err(Handshake::Io)?;
    if reply[0] == 0 {
        return Ok(());
    }
    let len = u32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]).min(4096) as usize;
    let mut reason = vec![0u8; len];
    s.read_exact(&mut reason).await.map_err(Handshake::Io)?;
    Err(Handshake::Refused(
        String::from_utf8_lossy(&reason).into_owned(),
    ))
}

/// The accepting side of one connection (see [`handshake`]): `Some` when it is the expected
/// rank, proved the key and was told so. A connection that does not prove the key is closed
/// with nothing said: all it got is a challenge and a tag over its own challenge, which tell
/// nothing about the group.
async fn answer(
    mut s: TcpStream,
    from: SocketAddr,
    cfg: &GroupConfig,
    prev: usize,
) -> Option<TcpStream> {
    let rank = cfg.rank;
    let mut opening = [0u8; OPENING];
    s.read_exact(&mut opening).await.ok()?;
    if &opening[..8] != MAGIC || opening[8..12] != VERSION.to_le_bytes() {
        tracing::warn!(rank, %from, "dropped a connection that did not open an rlhf-comm v{VERSION} handshake");
        return None;
    }
    let mut nc = [0u8; NONCE];
    nc.copy_from_slice(&opening[12..]);
    let na = match auth::nonce() {
        Ok(n) => n,
        Err(error) => {
            tracing::warn!(rank, %from, %error, "no challenge for a connecting rank; dropped it");
            return None;
        }
    };
    let mut ours = [0u8; NONCE + TAG];
    ours[..NONCE].copy_from_slice(&na);
    ours[NONCE..].copy_from_slice(&cfg.key.acceptor_tag(&nc, &na));
    s.write_all(&ours).await.ok()?;
    let mut msg = [0u8; FIELDS + TAG];
    s.read_exact(&mut msg).await.ok()?;
    let (f, tag) = msg.split_at(FIELDS);
    if !cfg.key.check_connector(&nc, &na, f, tag) {
        tracing::warn!(rank, %from, "dropped a connection that did not prove this run's collective key");
        return None;
    }
    let verdict = refusal(f, cfg, prev);
    let reason = verdict.clone().unwrap_or_default();
    let mut reply = vec![u8::from(verdict.is_some()), 0, 0, 0];
    reply.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    reply.extend_from_slice(reason.as_bytes());
    let sent = s.write_all(&reply).await;
    match verdict {
        Some(reason) => {
            tracing::warn!(rank, %from, %reason, "refused a connection");
            None
        }
        None if sent.is_ok() => Some(s),
        None => {
            tracing::debug!(rank, %from, "handshake reply failed; still waiting");
            None
        }
    }
}

async fn connect_next(
    cfg: &GroupConfig,
    peers: &[SocketAddr],
    next: usize,
    deadline: Instant,
) -> Result<TcpStream, CommError> {
    let addr = peers[next];
    let mut last = io::Error::new(io::ErrorKind::TimedOut, "no attempt finished in time");
    loop {
        if Instant::now() >= deadline {
            return Err(CommError::Connect {
                peer: next,
                addr,
                timeout: cfg.timeout,
                source: last,
            });
        }
        let attempt = async {
            let mut s = TcpStream::connect(addr).await.map_err(Handshake::Io)?;
            handshake(&mut s, cfg).await?;
            Ok(s)
        };
        match timeout_at(deadline, attempt).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(Handshake::Refused(reason))) => {
                return Err(CommError::Refused {
                    peer: next,
                    addr,
                    reason,
                })
            }
            // Not listening yet (or went away mid-handshake): normal while ranks start up.
            Ok(Err(Handshake::Io(e))) => {
                last = e;
                sleep_until((Instant::now() + RETRY).min(deadline)).await;
            }
            Err(_) => {
                last = io::Error::new(io::ErrorKind::TimedOut, "connect or handshake timed out")
            }
        }
    }
}

/// Accepts connections until the previous rank's handshake succeeds. Handshakes run
/// concurrently, each under its own [`HELLO_TIMEOUT`], so connections that say nothing (or
/// stall halfway) cost the expected rank no waiting; at most [`MAX_PENDING_HANDSHAKES`] are
/// open at once, the oldest dropped for a new one, so a flood cannot hold sockets forever nor
/// keep the real rank out.
async fn accept_prev(
    cfg: &GroupConfig,
    peers: &[SocketAddr],
    listener: &TcpListener,
    prev: usize,
    deadline: Instant,
) -> Result<TcpStream, CommError> {
    let mut pending: JoinSet<Option<TcpStream>> = JoinSet::new();
    let mut order: VecDeque<AbortHandle> = VecDeque::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, from)) => {
                    order.retain(|h| !h.is_finished());
                    if order.len() >= MAX_PENDING_HANDSHAKES {
                        if let Some(oldest) = order.pop_front() {
                            oldest.abort();
                            tracing::warn!(rank = cfg.rank, "too many unfinished handshakes; dropped the oldest");
                        }
                    }
                    let by = (Instant::now() + HELLO_TIMEOUT).min(deadline);
                    let cfg = cfg.clone();
                    order.push_back(pending.spawn(async move {
                        let r = timeout_at(by, answer(s, from, &cfg, prev)).await;
                        r.unwrap_or_else(|_| {
                            tracing::warn!(rank = cfg.rank, %from, "dropped a connection that did not finish the rlhf-comm handshake in time");
                            None
                        })
                    }));
                }
                Err(e) => {
                    // Per-connection failures (e.g. aborted before accept) must not end the wait.
                    tracing::debug!(rank = cfg.rank, error = %e, "accept failed; still waiting");
                    sleep_until((Instant::now() + RETRY).min(deadline)).await;
                }
            },
            Some(done) = pending.join_next(), if !pending.is_empty() => {
                // Dropping `pending` on return aborts the handshakes still open.
                if let Ok(Some(s)) = done {
                    return Ok(s);
                }
            }
            () = sleep_until(deadline) => {
                return Err(CommError::AcceptTimeout {
                    peer: prev,
                    addr: peers[prev],
                    timeout: cfg.timeout,
                });
            }
        }
    }
}
