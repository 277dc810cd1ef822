//! Failures on real loopback groups: a rank that dies mid-operation, one that stalls, one that
//! never shows up at rendezvous, and connections from outside the group. Every failure must be
//! an error naming the rank at fault and its address, within the group's timeout.

mod common;

use std::time::{Duration, Instant};

use common::{cfg, run};
use rlhf_comm::{bind_local, Collective, CommError, GroupConfig, ReduceOp, TcpGroup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Slack for scheduling on a loaded 2-core machine on top of the timeout bound.
const MARGIN: Duration = Duration::from_secs(1);

fn names(e: &CommError, rank: usize, addr: std::net::SocketAddr) -> bool {
    let s = e.to_string();
    e.peer() == Some(rank) && s.contains(&format!("rank {rank}")) && s.contains(&addr.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_dying_mid_all_reduce_is_named_by_the_others() {
    let timeout = Duration::from_secs(5);
    let (listeners, addrs) = bind_local(3).await.expect("bind");
    let (formed_tx, mut formed_rx) = tokio::sync::mpsc::channel::<usize>(3);
    // Survivors keep their (poisoned) group open until every one has reported, as a worker
    // keeps its group: one survivor dropping its sockets early would make the other name it.
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let (result_tx, mut result_rx) = tokio::sync::mpsc::channel(3);
    let mut tasks = Vec::new();
    for (rank, listener) in listeners.into_iter().enumerate() {
        let addrs = addrs.clone();
        let formed = formed_tx.clone();
        let results = result_tx.clone();
        let mut release = release_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut g = TcpGroup::connect(cfg(rank, 3, timeout), listener, addrs)
                .await
                .expect("connect");
            g.barrier().await.expect("barrier");
            formed.send(rank).await.expect("report");
            let mut buf = vec![1.0f32; 4 << 20];
            // All-reduce until the group breaks: however slow the machine, rank 2 dies while
            // the others are inside (or between) all-reduces, never before the group formed.
            let e = loop {
                if let Err(e) = g.all_reduce(&mut buf, ReduceOp::Sum).await {
                    break e;
                }
            };
            results
                .send((rank, e, Instant::now()))
                .await
                .expect("report");
            let _ = release.wait_for(|r| *r).await;
            drop(g);
        }));
    }
    for _ in 0..3 {
        formed_rx.recv().await.expect("every rank formed the group");
    }
    let victim = tasks.pop().expect("rank 2");
    tokio::time::sleep(Duration::from_millis(30)).await;
    victim.abort();
    let killed = Instant::now();
    for _ in 0..tasks.len() {
        let (rank, e, at) = tokio::time::timeout(timeout + MARGIN, result_rx.recv())
            .await
            .expect("every survivor reports an error within the timeout")
            .expect("report");
        let elapsed = at.saturating_duration_since(killed);
        eprintln!("rank {rank} after {elapsed:?}: {e}");
        assert!(names(&e, 2, addrs[2]), "rank {rank}: {e}");
        assert!(elapsed < timeout + MARGIN, "rank {rank} took {elapsed:?}");
    }
    release_tx.send(true).expect("release");
    for t in tasks {
        t.await.expect("task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_rank_times_out_naming_it() {
    let timeout = Duration::from_secs(1);
    let results = run(2, timeout, move |mut g| async move {
        if g.rank() == 1 {
            // Alive (connections open) but never joins the operation.
            tokio::time::sleep(timeout * 3).await;
            return None;
        }
        let start = Instant::now();
        let e = g
            .all_reduce(&mut [1.0; 100], ReduceOp::Sum)
            .await
            .expect_err("rank 1 stalls");
        let elapsed = start.elapsed();
        let again = g.barrier().await.expect_err("poisoned");
        Some((e, elapsed, again, g.peers()[1]))
    })
    .await;
    let (e, elapsed, again, addr) = results.into_iter().next().flatten().expect("rank 0 result");
    assert!(e.is_timeout() && names(&e, 1, addr), "{e}");
    assert!(
        elapsed >= timeout && elapsed < timeout + MARGIN,
        "took {elapsed:?}"
    );
    assert!(matches!(again, CommError::Poisoned { .. }), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_missing_at_rendezvous_fails_within_the_timeout() {
    let timeout = Duration::from_secs(1);
    let (mut listeners, addrs) = bind_local(3).await.expect("bind");
    drop(listeners.pop()); // rank 2 never starts
    let start = Instant::now();
    let tasks: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.clone();
            tokio::spawn(async move { TcpGroup::connect(cfg(rank, 3, timeout), l, addrs).await })
        })
        .collect();
    for (rank, t) in tasks.into_iter().enumerate() {
        let e = t.await.expect("task").expect_err("rank 2 is missing");
        let elapsed = start.elapsed();
        // Rank 0 waits for rank 2 to connect; rank 1 cannot connect to rank 2.
        match rank {
            0 => assert!(matches!(e, CommError::AcceptTimeout { .. }), "{e}"),
            _ => assert!(matches!(e, CommError::Connect { .. }), "{e}"),
        }
        eprintln!("rank {rank} after {elapsed:?}: {e}");
        assert!(names(&e, 2, addrs[2]), "rank {rank}: {e}");
        assert!(elapsed < timeout + MARGIN, "rank {rank} took {elapsed:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_from_outside_the_group_are_refused() {
    let timeout = Duration::from_secs(5);
    let (mut listeners, addrs) = bind_local(2).await.expect("bind");
    let l1 = listeners.pop().expect("rank 1 listener");
    let l0 = listeners.pop().expect("rank 0 listener");
    let rank0 = {
        let addrs = addrs.clone();
        tokio::spawn(async move { TcpGroup::connect(cfg(0, 2, timeout), l0, addrs).await })
    };

    // A rank of another group (id 99) that believes it is rank 1.
    let (mut own, own_addr) = bind_local(1).await.expect("bind");
    let start = Instant::now();
    let rogue = GroupConfig {
        group_id: 99,
        ..cfg(1, 2, timeout)
    };
    let e = TcpGroup::connect(rogue, own.remove(0), vec![addrs[0], own_addr[0]])
        .await
        .expect_err("wrong group id");
    assert!(
        matches!(e, CommError::Refused { .. }) && names(&e, 0, addrs[0]),
        "{e}"
    );
    assert!(e.to_string().contains("group id mismatch"), "{e}");
    assert!(
        start.elapsed() < timeout,
        "refusal took {:?}",
        start.elapsed()
    );

    // Something that is not rlhf-comm at all is closed without a word, and no hang.
    let mut stray = TcpStream::connect(addrs[0]).await.expect("connect");
    stray.write_all(&[0xAB; 44]).await.expect("write");
    let mut reply = Vec::new();
    stray
        .read_to_end(&mut reply)
        .await
        .expect("read until closed");
    assert!(reply.is_empty(), "a stranger was answered: {reply:?}");

    // The real rank 1 still gets in, and the group works.
    let rank1 = tokio::spawn(async move { TcpGroup::connect(cfg(1, 2, timeout), l1, addrs).await });
    let mut groups = Vec::new();
    for t in [rank0, rank1] {
        groups.push(
            t.await
                .expect("task")
                .expect("group forms after the refusals"),
        );
    }
    let mut g1 = groups.pop().expect("rank 1");
    let mut g0 = groups.pop().expect("rank 0");
    let (mut a, mut b) = (vec![1.0f32, 2.0], vec![10.0f32, 20.0]);
    let (ra, rb) = tokio::join!(
        g0.all_reduce(&mut a, ReduceOp::Sum),
        g1.all_reduce(&mut b, ReduceOp::Sum)
    );
    ra.expect("rank 0");
    rb.expect("rank 1");
    assert_eq!((a, b), (vec![11.0, 22.0], vec![11.0, 22.0]));
}
