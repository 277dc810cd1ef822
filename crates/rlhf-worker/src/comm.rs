//! A role's collective groups (through `rlhf-comm`) and what the role does with them: the
//! gradient reduction of data-parallel replicas over the flat f32 gradient (all-reduce, or with
//! ZeRO reduce-scatter plus the all-gather of updated weights and of the optimizer state), the
//! weight broadcast from the training actor
//! to generators, and the weight digest that proves replicas and generators bitwise equal.
//!
//! The groups live on the role's thread next to its tensors. A group is TCP ([`TcpGroup`]: host
//! memory, any device) or NCCL ([`NcclGroup`]: CUDA device memory, no host copies). TCP
//! collectives are async (tokio sockets); the role thread drives them with the runtime's
//! [`Handle::block_on`], which is allowed because role threads are not runtime threads. NCCL
//! collectives block the role thread until they finished on the device.
//!
//! **Invariant:** both sides of a collective walk the model's tensors in the same order (name
//! order, as `named_tensors` returns them) and cut buckets at the same offsets, so the layouts
//! agree without sending them; a digest of the layout is exchanged first and a mismatch is an
//! error naming both sides' model, never a silent garbage copy.
//! **Invariant:** a receiver swaps in new weights only after the whole model arrived.

use std::ops::Range;

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};
use tokio::runtime::Handle;

use rlhf_comm::{scatter_chunk, Collective, NcclGroup, ReduceOp, TcpGroup, GRAD_BUCKET_ELEMS};

use crate::error::{RoleError, RoleResult};

/// Bytes per TCP weight broadcast bucket.
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

/// One group, over either backend.
pub enum Group {
    Tcp(TcpGroup),
    Nccl(NcclGroup),
}

impl Group {
    fn rank(&self) -> usize {
        match self {
            Group::Tcp(g) => g.rank(),
            Group::Nccl(g) => g.rank(),
        }
    }

    fn world(&self) -> usize {
        match self {
            Group::Tcp(g) => g.world(),
            Group::Nccl(g) => g.world(),
        }
    }
}

/// A role's groups.
pub struct Groups {
    rt: Handle,
    grads: Option<Group>,
    weights: Option<Group>,
    /// Host staging for TCP weight sync (the whole model's bytes) and for TCP gradient
    /// all-reduce (one bucket), kept between calls so each one does not allocate and fault in
    /// fresh pages again.
    staging: Vec<u8>,
    grad_buf: Vec<f32>,
}

impl Groups {
    pub fn new(rt: Handle) -> Groups {
        Groups {
            rt,
            grads: None,
            weights: None,
            staging: Vec::new(),
            grad_buf: Vec::new(),
        }
    }

    /// Installs a joined group, replacing an earlier one of the same purpose.
    pub fn set(&mut self, purpose: Purpose, group: Group) {
        match purpose {
            Purpose::Gradients => self.grads = Some(group),
            Purpose::Weights => self.weights = Some(group),
        }
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
        let t0 = std::time::Instant::now();
        match group {
            Group::Tcp(tcp) => {
                self.rt.block_on(tcp.broadcast(root, &mut header))?;
                check_header(&header, &layout, total, root, sender)?;
                tcp_sync(&self.rt, tcp, root, sender, vars, &mut self.staging, total)?;
            }
            Group::Nccl(nccl) => {
                let device = vars.first().map_or(Device::Cpu, |(_, t)| t.device());
                let h = Tensor::f_from_slice(&header)?.f_to_device(device)?;
                // SAFETY: `h` is 40 contiguous bytes on the group's device, alive during the call.
                unsafe { nccl.broadcast_raw(root, h.data_ptr() as u64, header.len())? };
                let got = Vec::<u8>::try_from(h.f_to_device(Device::Cpu)?)?;
                header.copy_from_slice(&got);
                check_header(&header, &layout, total, root, sender)?;
                nccl_sync(nccl, root, sender, vars)?;
            }
        }
        tracing::debug!(
            bytes = total,
            sender,
            secs = t0.elapsed().as_secs_f64(),
            "weight sync"
        );
        Ok((total as u64, vars.len() as u64))
    }
}

impl Groups {
    /// (rank, world) in the gradients group; (0, 1) without one.
    pub fn grad_rank(&self) -> (usize, usize) {
        self.grads
            .as_ref()
            .map_or((0, 1), |g| (g.rank(), g.world()))
    }

    /// Sums the f32 flat buffer `flat` (contiguous, on any device) over the replicas in place,
    /// bucket by bucket ([`flat_buckets`]). A no-op without a gradient group of two or more.
    pub fn all_reduce_flat(&mut self, flat: &Tensor) -> RoleResult<()> {
        let Some(group) = self.grads.as_mut().filter(|g| g.world() > 1) else {
            return Ok(());
        };
        let _g = tch::no_grad_guard();
        for b in flat_buckets(flat.numel() as i64) {
            let part = flat.f_narrow(0, b.start, b.end - b.start)?;
            match group {
                Group::Tcp(tcp) => {
                    let buf = host_copy(&part, &mut self.grad_buf)?;
                    self.rt.block_on(tcp.all_reduce(buf, ReduceOp::Sum))?;
                    part.shallow_clone().f_copy_(&Tensor::f_from_slice(buf)?)?;
                }
                Group::Nccl(nccl) => {
                    let c = part.f_contiguous()?;
                    // SAFETY: `c` is a contiguous f32 tensor on the group's device, alive and
                    // used by nothing else until the call returned (it waits for the device).
                    unsafe {
                        nccl.all_reduce_f32_raw(c.data_ptr() as u64, c.numel(), ReduceOp::Sum)?
                    };
                    part.shallow_clone().f_copy_(&c)?;
                }
            }
        }
        Ok(())
    }

    /// Reduce-scatters the f32 flat buffer `flat` (the whole gradient, `total` long) over the
    /// replicas bucket by bucket and adds this rank's chunk of each bucket, in order, into
    /// `owned` (f32, the length of [`owned_ranges`]). Without a group of two or more it adds
    /// `flat` whole.
    pub fn reduce_scatter_flat(&mut self, flat: &Tensor, owned: &Tensor) -> RoleResult<()> {
        let (rank, world) = self.grad_rank();
        let _g = tch::no_grad_guard();
        let mut at = 0i64;
        for b in flat_buckets(flat.numel() as i64) {
            let len = b.end - b.start;
            let mine = chunk(len, world, rank);
            let n = mine.end - mine.start;
            let part = flat.f_narrow(0, b.start, len)?;
            let reduced = match self.grads.as_mut().filter(|g| g.world() > 1) {
                None => part,
                Some(Group::Tcp(tcp)) => {
                    let buf = host_copy(&part, &mut self.grad_buf)?;
                    self.rt.block_on(tcp.reduce_scatter(buf, ReduceOp::Sum))?;
                    let r = scatter_chunk(len as usize, world, rank);
                    Tensor::f_from_slice(&buf[r])?.f_to_device(owned.device())?
                }
                Some(Group::Nccl(nccl)) => {
                    // Padded to world equal chunks, reduced in place into this rank's chunk.
                    let per = (len as u64).div_ceil(world as u64) as i64;
                    let padded =
                        Tensor::f_zeros([per * world as i64], (Kind::Float, part.device()))?;
                    padded.f_narrow(0, 0, len)?.f_copy_(&part)?;
                    let base = padded.data_ptr() as u64;
                    // SAFETY: `padded` is a contiguous f32 device tensor of world * per elements;
                    // the receive pointer is its chunk `rank` (in place), alive until the call
                    // returned (it waits for the device).
                    unsafe {
                        nccl.reduce_scatter_f32_raw(
                            base,
                            base + (rank as i64 * per * 4) as u64,
                            per as usize,
                            ReduceOp::Sum,
                        )?
                    };
                    padded.f_narrow(0, rank as i64 * per, per)?
                }
            };
            // World 1: the chunk is the whole bucket; NCCL's chunk may carry padding.
            let src = reduced.f_narrow(0, 0, n)?;
            let _ = owned.f_narrow(0, at, n)?.f_add_(&src)?;
            at += n;
        }
        Ok(())
    }

    /// [`Groups::reduce_scatter_flat`] of the gradients `grads` (flat order, any float dtype)
    /// one bucket at a time, so the only f32 copy is one bucket's.
    pub fn reduce_scatter_grads(
        &mut self,
        grads: &[(String, Tensor)],
        owned: &Tensor,
    ) -> RoleResult<()> {
        let (rank, world) = self.grad_rank();
        let total: i64 = grads.iter().map(|(_, t)| t.numel() as i64).sum();
        let mut at = 0i64;
        for b in flat_buckets(total) {
            let n = {
                let c = chunk(b.end - b.start, world, rank);
                c.end - c.start
            };
            let part = read_flat(grads, b.start, b.end)?;
            self.reduce_scatter_flat(&part, &owned.f_narrow(0, at, n)?)?;
            at += n;
        }
        Ok(())
    }

    /// Gives every replica the elements of `params` (flat order) that the other replicas own
    /// and just updated: in each bucket every rank contributes its chunk.
    pub fn all_gather_params(&mut self, params: &[(String, Tensor)]) -> RoleResult<()> {
        let (rank, world) = self.grad_rank();
        let Some(group) = self.grads.as_mut().filter(|g| g.world() > 1) else {
            return Ok(());
        };
        let _g = tch::no_grad_guard();
        let total: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
        for b in flat_buckets(total) {
            let len = b.end - b.start;
            let mine = chunk(len, world, rank);
            let local = read_flat(params, b.start + mine.start, b.start + mine.end)?;
            match group {
                Group::Tcp(tcp) => {
                    let buf = host_copy(&local, &mut self.grad_buf)?;
                    let pieces = self.rt.block_on(tcp.all_gather(buf))?;
                    for (k, piece) in pieces.iter().enumerate() {
                        if k != rank {
                            let c = chunk(len, world, k);
                            write_flat(params, b.start + c.start, &Tensor::f_from_slice(piece)?)?;
                        }
                    }
                }
                Group::Nccl(nccl) => {
                    let per = (len as u64).div_ceil(world as u64) as i64;
                    let all = nccl_all_gather(nccl, &local, per)?;
                    for k in (0..world).filter(|&k| k != rank) {
                        let c = chunk(len, world, k);
                        let src = all.f_narrow(0, k as i64 * per, c.end - c.start)?;
                        write_flat(params, b.start + c.start, &src)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Every replica's `flat` (its f32 values over its [`owned_ranges`] of a `total`-element
    /// flat vector, concatenated) as one full flat tensor, on every replica.
    pub fn all_gather_flat(&mut self, flat: &Tensor, total: i64) -> RoleResult<Tensor> {
        let world = self.grad_rank().1;
        let Some(group) = self.grads.as_mut().filter(|g| g.world() > 1) else {
            return Ok(flat.shallow_clone());
        };
        let _g = tch::no_grad_guard();
        let lens: Vec<i64> = (0..world)
            .map(|k| {
                owned_ranges(total, k, world)
                    .iter()
                    .map(|r| r.end - r.start)
                    .sum()
            })
            .collect();
        let parts: Vec<Tensor> = match group {
            Group::Tcp(tcp) => {
                let buf = host_copy(flat, &mut self.grad_buf)?;
                let pieces = self.rt.block_on(tcp.all_gather(buf))?;
                pieces
                    .iter()
                    .map(|p| Ok(Tensor::f_from_slice(p)?.f_to_device(flat.device())?))
                    .collect::<RoleResult<_>>()?
            }
            Group::Nccl(nccl) => {
                let per = lens.iter().copied().max().unwrap_or(0);
                let all = nccl_all_gather(nccl, flat, per)?;
                (0..world)
                    .map(|k| Ok(all.f_narrow(0, k as i64 * per, lens[k])?))
                    .collect::<RoleResult<_>>()?
            }
        };
        let owned: Vec<(Vec<Range<i64>>, Tensor)> = parts
            .into_iter()
            .enumerate()
            .map(|(k, t)| (owned_ranges(total, k, world), t))
            .collect();
        Ok(rlhf_algo::assemble(total, &owned)?)
    }
}

/// The flat ranges rank `rank` of `world` owns in a `total`-element vector: its chunk
/// ([`scatter_chunk`]) of every [`GRAD_BUCKET_ELEMS`] bucket, so reduce-scatter and all-gather
/// run bucket by bucket.
pub fn owned_ranges(total: i64, rank: usize, world: usize) -> Vec<Range<i64>> {
    flat_buckets(total)
        .map(|b| {
            let c = chunk(b.end - b.start, world, rank);
            b.start + c.start..b.start + c.end
        })
        .filter(|r| r.end > r.start)
        .collect()
}

/// Buckets of [`GRAD_BUCKET_ELEMS`] over a `total`-element flat vector.
fn flat_buckets(total: i64) -> impl Iterator<Item = Range<i64>> {
    let step = GRAD_BUCKET_ELEMS as i64;
    (0..(total as u64).div_ceil(step as u64) as i64)
        .map(move |i| i * step..((i + 1) * step).min(total))
}

fn chunk(len: i64, world: usize, rank: usize) -> Range<i64> {
    let r = scatter_chunk(len as usize, world, rank);
    r.start as i64..r.end as i64
}

/// Every rank's `local` (f32, on the group's device, at most `per` elements) in one tensor of
/// `world * per` elements, rank `k`'s at `k * per` (zero-padded): NCCL's all-gather needs
/// equal lengths.
fn nccl_all_gather(nccl: &mut NcclGroup, local: &Tensor, per: i64) -> RoleResult<Tensor> {
    let (rank, world) = (nccl.rank() as i64, nccl.world() as i64);
    let all = Tensor::f_zeros([per * world], (Kind::Float, local.device()))?;
    let slot = all.f_narrow(0, rank * per, per)?;
    slot.f_narrow(0, 0, local.numel() as i64)?.f_copy_(local)?;
    // SAFETY: `all` is a contiguous f32 device tensor of world * per elements and the send
    // pointer its own chunk (in place), alive until the call returned (it waits for the device).
    unsafe {
        nccl.all_gather_f32_raw(slot.data_ptr() as u64, all.data_ptr() as u64, per as usize)?
    };
    Ok(all)
}

/// `t` (f32, any device) copied into the reused host buffer `buf`.
fn host_copy<'a>(t: &Tensor, buf: &'a mut Vec<f32>) -> RoleResult<&'a mut [f32]> {
    let n = t.numel();
    buf.resize(n, 0.0);
    let host = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    host.f_copy_data(&mut buf[..n], n)?;
    Ok(&mut buf[..n])
}

/// Elements `start..end` of the concatenation of `params` (flattened, in order), as f32.
pub fn read_flat(params: &[(String, Tensor)], start: i64, end: i64) -> RoleResult<Tensor> {
    let mut parts = vec![];
    let mut off = 0i64;
    for (_, p) in params {
        let n = p.numel() as i64;
        let (s, e) = (start.max(off), end.min(off + n));
        if s < e {
            parts.push(
                p.f_view([-1])?
                    .f_narrow(0, s - off, e - s)?
                    .f_to_kind(Kind::Float)?,
            );
        }
        off += n;
    }
    let dev = params.first().map_or(Device::Cpu, |(_, t)| t.device());
    Ok(if parts.is_empty() {
        Tensor::f_zeros([0], (Kind::Float, dev))?
    } else {
        Tensor::f_cat(&parts, 0)?
    })
}

/// Writes `src` into the concatenation of `params` from flat element `start` (cast to each
/// parameter's dtype, moved to its device).
pub fn write_flat(params: &[(String, Tensor)], start: i64, src: &Tensor) -> RoleResult<()> {
    let end = start + src.numel() as i64;
    let mut off = 0i64;
    for (_, p) in params {
        let n = p.numel() as i64;
        let (s, e) = (start.max(off), end.min(off + n));
        if s < e {
            let piece = src.f_narrow(0, s - start, e - s)?.f_to_device(p.device())?;
            p.f_view([-1])?
                .f_narrow(0, s - off, e - s)?
                .f_copy_(&piece)?;
        }
        off += n;
    }
    Ok(())
}

fn check_header(
    header: &[u8; 40],
    layout: &[u8; 32],
    total: usize,
    root: usize,
    sender: bool,
) -> RoleResult<()> {
    if !sender && (header[..32] != layout[..] || header[32..] != (total as u64).to_le_bytes()) {
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
    Ok(())
}

/// TCP weight sync through host staging: the sender copies every tensor into `staging` and
/// broadcasts it in buckets; receivers copy in only after all of it arrived.
fn tcp_sync(
    rt: &Handle,
    tcp: &mut TcpGroup,
    root: usize,
    sender: bool,
    vars: &[(String, Tensor)],
    staging: &mut Vec<u8>,
    total: usize,
) -> RoleResult<()> {
    staging.resize(total, 0);
    if sender {
        let mut off = 0;
        for (_, t) in vars {
            let n = byte_len(t);
            let c = t.f_to_device(Device::Cpu)?.f_contiguous()?;
            c.f_copy_data_u8(&mut staging[off..off + n], t.numel())?;
            off += n;
        }
    }
    for chunk in staging.chunks_mut(WEIGHT_BUCKET_BYTES) {
        rt.block_on(tcp.broadcast(root, chunk))?;
    }
    if !sender {
        let _g = tch::no_grad_guard();
        let mut off = 0;
        for (_, v) in vars {
            let n = byte_len(v);
            let bytes = &staging[off..off + n];
            // SAFETY: `bytes` holds exactly `numel` elements of `v`'s kind (the layouts
            // matched), and the view is dropped (after `copy_` read it) before `staging` is
            // touched again.
            let src = unsafe {
                Tensor::f_from_blob(bytes.as_ptr(), &v.size(), &[], v.kind(), Device::Cpu)?
            };
            v.shallow_clone().f_copy_(&src)?;
            drop(src);
            off += n;
        }
    }
    Ok(())
}

/// NCCL weight sync on device memory: the sender broadcasts straight from its parameters;
/// receivers receive into device staging tensors and copy in only after all arrived.
fn nccl_sync(
    nccl: &mut NcclGroup,
    root: usize,
    sender: bool,
    vars: &[(String, Tensor)],
) -> RoleResult<()> {
    let _g = tch::no_grad_guard();
    let targets: Vec<Tensor> = vars
        .iter()
        .map(|(_, t)| {
            if sender {
                t.f_contiguous()
            } else {
                t.f_empty_like()
            }
        })
        .collect::<Result<_, _>>()?;
    for t in &targets {
        // SAFETY: `t` is contiguous device memory of `byte_len(t)` bytes on the group's device
        // (the parameters, or staging made like them), alive until the call returned.
        unsafe { nccl.broadcast_raw(root, t.data_ptr() as u64, byte_len(t))? };
    }
    if !sender {
        for ((_, v), t) in vars.iter().zip(&targets) {
            v.shallow_clone().f_copy_(t)?;
        }
    }
    Ok(())
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
