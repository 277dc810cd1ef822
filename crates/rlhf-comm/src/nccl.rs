//! [`NcclGroup`]: the collectives on GPU memory through NCCL, one CUDA device per rank
//! (feature `nccl`).
//!
//! Nothing CUDA is linked, so the crate builds and its CPU tests run on machines without CUDA.
//! Both libraries are opened at run time, on first use: the CUDA driver (`libcuda.so.1`) through
//! cudarc's dynamic loading, and NCCL through libloading, as `libnccl.so.2` (its run-time name,
//! which also finds the copy that libtorch has already loaded in a worker process), then
//! `libnccl.so`, or the file named by `RLHF_NCCL_LIBRARY`. cudarc's own NCCL loader is not used:
//! its candidate names miss `libnccl.so.2` (they find only a development `libnccl.so`
//! symlink), and it panics where a missing library must be an error. [`nccl_available`] says,
//! without panicking, whether both libraries load and a CUDA device is visible; every other
//! entry point returns [`CommError::Backend`] when they do not. NCCL 2.14 or later is required
//! (non-blocking init); [`ReduceOp::Mean`] is NCCL's own `ncclAvg` (2.10 and later).
//!
//! Forming a group: rank 0 calls [`NcclGroup::unique_id`] and hands the id's bytes
//! ([`NcclUniqueId::to_bytes`]) to the other ranks out of band (the coordinator carries them
//! over gRPC); every rank then calls [`NcclGroup::connect`]. The communicator is created with
//! NCCL's non-blocking init (`ncclConfig_t.blocking = 0`, so `NCCL_COMM_BLOCKING=1` in the
//! environment must not be set: it would make init block without a timeout), polled with
//! `ncclCommGetAsyncError` until it is done or the timeout passes.
//!
//! Operations take raw device pointers (a tch CUDA tensor's `data_ptr()`), are enqueued on the
//! device's legacy default stream (the null stream, where libtorch's default-stream kernels run,
//! so they are ordered after the kernels that produced the data and before those that consume
//! it), and return only once the operation has finished on the device: once
//! `ncclCommGetAsyncError` reports it enqueued, an event is recorded after it on that stream and
//! `cuEventQuery` is polled with short sleeps (an event rather than `cuStreamQuery`, so that
//! kernels other threads queue later do not count). They block the calling thread; from async
//! code call them inside `spawn_blocking`.
//!
//! **Invariant:** every operation, init included, ends within [`NcclGroupConfig::timeout`].
//! NCCL exposes no progress counter, so the whole operation, with the work queued before it on
//! the stream, must finish in that time (unlike [`crate::TcpGroup`], where only each chunk
//! must): set it above the longest transfer. On
//! timeout the communicator is aborted (`ncclCommAbort`, which also stops its kernels, so the
//! stream drains and the device stays usable) and [`CommError::BackendTimeout`] is returned.
//! **Invariant:** errors name the operation, the group id and this rank; NCCL cannot tell which
//! peer is at fault, so none is named ([`CommError::peer`] is `None`). After any error other
//! than an invalid argument the communicator is aborted and the group is unusable (every later
//! call fails with [`CommError::Poisoned`]); form a new group with a new unique id.
//! **Boundary:** NCCL does not check that ranks make matching calls: unlike `TcpGroup`, a
//! mismatch (another root, another length, another operation) is not reported as
//! [`CommError::Mismatch`]; it hangs until the timeout or corrupts the buffers. Results of an
//! all-reduce are what NCCL computes; no bit-identity across ranks is promised beyond NCCL's.
//! **Boundary:** the operations are `unsafe`: the pointers must be device memory of this
//! group's device (or memory NCCL can address from it), valid for the stated length, and not
//! used by anything else until the call returns.

use std::ffi::{c_char, c_int, c_void, CStr, OsString};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{result as cu, sys as cusys, CudaContext, DriverError};
use libloading::Library;

use crate::error::{CommError, Op};
use crate::ReduceOp;

/// Size of an NCCL unique id, in bytes (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// Environment variable naming the NCCL library file to load instead of searching the loader's
/// path for `libnccl.so.2` and `libnccl.so`.
pub const NCCL_LIBRARY_ENV: &str = "RLHF_NCCL_LIBRARY";

/// Library names tried, in order, when [`NCCL_LIBRARY_ENV`] is not set.
const NCCL_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];
/// Oldest NCCL with `ncclConfig_t.blocking` (non-blocking init), `NCCL_VERSION(2, 14, 0)`.
const MIN_VERSION: c_int = 21400;
/// Longest wait for a healthy communicator to finalize when the group is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Polls of an operation's state before sleeping between polls (short collectives finish here).
const SPIN_POLLS: u32 = 64;
/// Longest sleep between polls.
const MAX_POLL_SLEEP: Duration = Duration::from_millis(1);

// ncclResult_t
const NCCL_SUCCESS: c_int = 0;
const NCCL_IN_PROGRESS: c_int = 7;
// ncclDataType_t
const NCCL_UINT8: c_int = 1;
const NCCL_FLOAT32: c_int = 7;
// ncclRedOp_t
const NCCL_SUM: c_int = 0;
const NCCL_AVG: c_int = 4;
// ncclConfig_t
const NCCL_CONFIG_MAGIC: u32 = 0xcafe_beef;
const NCCL_CONFIG_UNDEF_INT: c_int = c_int::MIN;

type Comm = *mut c_void;
type Stream = *mut c_void;

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawUniqueId {
    internal: [u8; NCCL_UNIQUE_ID_BYTES],
}

/// The first fields of `ncclConfig_t`, as of NCCL 2.14 (plus `cgaClusterSize`, so that the
/// struct has no padding). NCCL copies `size` bytes and takes the fields newer than `version`
/// from its own defaults, so this prefix is valid for every NCCL from 2.14 on.
#[repr(C)]
struct RawConfig {
    size: usize,
    magic: u32,
    version: u32,
    blocking: c_int,
    cga_cluster_size: c_int,
}

/// The NCCL entry points used here, resolved once; the library is never unloaded.
struct Nccl {
    version: c_int,
    get_unique_id: unsafe extern "C" fn(*mut RawUniqueId) -> c_int,
    comm_init_rank_config:
        unsafe extern "C" fn(*mut Comm, c_int, RawUniqueId, c_int, *mut RawConfig) -> c_int,
    comm_get_async_error: unsafe extern "C" fn(Comm, *mut c_int) -> c_int,
    comm_finalize: unsafe extern "C" fn(Comm) -> c_int,
    comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    comm_abort: unsafe extern "C" fn(Comm) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_last_error: unsafe extern "C" fn(Comm) -> *const c_char,
    #[allow(clippy::type_complexity)]
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    #[allow(clippy::type_complexity)]
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    all_gather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> c_int,
    #[allow(clippy::type_complexity)]
    reduce_scatter: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    _lib: Library,
}

impl Nccl {
    /// NCCL's text for a result code.
    fn error_string(&self, code: c_int) -> String {
        // SAFETY: ncclGetErrorString returns a static string for any code.
        unsafe { c_text((self.get_error_string)(code)) }.unwrap_or_else(|| format!("code {code}"))
    }

    /// NCCL's last error message, if any (`ncclGetLastError`).
    fn last_error(&self, comm: Comm) -> Option<String> {
        // SAFETY: the comm argument may be null or a live communicator.
        unsafe { c_text((self.get_last_error)(comm)) }.filter(|s| !s.is_empty())
    }
}

/// Copies a C string, `None` for a null pointer.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string.
unsafe fn c_text(p: *const c_char) -> Option<String> {
    (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().trim().to_string())
}

/// The loaded NCCL, or why it could not be loaded.
fn nccl() -> Result<&'static Nccl, String> {
    static NCCL: OnceLock<Result<Nccl, String>> = OnceLock::new();
    NCCL.get_or_init(
        || match std::env::var_os(NCCL_LIBRARY_ENV).filter(|p| !p.is_empty()) {
            Some(path) => load_nccl(&[path], &format!(" (from {NCCL_LIBRARY_ENV})")),
            None => load_nccl(&NCCL_NAMES.map(OsString::from), ""),
        },
    )
    .as_ref()
    .map_err(Clone::clone)
}

/// Loads the first of `names` that opens and resolves NCCL's entry points from it.
fn load_nccl(names: &[OsString], origin: &str) -> Result<Nccl, String> {
    let mut first_error = None;
    let lib = names.iter().find_map(|name| {
        // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
        match unsafe { Library::new(name) } {
            Ok(lib) => Some(lib),
            Err(e) => {
                first_error.get_or_insert_with(|| (name.clone(), e));
                None
            }
        }
    });
    let Some(lib) = lib else {
        let (name, e) = first_error.expect("at least one library name");
        return Err(format!(
            "cannot load {}{origin} ({}); install NCCL 2.14 or later (the libnccl2 package, or \
             the nvidia-nccl wheel that PyTorch brings) and put its directory on \
             LD_LIBRARY_PATH, or set {NCCL_LIBRARY_ENV} to the library file",
            name.to_string_lossy(),
            error_chain(&e)
        ));
    };
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol is NCCL's C function of that name, whose signature (nccl.h,
            // stable since 2.14) is the field's type.
            *unsafe { lib.get($name) }.map_err(|e| {
                format!(
                    "the loaded NCCL has no {} ({}); it is older than 2.14 or not NCCL",
                    $name,
                    error_chain(&e)
                )
            })?
        };
    }
    let get_version: unsafe extern "C" fn(*mut c_int) -> c_int = sym!("ncclGetVersion");
    let mut version = 0;
    // SAFETY: ncclGetVersion writes one int.
    let r = unsafe { get_version(&mut version) };
    if r != NCCL_SUCCESS || version < MIN_VERSION {
        return Err(format!(
            "the loaded NCCL is version {} (code {r}); 2.14 or later is needed (non-blocking \
             init)",
            version_text(version)
        ));
    }
    Ok(Nccl {
        version,
        get_unique_id: sym!("ncclGetUniqueId"),
        comm_init_rank_config: sym!("ncclCommInitRankConfig"),
        comm_get_async_error: sym!("ncclCommGetAsyncError"),
        comm_finalize: sym!("ncclCommFinalize"),
        comm_destroy: sym!("ncclCommDestroy"),
        comm_abort: sym!("ncclCommAbort"),
        get_error_string: sym!("ncclGetErrorString"),
        get_last_error: sym!("ncclGetLastError"),
        broadcast: sym!("ncclBroadcast"),
        all_reduce: sym!("ncclAllReduce"),
        all_gather: sym!("ncclAllGather"),
        reduce_scatter: sym!("ncclReduceScatter"),
        _lib: lib,
    })
}

/// An error with its sources (libloading's own text is only "dlopen failed"; the loader's
/// message is the source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// `NCCL_VERSION_CODE` as `major.minor.patch`.
fn version_text(code: c_int) -> String {
    if code >= 10000 {
        format!("{}.{}.{}", code / 10000, code % 10000 / 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code % 1000 / 100, code % 100)
    }
}

/// Whether the CUDA driver loads, initialises and shows at least one device; checked once.
fn driver() -> Result<(), String> {
    static DRIVER: OnceLock<Result<(), String>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            // SAFETY: probing loads (and unloads) the library; its initialisers have no
            // preconditions. Probing first keeps cudarc from panicking on a missing library.
            if !unsafe { cusys::is_culib_present() } {
                return Err(
                    "cannot load the CUDA driver library libcuda.so.1 (no NVIDIA driver \
                            on this machine, or its directory is not on the loader's path)"
                        .to_string(),
                );
            }
            guarded("cuInit", cu::init).map_err(|e| {
                format!("{e}; check the NVIDIA driver and that a GPU is visible to this process")
            })?;
            match guarded("cuDeviceGetCount", cu::device::get_count)? {
                0 => Err("the CUDA driver sees no device (check CUDA_VISIBLE_DEVICES)".to_string()),
                _ => Ok(()),
            }
        })
        .clone()
}

/// Runs a cudarc call, turning its errors and panics (a missing symbol panics there) into text.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, DriverError>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what} failed: {}", driver_text(&e))),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(format!("{what} failed in cudarc: {msg}"))
        }
    }
}

/// A driver error as `CUDA_ERROR_NAME (explanation)`.
fn driver_text(e: &DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{:?} ({})", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

/// Checks, without panicking, that the NCCL backend can work here: libnccl (2.14 or later) and
/// the CUDA driver library load, and the driver sees a device. The error says what is missing
/// and what to do, e.g. "NCCL backend unavailable: cannot load libnccl.so.2 (…); install NCCL
/// …". The answer is computed once per process.
pub fn nccl_available() -> Result<(), String> {
    let problems: Vec<String> = [nccl().map(drop), driver()]
        .into_iter()
        .filter_map(Result::err)
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("NCCL backend unavailable: {}", problems.join("; ")))
    }
}

/// The identity of one NCCL communicator, made by rank 0 ([`NcclGroup::unique_id`]) and given
/// to every rank of the group. Its bytes hold rank 0's bootstrap address; carry them as they are.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclUniqueId([u8; NCCL_UNIQUE_ID_BYTES]);

impl NcclUniqueId {
    /// The id's bytes, for sending to the other ranks.
    pub fn to_bytes(&self) -> [u8; NCCL_UNIQUE_ID_BYTES] {
        self.0
    }

    /// An id from the bytes of [`NcclUniqueId::to_bytes`]; any other length is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<NcclUniqueId, CommError> {
        let id = bytes.try_into().map_err(|_| CommError::InvalidArgument {
            op: Op::Rendezvous,
            detail: format!(
                "an NCCL unique id has {NCCL_UNIQUE_ID_BYTES} bytes, got {}; pass the bytes of \
                 rank 0's NcclUniqueId::to_bytes unchanged",
                bytes.len()
            ),
        })?;
        Ok(NcclUniqueId(id))
    }
}

impl fmt::Debug for NcclUniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // FNV-1a: enough to tell ids apart in logs without printing 128 bytes.
        let hash = self.0.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        write!(f, "NcclUniqueId({hash:016x})")
    }
}

/// Settings of one rank's membership in an NCCL group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclGroupConfig {
    /// Names the group in errors and logs (NCCL itself is told apart by the unique id). No
    /// default.
    pub group_id: u64,
    /// This process's rank, `0..world`. No default.
    pub rank: usize,
    /// Number of ranks. No default.
    pub world: usize,
    /// CUDA device ordinal this rank uses, as the CUDA driver numbers them (after
    /// `CUDA_VISIBLE_DEVICES`); the pointers given to the operations must be on it. No default.
    pub device: usize,
    /// Longest time init or one operation may take before it is aborted (see the module docs:
    /// the whole operation, not each chunk). Default 60 s.
    pub timeout: Duration,
}

impl NcclGroupConfig {
    /// A config with the default timeout (60 s).
    pub fn new(group_id: u64, rank: usize, world: usize, device: usize) -> Self {
        NcclGroupConfig {
            group_id,
            rank,
            world,
            device,
            timeout: Duration::from_secs(60),
        }
    }

    fn validate(&self) -> Result<(), CommError> {
        let bad = |detail: String| Err(CommError::bad_setting(detail));
        CommError::check_rank(self.rank, self.world)?;
        if self.world > c_int::MAX as usize || self.device > c_int::MAX as usize {
            return bad(format!(
                "world {} or device {} exceeds {}",
                self.world,
                self.device,
                c_int::MAX
            ));
        }
        if self.timeout.is_zero() {
            return bad("timeout must be positive".to_string());
        }
        Ok(())
    }
}

/// One rank's membership in an NCCL communicator. See the module docs.
///
/// Dropping a healthy group finalizes its communicator, which NCCL completes once the group is
/// quiescent (the other ranks drop theirs too), waiting at most the timeout or 5 s, whichever
/// is shorter, before aborting it instead; a poisoned group was aborted already.
pub struct NcclGroup {
    cfg: NcclGroupConfig,
    nccl: &'static Nccl,
    /// The device's primary context (the one libtorch uses), retained while the group lives.
    ctx: Arc<CudaContext>,
    /// Null once aborted or destroyed.
    comm: Comm,
    /// One `f32` of device memory for [`NcclGroup::barrier`]; 0 when not allocated.
    scratch: cusys::CUdeviceptr,
    /// Recorded after each operation to wait for it; null when not created.
    done: cusys::CUevent,
    /// The first error, once one happened.
    poisoned: Option<String>,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time, which `&mut
// self` guarantees; the CUDA context is made current on the calling thread by every call.
unsafe impl Send for NcclGroup {}

impl fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclGroup")
            .field("cfg", &self.cfg)
            .field("nccl", &version_text(self.nccl.version))
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl NcclGroup {
    /// A fresh unique id for a new group (`ncclGetUniqueId`); rank 0 calls it and hands
    /// [`NcclUniqueId::to_bytes`] to the other ranks. The calling process hosts NCCL's bootstrap
    /// root (a listener whose address is in the id), so it must live until every rank has
    /// connected. Needs only libnccl, no device.
    pub fn unique_id() -> Result<NcclUniqueId, CommError> {
        let backend = |detail: String| CommError::Backend {
            op: Op::Rendezvous,
            detail: format!("cannot create an NCCL unique id: {detail}"),
        };
        let nccl = nccl().map_err(|e| backend(format!("NCCL backend unavailable: {e}")))?;
        let mut id = RawUniqueId {
            internal: [0; NCCL_UNIQUE_ID_BYTES],
        };
        // SAFETY: ncclGetUniqueId writes one ncclUniqueId.
        let r = unsafe { (nccl.get_unique_id)(&mut id) };
        if r != NCCL_SUCCESS {
            let last = nccl
                .last_error(ptr::null_mut())
                .map(|l| format!(" ({l})"))
                .unwrap_or_default();
            return Err(backend(format!(
                "ncclGetUniqueId failed: {}{last}; often no usable network interface (see \
                 NCCL_SOCKET_IFNAME; NCCL_DEBUG=WARN gives NCCL's own account)",
                nccl.error_string(r)
            )));
        }
        Ok(NcclUniqueId(id.internal))
    }

    /// Forms the group: every rank calls this with the same `id`, `world` and `group_id`, each
    /// with its own rank and device. Init is non-blocking and polled; when it has not finished
    /// within `cfg.timeout` (a rank never came, or the network is blocked) the communicator is
    /// aborted and [`CommError::BackendTimeout`] is returned.
    pub fn connect(cfg: NcclGroupConfig, id: NcclUniqueId) -> Result<NcclGroup, CommError> {
        cfg.validate()?;
        let at = format!("rank {} of group {}", cfg.rank, cfg.group_id);
        let backend = |detail: String| CommError::Backend {
            op: Op::Rendezvous,
            detail: format!("{at}: {detail}"),
        };
        let unavailable = |e: String| backend(format!("NCCL backend unavailable: {e}"));
        let nccl = nccl().map_err(unavailable)?;
        driver().map_err(unavailable)?;
        if std::env::var("NCCL_COMM_BLOCKING").is_ok_and(|v| v.trim() == "1") {
            tracing::warn!(
                group = cfg.group_id,
                rank = cfg.rank,
                "NCCL_COMM_BLOCKING=1 makes NCCL's init block: the rendezvous timeout cannot be \
                 enforced; unset it"
            );
        }
        let device = cfg.device;
        let ctx = guarded("opening the CUDA device", || CudaContext::new(device))
            .map_err(|e| backend(format!("CUDA device {device}: {e}")))?;
        // SAFETY: the context was just made current on this thread; 4 bytes are allocated and
        // zeroed before use.
        let scratch = guarded("allocating the barrier buffer", || unsafe {
            let p = cu::malloc_sync(4)?;
            if let Err(e) = cu::memset_d8_sync(p, 0, 4) {
                let _ = cu::free_sync(p);
                return Err(e);
            }
            Ok(p)
        })
        .map_err(|e| backend(format!("CUDA device {device}: {e}")))?;
        let mut group = NcclGroup {
            cfg,
            nccl,
            ctx,
            comm: ptr::null_mut(),
            scratch,
            done: ptr::null_mut(),
            poisoned: None,
        };
        group.done = guarded("creating a CUDA event", || {
            cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
        })
        .map_err(|e| backend(format!("CUDA device {device}: {e}")))?;
        let mut config = RawConfig {
            size: size_of::<RawConfig>(),
            magic: NCCL_CONFIG_MAGIC,
            version: MIN_VERSION as u32,
            blocking: 0,
            cga_cluster_size: NCCL_CONFIG_UNDEF_INT,
        };
        let deadline = Instant::now() + group.cfg.timeout;
        let mut comm = ptr::null_mut();
        // SAFETY: the arguments were validated; NCCL writes the communicator handle, which is
        // valid (in progress) even when the call returns ncclInProgress.
        let r = unsafe {
            (nccl.comm_init_rank_config)(
                &mut comm,
                group.cfg.world as c_int,
                RawUniqueId { internal: id.0 },
                group.cfg.rank as c_int,
                &mut config,
            )
        };
        group.comm = comm;
        group.check(Op::Rendezvous, "ncclCommInitRankConfig", r)?;
        group.wait(Op::Rendezvous, "ncclCommInitRankConfig", deadline, false)?;
        tracing::debug!(
            group = group.cfg.group_id,
            rank = group.cfg.rank,
            world = group.cfg.world,
            device = group.cfg.device,
            nccl = %version_text(nccl.version),
            "NCCL group formed"
        );
        Ok(group)
    }

    /// This process's rank, `0..world`.
    pub fn rank(&self) -> usize {
        self.cfg.rank
    }

    /// Number of ranks in the group.
    pub fn world(&self) -> usize {
        self.cfg.world
    }

    /// The group's settings.
    pub fn config(&self) -> &NcclGroupConfig {
        &self.cfg
    }

    /// The loaded NCCL's version, `major.minor.patch`.
    pub fn nccl_version(&self) -> String {
        version_text(self.nccl.version)
    }

    /// Copies `root`'s `bytes` bytes at device address `ptr` to the same address range on every
    /// other rank (in place; `ncclBroadcast` of `ncclUint8`). Lengths must agree.
    ///
    /// # Safety
    /// `ptr` is device memory of this group's device, valid for `bytes` bytes, that nothing
    /// else reads or writes until this returns (work already queued on the legacy default
    /// stream is fine: it runs first).
    pub unsafe fn broadcast_raw(
        &mut self,
        root: usize,
        ptr: u64,
        bytes: usize,
    ) -> Result<(), CommError> {
        let op = Op::Broadcast;
        self.start(op)?;
        if root >= self.cfg.world {
            return Err(CommError::InvalidArgument {
                op,
                detail: format!("root {root} is not a rank of a group of {}", self.cfg.world),
            });
        }
        self.valid_ptr(op, "ptr", ptr, bytes)?;
        if bytes == 0 {
            return Ok(());
        }
        let (nccl, root) = (self.nccl, root as c_int);
        self.run(op, "ncclBroadcast", |comm| {
            let p = ptr as *mut c_void;
            (nccl.broadcast)(p, p, bytes, NCCL_UINT8, root, comm, ptr::null_mut())
        })
    }

    /// Replaces the `len` `f32`s at device address `ptr` on every rank with their element-wise
    /// reduction over all ranks (in place; `ncclAllReduce` with `ncclSum`, or `ncclAvg` for
    /// [`ReduceOp::Mean`]). Lengths must agree.
    ///
    /// # Safety
    /// As [`NcclGroup::broadcast_raw`], for `len * 4` bytes.
    pub unsafe fn all_reduce_f32_raw(
        &mut self,
        ptr: u64,
        len: usize,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.start(Op::AllReduce)?;
        let bytes = f32_bytes(Op::AllReduce, len, 1)?;
        self.valid_ptr(Op::AllReduce, "ptr", ptr, bytes)?;
        if len == 0 {
            return Ok(());
        }
        let red = nccl_red_op(op);
        let nccl = self.nccl;
        self.run(Op::AllReduce, "ncclAllReduce", |comm| {
            let p = ptr as *mut c_void;
            (nccl.all_reduce)(p, p, len, NCCL_FLOAT32, red, comm, ptr::null_mut())
        })
    }

    /// Writes every rank's `len_per_rank` `f32`s at `send_ptr` into `recv_ptr`, rank `r`'s at
    /// element `r * len_per_rank` (`ncclAllGather`). In place when `send_ptr` is this rank's
    /// slot of `recv_ptr`. Lengths must agree.
    ///
    /// # Safety
    /// As [`NcclGroup::broadcast_raw`], for `len_per_rank * 4` bytes at `send_ptr` and
    /// `world * len_per_rank * 4` bytes at `recv_ptr`; the two overlap only in place.
    pub unsafe fn all_gather_f32_raw(
        &mut self,
        send_ptr: u64,
        recv_ptr: u64,
        len_per_rank: usize,
    ) -> Result<(), CommError> {
        let op = Op::AllGather;
        self.start(op)?;
        let send_bytes = f32_bytes(op, len_per_rank, 1)?;
        let recv_bytes = f32_bytes(op, len_per_rank, self.cfg.world)?;
        self.valid_ptr(op, "send_ptr", send_ptr, send_bytes)?;
        self.valid_ptr(op, "recv_ptr", recv_ptr, recv_bytes)?;
        if len_per_rank == 0 {
            return Ok(());
        }
        let nccl = self.nccl;
        self.run(op, "ncclAllGather", |comm| {
            let (s, r) = (send_ptr as *const c_void, recv_ptr as *mut c_void);
            (nccl.all_gather)(s, r, len_per_rank, NCCL_FLOAT32, comm, ptr::null_mut())
        })
    }

    /// Reduces the `world * len_per_rank` `f32`s at `send_ptr` over all ranks and writes rank
    /// `r`'s chunk (elements `r * len_per_rank..`, [`crate::scatter_chunk`] of a buffer padded
    /// to `world * len_per_rank`) to `recv_ptr` (`ncclReduceScatter`). In place when `recv_ptr`
    /// is this rank's chunk of `send_ptr`. Lengths must agree.
    ///
    /// # Safety
    /// As [`NcclGroup::broadcast_raw`], for `world * len_per_rank * 4` bytes at `send_ptr` and
    /// `len_per_rank * 4` bytes at `recv_ptr`; the two overlap only in place.
    pub unsafe fn reduce_scatter_f32_raw(
        &mut self,
        send_ptr: u64,
        recv_ptr: u64,
        len_per_rank: usize,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let o = Op::ReduceScatter;
        self.start(o)?;
        let send_bytes = f32_bytes(o, len_per_rank, self.cfg.world)?;
        let recv_bytes = f32_bytes(o, len_per_rank, 1)?;
        self.valid_ptr(o, "send_ptr", send_ptr, send_bytes)?;
        self.valid_ptr(o, "recv_ptr", recv_ptr, recv_bytes)?;
        if len_per_rank == 0 {
            return Ok(());
        }
        let red = nccl_red_op(op);
        let nccl = self.nccl;
        self.run(o, "ncclReduceScatter", |comm| {
            let (s, r) = (send_ptr as *const c_void, recv_ptr as *mut c_void);
            (nccl.reduce_scatter)(s, r, len_per_rank, NCCL_FLOAT32, red, comm, ptr::null_mut())
        })
    }

    /// Returns once every rank has entered the barrier: a one-element all-reduce on a device
    /// buffer of the group's own. Like every operation it also waits for the work queued before
    /// it on the legacy default stream.
    pub fn barrier(&mut self) -> Result<(), CommError> {
        self.start(Op::Barrier)?;
        let (nccl, p) = (self.nccl, self.scratch as *mut c_void);
        // SAFETY: `scratch` is this group's own 4-byte device buffer, used by nothing else.
        unsafe {
            self.run(Op::Barrier, "ncclAllReduce", |comm| {
                (nccl.all_reduce)(p, p, 1, NCCL_FLOAT32, NCCL_SUM, comm, ptr::null_mut())
            })
        }
    }

    /// Fails with [`CommError::Poisoned`] after an earlier error.
    fn start(&self, op: Op) -> Result<(), CommError> {
        match &self.poisoned {
            Some(first) => Err(CommError::Poisoned {
                op,
                first: first.clone(),
            }),
            None => Ok(()),
        }
    }

    fn valid_ptr(&self, op: Op, name: &str, ptr: u64, bytes: usize) -> Result<(), CommError> {
        if ptr == 0 && bytes > 0 {
            return Err(CommError::InvalidArgument {
                op,
                detail: format!("{name} is null for {bytes} bytes"),
            });
        }
        Ok(())
    }

    /// Enqueues one NCCL call on the legacy default stream and waits for it to finish.
    ///
    /// # Safety
    /// `call` is an NCCL collective whose buffers satisfy the public method's contract.
    unsafe fn run(
        &mut self,
        op: Op,
        what: &str,
        call: impl FnOnce(Comm) -> c_int,
    ) -> Result<(), CommError> {
        let deadline = Instant::now() + self.cfg.timeout;
        let ctx = Arc::clone(&self.ctx);
        if let Err(e) = guarded("making the CUDA context current", || ctx.bind_to_thread()) {
            return Err(self.fail(op, e));
        }
        let r = call(self.comm);
        self.check(op, what, r)?;
        self.wait(op, what, deadline, true)
    }

    /// Passes ncclSuccess and ncclInProgress; anything else fails the group.
    fn check(&mut self, op: Op, what: &str, r: c_int) -> Result<(), CommError> {
        if r == NCCL_SUCCESS || r == NCCL_IN_PROGRESS {
            return Ok(());
        }
        let detail = self.nccl_failure(what, r);
        Err(self.fail(op, detail))
    }

    /// Polls until the communicator's pending work is done (`ncclCommGetAsyncError` is
    /// ncclSuccess) and, with `stream`, the operation has finished on the device (an event
    /// recorded after it on the legacy default stream has completed); fails the group
    /// on an error or when `deadline` passes.
    fn wait(
        &mut self,
        op: Op,
        what: &str,
        deadline: Instant,
        stream: bool,
    ) -> Result<(), CommError> {
        let mut polls = 0u32;
        let mut nap = Duration::from_micros(10);
        let mut recorded = false;
        loop {
            let mut state = NCCL_IN_PROGRESS;
            // SAFETY: the communicator is live (not aborted: failures return at once).
            let r = unsafe { (self.nccl.comm_get_async_error)(self.comm, &mut state) };
            if r != NCCL_SUCCESS {
                let detail = self.nccl_failure("ncclCommGetAsyncError", r);
                return Err(self.fail(op, detail));
            }
            if state != NCCL_SUCCESS && state != NCCL_IN_PROGRESS {
                let detail = format!(
                    "{} (a peer failed or left, or the network broke)",
                    self.nccl_failure(what, state)
                );
                return Err(self.fail(op, detail));
            }
            if state == NCCL_SUCCESS {
                if !stream {
                    return Ok(());
                }
                // SAFETY: `done` is this group's event, in the context current on this thread;
                // recorded on the legacy default stream, after the enqueued operation.
                let r = unsafe {
                    if recorded {
                        cusys::cuEventQuery(self.done)
                    } else {
                        recorded = true;
                        match cusys::cuEventRecord(self.done, ptr::null_mut()) {
                            cusys::CUresult::CUDA_SUCCESS => cusys::cuEventQuery(self.done),
                            e => e,
                        }
                    }
                };
                match r {
                    cusys::CUresult::CUDA_SUCCESS => return Ok(()),
                    cusys::CUresult::CUDA_ERROR_NOT_READY => {}
                    e => {
                        let detail = format!(
                            "waiting for {what} on the device failed: {}; the CUDA context is \
                             probably unusable (a bad device pointer, or an earlier kernel \
                             failed)",
                            driver_text(&DriverError(e))
                        );
                        return Err(self.fail(op, detail));
                    }
                }
            }
            if Instant::now() >= deadline {
                let e = CommError::BackendTimeout {
                    op,
                    group_id: self.cfg.group_id,
                    rank: self.cfg.rank,
                    timeout: self.cfg.timeout,
                };
                self.poison(op, &e);
                return Err(e);
            }
            polls += 1;
            if polls <= SPIN_POLLS {
                std::thread::yield_now();
            } else {
                std::thread::sleep(nap);
                nap = (nap * 2).min(MAX_POLL_SLEEP);
            }
        }
    }

    /// NCCL's account of a failed call, with its last error message.
    fn nccl_failure(&self, what: &str, code: c_int) -> String {
        let mut s = format!("{what} failed: {}", self.nccl.error_string(code));
        if let Some(last) = self.nccl.last_error(self.comm) {
            s.push_str(&format!(" ({last})"));
        }
        if !s.contains("NCCL_DEBUG") {
            s.push_str("; run with NCCL_DEBUG=WARN for NCCL's own account");
        }
        s
    }

    /// A backend error naming the group and this rank; aborts the communicator and poisons the
    /// group.
    fn fail(&mut self, op: Op, detail: String) -> CommError {
        let e = CommError::Backend {
            op,
            detail: format!(
                "rank {} of group {}: {detail}; form a new group",
                self.cfg.rank, self.cfg.group_id
            ),
        };
        self.poison(op, &e);
        e
    }

    fn poison(&mut self, op: Op, e: &CommError) {
        tracing::warn!(group = self.cfg.group_id, rank = self.cfg.rank, %op, error = %e, "rlhf-comm NCCL operation failed; the group is now unusable");
        self.poisoned = Some(e.to_string());
        self.abort();
    }

    /// Aborts the communicator (also stopping its kernels), once.
    fn abort(&mut self) {
        let comm = std::mem::replace(&mut self.comm, ptr::null_mut());
        if !comm.is_null() {
            // SAFETY: a live communicator, never used again.
            let r = unsafe { (self.nccl.comm_abort)(comm) };
            if r != NCCL_SUCCESS {
                tracing::warn!(group = self.cfg.group_id, rank = self.cfg.rank, error = %self.nccl.error_string(r), "ncclCommAbort failed");
            }
        }
    }

    /// Finalizes and destroys a healthy communicator, aborting it if that does not finish in
    /// time.
    fn close(&mut self) {
        if self.comm.is_null() {
            return;
        }
        let deadline = Instant::now() + self.cfg.timeout.min(CLOSE_GRACE);
        // SAFETY: a live communicator with no pending work (every operation waited for it).
        let mut r = unsafe { (self.nccl.comm_finalize)(self.comm) };
        while r == NCCL_IN_PROGRESS && Instant::now() < deadline {
            std::thread::sleep(MAX_POLL_SLEEP);
            let mut state = NCCL_IN_PROGRESS;
            // SAFETY: as above.
            r = unsafe { (self.nccl.comm_get_async_error)(self.comm, &mut state) };
            if r == NCCL_SUCCESS {
                r = state;
            }
        }
        if r == NCCL_SUCCESS {
            let comm = std::mem::replace(&mut self.comm, ptr::null_mut());
            // SAFETY: finalized, never used again.
            unsafe { (self.nccl.comm_destroy)(comm) };
        } else {
            self.abort();
        }
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        let ctx = Arc::clone(&self.ctx);
        let bound = guarded("making the CUDA context current", || ctx.bind_to_thread());
        self.close();
        if !self.done.is_null() && bound.is_ok() {
            let e = std::mem::replace(&mut self.done, ptr::null_mut());
            // SAFETY: created in `connect`, destroyed once; nothing waits on it any more.
            let _ = guarded("destroying the CUDA event", || unsafe {
                cu::event::destroy(e)
            });
        }
        if self.scratch != 0 && bound.is_ok() {
            let p = std::mem::take(&mut self.scratch);
            // SAFETY: allocated with malloc_sync in `connect`; the communicator that used it
            // is gone.
            let _ = guarded("freeing the barrier buffer", || unsafe { cu::free_sync(p) });
        }
    }
}

/// `len * per` `f32`s in bytes, or an invalid-argument error on overflow.
/// NCCL's reduction for `op` (`ncclSum`, or `ncclAvg` for the mean).
fn nccl_red_op(op: ReduceOp) -> c_int {
    match op {
        ReduceOp::Sum => NCCL_SUM,
        ReduceOp::Mean => NCCL_AVG,
    }
}

fn f32_bytes(op: Op, len: usize, per: usize) -> Result<usize, CommError> {
    len.checked_mul(per)
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| CommError::InvalidArgument {
            op,
            detail: format!("{len} x {per} f32 elements overflow a byte count"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_an_error_naming_it() {
        let e = load_nccl(&[OsString::from("/nonexistent/libnccl.so.2")], "")
            .err()
            .expect("no such file");
        assert!(e.contains("cannot load /nonexistent/libnccl.so.2"), "{e}");
        assert!(e.contains(NCCL_LIBRARY_ENV), "{e}");
    }

    #[test]
    fn config_prefix_has_no_padding() {
        assert_eq!(size_of::<RawConfig>(), 24);
        assert_eq!(size_of::<RawUniqueId>(), NCCL_UNIQUE_ID_BYTES);
    }

    #[test]
    fn versions_read_as_nccl_writes_them() {
        assert_eq!(version_text(21400), "2.14.0");
        assert_eq!(version_text(22807), "2.28.7");
        assert_eq!(version_text(2804), "2.8.4");
    }

    #[test]
    fn byte_counts_overflow_into_errors() {
        assert_eq!(f32_bytes(Op::AllGather, 3, 2).unwrap(), 24);
        assert!(f32_bytes(Op::AllGather, usize::MAX / 2, 2).is_err());
    }
}
