//! The authenticated rendezvous: a peer without the run's collective key is dropped and learns
//! nothing about the group, a listener without it gets no settings from a connecting rank, and
//! connections that say nothing cannot starve a rendezvous.

mod common;

use std::time::{Duration, Instant};

use common::cfg;
use rlhf_comm::{
    bind_local, Collective, CollectiveKey, CommError, GroupConfig, ReduceOp, TcpGroup,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Slack for scheduling on a loaded 2-core machine on top of the timeout bound.
const MARGIN: Duration = Duration::from_secs(1);

/// Forms the 2-rank group of `cfg` on `listeners` and checks it adds.
async fn form_and_sum(
    listeners: Vec<tokio::net::TcpListener>,
    addrs: Vec<std::net::SocketAddr>,
    timeout: Duration,
) {
    let tasks: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.clone();
            tokio::spawn(async move {
                let mut g = TcpGroup::connect(cfg(rank, 2, timeout), l, addrs).await?;
                let mut v = vec![rank as f32 + 1.0; 3];
                g.all_reduce(&mut v, ReduceOp::Sum).await?;
                Ok::<_, CommError>(v)
            })
        })
        .collect();
    for (rank, t) in tasks.into_iter().enumerate() {
        let v = t
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        assert_eq!(v, vec![3.0; 3], "rank {rank}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_key_is_dropped_and_learns_nothing() {
    let timeout = Duration::from_secs(5);
    let (listeners, addrs) = bind_local(2).await.expect("bind");
    // The group id is chosen so that its bytes would be recognisable in anything sent back.
    let group_id = 0x5EC2_E71D_u64;
    let stranger = CollectiveKey::from_run_token(b"another run's token");

    // A stranger that knows the protocol, the group id, the world and its rank, but not the key.
    let rogue_cfg = GroupConfig {
        key: stranger.clone(),
        group_id,
        ..cfg(1, 2, timeout)
    };
    let rank0_cfg = GroupConfig {
        group_id,
        ..cfg(0, 2, timeout)
    };
    let mut listeners = listeners.into_iter();
    let (l0, l1) = (listeners.next().expect("l0"), listeners.next().expect("l1"));
    let rank0 = {
        let addrs = addrs.clone();
        tokio::spawn(async move { TcpGroup::connect(rank0_cfg, l0, addrs).await })
    };
    let (mut own, own_addr) = bind_local(1).await.expect("bind");
    let start = Instant::now();
    let e = TcpGroup::connect(rogue_cfg, own.remove(0), vec![addrs[0], own_addr[0]])
        .await
        .expect_err("wrong key");
    // The stranger's own check of rank 0 fails first (rank 0 cannot prove a key the stranger
    // holds), and it is told nothing by rank 0: no group id, no reason.
    assert!(matches!(e, CommError::Refused { peer: 0, .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("did not prove this run's collective key"),
        "{msg}"
    );
    assert!(!msg.contains(&group_id.to_string()), "{msg}");
    assert!(start.elapsed() < timeout, "took {:?}", start.elapsed());

    // A stranger that skips that check and sends a forged tag is closed without a word.
    let mut raw = TcpStream::connect(addrs[0]).await.expect("connect");
    let mut opening = b"RLHFCOMM".to_vec();
    opening.extend_from_slice(&2u32.to_le_bytes());
    opening.extend_from_slice(&[7u8; 32]);
    raw.write_all(&opening).await.expect("opening");
    let mut challenge = [0u8; 64];
    raw.read_exact(&mut challenge).await.expect("challenge");
    assert!(
        !challenge.windows(8).any(|w| w == group_id.to_le_bytes()),
        "the challenge carries the group id"
    );
    let mut forged = Vec::new();
    forged.extend_from_slice(&1u32.to_le_bytes()); // rank
    forged.extend_from_slice(&2u32.to_le_bytes()); // world
    forged.extend_from_slice(&(64u32 * 1024).to_le_bytes()); // chunk_bytes
    forged.extend_from_slice(&group_id.to_le_bytes());
    forged.extend_from_slice(&[0u8; 32]); // a tag it cannot compute
    raw.write_all(&forged).await.expect("forged settings");
    let mut reply = Vec::new();
    raw.read_to_end(&mut reply)
        .await
        .expect("read until closed");
    assert!(reply.is_empty(), "the stranger was answered: {reply:?}");

    // The real rank 1 still gets in within the timeout.
    let rank1_cfg = GroupConfig {
        group_id,
        ..cfg(1, 2, timeout)
    };
    let g1 = tokio::spawn(async move { TcpGroup::connect(rank1_cfg, l1, addrs).await });
    let (g0, g1) = (rank0.await.expect("task"), g1.await.expect("task"));
    let (mut g0, mut g1) = (g0.expect("rank 0 forms"), g1.expect("rank 1 forms"));
    let (mut a, mut b) = (vec![1.0f32], vec![2.0f32]);
    let (ra, rb) = tokio::join!(
        g0.all_reduce(&mut a, ReduceOp::Sum),
        g1.all_reduce(&mut b, ReduceOp::Sum)
    );
    ra.expect("rank 0");
    rb.expect("rank 1");
    assert_eq!((a, b), (vec![3.0], vec![3.0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_without_the_key_gets_no_settings() {
    let timeout = Duration::from_secs(3);
    // A listener that answers the opening with a challenge and a tag under another key.
    let (mut ls, addrs) = bind_local(1).await.expect("bind");
    let fake = ls.remove(0);
    let fake_side = tokio::spawn(async move {
        let (mut s, _) = fake.accept().await.expect("accept");
        let mut opening = [0u8; 44];
        s.read_exact(&mut opening).await.expect("opening");
        s.write_all(&[9u8; 64]).await.expect("answer");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.expect("read until closed");
        rest
    });
    let (mut own, own_addr) = bind_local(1).await.expect("bind");
    let e = TcpGroup::connect(
        cfg(1, 2, timeout),
        own.remove(0),
        vec![addrs[0], own_addr[0]],
    )
    .await
    .expect_err("the listener has no key");
    assert!(
        matches!(e, CommError::Refused { peer: 0, .. })
            && e.to_string()
                .contains("did not prove this run's collective key"),
        "{e}"
    );
    let rest = fake_side.await.expect("fake listener");
    assert!(
        rest.is_empty(),
        "the rank sent its settings to a stranger: {rest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_silent_connections_do_not_stop_a_rendezvous() {
    // Shorter than a handshake's own deadline (5 s): a rank that waited out one silent socket
    // before looking at the next would miss the rendezvous.
    let timeout = Duration::from_secs(3);
    let (listeners, addrs) = bind_local(2).await.expect("bind");
    let mut silent = Vec::new();
    for i in 0..50 {
        silent.push(
            TcpStream::connect(addrs[i % 2])
                .await
                .expect("silent connection"),
        );
    }
    // Half of them also stall halfway, after a valid opening.
    for s in silent.iter_mut().step_by(2) {
        let mut opening = b"RLHFCOMM".to_vec();
        opening.extend_from_slice(&2u32.to_le_bytes());
        opening.extend_from_slice(&[1u8; 32]);
        s.write_all(&opening).await.expect("opening");
    }
    let start = Instant::now();
    form_and_sum(listeners, addrs, timeout).await;
    assert!(
        start.elapsed() < timeout + MARGIN,
        "took {:?}",
        start.elapsed()
    );
    drop(silent);
}
