//! Decode-step projections on x86-64 CPUs with AVX2 and FMA, without MKL.
//!
//! A decode step multiplies a few rows (one token per sequence, at most
//! [`crate::llama::SMALL_M_ROWS`]) by every weight matrix of the model. MKL's sgemm repacks the
//! whole weight into its panel layout on every call, so at 32 rows a decode step spends about a
//! fifth of its time copying weights (`perf`: `mkl_blas_def_sgemm_scopy_right4_bdz`). The
//! weights do not change during one `generate` call, so `Model::pack_weights` packs each of
//! them once per call into panels of 16 output features (k-major: the 16 weights of input
//! feature k are adjacent) and [`PackedLinear::forward_slice`] multiplies with a
//! register-blocked AVX2/FMA kernel: 6 rows x 16 outputs of accumulators, one broadcast per row
//! and two weight loads per input feature, prefetching the weight stream ahead.
//! Measured on the 2-core dev machine, the projections of one decode step of a 20.5M Llama at 32
//! rows (8 layers, distinct weights, 2 threads): 9.8 ms against MKL's 13.4 ms. At 32 rows the
//! kernel reaches ~95 GFLOP/s per core with the weight in cache and 60-85 when it streams from
//! memory, as a model's weights (82 MB at 20.5M, more than the L3) do every step: decode is bound
//! by that stream. docs/benchmarks.md has the numbers and the end-to-end effect.
//!
//! Threads: the kernel splits the panels over libtorch's own OpenMP team (`GOMP_parallel` from the
//! libgomp libtorch is linked against, found with `dlsym`), as one of libtorch's kernels would,
//! so no second pool competes for the cores. Without libgomp it runs single-threaded, which is
//! only chosen when libtorch itself has one thread.
//!
//! Each output is one sum over the input features in order, so results do not depend on the
//! number of rows or threads (sharded generation equals whole-batch generation bit for bit).

use std::ffi::{c_int, c_uint, c_void};
use std::ops::Range;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};

/// Output features per panel: two AVX registers.
const PANEL: usize = 16;
/// How many panel lines (k-steps) ahead the kernel prefetches.
const PREFETCH: usize = 32;
/// Rows per kernel call: 6 x 2 accumulators + 2 weight registers + 1 broadcast of the 16 AVX
/// registers.
const ROWS: usize = 6;

type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
type OmpInt = unsafe extern "C" fn() -> c_int;

struct Omp {
    parallel: GompParallel,
    thread_num: OmpInt,
    num_threads: OmpInt,
}

/// libgomp's entry points, if this process has them (libtorch's CPU builds link libgomp).
fn omp() -> Option<&'static Omp> {
    static OMP: OnceLock<Option<Omp>> = OnceLock::new();
    OMP.get_or_init(|| {
        let sym = |name: &std::ffi::CStr| {
            // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            (!p.is_null()).then_some(p)
        };
        let (p, t, n) = (
            sym(c"GOMP_parallel")?,
            sym(c"omp_get_thread_num")?,
            sym(c"omp_get_num_threads")?,
        );
        // SAFETY: these are libgomp's exported functions with these C signatures.
        unsafe {
            Some(Omp {
                parallel: std::mem::transmute::<*mut c_void, GompParallel>(p),
                thread_num: std::mem::transmute::<*mut c_void, OmpInt>(t),
                num_threads: std::mem::transmute::<*mut c_void, OmpInt>(n),
            })
        }
    })
    .as_ref()
}

/// Whether this CPU and process can run the packed kernels with `threads` threads.
pub(crate) fn available(threads: usize) -> bool {
    cpu_has_kernel() && (threads <= 1 || omp().is_some())
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_kernel() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_kernel() -> bool {
    false
}

struct Job<'a> {
    n: usize,
    work: &'a (dyn Fn(Range<usize>) + Sync),
    omp: &'static Omp,
}

extern "C" fn run_share(data: *mut c_void) {
    // SAFETY: `data` is the `Job` that `parallel_for` keeps alive until GOMP_parallel returns.
    let job = unsafe { &*(data as *const Job<'_>) };
    // SAFETY: called inside the parallel region libgomp runs this function in.
    let (t, nt) = unsafe { ((job.omp.thread_num)(), (job.omp.num_threads)()) };
    let (t, nt) = (t.max(0) as usize, nt.max(1) as usize);
    // A panic must not unwind into libgomp: the work closures index nothing unchecked, so a
    // panic here is a bug; abort rather than corrupt the team.
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        (job.work)(job.n * t / nt..job.n * (t + 1) / nt)
    }))
    .is_err()
    {
        std::process::abort();
    }
}

/// Runs `work` over `0..n` split into contiguous shares, one per thread of libtorch's OpenMP
/// team (the calling thread takes the first share).
pub(crate) fn parallel_for(n: usize, work: &(dyn Fn(Range<usize>) + Sync)) {
    let threads = tch::get_num_threads().max(1) as usize;
    match omp() {
        Some(omp) if threads > 1 && n > 1 => {
            let job = Job { n, work, omp };
            // SAFETY: `run_share` only reads `job`, which outlives the call; GOMP_parallel returns
            // after every thread of the team finished its share.
            unsafe {
                (omp.parallel)(
                    run_share,
                    &job as *const Job<'_> as *mut c_void,
                    threads.min(n) as c_uint,
                    0,
                )
            };
        }
        _ => work(0..n),
    }
}

/// The contents of an f32 CPU tensor as a `Vec` (copied).
pub(crate) fn to_vec(t: &Tensor) -> Option<Vec<f32>> {
    if t.kind() != Kind::Float {
        return None;
    }
    Vec::<f32>::try_from(t.contiguous().view([-1])).ok()
}

/// 64-byte aligned f32 storage (every panel row of 16 floats is one cache line).
struct Aligned {
    buf: Vec<f32>,
    start: usize,
}

impl Aligned {
    fn zeros(len: usize) -> Aligned {
        let buf = vec![0f32; len + PANEL];
        let start = buf.as_ptr().align_offset(64).min(PANEL);
        Aligned { buf, start }
    }
    fn as_ptr(&self) -> *const f32 {
        self.buf[self.start..].as_ptr()
    }
    fn as_mut_ptr(&mut self) -> *mut f32 {
        self.buf[self.start..].as_mut_ptr()
    }
}

/// A raw pointer that may cross into the OpenMP team (each thread writes disjoint ranges).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: used only to hand buffers to the team for disjoint writes or shared reads while the
// owning call waits for the team.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as for Send: the team's threads share it only while the owning call waits, and they
// read or write disjoint ranges through it.
unsafe impl<T> Sync for SendPtr<T> {}

/// One linear layer's weight (out, in), packed for the decode kernel, and its bias.
pub(crate) struct PackedLinear {
    data: Aligned,
    out: usize,
    inp: usize,
    bias: Option<Vec<f32>>,
}

impl PackedLinear {
    /// Packs an f32 CPU weight (out, in); `None` when its shape or storage does not suit the
    /// kernel (out not a multiple of 16, another dtype or device), so the caller keeps libtorch's
    /// GEMM for it, or when this CPU has no AVX2/FMA: a `PackedLinear` is the proof that the
    /// kernels may run (the module's invariant).
    pub(crate) fn pack(weight: &Tensor, bias: Option<&Tensor>) -> Option<PackedLinear> {
        if !cpu_has_kernel() {
            return None;
        }
        if weight.kind() != Kind::Float || weight.device() != Device::Cpu || weight.dim() != 2 {
            return None;
        }
        let (out, inp) = weight.size2().ok()?;
        let (out, inp) = (out as usize, inp as usize);
        if out == 0 || inp == 0 || out % PANEL != 0 {
            return None;
        }
        let w = weight.contiguous();
        let src = SendPtr(w.data_ptr() as *mut f32);
        let mut data = Aligned::zeros(out * inp);
        let dst = SendPtr(data.as_mut_ptr());
        parallel_for(out / PANEL, &|panels| {
            let (src, dst) = (src, dst);
            for p in panels {
                for o in 0..PANEL {
                    // SAFETY: `w` holds out * inp contiguous f32 and `data` as many; panel p's
                    // k-major block is dst[p * inp * 16 .. (p + 1) * inp * 16].
                    unsafe {
                        let row = src.0.add((p * PANEL + o) * inp);
                        let panel = dst.0.add(p * inp * PANEL + o);
                        for k in 0..inp {
                            *panel.add(k * PANEL) = *row.add(k);
                        }
                    }
                }
            }
        });
        Some(PackedLinear {
            data,
            out,
            inp,
            bias: match bias {
                Some(b) => Some(to_vec(b).filter(|b| b.len() == out)?),
                None => None,
            },
        })
    }

    /// `x W^T + b` of a (rows, in) f32 CPU `x`: (rows, out).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, inp) = x.size2()?;
        if inp as usize != self.inp || x.kind() != Kind::Float || x.device() != Device::Cpu {
            return Err(ModelError::invalid(
                "packed linear input",
                format!("{:?} {:?} on {:?}", x.size(), x.kind(), x.device()),
                format!("expected (rows, {}) f32 on the CPU", self.inp),
            ));
        }
        let x = x.contiguous();
        let y = Tensor::f_empty([rows, self.out as i64], (Kind::Float, Device::Cpu))?;
        let rows = rows as usize;
        // SAFETY: checked above: x is (rows, inp) contiguous f32 and y (rows, out).
        let (xs, ys) = unsafe {
            (
                std::slice::from_raw_parts(x.data_ptr() as *const f32, rows * self.inp),
                std::slice::from_raw_parts_mut(y.data_ptr() as *mut f32, rows * self.out),
            )
        };
        self.forward_slice(xs, rows, ys);
        Ok(y)
    }

    /// `y = x W^T + b` of a (rows, in) `x` into a (rows, out) `y`, row-major slices.
    ///
    /// # Panics
    /// When the slices are shorter than rows * in and rows * out.
    pub(crate) fn forward_slice(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let (inp, out) = (self.inp, self.out);
        assert!(
            x.len() >= rows * inp && y.len() >= rows * out,
            "packed linear slices"
        );
        let (xp, yp) = (SendPtr(x.as_ptr() as *mut f32), SendPtr(y.as_mut_ptr()));
        let wp = SendPtr(self.data.as_ptr() as *mut f32);
        let bias = self.bias.as_deref();
        parallel_for(out / PANEL, &|panels| {
            let (xp, yp, wp) = (xp, yp, wp);
            // SAFETY: lengths asserted above, the packed data is out * inp; each share writes
            // only its own panels' columns of y; `self` exists, so the CPU has AVX2 and FMA
            // (`pack` checks).
            unsafe { gemm_panels(xp.0, rows, inp, wp.0, yp.0, out, panels.clone()) };
            if let Some(b) = bias {
                let cols = panels.start * PANEL..panels.end * PANEL;
                for r in 0..rows {
                    for c in cols.clone() {
                        // SAFETY: row r, a column of this share's panels: inside y, ours alone.
                        unsafe { *yp.0.add(r * out + c) += b[c] };
                    }
                }
            }
        });
    }
}

/// y[:, 16p..16p+16] = x · (panel p)ᵀ for p in `panels`.
///
/// # Safety
/// `x` points to rows * inp f32, `w` to the packed (out / 16) panels of inp * 16 f32, `y` to
/// rows * out f32, the columns of `panels` accessed by nothing else during the call; the CPU has
/// AVX2 and FMA (checked by [`available`]; a [`PackedLinear`] exists only where it holds).
#[cfg(target_arch = "x86_64")]
unsafe fn gemm_panels(
    x: *const f32,
    rows: usize,
    inp: usize,
    w: *const f32,
    y: *mut f32,
    out: usize,
    panels: Range<usize>,
) {
    for p in panels {
        let panel = w.add(p * inp * PANEL);
        let mut j = 0;
        while j < rows {
            let n = (rows - j).min(ROWS);
            let (xj, yj) = (x.add(j * inp), y.add(j * out + p * PANEL));
            match n {
                6 => kernel::<6>(xj, inp, panel, yj, out),
                5 => kernel::<5>(xj, inp, panel, yj, out),
                4 => kernel::<4>(xj, inp, panel, yj, out),
                3 => kernel::<3>(xj, inp, panel, yj, out),
                2 => kernel::<2>(xj, inp, panel, yj, out),
                _ => kernel::<1>(xj, inp, panel, yj, out),
            }
            j += n;
        }
    }
}

/// Never called: no `PackedLinear` is packed off x86-64.
///
/// # Safety
/// As the x86-64 [`gemm_panels`].
#[cfg(not(target_arch = "x86_64"))]
unsafe fn gemm_panels(
    _x: *const f32,
    _rows: usize,
    _inp: usize,
    _w: *const f32,
    _y: *mut f32,
    _out: usize,
    _panels: Range<usize>,
) {
    unreachable!("packed kernels are only chosen on x86-64 (see `available`)")
}

/// R rows x 16 outputs: acc[r] += x[r, k] * panel[k, 0..16] for every k, in order.
///
/// # Safety
/// As [`gemm_panels`], for R rows starting at `x` (row stride `inp`) and `y` (row stride `out`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel<const R: usize>(
    x: *const f32,
    inp: usize,
    panel: *const f32,
    y: *mut f32,
    out: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for k in 0..inp {
        // Weights stream from memory once per step (a model's are larger than the L3): ask for
        // the line PREFETCH k-steps ahead (past the panel's end: the next panel's start; past
        // the last panel nothing useful, and a prefetch never faults).
        _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add((k + PREFETCH) * PANEL) as *const i8);
        let w0 = _mm256_loadu_ps(panel.add(k * PANEL));
        let w1 = _mm256_loadu_ps(panel.add(k * PANEL + 8));
        for (r, a) in acc.iter_mut().enumerate() {
            let xb = _mm256_broadcast_ss(&*x.add(r * inp + k));
            a[0] = _mm256_fmadd_ps(xb, w0, a[0]);
            a[1] = _mm256_fmadd_ps(xb, w1, a[1]);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(y.add(r * out), a[0]);
        _mm256_storeu_ps(y.add(r * out + 8), a[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn randn(shape: &[i64], seed: i64) -> Tensor {
        crate::llama::seeded_randn(shape, seed)
    }

    #[test]
    fn the_kernel_is_chosen_where_the_cpu_has_it() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            assert!(available(1));
            assert!(omp().is_some(), "libtorch's libgomp entry points not found");
            assert!(available(2));
        }
    }

    #[test]
    fn packed_linear_matches_libtorch_for_every_row_count_and_shape() {
        if !available(tch::get_num_threads().max(1) as usize) {
            return;
        }
        let _g = tch::no_grad_guard();
        for (i, &(out, inp)) in [(16, 1), (32, 7), (48, 384), (128, 1536)]
            .iter()
            .enumerate()
        {
            let w = randn(&[out, inp], i as i64) * 0.05;
            let b = randn(&[out], 100 + i as i64);
            for bias in [None, Some(&b)] {
                let p = PackedLinear::pack(&w, bias).expect("packable");
                for rows in [1, 5, 6, 7, 13, 32] {
                    let x = randn(&[rows, inp], 200 + rows);
                    let mut want = x.matmul(&w.tr());
                    if let Some(b) = bias {
                        want += b;
                    }
                    let got = p.forward(&x).unwrap();
                    assert_eq!(got.size(), [rows, out]);
                    let err = (&got - &want).abs().max().double_value(&[]);
                    let scale = want.abs().max().double_value(&[]).max(1.0);
                    assert!(err <= 1e-5 * scale, "({out}, {inp}) x {rows} rows: {err}");
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_how_panels_are_shared() {
        if !available(1) {
            return;
        }
        let (out, inp, rows) = (64usize, 96usize, 11usize);
        let w = randn(&[out as i64, inp as i64], 1);
        let x = randn(&[rows as i64, inp as i64], 2);
        let p = PackedLinear::pack(&w, None).unwrap();
        let run = |splits: &[Range<usize>]| {
            let mut y = vec![0f32; rows * out];
            for s in splits {
                // SAFETY: shapes as packed; x is contiguous (rows, inp); AVX2 and FMA checked
                // above.
                unsafe {
                    gemm_panels(
                        x.data_ptr() as *const f32,
                        rows,
                        inp,
                        p.data.as_ptr(),
                        y.as_mut_ptr(),
                        out,
                        s.clone(),
                    )
                }
            }
            y
        };
        let all = 0..4;
        let whole = run(std::slice::from_ref(&all));
        assert_eq!(whole, run(&[0..1, 1..3, 3..4]));
        assert_eq!(whole, run(&[2..4, 0..2]));
        // And row by row: each row's sums are the same whichever rows share the kernel call.
        let one = PackedLinear::pack(&w, None).unwrap();
        let first = one.forward(&x.narrow(0, 0, 1)).unwrap();
        let first: Vec<f32> = Vec::try_from(first.view([-1])).unwrap();
        assert_eq!(first, whole[..out]);
    }

    #[test]
    fn parallel_for_runs_every_index_once() {
        for n in [0usize, 1, 2, 3, 17, 256] {
            let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            parallel_for(n, &|r| {
                for i in r {
                    seen[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(
                seen.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
    }

    #[test]
    fn unsuitable_weights_are_left_to_libtorch() {
        assert!(
            PackedLinear::pack(&randn(&[50, 32], 0), None).is_none(),
            "50 outputs"
        );
        let half = randn(&[32, 32], 0).to_kind(Kind::BFloat16);
        assert!(PackedLinear::pack(&half, None).is_none(), "bf16");
        if !cpu_has_kernel() {
            assert!(
                PackedLinear::pack(&randn(&[32, 8], 0), None).is_none(),
                "no AVX2/FMA"
            );
            return;
        }
        let p = PackedLinear::pack(&randn(&[32, 8], 0), None).unwrap();
        let err = p.forward(&randn(&[2, 9], 0)).unwrap_err().to_string();
        assert!(err.contains("expected (rows, 8)"), "{err}");
    }
}
