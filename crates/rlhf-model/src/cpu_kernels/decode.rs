//! Whole decode steps on x86-64 CPUs with AVX2 and FMA: every layer of one step (one new token
//! for each of at most [`crate::llama::SMALL_M_ROWS`] rows) computed on plain f32 buffers, with
//! the projections through [`super::packed`]'s kernel and everything between them (RMSNorm,
//! rotary embeddings, the key/value cache write, attention, SiLU gating, residuals) here.
//!
//! Why: at 32 rows a libtorch decode step of the 20.5M benchmark model spent as long between its
//! GEMMs as in them: ~25 small ops per layer, each a dispatch, an allocation and often an
//! OpenMP fork, plus MKL's gemv inside SDPA for one query row (`perf`, docs/benchmarks.md). Here
//! a layer is six parallel regions (the q/k/v, o, gate/up and down GEMMs share out panels; the
//! attention and SiLU regions share out rows; norms and residuals run on the calling thread).
//!
//! Every value of a row is computed from that row alone, in an order that depends on neither
//! the number of rows nor the number of threads, so a row's tokens are the same whichever rows
//! share its batch (sharded generation equals whole-batch generation bit for bit, as with the
//! packed GEMM). Values differ from libtorch's by rounding only (unit test in `llama.rs`: hidden
//! states and logits within 1e-5 over several steps, padded rows and GQA included).

use std::ops::Range;

use tch::{Device, Kind, Tensor};

use super::packed::{parallel_for, PackedLinear, SendPtr};
use crate::error::{ModelError, Result};

/// Shapes of the model the buffers belong to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub eps: f32,
}

impl Dims {
    /// Width of the fused q/k/v projection's output: q heads, then k heads, then v heads.
    fn qkv(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// One decoder layer's weights for [`layer_step`]: the norms' weights and the packed
/// projections, q/k/v fused into one (out = q ‖ k ‖ v) and gate/up into one (out = gate ‖ up).
pub(crate) struct CpuLayer {
    pub ln1: Vec<f32>,
    pub qkv: PackedLinear,
    pub o: PackedLinear,
    pub ln2: Vec<f32>,
    pub gate_up: PackedLinear,
    pub down: PackedLinear,
}

/// What one step's layers share: the rows' rotary tables and which cached keys each row sees.
pub(crate) struct Step<'a> {
    pub rows: usize,
    /// Cache slot of this step's token (= keys already cached).
    pub offset: usize,
    /// Slots per row in the cache tensors.
    pub capacity: usize,
    /// (rows, head_dim) each: cos and the signed sine at each row's position (llama.rs `Rope`).
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// (rows, offset + 1): whether row r attends to slot j; `None`: every slot up to `offset`.
    pub valid: Option<&'a [bool]>,
}

/// RMSNorm of each of `rows` rows of `x` (width `w.len()`) into `out`, as HF's LlamaRMSNorm in
/// f32: `x * rsqrt(mean(x^2) + eps) * w`.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let mut acc = [0f32; 8];
        let mut chunks = xr.chunks_exact(8);
        for c in &mut chunks {
            for i in 0..8 {
                acc[i] += c[i] * c[i];
            }
        }
        let mut ss: f32 = acc.iter().sum();
        for v in chunks.remainder() {
            ss += v * v;
        }
        let r = 1.0 / (ss / h as f32 + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * r * g;
        }
    }
}

/// `x * cos + rotate_half(x) * sin` in place over `heads` heads of one row (`apply_rotary` in
/// llama.rs, with `sin` its signed sine).
fn rotary(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    let mut tmp = [0f32; 512];
    for head in x.chunks_exact_mut(head_dim) {
        let t = &mut tmp[..head_dim];
        t.copy_from_slice(head);
        for i in 0..head_dim {
            let swapped = if i < half { t[i + half] } else { t[i - half] };
            head[i] = t[i] * cos[i] + swapped * sin[i];
        }
    }
}

/// One decoder layer of one decode step over `x` (rows, hidden), in place: the step's keys and
/// values go into slot `s.offset` of the layer's cache `kc`, `vc` (each (rows, kv_heads,
/// capacity, head_dim) contiguous f32 on the CPU, as `KvCache` holds them).
///
/// # Errors
/// A cache of another layout, a step whose slot is past the cache's capacity, heads that do not
/// divide into the key/value heads, or an `x` that is not (rows, hidden): each a bug in the
/// caller, reported instead of writing out of bounds.
///
/// # Panics
/// When `l` was packed for other shapes than `d` (the projections' slice checks).
pub(crate) fn layer_step(
    l: &CpuLayer,
    d: &Dims,
    s: &Step<'_>,
    x: &mut [f32],
    kc: &mut Tensor,
    vc: &mut Tensor,
) -> Result<()> {
    let bad = |what: &str| ModelError::invalid("decode step", what.to_string(), "a bug");
    let want = [
        s.rows as i64,
        d.kv_heads as i64,
        s.capacity as i64,
        d.head_dim as i64,
    ];
    for t in [&*kc, &*vc] {
        if t.size() != want
            || !t.is_contiguous()
            || t.kind() != Kind::Float
            || t.device() != Device::Cpu
        {
            return Err(bad("cache layout"));
        }
    }
    if s.offset >= s.capacity {
        return Err(bad("cache slot past the capacity"));
    }
    if d.kv_heads == 0 || d.heads % d.kv_heads != 0 {
        return Err(bad("heads not a multiple of the key/value heads"));
    }
    if x.len() != s.rows * d.hidden {
        return Err(bad("hidden states not (rows, hidden)"));
    }
    let (kc, vc) = (kc.data_ptr() as *mut f32, vc.data_ptr() as *mut f32);
    let (rows, hd) = (s.rows, d.head_dim);
    let (nh, nkv) = (d.heads, d.kv_heads);
    let mut h = vec![0f32; rows * d.hidden];
    rms_norm(x, &l.ln1, d.eps, &mut h);
    let qkv_w = d.qkv();
    let mut qkv = vec![0f32; rows * qkv_w];
    l.qkv.forward_slice(&h, rows, &mut qkv);
    // Per row (rows are independent): rotary on its q and k, its k and v into the cache, then
    // attention for each of its heads.
    let mut att = vec![0f32; rows * nh * hd];
    let (qp, ap) = (SendPtr(qkv.as_mut_ptr()), SendPtr(att.as_mut_ptr()));
    let (kp, vp) = (SendPtr(kc), SendPtr(vc));
    let total = s.offset + 1;
    let scale = 1.0 / (hd as f32).sqrt();
    parallel_for(rows, &|share: Range<usize>| {
        let (qp, ap, kp, vp) = (qp, ap, kp, vp);
        let mut scores = vec![0f32; total];
        for r in share {
            // SAFETY: r < rows, so row r of the (rows, qkv_w) buffer lies inside it, and this
            // share alone touches it.
            let row = unsafe { std::slice::from_raw_parts_mut(qp.0.add(r * qkv_w), qkv_w) };
            let (cos, sin) = (&s.cos[r * hd..(r + 1) * hd], &s.sin[r * hd..(r + 1) * hd]);
            rotary(&mut row[..(nh + nkv) * hd], hd, cos, sin);
            for g in 0..nkv {
                let slot = ((r * nkv + g) * s.capacity + s.offset) * hd;
                let k = &row[(nh + g) * hd..(nh + g + 1) * hd];
                let v = &row[(nh + nkv + g) * hd..(nh + nkv + g + 1) * hd];
                // SAFETY: the caches were checked above as contiguous (rows, nkv, capacity, hd)
                // f32 with offset < capacity, so slot..slot + hd of row r, group g lies inside
                // them; the caller's `&mut` borrows are exclusive and this share alone writes
                // row r; `k` and `v` are in the separate `qkv` buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(k.as_ptr(), kp.0.add(slot), hd);
                    std::ptr::copy_nonoverlapping(v.as_ptr(), vp.0.add(slot), hd);
                }
            }
            let valid = s.valid.map(|v| &v[r * total..(r + 1) * total]);
            for head in 0..nh {
                // heads % kv_heads == 0 (checked), so head / (nh / nkv) < nkv.
                let base = (r * nkv + head / (nh / nkv)) * s.capacity * hd;
                // SAFETY: q is head `head` of `row` (nh * hd of its qkv_w floats are q); k and v
                // are the first `total` <= capacity slots of row r's group in the caches (layout
                // checked above), which this share alone writes; `scores` holds `total`; y is
                // row r, head `head` of `att` (rows * nh * hd), written by this share alone. The
                // CPU has AVX2 and FMA: `l` holds PackedLinears, which exist only on such CPUs.
                unsafe {
                    attend_one(
                        row.as_ptr().add(head * hd),
                        kp.0.add(base),
                        vp.0.add(base),
                        hd,
                        total,
                        scale,
                        valid,
                        &mut scores,
                        ap.0.add((r * nh + head) * hd),
                    )
                };
            }
        }
    });
    let mut o = vec![0f32; rows * d.hidden];
    l.o.forward_slice(&att, rows, &mut o);
    for (a, b) in x.iter_mut().zip(&o) {
        *a += b;
    }
    rms_norm(x, &l.ln2, d.eps, &mut h);
    let mut gu = vec![0f32; rows * 2 * d.inter];
    l.gate_up.forward_slice(&h, rows, &mut gu);
    let mut act = vec![0f32; rows * d.inter];
    let (gp, actp, inter) = (SendPtr(gu.as_mut_ptr()), SendPtr(act.as_mut_ptr()), d.inter);
    parallel_for(rows, &|share: Range<usize>| {
        let (gp, actp) = (gp, actp);
        for r in share {
            // SAFETY: row r of the (rows, 2 inter) and (rows, inter) buffers; each share writes
            // only its own rows of `act`.
            let (gr, ar) = unsafe {
                (
                    std::slice::from_raw_parts(gp.0.add(r * 2 * inter), 2 * inter),
                    std::slice::from_raw_parts_mut(actp.0.add(r * inter), inter),
                )
            };
            // SAFETY: the CPU has AVX2 and FMA: `l` holds PackedLinears, which exist only on
            // such CPUs.
            unsafe { silu_mul(&gr[..inter], &gr[inter..], ar) };
        }
    });
    l.down.forward_slice(&act, rows, &mut o);
    for (a, b) in x.iter_mut().zip(&o) {
        *a += b;
    }
    Ok(())
}

/// softmax(q·Kᵀ · scale over the valid slots) · V for one row and head: `y` (head_dim).
///
/// # Safety
/// `q`, `y` point to head_dim f32; `k`, `v` to `total` slots of head_dim f32; AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn attend_one(
    q: *const f32,
    k: *const f32,
    v: *const f32,
    hd: usize,
    total: usize,
    scale: f32,
    valid: Option<&[bool]>,
    scores: &mut [f32],
    y: *mut f32,
) {
    let seen = |j: usize| valid.is_none_or(|m| m[j]);
    let mut max = f32::NEG_INFINITY;
    for (j, sc) in scores.iter_mut().enumerate().take(total) {
        if seen(j) {
            *sc = dot(q, k.add(j * hd), hd) * scale;
            max = max.max(*sc);
        }
    }
    // Masked slots become -inf, whose exp is exactly 0.
    for (j, sc) in scores.iter_mut().enumerate().take(total) {
        if !seen(j) {
            *sc = f32::NEG_INFINITY;
        }
    }
    let sum = exp_sub_sum(&mut scores[..total], max);
    std::ptr::write_bytes(y, 0, hd);
    for (j, &p) in scores.iter().enumerate().take(total) {
        if p != 0.0 {
            axpy(p, v.add(j * hd), y, hd);
        }
    }
    let inv = 1.0 / sum;
    for e in 0..hd {
        *y.add(e) *= inv;
    }
}

/// The eight lanes of `acc` summed in lane order.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn sum_lanes(acc: std::arch::x86_64::__m256) -> f32 {
    let mut lanes = [0f32; 8];
    std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    lanes.iter().sum()
}

/// Σ a[i] b[i] with eight lanes, then the lanes in order.
///
/// # Safety
/// `a` and `b` point to `n` f32 each; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc);
        i += 8;
    }
    let mut s = sum_lanes(acc);
    while i < n {
        s += *a.add(i) * *b.add(i);
        i += 1;
    }
    s
}

/// y += alpha * x.
///
/// # Safety
/// `x` points to `n` f32 and `y` to `n` f32 that nothing else accesses during the call; the
/// CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy(alpha: f32, x: *const f32, y: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + 8 <= n {
        let yi = _mm256_loadu_ps(y.add(i));
        _mm256_storeu_ps(y.add(i), _mm256_fmadd_ps(a, _mm256_loadu_ps(x.add(i)), yi));
        i += 8;
    }
    while i < n {
        *y.add(i) += alpha * *x.add(i);
        i += 1;
    }
}

/// x[i] = exp(x[i] - m) for every i ([`exp8`] eight at a time); returns the sum, lanes in order.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    use std::arch::x86_64::*;
    let (n, p) = (x.len(), x.as_mut_ptr());
    let mv = _mm256_set1_ps(m);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
        _mm256_storeu_ps(p.add(i), e);
        acc = _mm256_add_ps(acc, e);
        i += 8;
    }
    let mut s = sum_lanes(acc);
    for v in &mut x[i..] {
        *v = (*v - m).exp();
        s += *v;
    }
    s
}

/// Never called: CPU decode steps exist only on x86-64.
///
/// # Safety
/// As the x86-64 [`exp_sub_sum`].
#[cfg(not(target_arch = "x86_64"))]
unsafe fn exp_sub_sum(_x: &mut [f32], _m: f32) -> f32 {
    unreachable!("CPU decode steps are only chosen on x86-64 (see packed::available)")
}

/// Never called: CPU decode steps exist only on x86-64.
///
/// # Safety
/// As the x86-64 [`dot`].
#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot(_a: *const f32, _b: *const f32, _n: usize) -> f32 {
    unreachable!("CPU decode steps are only chosen on x86-64 (see packed::available)")
}

/// Never called: CPU decode steps exist only on x86-64.
///
/// # Safety
/// As the x86-64 [`axpy`].
#[cfg(not(target_arch = "x86_64"))]
unsafe fn axpy(_alpha: f32, _x: *const f32, _y: *mut f32, _n: usize) {
    unreachable!("CPU decode steps are only chosen on x86-64 (see packed::available)")
}

/// out = silu(g) * u = g / (1 + exp(-g)) * u, eight lanes at a time ([`exp8`]).
///
/// # Safety
/// On x86-64 the CPU has AVX2 and FMA.
unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    let n = out.len().min(g.len()).min(u.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: n bounds the three slices; AVX2 and FMA are this function's own precondition.
    let i = unsafe { silu_mul_avx2(g.as_ptr(), u.as_ptr(), out.as_mut_ptr(), n) };
    #[cfg(not(target_arch = "x86_64"))]
    let i = 0;
    for j in i..n {
        out[j] = g[j] / (1.0 + (-g[j]).exp()) * u[j];
    }
}

/// [`silu_mul`] over the first n - n % 8 elements; returns how many it did.
///
/// # Safety
/// `g`, `u` and `out` point to `n` f32 each, `out` accessed by nothing else during the call;
/// the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(g: *const f32, u: *const f32, out: *mut f32, n: usize) -> usize {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 8 <= n {
        let gv = _mm256_loadu_ps(g.add(i));
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        let s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0), e));
        _mm256_storeu_ps(out.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(u.add(i))));
        i += 8;
    }
    i
}

/// exp of eight lanes: Cephes' expf (range reduction by ln 2 in two parts, a degree-5
/// polynomial, the exponent added back), within ~1 ulp of libm for inputs in [-87, 88]; above 88
/// it returns exp(88), below -87 exactly 0 (true values under 1.7e-38; -inf gives 0).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let c = _mm256_set1_ps;
    let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, c(-87.0));
    let x = _mm256_max_ps(_mm256_min_ps(x, c(88.0)), c(-87.0));
    let fx = _mm256_floor_ps(_mm256_fmadd_ps(x, c(std::f32::consts::LOG2_E), c(0.5)));
    let x = _mm256_fnmadd_ps(fx, c(0.693_359_4), x);
    let x = _mm256_fnmadd_ps(fx, c(-2.121_944_4e-4), x);
    let mut y = c(1.987_569_1e-4);
    for p in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        5.0e-1,
    ] {
        y = _mm256_fmadd_ps(y, x, c(p));
    }
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), c(1.0));
    let n = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(n)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_kernels::{available, to_vec};
    use crate::llama::seeded_randn;

    #[test]
    fn rms_norm_matches_the_libtorch_formula() {
        let (rows, h) = (3, 37);
        let x = seeded_randn(&[rows, h], 0);
        let w = seeded_randn(&[h], 1);
        let want =
            &w * (&x * (x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + 1e-6).rsqrt());
        let mut got = vec![0f32; (rows * h) as usize];
        rms_norm(&to_vec(&x).unwrap(), &to_vec(&w).unwrap(), 1e-6, &mut got);
        let got = Tensor::from_slice(&got).view([rows, h]);
        assert!((got - want).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn exp_sub_sum_matches_libm_and_zeroes_masked_slots() {
        if !available(1) {
            return;
        }
        let mut x: Vec<f32> = (0..53).map(|i| (i as f32 - 30.0) * 3.1).collect();
        x[7] = f32::NEG_INFINITY;
        x[50] = f32::NEG_INFINITY;
        let m = 5.0;
        let want: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
        // SAFETY: AVX2 and FMA checked above.
        let sum = unsafe { exp_sub_sum(&mut x, m) };
        assert_eq!((x[7], x[50]), (0.0, 0.0));
        for (g, w) in x.iter().zip(&want) {
            assert!((g - w).abs() <= 2e-7 * w.max(1e-30), "{g} vs {w}");
        }
        let wsum: f32 = want.iter().sum();
        assert!((sum - wsum).abs() <= 1e-6 * wsum, "{sum} vs {wsum}");
    }

    #[test]
    fn silu_mul_matches_libtorch() {
        if !available(1) {
            return;
        }
        let g = Tensor::cat(
            &[
                seeded_randn(&[100], 2) * 10.0,
                Tensor::from_slice(&[-200f32, -90.0, -88.0, 0.0, 88.0, 90.0, 200.0]),
            ],
            0,
        );
        let u = seeded_randn(&[107], 3);
        let want = g.silu() * &u;
        let mut got = vec![0f32; 107];
        // SAFETY: AVX2 and FMA checked above.
        unsafe { silu_mul(&to_vec(&g).unwrap(), &to_vec(&u).unwrap(), &mut got) };
        // Relative to the value (|g| up to 200): a few f32 ulps.
        let err = ((Tensor::from_slice(&got) - &want).abs() / (want.abs() + 1.0))
            .max()
            .double_value(&[]);
        assert!(err < 1e-6, "{err}");
    }

    #[test]
    fn layer_step_refuses_what_would_write_out_of_bounds() {
        if !available(tch::get_num_threads().max(1) as usize) {
            return;
        }
        let _g = tch::no_grad_guard();
        let d = Dims {
            hidden: 16,
            heads: 2,
            kv_heads: 1,
            head_dim: 8,
            inter: 16,
            eps: 1e-6,
        };
        let pack = |out: i64, inp: i64, seed: i64| {
            PackedLinear::pack(&(seeded_randn(&[out, inp], seed) * 0.1), None).unwrap()
        };
        let l = CpuLayer {
            ln1: vec![1.0; 16],
            qkv: pack(d.qkv() as i64, 16, 1),
            o: pack(16, 16, 2),
            ln2: vec![1.0; 16],
            gate_up: pack(32, 16, 3),
            down: pack(16, 16, 4),
        };
        let (rows, capacity) = (2usize, 4usize);
        let trig = vec![0.5f32; rows * d.head_dim];
        let step = |offset: usize| Step {
            rows,
            offset,
            capacity,
            cos: &trig,
            sin: &trig,
            valid: None,
        };
        let cache =
            |slots: i64| Tensor::zeros([rows as i64, 1, slots, 8], (Kind::Float, tch::Device::Cpu));
        let run = |s: &Step<'_>, d: &Dims, kc: &mut Tensor, vc: &mut Tensor| {
            let mut x = to_vec(&seeded_randn(&[rows as i64, 16], 5)).unwrap();
            layer_step(&l, d, s, &mut x, kc, vc).map(|()| x)
        };
        let err = |r: Result<Vec<f32>>| r.unwrap_err().to_string();

        // A well-formed step writes its keys into slot 2 and changes x.
        let (mut kc, mut vc) = (cache(4), cache(4));
        let x = run(&step(2), &d, &mut kc, &mut vc).unwrap();
        assert!(x.iter().all(|v| v.is_finite()));
        assert_ne!(
            kc.narrow(2, 2, 1).abs().sum(Kind::Float).double_value(&[]),
            0.0
        );
        assert_eq!(
            kc.narrow(2, 3, 1).abs().sum(Kind::Float).double_value(&[]),
            0.0
        );

        // A cache with fewer slots than the step says, one of another dtype, a slot past the
        // capacity, heads that do not group: errors, nothing written.
        let (mut small, mut vsmall) = (cache(3), cache(3));
        assert!(err(run(&step(2), &d, &mut small, &mut vsmall)).contains("cache layout"));
        let mut half = cache(4).to_kind(Kind::BFloat16);
        assert!(err(run(&step(2), &d, &mut half, &mut vc)).contains("cache layout"));
        let (mut kc, mut vc) = (cache(4), cache(4));
        assert!(err(run(&step(4), &d, &mut kc, &mut vc)).contains("past the capacity"));
        let odd = Dims {
            heads: 3,
            kv_heads: 2,
            ..d
        };
        let (mut kc2, mut vc2) = (
            Tensor::zeros([rows as i64, 2, 4, 8], (Kind::Float, tch::Device::Cpu)),
            Tensor::zeros([rows as i64, 2, 4, 8], (Kind::Float, tch::Device::Cpu)),
        );
        assert!(err(run(&step(0), &odd, &mut kc2, &mut vc2)).contains("key/value heads"));
        assert_eq!(kc.abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(kc2.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}
