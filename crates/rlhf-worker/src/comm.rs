//! A role's collective groups (through `rlhf-comm`) and what the role does with them: the
//! gradient all-reduce of data-parallel replicas, the weight broadcast from the training actor
//! to generators, and the weight digest that proves replicas and generators bitwise equal.
//!
//! The groups live on the role's thread next to its tensors. Collectives are async (tokio
//! sockets); the role thread drives them with the runtime's [`Handle::block_on`], which is
//! allowed because role threads are not runtime threads.
//!
//! **Invariant:** both sides of a collective walk the model's tensors in the same order (name
//! order, as `named_tensors` returns them) and cut buckets at the same byte offsets, so the
//! layouts agree without sending them; a digest of the layout is exchanged first and a
//! mismatch is an error naming both sides' model, never a silent garbage copy.
//! **Invariant:** a receiver swaps in new weights only after the whole model arrived.

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};
use tokio::runtime::Handle;

use rlhf_comm::{Collective, ReduceOp, TcpGroup};

use crate::error::{RoleError, RoleResult};

/// Elements per gradient all-reduce bucket (64 MiB of f32).
const GRAD_BUCKET_ELEMS: usize = 16 << 20;
/// Bytes per weight broadcast bucket.
const WEIGHT_BUCKET_BYTES: usize = 64 << 20;

/// What a group is for (one of each per role at most).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Data-parallel replicas: gradients are all-reduced in every train step.
    Gradients,
    /// The training actor (root) and the generators: weights are broadcast.
    Weights,
}

impl Purpose {
    pub fn name(self) -> &'static str {
        match self {
            Purpose::Gradients => "gradients",
            Purpose::Weights => "weights",
        }
    }
}

/// A role's groups.
pub struct Groups {
    rt: Handle,
    grads: Option<TcpGroup>,
    weights: Option<TcpGroup>,
}

impl Groups {
    pub fn new(rt: Handle) -> Groups {
        Groups {
            rt,
            grads: None,
            weights: None,
        }
    }

    /// Installs a joined group, replacing an earlier one of the same purpose.
    pub fn set(&mut self, purpose: Purpose, group: TcpGroup) {
        match purpose {
            Purpose::Gradients => self.grads = Some(group),
            Purpose::Weights => self.weights = Some(group),
        }
    }

    /// Number of data-parallel replicas (1 without a gradient group).
    pub fn replicas(&self) -> usize {
        self.grads.as_ref().map_or(1, |g| g.world())
    }

    /// Sums every parameter's gradient over the replicas, in buckets; afterwards all replicas
    /// hold bit-identical gradients (rlhf-comm's ring order). A no-op without a gradient group.
    /// Every replica runs the same graph, so a parameter has a gradient on all or on none.
    pub fn all_reduce_grads(&mut self, vars: &[(String, Tensor)]) -> RoleResult<()> {
        let Some(group) = self.grads.as_mut() else {
            return Ok(());
        };
        if group.world() == 1 {
            return Ok(());
        }
        let _g = tch::no_grad_guard();
        let grads: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| v.grad())
            .filter(|g| g.defined())
            .collect();
        let mut start = 0;
        while start < grads.len() {
            // One bucket: tensors from `start` while they fit (a larger one goes alone).
            let mut end = start;
            let mut elems = 0usize;
            while end < grads.len() {
                let n = grads[end].numel();
                if end > start && elems + n > GRAD_BUCKET_ELEMS {
                    break;
                }
                elems += n;
                end += 1;
            }
            let mut buf = vec![0f32; elems];
            let mut off = 0;
            for g in &grads[start..end] {
                let n = g.numel();
                let flat = g
                    .f_to_device(Device::Cpu)?
                    .f_to_kind(Kind::Float)?
                    .f_contiguous()?;
                flat.f_copy_data(&mut buf[off..off + n], n)?;
                off += n;
            }
            self.rt
                .block_on(group.all_reduce(&mut buf, ReduceOp::Sum))?;
            let mut off = 0;
            for g in &grads[start..end] {
                let n = g.numel();
                let src = Tensor::f_from_slice(&buf[off..off + n])?.f_view(g.size().as_slice())?;
                let mut g = g.shallow_clone();
                g.f_copy_(&src)?;
                off += n;
            }
            start = end;
        }
        Ok(())
    }

    /// Broadcasts `vars` from rank `root` of the weights group to every other member, which
    /// copies them into its own `vars` once all bytes arrived. Returns (bytes, tensors).
    pub fn sync_weights(
        &mut self,
        root: usize,
        vars: &[(String, Tensor)],
    ) -> RoleResult<(u64, u64)> {
        let group = self.weights.as_mut().ok_or_else(|| {
            RoleError::bad(
                "role_id",
                "this role has joined no weights group (JoinGroup with purpose WEIGHTS first)"
                    .into(),
            )
        })?;
        if root >= group.world() {
            return Err(RoleError::bad(
                "root",
                format!("{root} is not a rank of a group of {}", group.world()),
            ));
        }
        let sender = group.rank() == root;
        let layout = layout_digest(vars);
        let total: usize = vars.iter().map(|(_, t)| byte_len(t)).sum();
        // Header: the sender's layout digest and size; receivers compare with their own.
        let mut header = [0u8; 40];
        header[..32].copy_from_slice(&layout);
        header[32..].copy_from_slice(&(total as u64).to_le_bytes());
        self.rt.block_on(group.broadcast(root, &mut header))?;
        if !sender && (header[..32] != layout || header[32..] != (total as u64).to_le_bytes()) {
            let theirs = u64::from_le_bytes(header[32..].try_into().expect("8 bytes"));
            return Err(RoleError::bad(
                "weights",
                format!(
                    "the sender's model (rank {root}, {theirs} bytes) has another layout than this \
                     role's ({total} bytes): names, shapes or dtype differ; the actor and the \
                     generators must load the same policy with the same models.dtype"
                ),
            ));
        }
        let mut buf = vec![0u8; total];
        if sender {
            let mut off = 0;
            for (_, t) in vars {
                let n = byte_len(t);
                let c = t.f_to_device(Device::Cpu)?.f_contiguous()?;
                c.f_copy_data_u8(&mut buf[off..off + n], t.numel())?;
                off += n;
            }
        }
        for chunk in buf.chunks_mut(WEIGHT_BUCKET_BYTES) {
            self.rt.block_on(group.broadcast(root, chunk))?;
        }
        if !sender {
            let _g = tch::no_grad_guard();
            let mut off = 0;
            for (_, v) in vars {
                let n = byte_len(v);
                let src = Tensor::f_from_data_size(&buf[off..off + n], &v.size(), v.kind())?;
                let mut v = v.shallow_clone();
                v.f_copy_(&src)?;
                off += n;
            }
        }
        Ok((total as u64, vars.len() as u64))
    }
}

fn byte_len(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// SHA-256 over the names, dtypes and shapes of `vars`, in order.
fn layout_digest(vars: &[(String, Tensor)]) -> [u8; 32] {
    let mut h = Sha256::new();
    for (name, t) in vars {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(format!("{:?}{:?}", t.kind(), t.size()).as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

/// SHA-256 (hex) over each tensor's name, dtype, shape and bytes in order, and the byte count.
pub fn weights_digest(vars: &[(String, Tensor)]) -> RoleResult<(String, u64)> {
    let mut h = Sha256::new();
    h.update(layout_digest(vars));
    let mut bytes = 0u64;
    let mut buf = Vec::new();
    for (_, t) in vars {
        let n = byte_len(t);
        buf.resize(n, 0);
        t.f_to_device(Device::Cpu)?
            .f_contiguous()?
            .f_copy_data_u8(&mut buf, t.numel())?;
        h.update(&buf);
        bytes += n as u64;
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, bytes))
}
