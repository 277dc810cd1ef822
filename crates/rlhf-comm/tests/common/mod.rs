//! Shared by the integration tests: forming real groups on loopback, one tokio task per rank.
// Each test file uses part of it.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use rlhf_comm::{bind_local, CollectiveKey, GroupConfig, TcpGroup};

/// A test group: short timeout, and small chunks so that even modest buffers cross several
/// frames (the pipelining paths) while the tests stay fast.
pub fn cfg(rank: usize, world: usize, timeout: Duration) -> GroupConfig {
    GroupConfig {
        timeout,
        chunk_bytes: 64 * 1024,
        ..GroupConfig::new(key(), 7, rank, world)
    }
}

/// The key of the tests' run.
pub fn key() -> CollectiveKey {
    CollectiveKey::from_run_token(b"test-run-token")
}

/// Forms a `world`-rank group on loopback and runs `body` on every rank concurrently, each in
/// its own task; returns the bodies' results by rank.
pub async fn run<T, F, Fut>(world: usize, timeout: Duration, body: F) -> Vec<T>
where
    F: Fn(TcpGroup) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let (listeners, addrs) = bind_local(world).await.expect("bind loopback listeners");
    let tasks: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (body, addrs) = (body.clone(), addrs.clone());
            tokio::spawn(async move {
                let g = TcpGroup::connect(cfg(rank, world, timeout), listener, addrs)
                    .await
                    .unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                body(g).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(world);
    for t in tasks {
        out.push(t.await.expect("rank task panicked"));
    }
    out
}
