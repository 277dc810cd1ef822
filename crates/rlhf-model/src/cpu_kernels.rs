//! The CPU-only kernels: forwards without gradients of an f32 model on x86-64 CPUs with AVX2 and
//! FMA, computed on plain f32 buffers instead of through libtorch's ops. Everything in
//! rlhf-model that uses SIMD intrinsics, raw-pointer arithmetic or libgomp lives behind this
//! module; the rest of the crate (`llama.rs`, `lora.rs`) reaches it only through the entry
//! surface below, all of it safe to call.
//!
//! - [`packed`]: [`PackedLinear`], a linear layer's weight packed once per `generate` /
//!   `token_logprobs_from` call into 16-output k-major panels, and its 6-row x 16-output GEMM
//!   kernel (software prefetch: decode weights stream from memory every step), threaded on
//!   libtorch's own libgomp team.
//! - [`decode`]: one decoder layer of one decode step ([`layer_step`]: RMSNorm, fused q/k/v and
//!   gate/up projections, rotary, the key/value cache write, attention per (row, head), SiLU
//!   gating, residuals) and the final [`rms_norm`].
//!
//! Entry surface, in the order a caller uses it:
//! 1. [`available`]`(threads)`: whether this CPU and process can run the kernels at all.
//!    `Model::pack_weights` asks first and keeps libtorch's path when not.
//! 2. [`PackedLinear::pack`] (and [`to_vec`] for norm weights and rotary tables): the weights,
//!    laid out once; `None` for a weight the kernel does not suit, which stays with libtorch.
//! 3. [`PackedLinear::forward`]: `x W^T + b` of a (rows, in) tensor, for the row-major layer
//!    loop (`Attention/Mlp::forward_packed`); [`layer_step`] + [`rms_norm`] with [`CpuLayer`],
//!    [`Dims`] and [`Step`]: whole decode steps (`Model::decode_packed`).
//!
//! Why they exist and what they gain: the module docs of [`packed`] and [`decode`], and
//! docs/benchmarks.md.
//!
//! **Invariant:** a [`PackedLinear`] exists only where the CPU has AVX2 and FMA (`pack` checks),
//! so every kernel reached through one, or through a [`CpuLayer`] made of them, runs on a CPU
//! that has the instructions it was compiled for.
//! **Invariant:** each row's values are computed from that row alone, in an order independent
//! of row and thread counts, so sharded generation stays bitwise equal to whole-batch
//! generation; the unit test `packed_decode_steps_equal_the_libtorch_ones` (llama.rs) holds
//! them to the libtorch path within 1e-5.
//! **Boundary:** the functions re-exported here are the only way in; the `unsafe` code behind
//! them documents its contract in `# Safety` sections and every block says why it holds.

mod decode;
mod packed;

pub(crate) use decode::{layer_step, rms_norm, CpuLayer, Dims, Step};
pub(crate) use packed::{available, to_vec, PackedLinear};
