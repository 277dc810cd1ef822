//! Errors of the collectives: every one names the operation and, where a peer is at fault, its
//! rank and address.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// The operation an error happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Forming the group: connecting to the next rank and accepting the previous one.
    Rendezvous,
    /// [`crate::Collective::broadcast`].
    Broadcast,
    /// [`crate::Collective::all_reduce`].
    AllReduce,
    /// [`crate::Collective::all_gather`].
    AllGather,
    /// [`crate::Collective::barrier`].
    Barrier,
    /// [`crate::Collective::reduce_scatter`].
    ReduceScatter,
}

impl Op {
    pub(crate) fn code(self) -> u8 {
        match self {
            Op::Rendezvous => 0,
            Op::Broadcast => 1,
            Op::AllReduce => 2,
            Op::AllGather => 3,
            Op::Barrier => 4,
            Op::ReduceScatter => 5,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Op> {
        [
            Op::Rendezvous,
            Op::Broadcast,
            Op::AllReduce,
            Op::AllGather,
            Op::Barrier,
            Op::ReduceScatter,
        ]
        .into_iter()
        .find(|op| op.code() == code)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Rendezvous => "rendezvous",
            Op::Broadcast => "broadcast",
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::Barrier => "barrier",
            Op::ReduceScatter => "reduce_scatter",
        })
    }
}

/// An error of a collective operation or of forming a group.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The caller passed something no group could accept (rank out of range, wrong number of
    /// addresses, a root that is not a rank).
    #[error("{op}: invalid argument: {detail}")]
    InvalidArgument {
        /// The operation.
        op: Op,
        /// What is wrong, naming the value.
        detail: String,
    },
    /// A local listener could not be created.
    #[error("rendezvous: cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The next rank could not be reached before the rendezvous deadline.
    #[error(
        "rendezvous: cannot connect to rank {peer} at {addr} within {timeout:?} (last error: \
         {source}); check that rank {peer} was started and listens on that address"
    )]
    Connect {
        /// The rank we tried to reach.
        peer: usize,
        /// Its address.
        addr: SocketAddr,
        /// The rendezvous timeout.
        timeout: Duration,
        /// The last connection error.
        source: io::Error,
    },
    /// The previous rank did not connect before the rendezvous deadline.
    #[error(
        "rendezvous: rank {peer} ({addr}) did not connect within {timeout:?}; check that it was \
         started with the same group id and address list"
    )]
    AcceptTimeout {
        /// The rank we waited for.
        peer: usize,
        /// Its address.
        addr: SocketAddr,
        /// The rendezvous timeout.
        timeout: Duration,
    },
    /// The next rank answered our handshake with a refusal (another group, world or rank).
    #[error("rendezvous: rank {peer} at {addr} refused this rank: {reason}")]
    Refused {
        /// The rank that refused.
        peer: usize,
        /// Its address.
        addr: SocketAddr,
        /// Its explanation.
        reason: String,
    },
    /// A peer made no progress for the group's timeout: dead, stalled or not in this operation.
    #[error("{op}: no progress from rank {peer} ({addr}) for {timeout:?}; the peer is dead, stalled or not in this operation")]
    Timeout {
        /// The operation.
        op: Op,
        /// The silent rank.
        peer: usize,
        /// Its address.
        addr: SocketAddr,
        /// The group's timeout.
        timeout: Duration,
    },
    /// A peer closed (or reset) its connection.
    #[error("{op}: rank {peer} ({addr}) closed the connection; the peer exited or failed")]
    Closed {
        /// The operation.
        op: Op,
        /// The rank whose connection closed.
        peer: usize,
        /// Its address.
        addr: SocketAddr,
    },
    /// Another socket error on the connection with a peer.
    #[error("{op}: i/o error with rank {peer} ({addr}): {source}")]
    Io {
        /// The operation.
        op: Op,
        /// The peer.
        peer: usize,
        /// Its address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// Ranks called different operations, or with different roots or lengths.
    #[error("{op}: rank {peer} ({addr}) disagrees with this rank: {detail}; every rank must make the same calls with the same lengths")]
    Mismatch {
        /// The operation this rank is in.
        op: Op,
        /// The disagreeing rank.
        peer: usize,
        /// Its address.
        addr: SocketAddr,
        /// What differs, with both values.
        detail: String,
    },
    /// A peer sent bytes that are not a valid frame.
    #[error("{op}: rank {peer} ({addr}) sent an invalid frame: {detail}")]
    Protocol {
        /// The operation.
        op: Op,
        /// The peer.
        peer: usize,
        /// Its address.
        addr: SocketAddr,
        /// What was wrong.
        detail: String,
    },
    /// Another rank failed and the failure was relayed along the ring.
    #[error("{op}: rank {peer} ({addr}) failed: {reason} (reported by rank {via})")]
    PeerFailed {
        /// The operation.
        op: Op,
        /// The rank at fault.
        peer: usize,
        /// Its address.
        addr: SocketAddr,
        /// What went wrong with it.
        reason: &'static str,
        /// The neighbour that relayed the report.
        via: usize,
    },
    /// The NCCL backend could not be loaded, or a call into NCCL or the CUDA driver failed. The
    /// detail names the group and this rank where there is one, the failing call and NCCL's or
    /// CUDA's own explanation.
    #[error("{op}: {detail}")]
    Backend {
        /// The operation.
        op: Op,
        /// What failed and what to do about it.
        detail: String,
    },
    /// A device collective (NCCL) did not finish within the group's timeout. NCCL reports no
    /// progress of its own, so the whole operation is what had to finish in time; the
    /// communicator was aborted.
    #[error(
        "{op}: rank {rank} of group {group_id}: not finished after {timeout:?}, the peers made no \
         progress for that long; a peer is dead, stalled or not in this operation (the NCCL \
         communicator was aborted: form a new group)"
    )]
    BackendTimeout {
        /// The operation.
        op: Op,
        /// The group's id.
        group_id: u64,
        /// This rank.
        rank: usize,
        /// The group's timeout.
        timeout: Duration,
    },
    /// An earlier operation failed; the group must be rebuilt.
    #[error("{op}: the group is unusable after an earlier error ({first}); form a new group")]
    Poisoned {
        /// The operation attempted now.
        op: Op,
        /// The first error, as text.
        first: String,
    },
}

impl CommError {
    /// A group setting that no group could accept (`op` = rendezvous).
    pub(crate) fn bad_setting(detail: String) -> CommError {
        CommError::InvalidArgument {
            op: Op::Rendezvous,
            detail,
        }
    }

    /// Checks that `rank` is a rank of a group of `world`.
    pub(crate) fn check_rank(rank: usize, world: usize) -> Result<(), CommError> {
        if world == 0 || rank >= world {
            return Err(CommError::bad_setting(format!(
                "rank {rank} is not in 0..{world} (world)"
            )));
        }
        Ok(())
    }

    /// The rank at fault, where one is known.
    pub fn peer(&self) -> Option<usize> {
        match self {
            CommError::Connect { peer, .. }
            | CommError::AcceptTimeout { peer, .. }
            | CommError::Refused { peer, .. }
            | CommError::Timeout { peer, .. }
            | CommError::Closed { peer, .. }
            | CommError::Io { peer, .. }
            | CommError::Mismatch { peer, .. }
            | CommError::Protocol { peer, .. }
            | CommError::PeerFailed { peer, .. } => Some(*peer),
            CommError::InvalidArgument { .. }
            | CommError::Bind { .. }
            | CommError::Backend { .. }
            | CommError::BackendTimeout { .. }
            | CommError::Poisoned { .. } => None,
        }
    }

    /// True for a deadline that passed (no progress, or rendezvous not complete in time).
    pub fn is_timeout(&self) -> bool {
        match self {
            CommError::Timeout { .. }
            | CommError::AcceptTimeout { .. }
            | CommError::BackendTimeout { .. } => true,
            CommError::Connect { source, .. } => source.kind() == io::ErrorKind::TimedOut,
            CommError::PeerFailed { reason, .. } => *reason == REASON_TIMEOUT,
            _ => false,
        }
    }

    /// The reason code sent along the ring when this error ends an operation.
    pub(crate) fn abort_code(&self) -> u32 {
        match self {
            CommError::Timeout { .. } => 1,
            CommError::Closed { .. } => 2,
            CommError::Mismatch { .. } => 3,
            CommError::Protocol { .. } => 4,
            CommError::PeerFailed { reason, .. } => reason_code(reason),
            _ => 0,
        }
    }
}

const REASON_TIMEOUT: &str = "no progress within the timeout";
const REASONS: [&str; 5] = [
    "i/o error",
    REASON_TIMEOUT,
    "connection closed",
    "mismatched call",
    "invalid frame",
];

fn reason_code(reason: &str) -> u32 {
    REASONS.iter().position(|r| *r == reason).unwrap_or(0) as u32
}

/// The text of an abort reason code received from a peer.
pub(crate) fn reason_text(code: u32) -> &'static str {
    REASONS.get(code as usize).copied().unwrap_or(REASONS[0])
}
