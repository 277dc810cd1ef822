//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2): RMSNorm, rotary embeddings with
//! Llama 3 / linear scaling, grouped-query attention, SwiGLU MLP, optional tied embeddings and
//! q/k/v bias.
//!
//! Paper: Touvron et al. 2023, "Llama 2" (arXiv:2307.09288). Reference implementation:
//! `transformers/models/llama/modeling_llama.py` (and `qwen2`, `mistral` beside it); the
//! parity test in `tests/parity.rs` holds this file to it.
//!
//! Layer structs mirror checkpoint keys (`model.layers.N.self_attn.q_proj.weight`, ...): the
//! `VarStore` path of every weight *is* its safetensors name.

use std::path::Path;

use tch::{nn, nn::Module, Device, Kind, Tensor};

use crate::config::{Config, HeadKind, RopeScaling};
use crate::cpu_kernels::{self, CpuLayer, Dims, PackedLinear, Step};
use crate::error::{ModelError, Result};
use crate::lora::{Adapter, LayerAdapters, Lora, Target};
use crate::weights::{self, WeightFiles};

mod checkpoint;
pub use checkpoint::Checkpointed;

/// How a model is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Run in this dtype instead of the stored one. Default: the stored `torch_dtype`, except
    /// that reduced precision on CPU is promoted to f32 when `cpu_f32` is set.
    pub dtype: Option<Kind>,
    /// Replace the head named by `config.json`, e.g. a critic (`Score{1}`) initialised from a
    /// policy checkpoint. A head missing from the file is then freshly initialised.
    pub head: Option<HeadKind>,
    /// Seed for any freshly initialised head. Default 0.
    pub seed: i64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: None,
            head: None,
            seed: 0,
        }
    }
}

/// How a model is saved.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Store in this dtype. Default: the dtype the model runs in.
    pub dtype: Option<Kind>,
    /// Shard when the weights exceed this many bytes (HF's default is 5 GB).
    pub max_shard_bytes: usize,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            dtype: None,
            max_shard_bytes: 5_000_000_000,
        }
    }
}

/// Where one layer's attention gets its keys and values besides this call's own tokens.
enum LayerKv<'a> {
    /// Only this call's tokens.
    Own,
    /// A preallocated decode cache (keys, values) filled up to the offset: written, then read.
    Cache(&'a mut (Tensor, Tensor), i64),
    /// Only this call's tokens, and their keys/values are kept (a prefix pass).
    Record(&'a mut Vec<(Tensor, Tensor)>),
    /// A prefix's keys/values (b, n_kv, w, head_dim), one per row, in front of this call's own.
    After(&'a (Tensor, Tensor)),
}

/// How [`Model::trunk`] feeds each layer's attention.
enum KvMode<'a> {
    Own,
    Cache(&'a mut KvCache),
    Record(Vec<(Tensor, Tensor)>),
    After(Vec<(Tensor, Tensor)>),
}

/// Attention mask in the form SDPA wants; the cheap forms are chosen when no padding is present.
pub(crate) enum AttnMask {
    /// Plain causal over a prefill with no cache and no padding (`is_causal` kernel path).
    Causal,
    /// Every key visible (decode step, no padding).
    All,
    /// Boolean (b, 1, t, T), true = attend.
    Explicit(Tensor),
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm {
            weight: p.var("weight", &[dim], nn::Init::Const(1.0)),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        // Statistics in f32 whatever the model dtype, as HF's LlamaRMSNorm does.
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = xf * (var + self.eps).rsqrt();
        &self.weight * normed.to_kind(kind)
    }

    /// The same over a feature-major (hidden, rows) `x`: statistics over dim 0.
    fn forward_fm(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(0, true, Kind::Float);
        let normed = xf * (var + self.eps).rsqrt();
        self.weight.unsqueeze(1) * normed.to_kind(kind)
    }
}

fn linear(p: nn::Path, i: i64, o: i64, bias: bool, std: f64) -> nn::Linear {
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: std,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias,
        },
    )
}

/// Rows at or below which a linear layer computes `(W x^T)^T` instead of `x W^T`. For a few rows
/// (decode steps) the weight-streaming GEMM is memory-bound, and MKL packs the transposed weight
/// on every call, reading it twice; with the weight as the left operand only the small
/// activation is packed. Measured on the 2-core dev machine: 14% less time per decode GEMM at
/// 16 rows, slower from 64 rows on (see docs/benchmarks.md).
pub(crate) const SMALL_M_ROWS: i64 = 32;

/// `x W^T + b` over the last dimension, picking the faster GEMM form for few rows.
fn linear_fwd(l: &nn::Linear, x: &Tensor) -> Tensor {
    let size = x.size();
    let k = size[size.len() - 1];
    let rows = x.numel() as i64 / k.max(1);
    if rows > SMALL_M_ROWS || rows == 0 {
        return l.forward(x);
    }
    let x2 = x.reshape([rows, k]);
    // (out, k) @ (k, rows) -> (rows, out)
    let mut y = l.ws.mm(&x2.tr()).tr();
    if let Some(b) = &l.bs {
        y = y + b;
    }
    let mut out_shape = size;
    let last = out_shape.len() - 1;
    out_shape[last] = l.ws.size()[0];
    y.contiguous().view(out_shape.as_slice())
}

/// `W xᵀ + b` of a feature-major (in, rows) `x_t`, feature-major out: (out, rows). With the
/// activation already transposed and contiguous, MKL streams the weight without repacking either
/// operand; 20–25% faster per decode GEMM than [`linear_fwd`]'s form at 32 rows (docs/benchmarks.md).
fn linear_fm(l: &nn::Linear, x_t: &Tensor) -> Tensor {
    let y = l.ws.mm(x_t);
    match &l.bs {
        Some(b) => y + b.unsqueeze(1),
        None => y,
    }
}

/// [`linear_fwd`] plus the projection's adapter, if any.
fn proj(l: &nn::Linear, ad: Option<&Adapter<'_>>, x: &Tensor) -> Tensor {
    let y = linear_fwd(l, x);
    match ad {
        Some(ad) => y + ad.delta(x),
        None => y,
    }
}

/// [`linear_fm`] plus the projection's adapter, if any.
fn proj_fm(l: &nn::Linear, ad: Option<&Adapter<'_>>, x_t: &Tensor) -> Tensor {
    let y = linear_fm(l, x_t);
    match ad {
        Some(ad) => y + ad.delta_fm(x_t),
        None => y,
    }
}

struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    n_heads: i64,
    n_kv: i64,
    head_dim: i64,
}

impl Attention {
    fn new(p: nn::Path, c: &Config) -> Self {
        let (h, hd) = (c.hidden_size as i64, c.head_dim as i64);
        let (nh, nkv) = (c.num_attention_heads as i64, c.num_key_value_heads as i64);
        let std = c.initializer_range;
        Attention {
            q_proj: linear(&p / "q_proj", h, nh * hd, c.qkv_bias, std),
            k_proj: linear(&p / "k_proj", h, nkv * hd, c.qkv_bias, std),
            v_proj: linear(&p / "v_proj", h, nkv * hd, c.qkv_bias, std),
            o_proj: linear(&p / "o_proj", nh * hd, h, c.o_bias, std),
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        kv: LayerKv<'_>,
        ad: &LayerAdapters<'_>,
    ) -> Tensor {
        let (b, t, _) = x.size3().unwrap_or((0, 0, 0));
        let q = proj(&self.q_proj, ad.get(Target::Q), x).view([b, t, self.n_heads, self.head_dim]);
        let k = proj(&self.k_proj, ad.get(Target::K), x).view([b, t, self.n_kv, self.head_dim]);
        let v = proj(&self.v_proj, ad.get(Target::V), x).view([b, t, self.n_kv, self.head_dim]);
        let y = self.attend(&q, &k, &v, cos, sin, mask, kv);
        proj(&self.o_proj, ad.get(Target::O), &y)
    }

    /// [`Attention::forward`] with the projections through `l`'s packed weights (q/k/v fused).
    /// No autograd graph: for forwards without gradients only.
    fn forward_packed(
        &self,
        x: &Tensor,
        l: &CpuLayer,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        kv: LayerKv<'_>,
    ) -> Result<Tensor> {
        let (b, t, h) = x.size3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv, self.head_dim);
        let qkv = l.qkv.forward(&x.reshape([b * t, h]))?;
        // Contiguous copies of q and k (attend's rotary needs them); v may stay a view.
        let part = |from: i64, heads: i64| qkv.narrow(1, from * hd, heads * hd);
        let q = part(0, nh).contiguous().view([b, t, nh, hd]);
        let k = part(nh, nkv).contiguous().view([b, t, nkv, hd]);
        let v = part(nh + nkv, nkv).reshape([b, t, nkv, hd]);
        let y = self.attend(&q, &k, &v, cos, sin, mask, kv);
        Ok(l.o.forward(&y.view([b * t, nh * hd]))?.view([b, t, -1]))
    }

    /// One decode step over a feature-major (hidden, rows) `x_t`; returns the output the same
    /// way. The projections run as [`linear_fm`]; attention runs on the row-major layout
    /// ([`Attention::attend`]): q and k are transposed back (two small copies), v is a view.
    fn forward_fm(
        &self,
        x_t: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        kv: LayerKv<'_>,
        ad: &LayerAdapters<'_>,
    ) -> Tensor {
        let b = x_t.size()[1];
        let row_major = |l: &nn::Linear, t: Target, heads: i64| {
            proj_fm(l, ad.get(t), x_t)
                .tr()
                .contiguous()
                .view([b, 1, heads, self.head_dim])
        };
        let q = row_major(&self.q_proj, Target::Q, self.n_heads);
        let k = row_major(&self.k_proj, Target::K, self.n_kv);
        let v = proj_fm(&self.v_proj, ad.get(Target::V), x_t).tr().reshape([
            b,
            1,
            self.n_kv,
            self.head_dim,
        ]);
        let y = self.attend(&q, &k, &v, cos, sin, mask, kv);
        proj_fm(
            &self.o_proj,
            ad.get(Target::O),
            &y.view([b, self.n_heads * self.head_dim]).tr().contiguous(),
        )
    }

    /// Attention of (b, t, heads, head_dim) projections (q and k contiguous): rotary
    /// embeddings, the keys and values fed as `kv` says, SDPA; (b, t, n_heads * head_dim) out.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        kv: LayerKv<'_>,
    ) -> Tensor {
        let (b, t) = (q.size()[0], q.size()[1]);
        // Rotary embeddings on the projections' own (b, t, heads, head_dim) layout, then
        // (b, heads, t, head_dim) views for attention.
        let q = apply_rotary(q, cos, sin).transpose(1, 2);
        let k = apply_rotary(k, cos, sin).transpose(1, 2);
        let v = v.transpose(1, 2);
        let (k, v) = match kv {
            LayerKv::Own => (k, v),
            LayerKv::Cache((kc, vc), offset) => {
                // Write this step's keys/values into the preallocated slots, then attend over
                // everything filled so far: (b, n_kv, offset + t, head_dim).
                kc.narrow(2, offset, t).copy_(&k);
                vc.narrow(2, offset, t).copy_(&v);
                (kc.narrow(2, 0, offset + t), vc.narrow(2, 0, offset + t))
            }
            LayerKv::Record(out) => {
                out.push((k.shallow_clone(), v.shallow_clone()));
                (k, v)
            }
            // Differentiable: gradients flow back into the prefix pass through `cat`.
            LayerKv::After((pk, pv)) => (Tensor::cat(&[pk, &k], 2), Tensor::cat(&[pv, &v], 2)),
        };
        let gqa = self.n_kv != self.n_heads;
        let y = match mask {
            AttnMask::Causal => Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                true,
                None,
                gqa,
            ),
            AttnMask::All => Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                false,
                None,
                gqa,
            ),
            AttnMask::Explicit(m) => {
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, gqa)
            }
        };
        // (b, n_heads, t, head_dim) -> (b, t, n_heads * head_dim)
        y.transpose(1, 2)
            .contiguous()
            .view([b, t, self.n_heads * self.head_dim])
    }
}

/// `x * cos + rotate_half(x) * sin` (HF's rotary embedding) over a contiguous (b, t, heads,
/// head_dim) `x`, with cos and `sin_signed` (b, t, 1, head_dim) from [`Rope::at`].
/// `rotate_half(x) = cat(-x2, x1)`, so `rotate_half(x) * sin = cat(x2, x1) * cat(-sin1, sin2)`:
/// the halves swapped by one flip, times the sine with its first half negated (stored so by
/// [`Rope`]). Three kernels (mul, flip, addcmul) instead of five (neg, cat, mul, mul, add),
/// which counts in decode steps, where every layer does this twice on tiny tensors.
fn apply_rotary(x: &Tensor, cos: &Tensor, sin_signed: &Tensor) -> Tensor {
    let size = x.size();
    let half = size[3] / 2;
    let swapped = x
        .view([size[0], size[1], size[2], 2, half])
        .flip([3])
        .reshape(size.as_slice());
    let mut out = x * cos;
    let _ = out.addcmul_(&swapped, sin_signed);
    out
}

struct Mlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
}

impl Mlp {
    fn new(p: nn::Path, c: &Config) -> Self {
        let (h, i, std) = (
            c.hidden_size as i64,
            c.intermediate_size as i64,
            c.initializer_range,
        );
        Mlp {
            gate_proj: linear(&p / "gate_proj", h, i, c.mlp_bias, std),
            up_proj: linear(&p / "up_proj", h, i, c.mlp_bias, std),
            down_proj: linear(&p / "down_proj", i, h, c.mlp_bias, std),
        }
    }

    fn forward(&self, x: &Tensor, ad: &LayerAdapters<'_>) -> Tensor {
        let gate = proj(&self.gate_proj, ad.get(Target::Gate), x).silu();
        let up = proj(&self.up_proj, ad.get(Target::Up), x);
        proj(&self.down_proj, ad.get(Target::Down), &(gate * up))
    }

    /// [`Mlp::forward`] through `l`'s packed weights (gate/up fused). No autograd graph.
    fn forward_packed(x: &Tensor, l: &CpuLayer) -> Result<Tensor> {
        let (b, t, h) = x.size3()?;
        let gu = l.gate_up.forward(&x.reshape([b * t, h]))?;
        let i = gu.size()[1] / 2;
        let act = gu.narrow(1, 0, i).silu() * gu.narrow(1, i, i);
        Ok(l.down.forward(&act)?.view([b, t, h]))
    }

    /// The same over a feature-major (hidden, rows) `x_t`.
    fn forward_fm(&self, x_t: &Tensor, ad: &LayerAdapters<'_>) -> Tensor {
        let gate = proj_fm(&self.gate_proj, ad.get(Target::Gate), x_t).silu();
        let up = proj_fm(&self.up_proj, ad.get(Target::Up), x_t);
        proj_fm(&self.down_proj, ad.get(Target::Down), &(gate * up))
    }
}

struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// The layer over row-major (b, t, hidden) `x`, attention fed as `kv` says, projections
    /// through `packed` when given (no autograd graph then). The one layer body of the
    /// row-major paths: [`Model::trunk`] and the checkpointed forward and its recomputation.
    // The rotary tables, mask, cache mode, packed weights and adapters are each one layer's
    // view of a different per-forward value; bundling them would only move the list.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        kv: LayerKv<'_>,
        packed: Option<&CpuLayer>,
        ad: &LayerAdapters<'_>,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x);
        // Packed weights already hold the merged adapters (pack_weights).
        let attn = match packed {
            Some(l) => self.self_attn.forward_packed(&h, l, cos, sin, mask, kv)?,
            None => self.self_attn.forward(&h, cos, sin, mask, kv, ad),
        };
        let x = x + attn;
        let h = self.post_attention_layernorm.forward(&x);
        Ok(x + match packed {
            Some(l) => Mlp::forward_packed(&h, l)?,
            None => self.mlp.forward(&h, ad),
        })
    }
}

/// What [`Model::split_at_prefix`] returns: per pass (ids, positions, mask).
pub(crate) struct PrefixSplit {
    /// For each row, the index of its prefix among the prefix pass's rows.
    pub(crate) rows: Tensor,
    pub(crate) prefix: (Tensor, Tensor, AttnMask),
    /// The tokens after the prefix; `None` when the rows end with it.
    pub(crate) rest: Option<(Tensor, Tensor, AttnMask)>,
}

/// A model's weights packed by [`Model::pack_weights`] for forwards without gradients: per
/// layer the norms and the packed projections (q/k/v fused, gate/up fused), the final norm, and
/// the vocabulary head (`None`: its width is not a multiple of 16, libtorch computes it).
pub(crate) struct PackedWeights {
    layers: Vec<CpuLayer>,
    norm: Vec<f32>,
    dims: Dims,
    head: Option<PackedLinear>,
}

/// The per-layer key/value cache of one batch of sequences. An explicit value the caller owns,
/// preallocated to a capacity so decoding never reallocates.
pub struct KvCache {
    /// Per layer: (keys, values), each (b, n_kv, capacity, head_dim).
    layers: Vec<(Tensor, Tensor)>,
    len: i64,
    capacity: i64,
}

impl KvCache {
    /// A cache for the rows `rows` (int64 indices into this cache's batch), e.g. one prompt's
    /// prefill copied to each of its samples.
    pub fn select_rows(&self, rows: &Tensor) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((k.f_index_select(0, rows)?, v.f_index_select(0, rows)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: self.len,
            capacity: self.capacity,
        })
    }

    /// Positions filled so far.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }
}

/// Rotary tables, computed once per model in f32: (max_positions, head_dim).
struct Rope {
    cos: Tensor,
    /// `cat(-sin, sin)` of the frequencies: the sine with its first half negated.
    sin_signed: Tensor,
}

impl Rope {
    fn new(c: &Config, device: Device) -> Self {
        let dim = c.head_dim as i64;
        let f = (Kind::Float, device);
        // HF: 1 / base ** (arange(0, dim, 2) / dim), in f32.
        let exponent = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / dim as f64;
        let mut inv_freq = Tensor::pow_scalar(c.rope_theta, &exponent).reciprocal();
        match &c.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq = inv_freq / *factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                // transformers' _compute_llama3_parameters, op for op.
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
                let scaled =
                    inv_freq.where_self(&wavelen.le(low_freq_wavelen), &(&inv_freq / *factor));
                let smooth = (wavelen.reciprocal() * *old - *low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                let smoothed =
                    (smooth.ones_like() - &smooth) * &scaled / *factor + &smooth * &scaled;
                let is_medium = wavelen
                    .ge(high_freq_wavelen)
                    .logical_and(&wavelen.le(low_freq_wavelen));
                inv_freq = smoothed.where_self(&is_medium, &scaled);
            }
        }
        let t = Tensor::arange(c.max_position_embeddings as i64, f);
        // (max_pos, dim/2) -> (max_pos, dim)
        let freqs = t.unsqueeze(1) * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], 1);
        let sin = freqs.sin();
        Rope {
            cos: emb.cos(),
            sin_signed: Tensor::cat(&[&sin.neg(), &sin], 1),
        }
    }

    /// cos and the signed sine (see [`apply_rotary`]) gathered at `positions` (b, t): each
    /// (b, t, 1, head_dim) in `kind`.
    fn at(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let (b, t) = positions.size2().unwrap_or((0, 0));
        let flat = positions.reshape([-1]);
        let d = self.cos.size()[1];
        let cos = self.cos.index_select(0, &flat).view([b, t, 1, d]);
        let sin = self.sin_signed.index_select(0, &flat).view([b, t, 1, d]);
        (cos.to_kind(kind), sin.to_kind(kind))
    }
}

enum Head {
    /// `lm_head.weight`, or `None` when tied to the embedding.
    Lm(Option<Tensor>),
    /// `score.weight`: (num_labels, hidden).
    Score(Tensor),
}

/// A Llama-family transformer with a causal-LM or score head. Holds its own `VarStore`.
pub struct Model {
    pub config: Config,
    vs: nn::VarStore,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    head: Head,
    rope: Rope,
    kind: Kind,
    /// LoRA adapters in a `VarStore` of their own ([`crate::lora`]); `None`: a plain model.
    pub(crate) lora: Option<Lora>,
}

/// Held while seeding and drawing from libtorch's global generator ([`Model::new`]), so draws
/// on different threads do not interleave. Tests that draw random tensors take it too
/// ([`seeded_randn`]): a draw between another thread's seed and its draws changes its values.
pub(crate) fn global_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A standard-normal f32 CPU tensor drawn with `seed` under [`global_rng_lock`] (for tests).
#[cfg(test)]
pub(crate) fn seeded_randn(shape: &[i64], seed: i64) -> Tensor {
    let _rng = global_rng_lock();
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

impl Model {
    /// Builds the model with HF's random initialisation (normal(0, initializer_range) weights,
    /// zero biases, unit norms), seeded with `seed` through libtorch's global generator.
    ///
    /// **Invariant:** seeding and drawing happen under one process-wide lock, so models built
    /// at the same time on different threads (colocated roles, parallel tests) still get
    /// exactly the weights their seed gives.
    pub fn new(config: Config, device: Device, kind: Kind, seed: i64) -> Result<Model> {
        crate::cuda::check_device(device)?;
        let _init = global_rng_lock();
        tch::manual_seed(seed);
        let mut vs = nn::VarStore::new(device);
        let root = vs.root();
        let c = &config;
        let std = c.initializer_range;
        let m = &root / "model";
        let (v, h) = (c.vocab_size as i64, c.hidden_size as i64);
        let embed_tokens = (&m / "embed_tokens").var(
            "weight",
            &[v, h],
            nn::Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        );
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = &m / "layers" / i;
                DecoderLayer {
                    self_attn: Attention::new(&p / "self_attn", c),
                    mlp: Mlp::new(&p / "mlp", c),
                    input_layernorm: RmsNorm::new(&p / "input_layernorm", h, c.rms_norm_eps),
                    post_attention_layernorm: RmsNorm::new(
                        &p / "post_attention_layernorm",
                        h,
                        c.rms_norm_eps,
                    ),
                }
            })
            .collect();
        let norm = RmsNorm::new(&m / "norm", h, c.rms_norm_eps);
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        let head = match c.head {
            HeadKind::CausalLm if c.tie_word_embeddings => Head::Lm(None),
            HeadKind::CausalLm => Head::Lm(Some((&root / "lm_head").var("weight", &[v, h], init))),
            HeadKind::Score { num_labels } => {
                Head::Score((&root / "score").var("weight", &[num_labels as i64, h], init))
            }
        };
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        let rope = Rope::new(c, device);
        Ok(Model {
            config,
            vs,
            embed_tokens,
            layers,
            norm,
            head,
            rope,
            kind,
            lora: None,
        })
    }

    /// Loads `DIR/config.json` and the safetensors weights. Checks every tensor's presence and
    /// shape before copying any, so a bad checkpoint yields an error and no model.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Model> {
        let mut config = Config::from_dir(dir)?;
        let file_head = config.head;
        if let Some(h) = opts.head {
            config.head = h;
        }
        let kind = opts.dtype.unwrap_or(config.dtype);
        let files = WeightFiles::open(dir)?;
        let model = Model::new(config, opts.device, kind, opts.seed)?;
        // A replaced head may be absent from the file; it keeps its fresh initialisation.
        let skip: Vec<&str> = if model.config.head != file_head {
            vec!["score.weight", "lm_head.weight"]
        } else {
            vec![]
        };
        let unused = weights::load_into(&model.vs, &files, &skip)?;
        let unexpected: Vec<&String> = unused
            .iter()
            .filter(|n| {
                // Tied checkpoints sometimes still carry lm_head; old ones carry rotary buffers;
                // a policy checkpoint loaded as a critic carries lm_head.
                !(n.ends_with("rotary_emb.inv_freq")
                    || (n.as_str() == "lm_head.weight"
                        && (model.config.tie_word_embeddings
                            || model.config.head != HeadKind::CausalLm)))
            })
            .collect();
        if !unexpected.is_empty() {
            return Err(ModelError::tensor(
                files.path_of(unexpected[0]),
                unexpected[0],
                format!(
                    "not part of a {} with this config.json ({} unexpected tensors in all); \
                     the config and the weights do not belong together",
                    model.config.head.architecture(model.config.family),
                    unexpected.len()
                ),
            ));
        }
        Ok(model)
    }

    /// Writes `config.json` and the weights (HF layout) to `dir`. Tokenizer files are the
    /// caller's business (see `crate::ModelDir`).
    pub fn save(&self, dir: &Path, opts: &SaveOptions) -> Result<()> {
        let kind = opts.dtype.unwrap_or(self.kind);
        weights::save(dir, &self.named_tensors(), kind, opts.max_shard_bytes)?;
        self.save_config(dir, kind)
    }

    /// Writes `DIR/config.json` for weights stored in `kind`.
    pub(crate) fn save_config(&self, dir: &Path, kind: Kind) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.config.to_hf_json(kind))
            .map_err(|e| ModelError::config(dir.join("config.json"), "(all)", e.to_string()))?;
        crate::error::write_atomic(&dir.join("config.json"), &json)
    }

    /// The base projection `t` of layer `i` (its `ws` is (out, in)).
    pub(crate) fn projection(&self, i: usize, t: Target) -> &nn::Linear {
        let (a, m) = (&self.layers[i].self_attn, &self.layers[i].mlp);
        match t {
            Target::Q => &a.q_proj,
            Target::K => &a.k_proj,
            Target::V => &a.v_proj,
            Target::O => &a.o_proj,
            Target::Gate => &m.gate_proj,
            Target::Up => &m.up_proj,
            Target::Down => &m.down_proj,
        }
    }

    /// Every weight with its checkpoint name, sorted by name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Allocates a cache for `batch` sequences of up to `capacity` positions.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> Result<KvCache> {
        let c = &self.config;
        let shape = [
            batch,
            c.num_key_value_heads as i64,
            capacity,
            c.head_dim as i64,
        ];
        let opts = (self.kind, self.device());
        let layers = (0..c.num_hidden_layers)
            .map(|_| Ok((Tensor::f_zeros(shape, opts)?, Tensor::f_zeros(shape, opts)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
        })
    }

    /// Runs the trunk. `input_ids`, `positions`: (b, t) int64. `key_valid`: (b, T) bool over all
    /// keys including the cache (T = cache.len + t), or `None` when no position is padding.
    /// Returns the final-norm hidden states (b, t, hidden).
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_valid: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.forward_hidden_with(input_ids, positions, key_valid, cache, None)
    }

    /// [`Model::forward_hidden`] with the projections through `packed` when given (weights
    /// packed by [`Model::pack_weights`] from this model's current weights; no autograd graph):
    /// decode steps (one token, at most [`SMALL_M_ROWS`] rows, a cache) run whole in
    /// [`crate::cpu_kernels`], everything else through the layer loop's packed projections.
    pub(crate) fn forward_hidden_with(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_valid: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        packed: Option<&PackedWeights>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.size2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        if let Some(c) = cache.as_ref() {
            if offset + t > c.capacity {
                return Err(ModelError::invalid(
                    "cache",
                    format!("{} + {t}", c.len),
                    format!("exceeds the cache capacity {}", c.capacity),
                ));
            }
        }
        if offset + t > self.config.max_position_embeddings as i64 {
            return Err(ModelError::invalid(
                "sequence length",
                offset + t,
                format!(
                    "exceeds max_position_embeddings = {}",
                    self.config.max_position_embeddings
                ),
            ));
        }
        let mask = self.attention_mask(key_valid, b, t, offset)?;
        let mut mode = match cache {
            Some(c) => KvMode::Cache(c),
            None => KvMode::Own,
        };
        let x = match (&mut mode, packed) {
            (KvMode::Cache(c), Some(w)) if t == 1 && b <= SMALL_M_ROWS => {
                self.decode_packed(input_ids, positions, &mask, c, offset, w)?
            }
            _ => self.trunk(input_ids, positions, &mask, &mut mode, offset, packed)?,
        };
        if let KvMode::Cache(c) = mode {
            c.len += t;
        }
        Ok(x)
    }

    /// Embedding, the decoder layers (attention fed as `mode` says) and the final norm.
    fn trunk(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &AttnMask,
        mode: &mut KvMode<'_>,
        offset: i64,
        packed: Option<&PackedWeights>,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rope.at(positions, self.kind);
        let mut x = Tensor::f_embedding(&self.embed_tokens, input_ids, -1, false, false)?;
        let (b, t) = input_ids.size2()?;
        if let (KvMode::Cache(c), 1) = (&mut *mode, t) {
            if b <= SMALL_M_ROWS {
                return Ok(self.decode_fm(&x, &cos, &sin, mask, c, offset));
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = match mode {
                KvMode::Own => LayerKv::Own,
                KvMode::Cache(c) => LayerKv::Cache(&mut c.layers[i], offset),
                KvMode::Record(out) => LayerKv::Record(out),
                KvMode::After(prefix) => LayerKv::After(&prefix[i]),
            };
            let ad = self.adapters(i);
            x = layer.forward(&x, &cos, &sin, mask, kv, packed.map(|w| &w.layers[i]), &ad)?;
        }
        Ok(self.norm.forward(&x))
    }

    /// The decoder layers of one decode step (t = 1, at most [`SMALL_M_ROWS`] rows) with the
    /// activations feature-major, (hidden, rows), so every projection is `W · x` on a
    /// contiguous operand ([`linear_fm`]). Same values as the row-major loop of [`Model::trunk`]
    /// up to rounding; returns the final-norm hidden states as a (b, 1, hidden) view, which
    /// [`Model::logits`] turns back into a contiguous operand for free.
    fn decode_fm(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        cache: &mut KvCache,
        offset: i64,
    ) -> Tensor {
        let (b, h) = (x.size()[0], x.size()[2]);
        let mut x_t = x.view([b, h]).tr().contiguous();
        for (i, (layer, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let ad = self.adapters(i);
            let attn = layer.self_attn.forward_fm(
                &layer.input_layernorm.forward_fm(&x_t),
                cos,
                sin,
                mask,
                LayerKv::Cache(kv, offset),
                &ad,
            );
            x_t = x_t + attn;
            let mlp = layer
                .mlp
                .forward_fm(&layer.post_attention_layernorm.forward_fm(&x_t), &ad);
            x_t = x_t + mlp;
        }
        self.norm.forward_fm(&x_t).tr().unsqueeze(1)
    }

    /// Whether a forward would record an autograd graph now: gradients enabled and the weights
    /// (or, with the base frozen, the adapters) requiring them. Packed projections record none,
    /// so they serve only forwards that don't.
    pub(crate) fn builds_graph(&self) -> bool {
        (&self.norm.weight * 1.0).requires_grad()
            || self.lora.as_ref().is_some_and(Lora::builds_graph)
    }

    /// This model's weights packed for [`crate::cpu_kernels`] (its GEMM kernel and decode
    /// steps), from the current weights; `None` where those do not apply (not an f32 model
    /// on the CPU, no AVX2/FMA, no OpenMP entry points with several threads, a fused projection
    /// whose width is not a multiple of 16, head_dim over 512 or odd): the forwards then stay
    /// with libtorch (decode steps in [`Model::decode_fm`]). The copy is as large as the weights
    /// and goes stale when they change: `generate` and `token_logprobs_from` make one per call
    /// and drop it. Adapters that are on are merged into the packed weights (the same function;
    /// none while their dropout is active).
    pub(crate) fn pack_weights(&self) -> Option<PackedWeights> {
        let c = &self.config;
        if self.lora.as_ref().is_some_and(|l| !l.packable()) {
            return None;
        }
        if self.device() != Device::Cpu
            || self.kind != Kind::Float
            || !cpu_kernels::available(tch::get_num_threads().max(1) as usize)
            || c.head_dim > 512
            || c.head_dim % 2 != 0
            || c.num_key_value_heads == 0
            || c.num_attention_heads % c.num_key_value_heads != 0
        {
            return None;
        }
        let _guard = tch::no_grad_guard();
        // Weights (out, in) stacked along out, biases likewise (zeros where a part has none);
        // an adapted projection's weight merged with its adapter.
        let fused = |i: usize, targets: &[Target]| {
            let ad = self.adapters(i);
            let parts: Vec<&nn::Linear> = targets.iter().map(|&t| self.projection(i, t)).collect();
            let ws: Vec<Tensor> = targets
                .iter()
                .zip(&parts)
                .map(|(&t, l)| match ad.get(t) {
                    Some(a) => a.merged(&l.ws),
                    None => l.ws.shallow_clone(),
                })
                .collect();
            if let ([l], [w]) = (parts.as_slice(), ws.as_slice()) {
                return PackedLinear::pack(w, l.bs.as_ref());
            }
            let w = Tensor::cat(&ws, 0);
            let b = parts.iter().any(|l| l.bs.is_some()).then(|| {
                let bs: Vec<Tensor> = parts
                    .iter()
                    .map(|l| match &l.bs {
                        Some(b) => b.shallow_clone(),
                        None => Tensor::zeros([l.ws.size()[0]], (Kind::Float, Device::Cpu)),
                    })
                    .collect();
                Tensor::cat(&bs, 0)
            });
            PackedLinear::pack(&w, b.as_ref())
        };
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                Some(CpuLayer {
                    ln1: cpu_kernels::to_vec(&l.input_layernorm.weight)?,
                    qkv: fused(i, &[Target::Q, Target::K, Target::V])?,
                    o: fused(i, &[Target::O])?,
                    ln2: cpu_kernels::to_vec(&l.post_attention_layernorm.weight)?,
                    gate_up: fused(i, &[Target::Gate, Target::Up])?,
                    down: fused(i, &[Target::Down])?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let head = match &self.head {
            Head::Lm(Some(w)) => PackedLinear::pack(w, None),
            Head::Lm(None) => PackedLinear::pack(&self.embed_tokens, None),
            Head::Score(_) => None,
        };
        Some(PackedWeights {
            layers,
            norm: cpu_kernels::to_vec(&self.norm.weight)?,
            dims: Dims {
                hidden: c.hidden_size,
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                inter: c.intermediate_size,
                eps: c.rms_norm_eps as f32,
            },
            head,
        })
    }

    /// One decode step (t = 1, at most [`SMALL_M_ROWS`] rows) through [`crate::cpu_kernels`];
    /// the same values as [`Model::trunk`] up to rounding. Final-norm hidden states (b, 1,
    /// hidden) out.
    fn decode_packed(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &AttnMask,
        cache: &mut KvCache,
        offset: i64,
        w: &PackedWeights,
    ) -> Result<Tensor> {
        let b = input_ids.size()[0];
        let (rows, d) = (b as usize, w.dims);
        let total = offset + 1;
        let (cos, sin) = self.rope.at(positions, Kind::Float);
        let bad = |what: &str| ModelError::invalid("decode step", what.to_string(), "a bug");
        let cos = cpu_kernels::to_vec(&cos).ok_or_else(|| bad("rotary table"))?;
        let sin = cpu_kernels::to_vec(&sin).ok_or_else(|| bad("rotary table"))?;
        let valid: Option<Vec<bool>> = match mask {
            AttnMask::All => None,
            AttnMask::Explicit(m) => Some(Vec::<bool>::try_from(m.reshape([b * total]))?),
            AttnMask::Causal => return Err(bad("causal mask for one token")),
        };
        let x = Tensor::f_embedding(&self.embed_tokens, &input_ids.view([b]), -1, false, false)?;
        let mut x = cpu_kernels::to_vec(&x).ok_or_else(|| bad("embedding"))?;
        let step = Step {
            rows,
            offset: offset as usize,
            capacity: cache.capacity as usize,
            cos: &cos,
            sin: &sin,
            valid: valid.as_deref(),
        };
        // layer_step checks the caches' layout (b, n_kv, capacity, head_dim) itself.
        for (l, (kc, vc)) in w.layers.iter().zip(cache.layers.iter_mut()) {
            cpu_kernels::layer_step(l, &d, &step, &mut x, kc, vc)?;
        }
        let mut out = vec![0f32; x.len()];
        cpu_kernels::rms_norm(&x, &w.norm, d.eps, &mut out);
        Ok(Tensor::from_slice(&out).view([b, 1, d.hidden as i64]))
    }

    /// Final-norm hidden states (b, t - 1 - from, hidden) of the columns `from..t-1` of a padded
    /// batch, the ones that predict tokens `from + 1..t`: the same values as
    /// `forward_padded(..).narrow(1, from, t - 1 - from)`, without running the last column
    /// (causal attention: no earlier column depends on it). When rows share their first
    /// `from + 1` tokens (and mask), as the samples of one prompt do, that shared prefix runs
    /// once per distinct prefix and the rest of each row attends to its prefix's keys and
    /// values: the prompt's share of the forward (and of its backward, when gradients are on)
    /// shrinks by the number of samples per prompt. Without shared prefixes it is the plain
    /// forward.
    pub fn forward_predicting(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        from: i64,
    ) -> Result<Tensor> {
        self.forward_predicting_with(input_ids, attention_mask, from, None)
    }

    /// The checked inputs of a predicting forward ([`Model::forward_predicting`]): `input_ids`
    /// and `attention_mask` without their last column (it predicts nothing), and the rows'
    /// shared prefixes of `from + 1` tokens as [`shared_prefixes`] groups them, when sharing
    /// saves at least a token per row.
    #[allow(clippy::type_complexity)]
    fn predicting_inputs(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        from: i64,
    ) -> Result<(Tensor, Tensor, Option<(Vec<i64>, Vec<i64>)>)> {
        let (b, t) = input_ids.size2()?;
        if attention_mask.size() != [b, t] {
            return Err(ModelError::invalid(
                "attention_mask",
                format!("{:?}", attention_mask.size()),
                format!("must match input_ids [{b}, {t}]"),
            ));
        }
        if t < 2 {
            return Err(ModelError::invalid(
                "input_ids",
                t,
                "need at least 2 tokens",
            ));
        }
        if from < 0 || from > t - 2 {
            return Err(ModelError::invalid(
                "from",
                from,
                format!("must be in 0..={} for sequences of {t} tokens", t - 2),
            ));
        }
        // The last column predicts nothing: drop it.
        let t = t - 1;
        let input_ids = input_ids.f_narrow(1, 0, t)?;
        let attention_mask = attention_mask.f_narrow(1, 0, t)?;
        let w = from + 1;
        // Shared only when it saves at least a token per row: a one-token prefix (a common BOS)
        // is not worth the extra pass.
        let shared = shared_prefixes(&input_ids, &attention_mask, w)?
            .filter(|(firsts, _)| (b - firsts.len() as i64) * w >= b);
        Ok((input_ids, attention_mask, shared))
    }

    /// [`Model::forward_predicting`] with every projection through `packed` (weights packed by
    /// [`Model::pack_weights`] from this model's current weights) when given: for forwards
    /// that build no autograd graph ([`Model::builds_graph`]), since the packed kernel records
    /// none.
    pub(crate) fn forward_predicting_with(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        from: i64,
        packed: Option<&PackedWeights>,
    ) -> Result<Tensor> {
        let (input_ids, attention_mask, shared) =
            self.predicting_inputs(input_ids, attention_mask, from)?;
        let (input_ids, attention_mask) = (&input_ids, &attention_mask);
        let t = input_ids.size()[1];
        let w = from + 1;
        let Some((firsts, rows)) = shared else {
            let hidden = self.forward_padded_with(input_ids, attention_mask, packed)?;
            return Ok(hidden.f_narrow(1, from, t - from)?);
        };
        let split = self.split_at_prefix(input_ids, attention_mask, w, &firsts, &rows)?;
        // Prefix pass over one row per distinct prefix, keeping every layer's keys/values.
        let (p_ids, p_pos, p_mask) = &split.prefix;
        let mut mode = KvMode::Record(Vec::with_capacity(self.layers.len()));
        let p_hidden = self.trunk(p_ids, p_pos, p_mask, &mut mode, 0, packed)?;
        let KvMode::Record(recorded) = mode else {
            unreachable!("the prefix pass records")
        };
        // Each row gets its prefix's keys/values; the rest of the row attends to them.
        let rows = &split.rows;
        let prefix = recorded
            .iter()
            .map(|(k, v)| Ok((k.f_index_select(0, rows)?, v.f_index_select(0, rows)?)))
            .collect::<Result<Vec<_>>>()?;
        let last = p_hidden.f_narrow(1, from, 1)?.f_index_select(0, rows)?;
        let Some((ids, positions, mask)) = &split.rest else {
            return Ok(last);
        };
        let mut mode = KvMode::After(prefix);
        let rest = self.trunk(ids, positions, mask, &mut mode, w, packed)?;
        Ok(Tensor::f_cat(&[last, rest], 1)?)
    }

    /// A padded batch (b, t) split at its first `w` tokens, which the rows share with the row
    /// `firsts[rows[i]]` (the samples of one prompt): the prefix pass's ids, positions and mask
    /// over one row per distinct prefix, the row -> prefix map, and the rest pass's ids,
    /// positions and mask (keys: the prefix's and the rest's) when the rows go beyond `w`. The
    /// one split of the plain and the checkpointed prefix-sharing forwards.
    pub(crate) fn split_at_prefix(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        w: i64,
        firsts: &[i64],
        rows: &[i64],
    ) -> Result<PrefixSplit> {
        let (b, t) = input_ids.size2()?;
        let dev = self.device();
        let firsts = Tensor::f_from_slice(firsts)?.f_to_device(dev)?;
        let rows = Tensor::f_from_slice(rows)?.f_to_device(dev)?;
        let p_ids = input_ids.f_narrow(1, 0, w)?.f_index_select(0, &firsts)?;
        let p_attention = attention_mask
            .f_narrow(1, 0, w)?
            .f_index_select(0, &firsts)?;
        let (p_pos, p_valid) = positions_from_mask(&p_attention)?;
        let u = firsts.size()[0];
        let p_mask = self.attention_mask(p_valid.as_ref(), u, w, 0)?;
        let s = t - w;
        let rest = if s > 0 {
            let (positions, key_valid) = positions_from_mask(attention_mask)?;
            let key_valid = key_valid.unwrap_or_else(|| attention_mask.ones_like().ne(0));
            let mask = self.explicit_mask(Some(&key_valid), b, s, w, self.sliding_window())?;
            Some((
                input_ids.f_narrow(1, w, s)?,
                positions.f_narrow(1, w, s)?,
                mask,
            ))
        } else {
            None
        };
        Ok(PrefixSplit {
            rows,
            prefix: (p_ids, p_pos, p_mask),
            rest,
        })
    }

    fn sliding_window(&self) -> Option<i64> {
        self.config.sliding_window.map(|w| w as i64)
    }

    fn attention_mask(
        &self,
        key_valid: Option<&Tensor>,
        b: i64,
        t: i64,
        offset: i64,
    ) -> Result<AttnMask> {
        let total = offset + t;
        let window = self.sliding_window();
        let windowed = window.is_some_and(|w| total > w);
        if key_valid.is_none() && !windowed {
            return Ok(if offset == 0 && t > 1 {
                AttnMask::Causal
            } else if t == 1 {
                AttnMask::All
            } else {
                self.explicit_mask(None, b, t, offset, window)?
            });
        }
        self.explicit_mask(key_valid, b, t, offset, window)
    }

    fn explicit_mask(
        &self,
        key_valid: Option<&Tensor>,
        b: i64,
        t: i64,
        offset: i64,
        window: Option<i64>,
    ) -> Result<AttnMask> {
        let dev = self.device();
        let total = offset + t;
        // (t, 1) and (1, T): absolute positions of queries and keys in the cache.
        let q_pos = Tensor::f_arange_start(offset, total, (Kind::Int64, dev))?.unsqueeze(1);
        let k_pos = Tensor::f_arange(total, (Kind::Int64, dev))?.unsqueeze(0);
        let mut allowed = k_pos.f_le_tensor(&q_pos)?;
        if let Some(w) = window {
            allowed = allowed.f_logical_and(&(&q_pos - &k_pos).f_lt(w)?)?;
        }
        // (b, t, T)
        let mut m = allowed.unsqueeze(0).expand([b, t, total], false);
        if let Some(kv) = key_valid {
            if kv.size() != [b, total] {
                return Err(ModelError::invalid(
                    "attention_mask",
                    format!("{:?}", kv.size()),
                    format!("expected shape [{b}, {total}]"),
                ));
            }
            m = m.f_logical_and(&kv.unsqueeze(1))?;
        }
        // A padding query sees no valid key; let it see itself so SDPA never takes a softmax
        // over nothing (NaN there would leak into real rows through 0 * NaN in the value sum).
        let diag = k_pos.f_eq_tensor(&q_pos)?.unsqueeze(0);
        Ok(AttnMask::Explicit(m.f_logical_or(&diag)?.unsqueeze(1)))
    }

    /// [`Model::logits`], through the packed head of `packed` when it has one.
    pub(crate) fn logits_with(
        &self,
        hidden: &Tensor,
        packed: Option<&PackedWeights>,
    ) -> Result<Tensor> {
        let size = hidden.size();
        let k = size[size.len() - 1];
        let rows = hidden.numel() as i64 / k.max(1);
        match packed.and_then(|w| w.head.as_ref()) {
            Some(head) if rows > 0 => {
                let mut shape = size.clone();
                shape[size.len() - 1] = -1;
                Ok(head
                    .forward(&hidden.f_reshape([rows, k])?)?
                    .f_view(shape.as_slice())?)
            }
            _ => self.logits(hidden),
        }
    }

    /// Next-token logits (b, t, vocab) in f32 from hidden states. Causal-LM heads only.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = match &self.head {
            Head::Lm(Some(w)) => w,
            Head::Lm(None) => &self.embed_tokens,
            Head::Score(_) => {
                return Err(ModelError::invalid(
                    "head",
                    "score",
                    "this model has a score head, not a language-model head",
                ))
            }
        };
        let size = hidden.size();
        let k = size[size.len() - 1];
        let rows = hidden.numel() as i64 / k.max(1);
        let logits = if rows > 0 && rows <= SMALL_M_ROWS {
            // See SMALL_M_ROWS: the (vocab, hidden) weight is the biggest one streamed per step.
            let mut shape = size.clone();
            shape[size.len() - 1] = w.size()[0];
            w.f_mm(&hidden.f_reshape([rows, k])?.tr())?
                .tr()
                .f_contiguous()?
                .f_view(shape.as_slice())?
        } else {
            hidden.f_linear(w, None::<Tensor>)?
        };
        Ok(logits.f_to_kind(Kind::Float)?)
    }

    /// Score-head outputs (b, t, num_labels) in f32 from hidden states.
    pub fn score(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.head {
            Head::Score(w) => Ok(hidden.f_linear(w, None::<Tensor>)?.f_to_kind(Kind::Float)?),
            Head::Lm(_) => Err(ModelError::invalid(
                "head",
                "lm_head",
                "this model has a language-model head, not a score head",
            )),
        }
    }

    /// Trunk over a padded batch: positions and masks derived from `attention_mask` (b, t) of
    /// 0/1 (left or right padding). Returns hidden states (b, t, hidden).
    pub fn forward_padded(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.forward_padded_with(input_ids, attention_mask, None)
    }

    /// [`Model::forward_padded`] with the projections through `packed` when given.
    fn forward_padded_with(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        packed: Option<&PackedWeights>,
    ) -> Result<Tensor> {
        let (positions, key_valid) = positions_from_mask(attention_mask)?;
        self.forward_hidden_with(input_ids, &positions, key_valid.as_ref(), None, packed)
    }
}

/// Position ids (count of real tokens before each position, as HF derives them) and the boolean
/// key mask, or `None` when nothing is padded.
/// Rows that share their first `w` tokens and mask: `(firsts, rows)` with `firsts` the first
/// row of each distinct prefix and `rows[i]` the index into `firsts` of row `i`'s prefix, or
/// `None` when every prefix is distinct (nothing to share).
fn shared_prefixes(
    input_ids: &Tensor,
    attention_mask: &Tensor,
    w: i64,
) -> Result<Option<(Vec<i64>, Vec<i64>)>> {
    let (b, _) = input_ids.size2()?;
    let host = |t: &Tensor| -> Result<Vec<i64>> {
        let t = t.f_narrow(1, 0, w)?.f_to_kind(Kind::Int64)?;
        Ok(Vec::<i64>::try_from(
            t.f_to_device(Device::Cpu)?.f_contiguous()?.f_view(-1)?,
        )?)
    };
    let (ids, mask) = (host(input_ids)?, host(attention_mask)?);
    let w = w as usize;
    // A padded position's token does not matter, only that it is padding.
    let key = |r: usize| -> Vec<i64> {
        (r * w..(r + 1) * w)
            .map(|j| if mask[j] != 0 { ids[j] } else { -1 })
            .collect()
    };
    Ok(group_rows((0..b as usize).map(key)))
}

/// Groups equal keys: `(firsts, rows)` with `firsts` the index of each distinct key's first
/// occurrence and `rows[i]` the index into `firsts` of key `i`, or `None` when all are distinct.
pub(crate) fn group_rows<K: std::hash::Hash + Eq>(
    keys: impl Iterator<Item = K>,
) -> Option<(Vec<i64>, Vec<i64>)> {
    let mut seen = std::collections::HashMap::new();
    let (mut firsts, mut rows) = (vec![], vec![]);
    for (r, k) in keys.enumerate() {
        let next = firsts.len() as i64;
        let g = *seen.entry(k).or_insert_with(|| {
            firsts.push(r as i64);
            next
        });
        rows.push(g);
    }
    (firsts.len() < rows.len()).then_some((firsts, rows))
}

pub fn positions_from_mask(attention_mask: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    let valid = attention_mask.f_ne(0)?;
    let positions = (valid.f_cumsum(-1, Kind::Int64)? - 1).f_clamp_min(0)?;
    let all = bool::try_from(valid.f_all()?)?;
    Ok((positions, if all { None } else { Some(valid) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HfConfig;

    pub(crate) fn tiny(arch: &str, tied: bool) -> Config {
        let hf: HfConfig = serde_json::from_value(serde_json::json!({
            "architectures": [arch], "vocab_size": 50, "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64,
            "tie_word_embeddings": tied
        }))
        .unwrap();
        hf.resolve(Path::new("config.json")).unwrap()
    }

    #[test]
    fn varstore_names_are_checkpoint_keys() {
        let m = Model::new(tiny("Qwen2ForCausalLM", true), Device::Cpu, Kind::Float, 0).unwrap();
        let names: Vec<String> = m.named_tensors().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"model.layers.1.self_attn.q_proj.bias".to_string()));
        assert!(names.contains(&"model.embed_tokens.weight".to_string()));
        assert!(
            !names.iter().any(|n| n.contains("lm_head")),
            "tied: no lm_head"
        );
        assert!(
            !names.iter().any(|n| n.contains("__")),
            "tch renamed a duplicate: {names:?}"
        );
        assert!(!names.contains(&"model.layers.0.self_attn.o_proj.bias".to_string()));
    }

    /// Two prompts (left-padded to width 4) with three and two samples, responses right-padded:
    /// rows share their first 4 tokens in groups {0, 2, 4} and {1, 3}.
    pub(super) fn grouped_batch() -> (Tensor, Tensor) {
        let ids = Tensor::from_slice(&[
            0i64, 5, 6, 7, 11, 12, 13, //
            8, 9, 10, 11, 14, 15, 0, //
            0, 5, 6, 7, 16, 17, 18, //
            8, 9, 10, 11, 19, 0, 0, //
            0, 5, 6, 7, 20, 21, 0,
        ])
        .view([5, 7]);
        let mask = Tensor::from_slice(&[
            0i64, 1, 1, 1, 1, 1, 1, //
            1, 1, 1, 1, 1, 1, 0, //
            0, 1, 1, 1, 1, 1, 1, //
            1, 1, 1, 1, 1, 0, 0, //
            0, 1, 1, 1, 1, 1, 0,
        ])
        .view([5, 7]);
        (ids, mask)
    }

    pub(super) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn shared_prefix_forward_matches_the_plain_forward() {
        let (ids, mask) = grouped_batch();
        assert_eq!(
            shared_prefixes(&ids, &mask, 4).unwrap(),
            Some((vec![0, 1], vec![0, 1, 0, 1, 0]))
        );
        // A padded position's token id does not split a group; a different token does.
        let ids2 = ids.copy();
        let _ = ids2.get(2).get(0).fill_(3);
        assert_eq!(
            shared_prefixes(&ids2, &mask, 4).unwrap().unwrap().1,
            vec![0, 1, 0, 1, 0]
        );
        let _ = ids2.get(2).get(1).fill_(3);
        assert_eq!(
            shared_prefixes(&ids2, &mask, 4).unwrap().unwrap().1,
            vec![0, 1, 2, 1, 0]
        );
        assert_eq!(
            shared_prefixes(&ids.narrow(0, 0, 2), &mask.narrow(0, 0, 2), 4).unwrap(),
            None
        );

        let mut window = tiny("MistralForCausalLM", false);
        window.sliding_window = Some(3);
        for config in [tiny("LlamaForCausalLM", false), window] {
            let m = Model::new(config, Device::Cpu, Kind::Float, 2).unwrap();
            for from in [5, 3, 2, 0] {
                let plain = m
                    .forward_padded(&ids, &mask)
                    .unwrap()
                    .narrow(1, from, 6 - from);
                let shared = m.forward_predicting(&ids, &mask, from).unwrap();
                assert_eq!(shared.size(), plain.size());
                // Padded columns hold garbage in both; compare the real ones.
                let real = mask
                    .narrow(1, from, 6 - from)
                    .unsqueeze(2)
                    .to_kind(Kind::Float);
                let d = max_diff(&(&shared * &real), &(&plain * &real));
                assert!(
                    d < 1e-5,
                    "from {from}: shared prefix changed hidden states by {d}"
                );
            }
        }
    }

    #[test]
    fn shared_prefix_backward_matches_the_plain_backward() {
        let (ids, mask) = grouped_batch();
        let grads = |shared: bool| -> Vec<Tensor> {
            let m =
                Model::new(tiny("LlamaForCausalLM", false), Device::Cpu, Kind::Float, 3).unwrap();
            let h = if shared {
                m.forward_predicting(&ids, &mask, 3).unwrap()
            } else {
                m.forward_padded(&ids, &mask).unwrap().narrow(1, 3, 3)
            };
            let real = mask.narrow(1, 3, 3).unsqueeze(2).to_kind(Kind::Float);
            let loss = (m.logits(&h).unwrap() * real)
                .pow_tensor_scalar(2)
                .sum(Kind::Float);
            loss.backward();
            m.named_tensors()
                .iter()
                .map(|(_, t)| t.grad().copy())
                .collect()
        };
        let (a, b) = (grads(true), grads(false));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            let scale = y.abs().max().double_value(&[]).max(1e-6);
            let d = max_diff(x, y) / scale;
            assert!(d < 1e-4, "relative gradient difference {d}");
        }
        // Prompt-side weights got gradients at all (the prefix pass is in the graph).
        assert!(a[0].abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn padding_does_not_change_real_positions() {
        let m = Model::new(tiny("LlamaForCausalLM", false), Device::Cpu, Kind::Float, 1).unwrap();
        let ids = Tensor::from_slice(&[5i64, 6, 7]).view([1, 3]);
        let h = m.forward_padded(&ids, &ids.ones_like()).unwrap();
        // Same prompt, left-padded by two.
        let ids2 = Tensor::from_slice(&[0i64, 0, 5, 6, 7]).view([1, 5]);
        let mask2 = Tensor::from_slice(&[0i64, 0, 1, 1, 1]).view([1, 5]);
        let h2 = m.forward_padded(&ids2, &mask2).unwrap();
        let diff = (h - h2.narrow(1, 2, 3)).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "left padding changed outputs by {diff}");
        assert!(!bool::try_from(h2.isnan().any()).unwrap());
    }

    #[test]
    fn packed_no_grad_log_probs_equal_the_libtorch_ones() {
        if !cpu_kernels::available(tch::get_num_threads().max(1) as usize) {
            return;
        }
        let mut c = tiny("LlamaForCausalLM", false);
        c.vocab_size = 64;
        let m = Model::new(c, Device::Cpu, Kind::Float, 5).unwrap();
        assert!(m.pack_weights().is_some());
        // 8 copies of the grouped batch: 40 rows x 7 = 280 tokens, enough to pack.
        let (ids, mask) = grouped_batch();
        let (ids, mask) = (ids.repeat([8, 1]), mask.repeat([8, 1]));
        // from 3: shared prefixes (the recorded prefix pass and the rest); from 0: plain.
        for from in [3, 0] {
            let lp = |grad: bool| {
                let _g = (!grad).then(tch::no_grad_guard);
                assert_eq!(m.builds_graph(), grad);
                crate::generate::token_logprobs_from(
                    &m,
                    &ids,
                    &mask,
                    from,
                    1.0,
                    crate::generate::Entropy::Off,
                )
                .unwrap()
                .logprobs
            };
            let (libtorch, packed) = (lp(true), lp(false));
            assert!(libtorch.requires_grad() && !packed.requires_grad());
            let real = mask.narrow(1, from + 1, 6 - from).to_kind(Kind::Float);
            let d = max_diff(&(libtorch.detach() * &real), &(packed * &real));
            assert!(d < 1e-5, "from {from}: packed log-probs differ by {d}");
        }
    }

    #[test]
    fn packed_decode_steps_equal_the_libtorch_ones() {
        if !cpu_kernels::available(tch::get_num_threads().max(1) as usize) {
            return;
        }
        let _g = tch::no_grad_guard();
        // Llama untied (vocab 64: a packed head) and Qwen2 tied with q/k/v bias (vocab 50: the
        // head stays with libtorch).
        // Llama also without padding (no key mask at all).
        for (arch, tied, vocab, padded) in [
            ("LlamaForCausalLM", false, 64, true),
            ("LlamaForCausalLM", false, 64, false),
            ("Qwen2ForCausalLM", true, 50, true),
        ] {
            let mut c = tiny(arch, tied);
            c.vocab_size = vocab;
            let m = Model::new(c, Device::Cpu, Kind::Float, 3).unwrap();
            let w = m.pack_weights().expect("f32 on the CPU packs");
            assert_eq!(w.head.is_some(), vocab % 16 == 0);
            assert_eq!(w.layers.len(), 2);
            let b = 5;
            let randint = |shape: [i64; 2], seed: i64| {
                let _rng = global_rng_lock();
                tch::manual_seed(seed);
                Tensor::randint(vocab as i64, shape, (Kind::Int64, Device::Cpu))
            };
            let ids = randint([b, 6], 10);
            // Row 1 left-padded by two: an explicit key mask.
            let valid = Tensor::ones([b, 6], (Kind::Bool, Device::Cpu));
            if padded {
                let _ = valid.narrow(1, 0, 2).get(1).fill_(0);
            }
            let (pos, _) = positions_from_mask(&valid.to_kind(Kind::Int64)).unwrap();
            let key_valid = |v: &Tensor| padded.then(|| v.shallow_clone());
            let mut ca = m.new_cache(b, 10).unwrap();
            let mut cb = m.new_cache(b, 10).unwrap();
            let _ = m
                .forward_hidden(&ids, &pos, key_valid(&valid).as_ref(), Some(&mut ca))
                .unwrap();
            let _ = m
                .forward_hidden(&ids, &pos, key_valid(&valid).as_ref(), Some(&mut cb))
                .unwrap();
            let mut valid = valid;
            for step in 0..3 {
                let next = pos.narrow(1, 5, 1) + 1 + step;
                valid = Tensor::cat(&[&valid, &valid.narrow(1, 0, 1).ones_like()], 1);
                let tok = randint([b, 1], 20 + step);
                let ha = m
                    .forward_hidden(&tok, &next, key_valid(&valid).as_ref(), Some(&mut ca))
                    .unwrap();
                let hb = m
                    .forward_hidden_with(
                        &tok,
                        &next,
                        key_valid(&valid).as_ref(),
                        Some(&mut cb),
                        Some(&w),
                    )
                    .unwrap();
                assert_eq!(ha.size(), hb.size());
                let dh = (&ha - &hb).abs().max().double_value(&[]);
                let la = m.logits(&ha).unwrap();
                let lb = m.logits_with(&hb, Some(&w)).unwrap();
                assert_eq!(la.size(), lb.size());
                let dl = (la - lb).abs().max().double_value(&[]);
                assert!(
                    dh < 1e-5 && dl < 1e-5,
                    "{arch} (padded {padded}) step {step}: hidden {dh}, logits {dl}"
                );
            }
        }
    }
}
