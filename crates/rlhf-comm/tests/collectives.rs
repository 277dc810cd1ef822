//! Results of the collectives on real loopback TCP groups of 1 to 4 ranks: all-reduce (sum and
//! mean, bit for bit in ring order), reduce-scatter (each rank's chunk, close to the sum), broadcast from every root, all-gather, barrier, and calls
//! that disagree between ranks.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::run;
use rlhf_comm::{ring_segment, scatter_chunk, Collective, CommError, ReduceOp};

const T: Duration = Duration::from_secs(10);
const SIZES: [usize; 4] = [0, 1, 7, (1 << 20) + 3];

/// Rank `rank`'s input at index `i`: magnitudes from 1e-4 to 1e5 so that the order of the
/// additions changes the rounded result, which makes the bit-for-bit checks meaningful.
pub fn value(rank: usize, i: usize) -> f32 {
    let mut h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (rank as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 32;
    let mantissa = (h % 20_001) as f32 / 1000.0 - 10.0;
    mantissa * 10f32.powi((h >> 40) as i32 % 9 - 4)
}

/// The all-reduce result the crate promises: segment k summed from rank k around the ring.
fn ring_order(world: usize, len: usize, op: ReduceOp) -> Vec<f32> {
    let mut out = vec![0f32; len];
    for k in 0..world {
        for i in ring_segment(len, world, k) {
            let mut acc = value(k, i);
            for j in 1..world {
                acc = acc + value((k + j) % world, i);
            }
            if op == ReduceOp::Mean {
                acc /= world as f32;
            }
            out[i] = acc;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_reduce_sum_and_mean_are_bit_identical_in_ring_order() {
    for world in [2, 3, 4] {
        let results = run(world, T, move |mut g| async move {
            let mut outs = Vec::new();
            for len in SIZES {
                for op in [ReduceOp::Sum, ReduceOp::Mean] {
                    let mut buf: Vec<f32> = (0..len).map(|i| value(g.rank(), i)).collect();
                    g.all_reduce(&mut buf, op).await.expect("all_reduce");
                    outs.push((len, op, buf));
                }
            }
            outs
        })
        .await;
        for (idx, (len, op, _)) in results[0].iter().enumerate() {
            let want = ring_order(world, *len, *op);
            for (rank, outs) in results.iter().enumerate() {
                let got = &outs[idx].2;
                assert_eq!(got.len(), *len);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "world {world} len {len} {op:?}: rank {rank} differs from ring order"
                );
            }
            // And the ring order is a sum: close to the f64 reference.
            for (i, got) in want.iter().enumerate() {
                let vals: Vec<f64> = (0..world).map(|r| f64::from(value(r, i))).collect();
                let mut exact: f64 = vals.iter().sum();
                let mut scale: f64 = vals.iter().map(|v| v.abs()).sum();
                if *op == ReduceOp::Mean {
                    exact /= world as f64;
                    scale /= world as f64;
                }
                let err = (f64::from(*got) - exact).abs();
                assert!(
                    err <= 1e-6 * scale + 1e-30,
                    "world {world} i {i}: {got} vs {exact}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_from_every_root() {
    for world in [2, 3, 4] {
        let results = run(world, T, move |mut g| async move {
            let mut outs = Vec::new();
            for root in 0..world {
                for len in [0usize, 1, 13, 300_001] {
                    let mut bytes: Vec<u8> = if g.rank() == root {
                        (0..len).map(|i| (i * 31 + root * 7 + 1) as u8).collect()
                    } else {
                        vec![0; len]
                    };
                    g.broadcast(root, &mut bytes).await.expect("broadcast");
                    let mut floats: Vec<f32> = if g.rank() == root {
                        (0..len).map(|i| value(root, i)).collect()
                    } else {
                        vec![0.0; len]
                    };
                    g.broadcast_f32(root, &mut floats)
                        .await
                        .expect("broadcast_f32");
                    outs.push((root, len, bytes, floats));
                }
            }
            outs
        })
        .await;
        for (rank, outs) in results.iter().enumerate() {
            for (root, len, bytes, floats) in outs {
                let want: Vec<u8> = (0..*len).map(|i| (i * 31 + root * 7 + 1) as u8).collect();
                assert!(
                    *bytes == want,
                    "world {world} root {root} len {len}: rank {rank} bytes differ"
                );
                let same = floats
                    .iter()
                    .enumerate()
                    .all(|(i, f)| f.to_bits() == value(*root, i).to_bits());
                assert!(
                    same,
                    "world {world} root {root} len {len}: rank {rank} floats differ"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reduce_scatter_leaves_each_rank_its_chunk_of_the_sum() {
    for world in [1, 2, 3, 4] {
        let results = run(world, T, move |mut g| async move {
            let mut outs = Vec::new();
            for len in SIZES.into_iter().chain([2, world + 1]) {
                for op in [ReduceOp::Sum, ReduceOp::Mean] {
                    let mut buf: Vec<f32> = (0..len).map(|i| value(g.rank(), i)).collect();
                    g.reduce_scatter(&mut buf, op)
                        .await
                        .expect("reduce_scatter");
                    outs.push((len, op, buf[scatter_chunk(len, world, g.rank())].to_vec()));
                }
            }
            // The group stays usable for the other collectives.
            let mut buf = vec![1.0f32; 3];
            g.all_reduce(&mut buf, ReduceOp::Sum)
                .await
                .expect("all_reduce after");
            assert_eq!(buf, vec![world as f32; 3]);
            outs
        })
        .await;
        for (rank, outs) in results.iter().enumerate() {
            for (len, op, got) in outs {
                let chunk = scatter_chunk(*len, world, rank);
                assert_eq!(
                    got.len(),
                    chunk.len(),
                    "world {world} len {len} rank {rank}"
                );
                for (j, i) in chunk.enumerate() {
                    let vals: Vec<f64> = (0..world).map(|r| f64::from(value(r, i))).collect();
                    let mut exact: f64 = vals.iter().sum();
                    let mut scale: f64 = vals.iter().map(|v| v.abs()).sum();
                    if *op == ReduceOp::Mean {
                        exact /= world as f64;
                        scale /= world as f64;
                    }
                    let err = (f64::from(got[j]) - exact).abs();
                    assert!(
                        err <= 1e-6 * scale + 1e-30,
                        "world {world} len {len} rank {rank} i {i}: {} vs {exact}",
                        got[j]
                    );
                }
            }
        }
    }
    // Chunks tile the buffer in rank order, equal but for the last ones.
    for (len, world) in [(10, 3), (2, 4), (0, 2), (12, 4)] {
        let chunks: Vec<_> = (0..world).map(|k| scatter_chunk(len, world, k)).collect();
        assert_eq!(chunks.first().map(|c| c.start), Some(0));
        assert_eq!(chunks.last().map(|c| c.end), Some(len));
        assert!(chunks.windows(2).all(|w| w[0].end == w[1].start));
        assert!(chunks.iter().all(|c| c.len() <= len.div_ceil(world)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_gather_returns_every_piece_by_rank() {
    // Lengths differ per rank, include an empty piece and one spanning several chunks.
    let len = |r: usize| [5usize, 0, 40_000, 1][r];
    for world in [2, 3, 4] {
        let results = run(world, T, move |mut g| async move {
            let local: Vec<f32> = (0..len(g.rank())).map(|i| value(g.rank(), i)).collect();
            let first = g.all_gather(&local).await.expect("all_gather");
            let second = g
                .all_gather(&local[..local.len().min(2)])
                .await
                .expect("second all_gather");
            (first, second)
        })
        .await;
        for (rank, (first, second)) in results.iter().enumerate() {
            assert_eq!(first.len(), world);
            for (owner, piece) in first.iter().enumerate() {
                let want: Vec<f32> = (0..len(owner)).map(|i| value(owner, i)).collect();
                assert!(
                    *piece == want,
                    "world {world}: rank {rank} has a wrong piece of rank {owner}"
                );
                assert_eq!(second[owner].len(), len(owner).min(2));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_waits_for_the_last_rank() {
    let entered = Arc::new(AtomicUsize::new(0));
    let late = Duration::from_millis(300);
    let results = run(3, T, {
        let entered = entered.clone();
        move |mut g| {
            let entered = entered.clone();
            async move {
                g.barrier().await.expect("first barrier");
                let start = Instant::now();
                if g.rank() == 2 {
                    tokio::time::sleep(late).await;
                }
                entered.fetch_add(1, Ordering::SeqCst);
                g.barrier().await.expect("barrier");
                (entered.load(Ordering::SeqCst), start.elapsed())
            }
        }
    })
    .await;
    for (rank, (seen, waited)) in results.into_iter().enumerate() {
        assert_eq!(
            seen, 3,
            "rank {rank} left the barrier before every rank entered it"
        );
        assert!(
            waited >= late - Duration::from_millis(20),
            "rank {rank} waited only {waited:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_one_needs_no_network() {
    let mut out = run(1, T, |mut g| async move {
        let mut buf = vec![1.5f32, -2.0];
        g.all_reduce(&mut buf, ReduceOp::Mean)
            .await
            .expect("all_reduce");
        let mut bytes = vec![9u8; 3];
        g.broadcast(0, &mut bytes).await.expect("broadcast");
        let bad_root = g.broadcast(1, &mut bytes).await;
        g.barrier().await.expect("barrier");
        let gathered = g.all_gather(&buf).await.expect("all_gather");
        (buf, bytes, bad_root, gathered)
    })
    .await;
    let (buf, bytes, bad_root, gathered) = out.remove(0);
    assert_eq!(buf, vec![1.5, -2.0]);
    assert_eq!(bytes, vec![9, 9, 9]);
    assert!(
        matches!(bad_root, Err(CommError::InvalidArgument { .. })),
        "{bad_root:?}"
    );
    assert_eq!(gathered, vec![vec![1.5, -2.0]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_that_disagree_get_a_mismatch_naming_the_other() {
    let results = run(2, T, |mut g| async move {
        let mut buf = vec![1.0f32; 10 + g.rank()];
        let first = g.all_reduce(&mut buf, ReduceOp::Sum).await;
        let after = g.barrier().await;
        (first, after)
    })
    .await;
    for (rank, (first, after)) in results.into_iter().enumerate() {
        let e = first.expect_err("lengths differ");
        assert!(matches!(e, CommError::Mismatch { .. }), "rank {rank}: {e}");
        assert_eq!(e.peer(), Some(1 - rank), "rank {rank}: {e}");
        assert!(
            e.to_string().contains("10 floats") && e.to_string().contains("11 floats"),
            "{e}"
        );
        assert!(
            matches!(after, Err(CommError::Poisoned { .. })),
            "rank {rank}: {after:?}"
        );
    }
}
