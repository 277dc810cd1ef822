//! `rlhf-comm`: collectives between the ranks of a worker group — [`Collective::broadcast`],
//! [`Collective::all_reduce`], [`Collective::all_gather`] and [`Collective::barrier`] — behind
//! one small async trait, [`Collective`], and its CPU implementation over TCP, [`TcpGroup`] (a
//! ring on tokio). Weight sync from the trainer to separate generators is a broadcast; gradient
//! sync between data-parallel ranks is an all-reduce. With the `nccl` feature (on by default),
//! `NcclGroup` runs the same collectives on GPU memory through NCCL, blocking and on raw device
//! pointers rather than through the trait (see its module docs); it loads libcuda and libnccl
//! at run time, so building needs no CUDA and `nccl_available` says whether a machine can use it.
//!
//! May use: tokio (sockets, timers), bytemuck (safe `f32` ↔ byte views), hmac + sha2 + rand
//! (the handshake), thiserror, tracing;
//! with `nccl`, cudarc (the CUDA driver, dynamically loaded) and libloading (libnccl).
//! Knows nothing about tensors, tch, gRPC or the controller, and imports no other crate of the
//! workspace: a worker hands it plain `f32`/byte buffers or device addresses, and the group's
//! addresses (or NCCL unique id bytes) arrive from the coordinator (over gRPC, later).
//!
//! **Invariant:** every rank ends an [`Collective::all_reduce`] with bit-identical results. Each
//! element is summed exactly once, in a fixed order that depends only on the element's ring
//! segment ([`ring_segment`]): for segment `k` the sum is `((v[k] + v[k+1]) + …) + v[k-1]`
//! (ranks modulo `world`), and the finished segment is copied, not re-added, to the other ranks.
//! **Invariant:** every operation has a timeout ([`GroupConfig::timeout`]): a peer that makes no
//! progress for that long, or that closes its connection, ends the operation with an error, never
//! a hang. A closed connection is reported at once, not after the timeout.
//! **Invariant:** errors name the operation, the peer's rank and its address ([`CommError`]);
//! when a rank fails it tells the next rank, so ranks further along the ring name the rank at
//! fault rather than their neighbour. After an error the group is unusable (every later call
//! fails with [`CommError::Poisoned`]); rebuild it.
//! **Boundary:** [`TcpGroup::connect`] is where a group meets the network: a handshake proves
//! the run's [`CollectiveKey`] both ways (HMAC-SHA256 over random challenges) before anything
//! about the group is said, then carries the group id and rank; a connection without the key is
//! dropped unanswered, one from another group or the wrong rank is refused with a reason.

mod auth;
mod error;
#[cfg(feature = "nccl")]
mod nccl;
pub mod net;
mod tcp;
mod wire;

use std::future::Future;
use std::ops::Range;

pub use auth::CollectiveKey;
pub use error::{CommError, Op};
#[cfg(feature = "nccl")]
pub use nccl::{
    nccl_available, NcclGroup, NcclGroupConfig, NcclUniqueId, NCCL_LIBRARY_ENV,
    NCCL_UNIQUE_ID_BYTES,
};
pub use tcp::{bind, bind_local, GroupConfig, TcpGroup};

// The wire format is the in-memory layout of `f32` (little-endian), sent without conversion.
#[cfg(not(target_endian = "little"))]
compile_error!(
    "rlhf-comm sends f32 buffers in native byte order and supports little-endian targets only"
);

/// How [`Collective::all_reduce`] combines the ranks' buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum, in ring order (see the crate docs).
    Sum,
    /// The sum divided by `world` (each rank divides the same bits, so results stay identical).
    Mean,
}

/// Collective operations over a group of `world` ranks, numbered `0..world`.
///
/// Every rank of the group must make the same sequence of calls with matching arguments (same
/// `root`, same buffer length for broadcast and all-reduce); a mismatch is detected and reported
/// as [`CommError::Mismatch`]. Calls take `&mut self`: one operation at a time per group. On any
/// error the buffer's contents are unspecified and the group is poisoned.
pub trait Collective {
    /// This process's rank, `0..world`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world(&self) -> usize;

    /// Copies `root`'s `buf` into `buf` on every other rank. Lengths must agree.
    fn broadcast(
        &mut self,
        root: usize,
        buf: &mut [u8],
    ) -> impl Future<Output = Result<(), CommError>> + Send;

    /// [`Collective::broadcast`] for `f32` buffers (sent as their little-endian bytes).
    fn broadcast_f32(
        &mut self,
        root: usize,
        buf: &mut [f32],
    ) -> impl Future<Output = Result<(), CommError>> + Send {
        self.broadcast(root, bytemuck::cast_slice_mut(buf))
    }

    /// Replaces `buf` on every rank with the element-wise reduction over all ranks. Lengths must
    /// agree. Results are bit-identical on every rank.
    fn all_reduce(
        &mut self,
        buf: &mut [f32],
        op: ReduceOp,
    ) -> impl Future<Output = Result<(), CommError>> + Send;

    /// Reduces `buf` element-wise over all ranks and leaves rank `r` with its chunk
    /// [`scatter_chunk`]`(len, world, r)` of the result (the rest of `buf` is unspecified).
    /// Lengths must agree. The sharded gradient reduction of ZeRO: afterwards each rank holds
    /// the reduced gradient of the elements it updates.
    fn reduce_scatter(
        &mut self,
        buf: &mut [f32],
        op: ReduceOp,
    ) -> impl Future<Output = Result<(), CommError>> + Send;

    /// Returns every rank's `local`, indexed by rank. Lengths may differ between ranks.
    fn all_gather(
        &mut self,
        local: &[f32],
    ) -> impl Future<Output = Result<Vec<Vec<f32>>, CommError>> + Send;

    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> impl Future<Output = Result<(), CommError>> + Send;
}

/// The elements of a `len`-element all-reduce buffer that form ring segment `k` of `world`.
///
/// Segment `k` is reduced starting at rank `k` (see the crate docs), so this is what a caller
/// needs to reproduce the exact floating-point result. Segments are contiguous, in order, and
/// differ in length by at most one.
pub fn ring_segment(len: usize, world: usize, k: usize) -> Range<usize> {
    assert!(world > 0 && k < world, "segment {k} of a group of {world}");
    // u128 so that `len * world` cannot overflow for any buffer that fits in memory.
    let at = |i: usize| (i as u128 * len as u128 / world as u128) as usize;
    at(k)..at(k + 1)
}

/// Elements per bucket of a flat f32 gradient (64 MiB): the unit in which workers run their
/// gradient and optimizer-state collectives and split ZeRO ownership, and the transient f32
/// copy `rlhf-coord plan` counts for it.
pub const GRAD_BUCKET_ELEMS: usize = 16 << 20;

/// The elements of a `len`-element buffer that rank `k` of `world` owns after
/// [`Collective::reduce_scatter`]: equal chunks of `ceil(len / world)` elements in rank order,
/// the last ones cut short (or empty) at `len`. Equal chunks are what `ncclReduceScatter` and
/// `ncclAllGather` need, so both backends shard a buffer the same way.
pub fn scatter_chunk(len: usize, world: usize, k: usize) -> Range<usize> {
    assert!(world > 0 && k < world, "chunk {k} of a group of {world}");
    let c = len.div_ceil(world);
    (k * c).min(len)..((k + 1) * c).min(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_tile_the_buffer() {
        for world in 1..6 {
            for len in [0, 1, 2, 7, 100, 1001] {
                let mut next = 0;
                for k in 0..world {
                    let r = ring_segment(len, world, k);
                    assert_eq!(r.start, next);
                    assert!(r.len() == len / world || r.len() == len / world + 1);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}
