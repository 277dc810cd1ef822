//! The NCCL backend. Without CUDA (CI, developers' machines) every entry point must be an error
//! that names the missing library, never a panic. With `RLHF_TEST_CUDA=1` on a machine with a
//! GPU, libcuda and libnccl, one-rank groups run every collective on device buffers, and init
//! waiting for a rank that never comes ends at the timeout.

#![cfg(feature = "nccl")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{result as cu, CudaContext};
use rlhf_comm::{
    nccl_available, CommError, NcclGroup, NcclGroupConfig, NcclUniqueId, Op, ReduceOp,
    NCCL_UNIQUE_ID_BYTES,
};

/// Slack on top of a timeout bound: scheduling, and NCCL's abort of the half-formed communicator.
const MARGIN: Duration = Duration::from_secs(5);

#[test]
fn without_nccl_or_cuda_every_entry_point_is_an_error_not_a_panic() {
    let msg = match nccl_available() {
        Ok(()) => {
            eprintln!("note: NCCL and a CUDA device are available here; the missing-library path is not exercised");
            return;
        }
        Err(msg) => msg,
    };
    eprintln!("{msg}");
    assert!(msg.starts_with("NCCL backend unavailable: "), "{msg}");
    assert!(
        msg.contains("libnccl.so.2") || msg.contains("libcuda.so.1"),
        "names no library: {msg}"
    );
    // The answer is cached, and asking again does not panic either.
    assert_eq!(nccl_available(), Err(msg.clone()));

    let lib_missing = msg.contains("cannot load libnccl");
    match NcclGroup::unique_id() {
        Err(e @ CommError::Backend { .. }) => {
            eprintln!("{e}");
            let s = e.to_string();
            assert!(s.starts_with("rendezvous: "), "{s}");
            if lib_missing {
                assert!(s.contains("libnccl.so.2"), "{s}");
            }
        }
        // libnccl loads but the CUDA driver is missing: an id needs no device.
        Ok(id) => {
            assert!(!lib_missing);
            assert!(id.to_bytes().iter().any(|&b| b != 0), "{id:?}");
        }
        Err(e) => panic!("unexpected error: {e}"),
    }

    let id = NcclUniqueId::from_bytes(&[0; NCCL_UNIQUE_ID_BYTES]).expect("128 bytes");
    let e = NcclGroup::connect(NcclGroupConfig::new(7, 0, 1, 0), id).expect_err("no backend");
    eprintln!("{e}");
    let s = e.to_string();
    assert!(
        matches!(
            e,
            CommError::Backend {
                op: Op::Rendezvous,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(s.contains("rank 0 of group 7"), "{s}");
    assert!(s.contains("NCCL backend unavailable"), "{s}");
    assert_eq!(e.peer(), None);
    assert!(!e.is_timeout());
}

#[test]
fn unique_ids_travel_as_their_bytes() {
    let mut bytes = [0u8; NCCL_UNIQUE_ID_BYTES];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = i as u8;
    }
    let id = NcclUniqueId::from_bytes(&bytes).expect("128 bytes");
    assert_eq!(id.to_bytes(), bytes);
    assert_eq!(NcclUniqueId::from_bytes(&id.to_bytes()).unwrap(), id);
    assert!(format!("{id:?}").starts_with("NcclUniqueId("));
    for len in [0, 127, 129] {
        let e = NcclUniqueId::from_bytes(&vec![0; len]).expect_err("wrong length");
        assert!(
            matches!(
                e,
                CommError::InvalidArgument {
                    op: Op::Rendezvous,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains(&format!("got {len}")), "{e}");
    }
}

#[test]
fn invalid_configs_are_refused_before_any_library_is_loaded() {
    let id = NcclUniqueId::from_bytes(&[0; NCCL_UNIQUE_ID_BYTES]).unwrap();
    let zero_timeout = NcclGroupConfig {
        timeout: Duration::ZERO,
        ..NcclGroupConfig::new(1, 0, 1, 0)
    };
    for (cfg, what) in [
        (NcclGroupConfig::new(1, 2, 2, 0), "rank 2 is not in 0..2"),
        (NcclGroupConfig::new(1, 0, 0, 0), "rank 0 is not in 0..0"),
        (zero_timeout, "timeout must be positive"),
    ] {
        let e = NcclGroup::connect(cfg, id).expect_err("invalid");
        assert!(matches!(e, CommError::InvalidArgument { .. }), "{e:?}");
        assert!(e.to_string().contains(what), "{e}");
    }
}

#[test]
fn groups_can_move_between_threads() {
    fn send<T: Send>() {}
    send::<NcclGroup>();
}

// --- On a GPU (RLHF_TEST_CUDA=1) ---------------------------------------------------------------

fn cuda() -> bool {
    if std::env::var("RLHF_TEST_CUDA").as_deref() != Ok("1") {
        eprintln!("note: skipped; set RLHF_TEST_CUDA=1 on a machine with a GPU and NCCL to run");
        return false;
    }
    if let Err(e) = nccl_available() {
        panic!("RLHF_TEST_CUDA=1 but {e}");
    }
    true
}

/// `f32`s in device memory, allocated and copied with cudarc's synchronous driver calls.
struct DevBuf {
    ctx: Arc<CudaContext>,
    ptr: u64,
    len: usize,
}

impl DevBuf {
    fn new(ctx: &Arc<CudaContext>, host: &[f32]) -> DevBuf {
        ctx.bind_to_thread().expect("bind");
        // SAFETY: a fresh allocation of exactly `host`'s size, filled from it.
        let ptr = unsafe {
            let p = cu::malloc_sync(host.len().max(1) * 4).expect("cuMemAlloc");
            cu::memcpy_htod_sync(p, host).expect("cuMemcpyHtoD");
            p
        };
        DevBuf {
            ctx: ctx.clone(),
            ptr,
            len: host.len(),
        }
    }

    /// The device address of element `i`.
    fn at(&self, i: usize) -> u64 {
        self.ptr + (i * 4) as u64
    }

    fn read(&self) -> Vec<f32> {
        self.ctx.bind_to_thread().expect("bind");
        let mut out = vec![0f32; self.len];
        // SAFETY: `len` f32s were allocated at `ptr`.
        unsafe { cu::memcpy_dtoh_sync(&mut out, self.ptr) }.expect("cuMemcpyDtoH");
        out
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated with malloc_sync, freed once.
        let _ = unsafe { cu::free_sync(self.ptr) };
    }
}

fn one_rank(group_id: u64, timeout: Duration) -> NcclGroup {
    let id = NcclGroup::unique_id().expect("unique id");
    let cfg = NcclGroupConfig {
        timeout,
        ..NcclGroupConfig::new(group_id, 0, 1, 0)
    };
    NcclGroup::connect(cfg, id).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn one_rank_group_runs_every_collective_on_device_buffers() {
    if !cuda() {
        return;
    }
    let mut g = one_rank(11, Duration::from_secs(60));
    eprintln!("NCCL {}", g.nccl_version());
    assert_eq!((g.rank(), g.world()), (0, 1));
    let ctx = CudaContext::new(0).expect("device 0");
    let host: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();

    // Broadcast from the only rank leaves the bytes as they are (bytes, not f32s: odd length).
    let b = DevBuf::new(&ctx, &host);
    // SAFETY: `b` holds host.len() f32 on the group's device, used by nothing else meanwhile.
    unsafe { g.broadcast_raw(0, b.ptr, host.len() * 4 - 1) }.expect("broadcast");
    assert_eq!(b.read(), host);

    // A root outside the group is refused without poisoning it.
    // SAFETY: `b` is valid for these 4 bytes; the bad root is refused before any device work.
    let e = unsafe { g.broadcast_raw(1, b.ptr, 4) }.expect_err("root 1 of 1");
    assert!(matches!(e, CommError::InvalidArgument { .. }), "{e:?}");
    // SAFETY: a null pointer is refused before any device access (what this asserts).
    let e = unsafe { g.all_reduce_f32_raw(0, 4, ReduceOp::Sum) }.expect_err("null");
    assert!(matches!(e, CommError::InvalidArgument { .. }), "{e:?}");

    // All-reduce of one rank: the sum and the mean are the input.
    for op in [ReduceOp::Sum, ReduceOp::Mean] {
        let b = DevBuf::new(&ctx, &host);
        // SAFETY: `b` holds host.len() f32 on the group's device, used by nothing else.
        unsafe { g.all_reduce_f32_raw(b.ptr, host.len(), op) }.expect("all_reduce");
        assert_eq!(b.read(), host, "{op:?}");
    }
    // A large one (64 MiB) goes through the polling path with sleeps.
    let big: Vec<f32> = (0..16 << 20).map(|i| (i % 977) as f32).collect();
    let b = DevBuf::new(&ctx, &big);
    let start = Instant::now();
    // SAFETY: `b` holds big.len() f32 on the group's device, used by nothing else.
    unsafe { g.all_reduce_f32_raw(b.ptr, big.len(), ReduceOp::Sum) }.expect("big all_reduce");
    eprintln!("64 MiB all_reduce on one rank: {:?}", start.elapsed());
    assert_eq!(b.read(), big);

    // All-gather into a separate buffer, then in place (send = this rank's slot of recv).
    let send = DevBuf::new(&ctx, &[4.0, 5.0, 6.0]);
    let recv = DevBuf::new(&ctx, &[0.0; 3]);
    // SAFETY: separate device buffers of 3 f32 each (world 1 x 3), used by nothing else.
    unsafe { g.all_gather_f32_raw(send.ptr, recv.ptr, 3) }.expect("all_gather");
    assert_eq!(recv.read(), vec![4.0, 5.0, 6.0]);
    let both = DevBuf::new(&ctx, &[9.0, 8.0]);
    // SAFETY: in place: `both.at(0)` is rank 0's 2-f32 slot of the 2-f32 receive buffer.
    unsafe { g.all_gather_f32_raw(both.at(0), both.ptr, 2) }.expect("in-place all_gather");
    assert_eq!(both.read(), vec![9.0, 8.0]);

    // Reduce-scatter of one rank: its chunk is the whole buffer, separate and in place.
    let send = DevBuf::new(&ctx, &[1.0, 2.0, 3.0]);
    let recv = DevBuf::new(&ctx, &[0.0; 3]);
    // SAFETY: separate device buffers of 3 f32 each (world 1 x 3), used by nothing else.
    unsafe { g.reduce_scatter_f32_raw(send.ptr, recv.ptr, 3, ReduceOp::Sum) }
        .expect("reduce_scatter");
    assert_eq!(recv.read(), vec![1.0, 2.0, 3.0]);
    // SAFETY: in place: with one rank, send (world x 3) and this rank's chunk (3) coincide.
    unsafe { g.reduce_scatter_f32_raw(send.ptr, send.ptr, 3, ReduceOp::Mean) }
        .expect("in-place reduce_scatter");
    assert_eq!(send.read(), vec![1.0, 2.0, 3.0]);

    // Zero-length calls return at once.
    // SAFETY: zero-length calls touch no memory.
    unsafe { g.all_reduce_f32_raw(0, 0, ReduceOp::Sum) }.expect("empty all_reduce");
    // SAFETY: as above.
    unsafe { g.broadcast_raw(0, 0, 0) }.expect("empty broadcast");

    for _ in 0..3 {
        g.barrier().expect("barrier");
    }

    // The group can move to another thread and work there (the context is bound per call).
    let g = std::thread::spawn(move || {
        g.barrier().expect("barrier on another thread");
        g
    })
    .join()
    .expect("thread");
    drop(g);
}

#[test]
fn one_rank_init_finishes_within_its_timeout() {
    if !cuda() {
        return;
    }
    let timeout = Duration::from_secs(30);
    let start = Instant::now();
    let mut g = one_rank(12, timeout);
    let took = start.elapsed();
    eprintln!("one-rank init took {took:?}");
    assert!(took < timeout, "{took:?}");
    g.barrier().expect("barrier");
}

#[test]
fn init_waiting_for_a_rank_that_never_comes_times_out_naming_the_group() {
    if !cuda() {
        return;
    }
    let timeout = Duration::from_secs(3);
    let id = NcclGroup::unique_id().expect("unique id");
    let cfg = NcclGroupConfig {
        timeout,
        ..NcclGroupConfig::new(13, 0, 2, 0)
    };
    let start = Instant::now();
    let e = NcclGroup::connect(cfg, id).expect_err("rank 1 never comes");
    let took = start.elapsed();
    eprintln!("after {took:?}: {e}");
    assert!(e.is_timeout(), "{e:?}");
    assert!(
        matches!(
            e,
            CommError::BackendTimeout {
                op: Op::Rendezvous,
                group_id: 13,
                rank: 0,
                ..
            }
        ),
        "{e:?}"
    );
    let s = e.to_string();
    assert!(s.contains("rank 0 of group 13"), "{s}");
    assert!(s.contains("made no progress"), "{s}");
    assert!(took >= timeout && took < timeout + MARGIN, "{took:?}");

    // The device is still usable after the abort.
    let mut g = one_rank(14, Duration::from_secs(30));
    g.barrier().expect("barrier after an aborted init");
}
